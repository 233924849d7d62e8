"""Fidelity evaluation of pruning methods: how much does the pruned model still answer like the full one.

For each evaluation sample (disjoint from the calibration's samples) the full model and the model pruned by
each (method, keep) run ``generate`` greedily for a few tokens. From them:

- ``kl``: KL(full || pruned) of the answer's first-token distribution (the logits of the last prompt
  position), in nats, float64;
- ``top1_agree``: the first answer token is the same;
- ``exact_agree``: the generated answers (up to EOS, at most ``max_new_tokens``) are identical;
- ``accuracy``: the answer's first word against a yes/no label (POPE, MME) when the source has one;
- ``flops``: PosPrune Eq. 8 summed over decoder layers, ``4 n d^2 + 2 n^2 d + 2 n d m`` with ``n`` the
  tokens that layer processed during prefill (text + visual), ``d`` the hidden size, ``m`` the MLP size;
- ``prefill_ms``: wall time of the prefill forward (inside ``generate``); ``peak_mem_mib``: peak RSS
  growth during the call (CPU; CUDA: ``max_memory_allocated``).

Each method is then compared with FastV on the same samples by a paired test (:mod:`posbias.evaluate.paired`):
``results[].paired`` holds the mean per-sample difference in KL and agreement, its bootstrap interval, the
Wilcoxon signed-rank p-value and a verdict (better / not distinguishable / worse).

What each measure answers: KL and agreement, fidelity to the full model (a method that keeps what the full
model attends to, positional bias included, scores well); accuracy, task quality (needs labels and a trained
model); the position-invariance probe (:mod:`posbias.evaluate.probe`), whether a method keeps the same content
wherever it sits in the image.

The JSON written by :func:`write_evaluation` is specified in docs/evaluation.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posbias.artifacts.calibration import Calibration, dumps, utc_now
from posbias.errors import PosbiasError

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "EvaluationConfig",
    "kl_divergence",
    "layer_flops",
    "prefill_flops",
    "peak_memory",
    "pin_mmap_threshold",
    "calibration_sample_ids",
    "evaluate",
    "write_evaluation",
    "format_table",
]

#: which question each measure answers (recorded in the evaluation JSON and shown by the report)
MEASURE_QUESTIONS: dict[str, str] = {
    "kl, top1_agreement, exact_agreement": "fidelity to the full model (not task quality: keeping what the full "
                                           "model attends to, positional bias included, scores well)",
    "accuracy": "task quality (needs labelled samples and a trained model)",
    "probe": "positional invariance: is the same content kept wherever it sits (profile-bias evaluate --probe)",
}

SCHEMA_NAME = "posbias.evaluation"
SCHEMA_VERSION = 1


@dataclass
class EvaluationConfig:
    """What to evaluate.

    Attributes
    ----------
    methods : list of str
        Pruning methods: any registered in :mod:`posbias.runtime.registry` (the built-ins and those registered
        later with :func:`~posbias.runtime.registry.register_method`).
    keeps : list of int
        Kept visual tokens per budget.
    n : int
        Evaluation samples.
    data : list of str
        Sample sources (``SOURCE[:PATH]``), default the embedded photos.
    seed : int
        Seed of the sample plan.
    max_new_tokens : int
        Length of the greedy answer compared for exact agreement.
    params : dict
        Per-method parameter overrides ``{method: {name: value}}``.
    store : str or None
        The calibration's profile store (its sample ids are excluded); default: the store named in the
        calibration, next to the calibration file.
    """

    methods: list[str]
    keeps: list[int]
    n: int = 16
    data: list[str] = field(default_factory=lambda: ["embedded"])
    seed: int = 0
    max_new_tokens: int = 8
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    store: str | None = None


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """KL(p || q) in nats between the softmax of two (vocab,) logit vectors, computed in float64."""
    lp = torch.log_softmax(logits_p.double(), dim=-1)  # (vocab,)
    lq = torch.log_softmax(logits_q.double(), dim=-1)  # (vocab,)
    return float(max(0.0, float((lp.exp() * (lp - lq)).sum())))


def layer_flops(n: int, d: int, m: int) -> float:
    """PosPrune Eq. 8: attention + MLP FLOPs of one decoder layer over ``n`` tokens."""
    return 4.0 * n * d * d + 2.0 * n * n * d + 2.0 * n * d * m


def prefill_flops(tokens_per_layer: list[int], d: int, m: int) -> float:
    """Sum of :func:`layer_flops` over the decoder layers of one prefill."""
    return float(sum(layer_flops(int(n), d, m) for n in tokens_per_layer))


def calibration_sample_ids(calibration: Calibration, calibration_path: str | Path | None,
                           store: str | Path | None = None) -> list[str]:
    """Sample ids the calibration was fitted on, read from its profile store.

    The store is ``store`` when given, else the file named in the calibration's ``store.file`` next to the
    calibration file. A missing store is an error (the evaluation could not prove disjointness).
    """
    name = calibration.store["file"]
    if store is not None:
        path = Path(store)
    elif calibration_path is not None:
        path = Path(calibration_path).parent / name
    else:
        raise PosbiasError("cannot find the calibration's profile store; pass store=PATH to exclude its samples")
    from posbias.profiler.store import ProfileStore, store_exists

    if not (path.exists() or store_exists(path)):
        raise PosbiasError(
            f"the calibration's profile store {path} does not exist; pass store=PATH (the {name} the "
            "calibration was fitted on) so that its samples can be excluded"
        )
    with ProfileStore(path) as st:
        return list(st.sample_ids)


class _PrefillTimer:
    """Times the first forward call (the prefill) of the next ``generate``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.ms: float | None = None
        self._t0 = 0.0
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, module: Any, args: tuple) -> None:
        if self.ms is None:
            self._t0 = time.perf_counter()

    def _post(self, module: Any, args: tuple, output: Any) -> None:
        if self.ms is None:
            self.ms = 1000.0 * (time.perf_counter() - self._t0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def pin_mmap_threshold(threshold: int = 131072) -> bool:
    """Fix glibc's mmap threshold for this process so that sampled-RSS peaks see every large buffer.

    glibc raises its mmap threshold after a large buffer is freed; later buffers of that size then come from
    the heap and stay resident after their free, so a second forward reuses them and its RSS barely grows:
    :func:`peak_memory` would under-read (to ~0). ``mallopt(M_MMAP_THRESHOLD, threshold)`` fixes the threshold
    (and turns the dynamic adjustment off): every buffer above it is an mmap that RSS sees come and go. It
    changes allocation for the whole process, so only measurement processes call it (``profile-bias
    evaluate`` does, before loading the model); setting ``MALLOC_MMAP_THRESHOLD_`` before start has the
    same effect.

    Returns
    -------
    bool
        True when the threshold was set (glibc), False elsewhere (then RSS peaks may under-read).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD
    return bool(mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(int(threshold))))


def peak_memory(fn: Any, device: Any = "cpu", *, interval: float = 0.001) -> tuple[Any, float | None]:
    """Run ``fn``; (result, peak memory growth in MiB) — CUDA allocator peak, or RSS sampled every
    ``interval`` seconds on CPU (None when psutil is missing)."""
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        import threading

        import psutil
    except ImportError:  # pragma: no cover - psutil ships with the dev install
        return fn(), None
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return out, (peak[0] - base) / 2**20


def _answer_tokens(seq: torch.Tensor, eos: set[int]) -> list[int]:
    out: list[int] = []
    for t in seq.tolist():
        if t in eos:
            break
        out.append(int(t))
    return out


def _yes_no(text: str) -> str | None:
    words = "".join(ch if ch.isalpha() else " " for ch in text.lower()).split()
    for w in words[:3]:
        if w in ("yes", "no"):
            return w
    return None


def _run(model: Any, inputs: dict[str, Any], max_new_tokens: int, eos: set[int]) -> dict[str, Any]:
    timer = _PrefillTimer(model)
    try:
        with torch.inference_mode():
            out, mem = peak_memory(
                lambda: model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True),
                model.device,
            )
    finally:
        timer.remove()
    n_prompt = int(inputs["input_ids"].shape[1])
    return {
        "logits": out.logits[0][0].detach().float().cpu(),  # (vocab,) first answer token
        "tokens": _answer_tokens(out.sequences[0, n_prompt:], eos),
        "prefill_ms": timer.ms,
        "peak_mem_mib": mem,
    }


def _mean_sem(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def evaluate(
    adapter: Any,
    calibration: Calibration,
    config: EvaluationConfig,
    *,
    calibration_path: str | Path | None = None,
    exclude_ids: list[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the fidelity evaluation and return the evaluation document (see docs/evaluation.md).

    Parameters
    ----------
    adapter : posbias adapter
        The loaded model (its fingerprint must match the calibration's).
    calibration : Calibration
    config : EvaluationConfig
    calibration_path : str or Path, optional
        Where the calibration was read from (to find its store).
    exclude_ids : list of str, optional
        Sample ids to exclude; default: read from the calibration's store.
    progress : bool
        Print one line per sample.
    """
    from posbias.artifacts.fingerprint import model_fingerprint
    from posbias.data.base import BadSample
    from posbias.data.registry import plan_samples, resolve_sources
    from posbias.runtime.prune import enable_pruning
    from posbias.runtime.registry import known_methods
    from posbias.runtime.spec import resolve_method

    model = adapter.model
    fingerprint = model_fingerprint(model.config.to_dict())
    calibration.check_fingerprint(fingerprint, model_id=adapter.model_id)
    known = known_methods()
    bad = [m for m in config.methods if m not in known]
    if bad:
        raise PosbiasError(f"unknown method(s) {bad} in methods; use any of {', '.join(known)}")
    if not config.keeps or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in config.keeps):
        raise PosbiasError(f"keeps={config.keeps}: give positive integers, e.g. 64,128,192")
    if isinstance(config.n, bool) or not isinstance(config.n, int) or config.n < 1:
        raise PosbiasError(f"n={config.n!r} must be a positive integer")
    # every (method, keep) is resolved before any compute: missing parameters, budgets, layers fail here
    for m in config.methods:
        for k in config.keeps:
            resolve_method(model, calibration, method=m, keep=k, params=config.params.get(m))
    if exclude_ids is None:
        exclude_ids = calibration_sample_ids(calibration, calibration_path, config.store)
    excluded = set(exclude_ids)

    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d, mlp = int(text_cfg.hidden_size), int(text_cfg.intermediate_size)
    n_layers = int(text_cfg.num_hidden_layers)
    eos_cfg = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos_cfg if isinstance(eos_cfg, list) else ([eos_cfg] if eos_cfg is not None else []))

    plan = plan_samples(resolve_sources(config.data), None, config.seed)
    per_sample: list[dict[str, Any]] = []
    full_rows: list[dict[str, Any]] = []
    sample_ids: list[str] = []
    skipped: list[dict[str, str]] = []  # samples that could not be read: id and why (in the document, printed)
    for src, index in plan:
        if len(sample_ids) >= config.n:
            break
        if src.sample_id(index) in excluded:
            continue
        try:
            sample = src.load(index)
        except BadSample as exc:
            skipped.append({"id": exc.sample_id, "reason": exc.reason})
            continue
        inputs = adapter.prepare(sample.image, sample.question)
        n_visual = adapter.layout(inputs).n_visual
        seq_len = int(inputs["input_ids"].shape[1])
        label = sample.answer.strip().lower() if isinstance(sample.answer, str) else None
        label = label if label in ("yes", "no") else None
        full = _run(model, inputs, config.max_new_tokens, eos)
        full_text = adapter.processor.tokenizer.decode(full["tokens"]) if hasattr(adapter.processor, "tokenizer") else ""
        full_rows.append({
            "id": sample.id, "prefill_ms": full["prefill_ms"], "flops": prefill_flops([seq_len] * n_layers, d, mlp),
            "correct": (None if label is None else _yes_no(full_text) == label), "peak_mem_mib": full["peak_mem_mib"],
        })
        sample_ids.append(sample.id)
        for m in config.methods:
            for k in config.keeps:
                if k > n_visual:
                    raise PosbiasError(f"keep {k} exceeds the {n_visual} visual tokens of sample {sample.id}")
                # force: the evaluation measures every method, unusable fits included (the report shows verdicts)
                with enable_pruning(model, calibration, method=m, keep=k, params=config.params.get(m), force=True) as pruner:
                    res = _run(model, inputs, config.max_new_tokens, eos)
                    rec = pruner.last
                assert rec is not None
                text = adapter.processor.tokenizer.decode(res["tokens"]) if hasattr(adapter.processor, "tokenizer") else ""
                per_sample.append({
                    "id": sample.id,
                    "method": m,
                    "keep": k,
                    "kl": kl_divergence(full["logits"], res["logits"]),
                    "top1_agree": bool(int(full["logits"].argmax()) == int(res["logits"].argmax())),
                    "exact_agree": bool(full["tokens"] == res["tokens"]),
                    "correct": None if label is None else bool(_yes_no(text) == label),
                    "kept": [int(x) for x in rec.kept.tolist()],
                    "n_visual": n_visual,
                    "flops": prefill_flops(rec.tokens_per_layer, d, mlp),
                    "flops_full": full_rows[-1]["flops"],
                    "prefill_ms": res["prefill_ms"],
                    "prefill_ms_full": full["prefill_ms"],
                    "peak_mem_mib": res["peak_mem_mib"],
                    "select_ms": rec.select_ms,
                })
        if progress:
            print(f"[{len(sample_ids)}/{config.n}] {sample.id}", flush=True)
    if not sample_ids:
        raise PosbiasError("no evaluation samples left after excluding the calibration's samples; add data sources")

    results = []
    for m in config.methods:
        for k in config.keeps:
            rows = [r for r in per_sample if r["method"] == m and r["keep"] == k]
            kl_mean, kl_sem = _mean_sem([r["kl"] for r in rows])
            labelled = [r["correct"] for r in rows if r["correct"] is not None]
            flops = sum(r["flops"] for r in rows) / len(rows)
            flops_full = sum(r["flops_full"] for r in rows) / len(rows)
            mems = [r["peak_mem_mib"] for r in rows if r["peak_mem_mib"] is not None]
            results.append({
                "method": m,
                "keep": k,
                "n": len(rows),
                "kl_mean": kl_mean,
                "kl_sem": kl_sem,
                "top1_agreement": sum(r["top1_agree"] for r in rows) / len(rows),
                "exact_agreement": sum(r["exact_agree"] for r in rows) / len(rows),
                "accuracy": (sum(labelled) / len(labelled)) if labelled else None,
                "flops": flops,
                "flops_ratio": flops / flops_full,
                "prefill_ms": sum(r["prefill_ms"] for r in rows) / len(rows),
                "prefill_ms_full": sum(r["prefill_ms_full"] for r in rows) / len(rows),
                "peak_mem_mib": (sum(mems) / len(mems)) if mems else None,
                "select_ms": sum(r["select_ms"] for r in rows) / len(rows),
            })
    from posbias.evaluate.paired import paired_comparisons

    comparisons = paired_comparisons(per_sample, baseline="fastv", seed=config.seed)
    for r in results:
        r["paired"] = comparisons.get((r["method"], r["keep"]))
    labelled_full = [r["correct"] for r in full_rows if r["correct"] is not None]
    full_mems = [r["peak_mem_mib"] for r in full_rows if r["peak_mem_mib"] is not None]
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "created": utc_now(),
        "model": {"id": adapter.model_id, "fingerprint": fingerprint, "adapter": adapter.name},
        "calibration": {"file": str(calibration_path) if calibration_path is not None else calibration.source,
                        "fingerprint": calibration.fingerprint},
        "n_samples": len(sample_ids),
        "sample_ids": sample_ids,
        "excluded": len(excluded),
        "skipped": skipped,
        "settings": {"max_new_tokens": config.max_new_tokens, "seed": config.seed, "data": list(config.data),
                     "params": config.params},
        "full": {
            "accuracy": (sum(labelled_full) / len(labelled_full)) if labelled_full else None,
            "prefill_ms": sum(r["prefill_ms"] for r in full_rows) / len(full_rows),
            "flops": sum(r["flops"] for r in full_rows) / len(full_rows),
            "peak_mem_mib": (sum(full_mems) / len(full_mems)) if full_mems else None,
        },
        "paired_baseline": "fastv" if "fastv" in config.methods else None,
        "measures": MEASURE_QUESTIONS,
        "results": results,
        "per_sample": [{k: v for k, v in r.items() if k not in ("flops_full", "prefill_ms_full")} for r in per_sample],
    }


def write_evaluation(doc: dict[str, Any], path: str | Path) -> Path:
    """Write the evaluation document as canonical JSON (sorted keys, no NaN)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise PosbiasError(f"cannot write {p}: directory {p.parent} does not exist; create it first")
    from posbias.atomic import atomic_write_text

    return atomic_write_text(p, dumps(doc))


def format_table(doc: dict[str, Any]) -> str:
    """The terminal table of an evaluation document."""
    head = ("method", "keep", "n", "KL mean", "± sem", "top-1", "exact", "acc", "FLOPs", "ratio", "prefill ms", "full ms",
            "ΔKL vs FastV [95% CI]", "p", "verdict (KL)", "Δtop-1", "verdict (top-1)")
    rows = [head]
    for r in doc["results"]:
        pr = r.get("paired")
        if pr:
            kl, t1 = pr["kl"], pr["top1"]
            ci = kl["ci"]
            paired = (f"{kl['mean']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci[0] is not None else f"{kl['mean']:+.4f}",
                      f"{kl['p']:.2g}", kl["verdict"], f"{t1['mean']:+.2f}", t1["verdict"])
        else:
            paired = ("baseline" if r["method"] == doc.get("paired_baseline") else "-", "-", "-", "-", "-")
        rows.append((
            r["method"], str(r["keep"]), str(r["n"]),
            f"{r['kl_mean']:.4f}", "-" if r["kl_sem"] is None else f"{r['kl_sem']:.4f}",
            f"{r['top1_agreement']:.2f}", f"{r['exact_agreement']:.2f}",
            "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}",
            f"{r['flops'] / 1e9:.2f}G", f"{r['flops_ratio']:.3f}",
            f"{r['prefill_ms']:.0f}", f"{r['prefill_ms_full']:.0f}", *paired,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    need = [(r["method"], r["keep"], r["paired"]["kl"]["n_needed"]) for r in doc["results"]
            if r.get("paired") and r["paired"]["kl"]["verdict"] == "not distinguishable" and r["paired"]["kl"]["n_needed"]]
    if need:
        lines.append("not distinguishable from FastV on KL; samples a paired test would need at the observed effect: "
                     + ", ".join(f"{m}@{k} ~{n}" for m, k, n in need))
    lines.append("KL and agreement measure fidelity to the full model, not task quality (accuracy needs labels "
                 "and a trained model).")
    return "\n".join(lines)

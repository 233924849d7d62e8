"""Capture cost on demo-llava: time and peak memory of the profiling forward vs a plain sdpa forward,
and vs eager ``output_attentions`` (the N x N way), at the demo prompt length and a longer one.

Run: python benchmarks/bench_capture.py [--repeats 7] [--json out.json]
Prints ratios measured side by side in one run (forwards interleaved so machine noise hits both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mem import fix_mmap_threshold  # noqa: E402



def _inputs(adapter, words: int):
    from skimage import data
    from PIL import Image

    image = Image.fromarray(data.astronaut())
    question = "Describe the image." + " Please look carefully at every part of it." * words
    inputs = adapter.prepare(image, question)
    return inputs, adapter.layout(inputs)


def main() -> None:
    fix_mmap_threshold()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo-llava")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    from posbias.evaluate.fidelity import peak_memory
    from posbias.models import load_adapter
    from posbias.profiler.capture import LastTokenAttentionCapture

    adapter = load_adapter(args.model)
    results: dict[str, object] = {"model": args.model, "threads": torch.get_num_threads()}

    # --- time: plain sdpa forward vs capture forward, interleaved -------------------------------
    inputs, layout = _inputs(adapter, 0)
    results["seq_len"] = layout.seq_len
    results["n_visual"] = layout.n_visual
    capture = LastTokenAttentionCapture(adapter)
    adapter.forward_last_logits(inputs)  # warm-up
    with capture:
        capture.run(inputs, layout)
    plain_t, cap_t = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        adapter.forward_last_logits(inputs)
        plain_t.append(time.perf_counter() - t0)
        with capture:
            t0 = time.perf_counter()
            capture.run(inputs, layout)
            cap_t.append(time.perf_counter() - t0)
    results["plain_forward_s"] = statistics.median(plain_t)
    results["capture_forward_s"] = statistics.median(cap_t)
    results["capture_time_ratio"] = results["capture_forward_s"] / results["plain_forward_s"]

    # --- memory: capture vs plain vs eager output_attentions, at two prompt lengths ------------
    mem = []
    for words in (0, 150):
        inputs, layout = _inputs(adapter, words)
        _, plain_b = peak_memory(lambda: adapter.forward_last_logits(inputs), interval=0.0005)

        def cap_fn():
            with capture:
                return capture.run(inputs, layout)

        _, cap_b = peak_memory(cap_fn, interval=0.0005)
        lm = adapter.language_model()
        previous = lm.config._attn_implementation
        lm.set_attn_implementation("eager")
        try:
            _, eager_b = peak_memory(
                lambda: adapter.model(**inputs, output_attentions=True, use_cache=False, logits_to_keep=1),
                interval=0.0005,
            )
        finally:
            lm.set_attn_implementation(previous)
        mem.append(
            {
                "seq_len": layout.seq_len,
                "plain_peak_mib": plain_b,
                "capture_peak_mib": cap_b,
                "eager_output_attentions_peak_mib": eager_b,
                "capture_over_plain": cap_b / max(plain_b, 1e-6),
                "capture_over_eager": cap_b / max(eager_b, 1e-6),
            }
        )
    results["memory"] = mem

    print(f"capture overhead on {args.model} ({results['seq_len']} tokens, {results['n_visual']} visual, "
          f"{results['threads']} threads, median of {args.repeats}):")
    print(f"  plain sdpa forward   {results['plain_forward_s'] * 1000:8.1f} ms")
    print(f"  capture forward      {results['capture_forward_s'] * 1000:8.1f} ms")
    print(f"  ratio capture/plain  {results['capture_time_ratio']:8.3f}   (target <= 1.15)")
    print("peak RSS above the pre-forward level (MiB):")
    print(f"  {'tokens':>7} {'plain':>9} {'capture':>9} {'eager+attn':>11} {'cap/plain':>10} {'cap/eager':>10}")
    for m in mem:
        print(f"  {m['seq_len']:>7} {m['plain_peak_mib']:>9.1f} {m['capture_peak_mib']:>9.1f} "
              f"{m['eager_output_attentions_peak_mib']:>11.1f} {m['capture_over_plain']:>10.2f} {m['capture_over_eager']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Fault injection for the command line: run ``profile-bias`` commands with faults and judge the outcome.

Used by ``tests/test_faults_*.py`` and by ``benchmarks/faults.py`` (the figures of docs/reliability.md).

Commands run in children forked from a *zygote*: one Python process, started with one thread per
library, that imports posbias, torch and transformers once and never computes, so forking it is safe and
each command starts in milliseconds instead of seconds. A child runs ``posbias.cli.main`` in its own
process group with stdout/stderr in files, after installing the requested fault:

* ``{"kill": "replace"|"fsync", "at": n}``: SIGKILL the process group just before the n-th call;
* ``{"errno": "ENOSPC", "on": "replace"|"fsync"|"write", "at": n}``: that call (``write``: ``os.write``
  on a file, what :mod:`posbias.atomic` writes bytes with) fails with that errno, from the n-th on;
* ``{"fsize": bytes}``: RLIMIT_FSIZE, the kernel refuses to grow any file past ``bytes`` (EFBIG), h5py's
  C writes included;
* nothing: a clean run (the caller may SIGKILL it after a delay: :meth:`Zygote.run` ``kill_after``).

Real faults of the machine come from :func:`tmpfs` (a small RAM file system, full on demand or
remounted read-only), which needs root and ``mount``; :func:`can_mount` says whether it works here.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_ZYGOTE = r'''
import errno, json, os, signal, sys
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy, torch, h5py, transformers  # noqa: F401  (warm imports, shared by every child)
import posbias.cli, posbias.models.tiny, posbias.reports.html, posbias.pipeline  # noqa: F401
import posbias.evaluate, posbias.profiler.utr, posbias.solvers.store, posbias.reports.pdf  # noqa: F401
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: F401
import matplotlib.backends.backend_pdf, matplotlib.backends.backend_agg  # noqa: F401
posbias.models.tiny.tiny_llava(seed=0)  # every lazy import of building and running the tiny model
torch.set_num_threads(1)

def install(fault):
    if not fault:
        return
    if "fsize" in fault:
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(fault["fsize"]), int(fault["fsize"])))
        return
    op = fault.get("kill") or fault.get("on")
    at = int(fault.get("at", 1))
    code = getattr(errno, fault["errno"]) if "errno" in fault else None
    count = [0]
    def hit():
        count[0] += 1
        if count[0] < at:
            return False
        if code is None:
            if count[0] == at:
                sys.stdout.flush(); sys.stderr.flush()
                os.killpg(0, signal.SIGKILL)
            return False
        return True
    if op in ("replace", "fsync"):
        orig = getattr(os, op)
        def patched(*a, **k):
            if hit():
                raise OSError(code, os.strerror(code))
            return orig(*a, **k)
        setattr(os, op, patched)
    elif op == "write":  # os.write: what posbias.atomic writes JSON, HTML and PDF bytes with
        orig_write = os.write
        def w(fd, data):
            if fd > 2 and hit():
                raise OSError(code, os.strerror(code))
            return orig_write(fd, data)
        os.write = w

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            os.chdir(req["cwd"])
            for k, v in req.get("env", {}).items():
                os.environ[k] = v
            out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1); os.dup2(err, 2)
            install(req.get("fault"))
            rc = posbias.cli.main(req["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback; traceback.print_exc(); rc = 99
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(int(rc or 0))
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status}), flush=True)
'''


@dataclass
class Outcome:
    """How one command ended."""

    rc: int | None  # exit status, None when killed by a signal
    signal: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def killed(self) -> bool:
        return self.signal == signal.SIGKILL

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("profile-bias: error:")]


class Zygote:
    """A warm Python process that forks one child per command (see the module docstring)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(self.workdir))
        self._n = 0

    def run(self, argv: list[str], *, fault: dict | None = None, kill_after: float | None = None,
            env: dict[str, str] | None = None) -> Outcome:
        """Run ``profile-bias ARGV`` in a fresh child; SIGKILL its process group after ``kill_after`` s."""
        self._n += 1
        out, err = self.workdir / f"out{self._n}.txt", self.workdir / f"err{self._n}.txt"
        req = {"argv": [str(a) for a in argv], "fault": fault, "stdout": str(out), "stderr": str(err),
               "cwd": str(self.workdir), "env": env or {}}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        start = time.perf_counter()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if kill_after is not None:
            time.sleep(kill_after)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fault zygote died")
        status = json.loads(line)["status"]
        seconds = time.perf_counter() - start
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # helpers it forked (the report's PDF process), if any remain
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        return Outcome(rc, sig, out.read_text(errors="replace"), err.read_text(errors="replace"), seconds)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ------------------------------------------------------------------------------------- file systems


def can_mount() -> bool:
    """True when this process may mount a tmpfs (root with CAP_SYS_ADMIN, mount present)."""
    if os.geteuid() != 0:
        return False
    probe = Path(f"/tmp/.posbias-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return ok
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int = 64) -> Iterator[Path]:
    """Mount a tmpfs of ``size_mb`` at ``path`` for the block (unmounted after, even on failure)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    """Remount the tmpfs at ``path`` ``ro`` or ``rw``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the file system of folder ``path`` with one file, leaving about ``leave`` bytes free."""
    filler = path / ".filler"
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush on close
        block = b"\0" * (1 << 16)
        while True:
            try:
                if not fh.write(block):
                    break
            except OSError as exc:
                if exc.errno != _errno.ENOSPC:
                    raise
                break
    with contextlib.suppress(OSError):
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


# ----------------------------------------------------------------------------------------- judging


def digest(path: Path) -> str | None:
    """sha256 of a file (None when absent); a store's segment folder counts as part of it."""
    if not path.exists():
        return None
    h = hashlib.sha256(path.read_bytes() if path.is_file() else b"")
    parts = path.with_name(path.name + ".parts")
    if parts.is_dir():
        for seg in sorted(parts.iterdir()):
            if seg.is_file() and seg.name != "LOCK":
                h.update(seg.name.encode() + seg.read_bytes())
    return h.hexdigest()


def whole(path: Path) -> bool:
    """True when ``path`` is a complete output of its kind (JSON, HTML, PDF, profile store)."""
    try:
        if path.suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(doc, dict) and "schema" in doc
        if path.suffix == ".html":
            return path.read_text(encoding="utf-8").rstrip().endswith("</html>")
        if path.suffix == ".pdf":
            data = path.read_bytes()
            return data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
        if path.suffix == ".h5" or path.name.endswith(".h5"):
            from posbias.profiler.store import ProfileStore

            with ProfileStore(path) as st:
                return st.n_samples >= 0 and len(st.sample_ids) == st.n_samples
    except Exception:  # noqa: BLE001 - anything unreadable is not whole
        return False
    return path.is_file()


def temps(folder: Path) -> list[str]:
    """Temporary files left in ``folder`` (and in store segment folders below it)."""
    found = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] if folder.is_dir() else []
    for parts in folder.glob("*.parts") if folder.is_dir() else []:
        found += [f"{parts.name}/{p.name}" for p in parts.iterdir() if p.name.endswith(".tmp")]
    return sorted(found)


def judge(outputs: dict[Path, str | None]) -> list[str]:
    """Problems with the outputs after a faulty run: ``outputs`` maps each output path to its digest before.

    An output is fine when it is byte-identical to before, or whole. Lost: it existed and is gone or not whole.
    """
    problems = []
    for path, before in outputs.items():
        now = digest(path)
        if now == before:
            continue
        if now is None:
            problems.append(f"{path.name} lost")
        elif not whole(path):
            problems.append(f"{path.name} corrupted")
    return problems


# ----------------------------------------------------------------------------------------- commands

#: every command that writes, in pipeline order
COMMANDS = ("profile", "utr", "fit", "solve", "evaluate", "report", "merge", "export")


@dataclass
class Base:
    """Finished outputs of every command on tiny-llava, made once (:func:`make_base`)."""

    dir: Path
    store: Path  # n=3 with /samples/utr_loss
    small: Path  # n=2 (a run to resume)
    cal: Path  # with a schedule for ratio 2
    evaluation: Path
    html: Path
    pdf: Path | None
    config: Path  # tiny-llava's config.json


def make_base(z: Zygote, folder: Path, *, pdf: bool = False) -> Base:
    """Run the pipeline once on tiny-llava into ``folder`` (about a minute on two loaded cores)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    run = [("profile", "--model", "tiny-llava", "--n", "2", "--out", folder / "small", "--no-progress")]
    run.append(("profile", "--model", "tiny-llava", "--n", "3", "--out", folder / "run", "--no-progress"))
    run.append(("utr", "--store", folder / "run" / "profile.h5", "--no-progress"))
    run.append(("fit", "--store", folder / "run" / "profile.h5", "--out", folder / "cal.json", "--no-stats"))
    run.append(("solve", "--store", folder / "run" / "profile.h5", "--ratios", "2", "--into", folder / "cal.json"))
    run.append(_evaluate_argv(folder / "cal.json", folder / "run" / "profile.h5", folder / "eval.json"))
    report = ["report", "--store", folder / "run" / "profile.h5", "--calibration", folder / "cal.json",
              "--html", folder / "report.html", "--pictures", "0"]
    run.append(tuple(report + (["--pdf", folder / "report.pdf"] if pdf else [])))
    for argv in run:
        o = z.run(list(argv))
        if o.rc != 0:
            raise RuntimeError(f"base run {argv[0]} failed: {o.stderr[-2000:]}")
    from posbias.models.tiny import tiny_llava

    ckpt = folder / "ckpt"
    tiny_llava(seed=0).model.config.save_pretrained(ckpt)
    shutil.copy(folder / "cal.json", ckpt / "posbias_calibration.json")
    return Base(folder, folder / "run" / "profile.h5", folder / "small" / "profile.h5", folder / "cal.json",
                folder / "eval.json", folder / "report.html", folder / "report.pdf" if pdf else None, ckpt / "config.json")


def _evaluate_argv(cal: Path, store: Path, out: Path) -> tuple:
    return ("evaluate", "--model", "tiny-llava", "--calibration", cal, "--store", store, "--keep", "4", "--n", "1",
            "--methods", "fastv", "--max-new-tokens", "1", "--out", out, "--no-progress", "--overwrite")


def setup_case(command: str, base: Base, d: Path, *, pdf: bool = False) -> tuple[list, list[Path], list]:
    """Put the pre-existing outputs of ``command`` into folder ``d``; returns (argv, outputs, resume argv)."""
    import shutil

    def copy(src: Path, dst: Path) -> Path:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return dst

    if command == "profile":
        out = copy(base.small, d / "run" / "profile.h5")
        argv = ["profile", "--model", "tiny-llava", "--n", "3", "--out", d / "run", "--resume", "--no-progress"]
        return argv, [out], argv
    if command == "utr":
        out = copy(base.store, d / "profile.h5")
        argv = ["utr", "--store", out, "--overwrite", "--no-progress"]
        return argv, [out], argv
    if command == "fit":
        out = copy(base.cal, d / "cal.json")
        argv = ["fit", "--store", base.store, "--out", out, "--no-stats", "--overwrite", "--seed", "1"]
        return argv, [out], argv
    if command == "solve":
        out = copy(base.cal, d / "cal.json")
        argv = ["solve", "--store", base.store, "--ratios", "2,2.5", "--into", out]
        return argv, [out], argv
    if command == "evaluate":
        out = copy(base.evaluation, d / "eval.json")
        argv = list(_evaluate_argv(base.cal, base.store, out))
        return argv, [out], argv
    if command == "report":
        outs = [copy(base.html, d / "report.html")]
        argv = ["report", "--store", base.store, "--calibration", base.cal, "--evaluation", base.evaluation,
                "--html", outs[0], "--pictures", "0", "--overwrite"]
        if pdf:  # the PDF too: an old one when the base has it, else a new one must appear whole or not at all
            outs.append(copy(base.pdf, d / "report.pdf") if base.pdf is not None else d / "report.pdf")
            argv += ["--pdf", outs[1]]
        return argv, outs, argv
    if command == "merge":
        out = copy(base.store, d / "merged.h5")
        argv = ["merge", base.store, "--out", out, "--overwrite"]
        return argv, [out], argv
    if command == "export":
        copy(base.config, d / "ckpt" / "config.json")
        out = copy(base.cal, d / "ckpt" / "posbias_calibration.json")
        argv = ["export", "--calibration", base.cal, "--to", d / "ckpt", "--overwrite"]
        return argv, [out], argv
    raise ValueError(command)

"""Fault injection on every command that writes (profile, utr, fit, solve, evaluate, report, merge, export).

Each case asserts: the exit code (killed, 74 for the machine's faults), one error line and no traceback,
every pre-existing output byte-identical or the new one whole, no temporary file left, and that the same
command succeeds once the cause is gone. Commands run in children of a warm zygote (tests/faults_kit.py)
on the tiny random LLaVA, so a case costs about what the command costs.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

import faults_kit as fk

MOUNT = fk.can_mount()
needs_mount = pytest.mark.skipif(not MOUNT, reason="mounting a tmpfs needs root and mount(8); injected faults still run")


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = fk.Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.fixture(scope="module")
def base(zygote, tmp_path_factory) -> fk.Base:
    return fk.make_base(zygote, tmp_path_factory.mktemp("base"))


def _after_fault(o: fk.Outcome, outputs: dict[Path, str | None], folder: Path, *, code: int, word: str) -> None:
    assert o.rc == code, (o.rc, o.signal, o.stderr[-1500:])
    assert not o.traceback, o.stderr[-1500:]
    assert len(o.error_lines) == 1, o.stderr
    assert word in o.error_lines[0], o.error_lines[0]
    assert fk.judge(outputs) == []
    assert fk.temps(folder) == [] and fk.temps(folder / "run") == []


def _recovers(zygote: fk.Zygote, argv: list, outputs: list[Path], folder: Path) -> None:
    o = zygote.run(argv)
    assert o.rc == 0 and not o.traceback, o.stderr[-1500:]
    assert all(fk.whole(p) for p in outputs)
    assert fk.temps(folder) == [] and fk.temps(folder / "run") == []


#: commands that take seconds (a model forward per sample, figures): one kill each here, more in benchmarks/faults.py
HEAVY = ("profile", "utr", "evaluate", "report")


@pytest.mark.parametrize("command", fk.COMMANDS)
def test_sigkill_leaves_the_old_output_or_the_new_one_whole(command, zygote, base, tmp_path):
    rng = random.Random(sum(map(ord, command)))
    # the riskiest moment (just before the new file is renamed over the old one), the moment it is made
    # durable, and a random time
    faults = [({"kill": "replace", "at": 1}, None)]
    if command not in HEAVY:
        faults += [({"kill": "fsync", "at": 1}, None), (None, rng.uniform(0.05, 1.0))]
    for k, (fault, delay) in enumerate(faults):
        d = tmp_path / f"k{k}"
        argv, outs, again = fk.setup_case(command, base, d, pdf=(command == "report"))
        before = {p: fk.digest(p) for p in outs}
        o = zygote.run(argv, fault=fault, kill_after=delay)
        assert o.killed or o.rc == 0, (o.rc, o.stderr[-1500:])
        assert not o.traceback, o.stderr[-1500:]
        assert fk.judge(before) == [], (fault, delay)
    _recovers(zygote, again, outs, d)  # a killed run's temporary files are swept by the next one


@needs_mount
@pytest.mark.parametrize("command", fk.COMMANDS)
def test_full_disk(command, zygote, base, tmp_path):
    with fk.tmpfs(tmp_path / "disk", size_mb=24) as disk:
        argv, outs, again = fk.setup_case(command, base, disk)
        before = {p: fk.digest(p) for p in outs}
        filler = fk.fill(disk, leave=8192 if command == "profile" else 0)
        o = zygote.run(argv)
        _after_fault(o, before, disk, code=74, word="ENOSPC")
        assert str(disk) in o.error_lines[0]
        filler.unlink()
        if command in HEAVY and command != "profile":
            return  # their recovery after a fault is shown by the SIGKILL case
        _recovers(zygote, again, outs, disk)
        if command == "profile":  # the resumed run holds every planned sample
            from posbias.profiler.store import ProfileStore

            with ProfileStore(outs[0]) as st:
                assert st.n_samples + len(st.skipped()) == 3 and st.complete


@needs_mount
@pytest.mark.parametrize("command", fk.COMMANDS)
def test_read_only_folder(command, zygote, base, tmp_path):
    with fk.tmpfs(tmp_path / "ro", size_mb=24) as disk:
        argv, outs, again = fk.setup_case(command, base, disk)
        before = {p: fk.digest(p) for p in outs}
        fk.remount(disk, "ro")
        o = zygote.run(argv)
        _after_fault(o, before, disk, code=74, word="read-only")
        assert o.seconds < 30  # found before the work, not after it (a write probe in the output folder)
        fk.remount(disk, "rw")


INJECTED = [
    ({"errno": "ENOSPC", "on": "fsync", "at": 1}, "no space left"),
    ({"errno": "EDQUOT", "on": "replace", "at": 1}, "quota"),
    ({"errno": "EACCES", "on": "replace", "at": 1}, "permission denied"),
]


@pytest.mark.parametrize("command, fault, word", [(c, f, w) for c in ("fit", "solve", "merge", "export") for f, w in INJECTED]
                         + [("report", *INJECTED[0]), ("utr", *INJECTED[2])])
def test_injected_errors_on_fsync_and_rename(command, fault, word, zygote, base, tmp_path):
    argv, outs, again = fk.setup_case(command, base, tmp_path)
    before = {p: fk.digest(p) for p in outs}
    o = zygote.run(argv, fault=fault)
    _after_fault(o, before, tmp_path, code=74, word=word)
    assert all(fk.digest(p) == before[p] for p in outs)  # a failed write changes nothing


def test_injected_enospc_on_write_and_debug_traceback(zygote, base, tmp_path):
    argv, outs, _ = fk.setup_case("fit", base, tmp_path)
    before = {p: fk.digest(p) for p in outs}
    o = zygote.run(argv, fault={"errno": "ENOSPC", "on": "write", "at": 1})
    _after_fault(o, before, tmp_path, code=74, word="ENOSPC")
    o = zygote.run(argv, fault={"errno": "ENOSPC", "on": "write", "at": 1}, env={"POSBIAS_DEBUG": "1"})
    assert o.rc == 74 and o.traceback and len(o.error_lines) == 1
    o = zygote.run([*argv, "--debug"], fault={"errno": "ENOSPC", "on": "write", "at": 1})
    assert o.rc == 74 and o.traceback


def test_file_size_limit_stops_profile_and_resume_finishes(zygote, base, tmp_path):
    """RLIMIT_FSIZE: the kernel refuses to grow files (EFBIG), h5py's own writes included."""
    argv, outs, again = fk.setup_case("profile", base, tmp_path)
    before = {p: fk.digest(p) for p in outs}
    o = zygote.run(argv, fault={"fsize": 2048})
    _after_fault(o, before, tmp_path, code=74, word="EFBIG")
    _recovers(zygote, again, outs, tmp_path)

"""posbias.atomic: the one way posbias writes a file (temp in the same folder, fsync, rename, fsync folder)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from posbias.atomic import atomic_path, atomic_write_text, environment_fault, sweep_stale_temps, temp_path
from posbias.errors import EXIT_ENVIRONMENT, EnvironmentFault, PosbiasError


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "cal.json"
    target.write_text("old")
    atomic_write_text(target, "new" * 1000)
    assert target.read_text() == "new" * 1000
    assert _temps(tmp_path) == []


def test_failure_inside_the_block_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("good report")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a rep")
            raise RuntimeError("drawing failed")
    assert target.read_text() == "good report"
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS])
def test_machine_errors_become_one_line_environment_faults(tmp_path, code):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(EnvironmentFault) as info:
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise OSError(code, os.strerror(code))
    msg = str(info.value)
    assert "\n" not in msg and str(target) in msg and errno.errorcode[code] in msg
    assert info.value.exit_code == EXIT_ENVIRONMENT == 74
    assert isinstance(info.value, PosbiasError)  # callers that catch input errors still catch it
    assert target.read_text() == "old" and _temps(tmp_path) == []


def test_h5py_style_errno_in_the_message_is_recognised(tmp_path):
    exc = OSError("Unable to synchronously create file (file write failed: errno = 28, error message = 'No space')")
    fault = environment_fault(exc, tmp_path / "profile.h5")
    assert fault is not None and "ENOSPC" in str(fault)
    assert environment_fault(OSError("Unable to open file (bad object header version number)")) is None


def test_missing_folder_and_file_in_place_of_folder(tmp_path):
    with pytest.raises(EnvironmentFault, match="does not exist"):
        atomic_write_text(tmp_path / "gone" / "a.json", "{}")
    (tmp_path / "blocker").write_text("")
    with pytest.raises(EnvironmentFault, match="a file stands where a folder should be"):
        atomic_write_text(tmp_path / "blocker" / "a.json", "{}")


def test_temps_of_dead_processes_are_swept_living_ones_kept(tmp_path):
    target = tmp_path / "report.pdf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = target.with_name(f".{target.name}.{pid}-abcdef.tmp")
    stale.write_text("left by a SIGKILL")
    mine = temp_path(target)
    mine.write_text("in flight")
    other = tmp_path / f".other.pdf.{pid}-abcdef.tmp"
    other.write_text("another target's")
    assert sweep_stale_temps(target) == 1
    assert not stale.exists() and mine.exists() and other.exists()

"""What a newcomer meets at the command line: help, mistakes, default folders, one-line errors (issue 18)."""

from __future__ import annotations

import json
import re

import pytest

from posbias.cli import build_parser, main
from posbias.cli.common import default_out, print_table


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _all_help_texts(capsys) -> dict[str, str]:
    from posbias.cli import SUBCOMMANDS

    texts = {}
    for args in (["--help"], *[[c, "--help"] for c in SUBCOMMANDS]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
        texts[" ".join(args)] = capsys.readouterr().out
    return texts


def test_help_shows_at_most_one_default_per_option(capsys):
    for name, text in _all_help_texts(capsys).items():
        flat = " ".join(text.split())
        # split the help into one chunk per option and count the defaults each mentions
        for chunk in re.split(r"\s(?=--?[a-z][a-z0-9-]*[ ,])", flat):
            assert chunk.lower().count("(default") <= 1, (name, chunk)
        assert "(default: None)" not in flat, name
        assert "(default: default)" not in flat, name
        assert "seed 00" not in flat, name  # users know the papers by name


def test_every_option_has_help(capsys):
    top, stages = build_parser()
    parsers = [top] + list(stages._subparsers._group_actions[0].choices.values())
    for p in parsers:
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{p.prog} {action.option_strings} has no help"


@pytest.mark.parametrize(("word", "suggest"), [("fitt", "fit"), ("reprot", "report"), ("xyz", None)])
def test_unknown_subcommand_is_one_line_with_the_valid_ones(capsys, word, suggest):
    code, out, err = _run([word, "--store", "s.h5"], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0]
    assert "profile, fit, export, report" in lines[0]
    if suggest:
        assert f"did you mean {suggest}?" in lines[0]
    else:
        assert "did you mean" not in lines[0]


def test_default_out_depends_on_the_model():
    assert default_out("demo-llava") == "runs/demo-llava"
    assert default_out("qwen2.5-vl-7b") == "runs/qwen2.5-vl-7b"
    assert default_out("Qwen/Qwen2.5-VL-7B-Instruct") == "runs/Qwen2.5-VL-7B-Instruct"
    assert default_out("/models/llava-1.5-7b-hf/") == "runs/llava-1.5-7b-hf"
    assert default_out("demo-llava") != default_out("qwen2.5-vl-7b")


def test_default_out_is_used_when_none_given(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["profile", "--model", "tiny-llava", "--n", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "runs" / "tiny-llava" / "profile.h5").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "no-such-model-alias", "--n", "2"],
        ["--model", "tiny-llava", "--n", "0"],
        ["--model", "tiny-llava", "--n", "2", "--data", "nosuchsource"],
        ["profile", "--model", "no-such-model-alias", "--n", "2"],
        ["profile", "--model", "tiny-llava", "--resume", "--overwrite"],
    ],
)
def test_failed_run_leaves_no_empty_folder(tmp_path, capsys, args):
    out = tmp_path / "deep" / "run"
    code, _, err = _run([*args, "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "deep").exists()


def test_failed_run_keeps_a_folder_that_existed(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    code, _, _ = _run(["--model", "no-such-model-alias", "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and out.is_dir()


def test_model_folder_without_calibration_is_a_one_line_hint(tmp_path):
    from posbias.errors import PosbiasError
    from posbias.runtime import Calibration

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PosbiasError) as exc:
        Calibration.from_pretrained(tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "profile-bias export" in msg and str(tmp_path) in msg
    assert "posbias.artifacts" not in msg


def test_fit_summary_has_no_trailing_padding(capsys):
    print_table([("a", "b", "short"), ("aa", "bbb", "x" * 120)], ("method", "quantity", "value"))
    lines = capsys.readouterr().out.splitlines()
    assert all(line == line.rstrip() for line in lines)
    assert lines[2] == "a       b         short"  # columns as wide as their header, last one unpadded


def test_pipeline_records_run_time_and_integer_counts(tmp_path, capsys):
    import h5py

    out = tmp_path / "run"
    code, stdout, err = _run(["--model", "tiny-llava", "--n", "4", "--out", str(out), "--no-progress",
                              "--signals", "all"], capsys)
    assert code == 0, err
    with h5py.File(out / "profile.h5", "r") as f:
        seconds = float(f.attrs["profile_seconds"])
    assert seconds > 0
    html = (out / "report.html").read_text()
    assert "not recorded in the store" not in html
    doc = json.loads((out / "posbias_calibration.json").read_text())
    den = doc["statistics"]["density"]
    if den.get("status") == "evaluated":
        text = (out / "posbias_calibration.json").read_text()
        assert re.search(r'"n_centre_blocks": \d+,', text) and '"n_centre_blocks": ' in text
        assert isinstance(den["welch"]["n_centre_blocks"], int)
    # the final line says where everything went
    assert str(out) in stdout.strip().splitlines()[-1] and "report.html" in stdout.strip().splitlines()[-1]
    assert all(line == line.rstrip() for line in stdout.splitlines())


def test_solve_prints_only_its_results(tmp_path, capsys):
    """HiGHS writes to the C-level stdout; a subprocess sees everything the command prints."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import posbias

    run = tmp_path / "run"
    assert main(["--model", "tiny-llava", "--n", "3", "--out", str(run), "--no-progress", "--capture", "attn"]) == 0
    assert main(["utr", "--store", str(run / "profile.h5"), "--no-progress"]) == 0
    capsys.readouterr()
    env = dict(os.environ, PYTHONPATH=str(Path(posbias.__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-m", "posbias.cli", "solve", "--store", str(run / "profile.h5"), "--ratios",
                           "2", "--into", str(run / "posbias_calibration.json")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("ratio ") for line in lines), proc.stdout
    assert "HiGHS" not in proc.stdout + proc.stderr

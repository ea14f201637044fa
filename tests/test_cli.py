"""The ``bevnext`` command: every contract subcommand exists with --help; errors are one line."""

import subprocess
import sys

import pytest

from bevnext.cli import main

SUBCOMMANDS = ["demo", "synth", "create-data", "check-data", "train", "eval", "bench"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bevnext", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"bevnext {name}" in capsys.readouterr().out


def test_top_level_help_lists_contract():
    out = _run("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout


def test_demo_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--work-dir" in out and "--budget-minutes" in out and "--seed" in out
    assert "work_dirs/demo" in out


def test_demo_bad_budget_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--work-dir", str(tmp_path / "d"), "--budget-minutes", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--budget-minutes" in err
    assert not (tmp_path / "d").exists()


def test_user_error_is_one_line_without_traceback(tmp_path):
    out = _run("create-data", "--data-root", str(tmp_path / "missing"), "--version", "v1.0-mini")
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and "missing" in lines[0]
    assert "Traceback" not in out.stderr


def test_unknown_benchmark_is_a_clear_error(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'no-such-bench'" in err and "synth" in err

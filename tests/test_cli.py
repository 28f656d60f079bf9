"""The `xdistill` entry point: every verb has --help; unimplemented verbs say so and fail."""

import subprocess
import sys

import pytest

from xdistill_jax import cli


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: xdistill " + verb in capsys.readouterr().out


def test_unimplemented_verb_fails_and_names_issue(monkeypatch, capsys):
    monkeypatch.setitem(cli.VERBS, "demo", ("no_such_module_for_test", "x", 7))
    assert cli.main(["demo"]) == 2
    assert "issue #7" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "xdistill_jax", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "convert-weights" in out

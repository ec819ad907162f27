"""The mutation harness's own rule (tests/mutants/plugin.py): a test that fails only because the
mutant refuses a call it does not model is *not applicable* (a skip), never a kill; any other
failure, a plain NotImplementedError included, still fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CASES = """
from plugin import NotModelled


def test_refused():
    raise NotModelled("no mutant for grouped heads")


def test_refusal_wrapped():
    # as the dispatcher or torch.compile re-raise it: chained, or only quoted in the message
    try:
        raise NotModelled("refused under compile")
    except NotModelled as e:
        raise RuntimeError(f"while tracing: {e} (scroll up for stack trace)") from None


def test_other_not_implemented():
    raise NotImplementedError("a real gap")


def test_wrong_value():
    assert 1 == 2


def test_passes():
    pass
"""


def test_refusals_skip_and_other_failures_fail(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    env_path = str(HERE / "mutants")
    args = ["-p", "plugin", "-q", "-rfs", "-p", "no:cacheprovider", "--no-header"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "test_cases.py"), *args],
        env={**os.environ, "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "2 failed, 1 passed, 2 skipped" in out, out
    assert out.count("mutant not applicable: no mutant for grouped heads") == 1, out
    assert out.count("mutant not applicable: refused under compile") == 1, out
    assert "FAILED" in out and "test_other_not_implemented" in out and "test_wrong_value" in out

"""``python -m bench.quality --quick`` for the MQAR and copy tasks, the command users run (its
tasks run in worker processes that import the task runner anew): the pipeline writes what it
documents and shows progress, and the settings any working model learns are learned.

Thresholds are set from runs of the quick preset on the project's 2-core machine (seed 0), with
margin: full attention reached 1.000 query accuracy at (2 pairs, gap 0) and at gap 24, RelRNN
1.000 recall accuracy on the copy task at T=10; the sliding window, which cannot reach any pair
across a gap of 24 (the gap exceeds 2 layers x 11 positions), stayed near chance (1/16).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.quality import __main__ as quality
from bench.quality import readme
from bench.quality._common import ROOT

SCALARS = (int, float, str, bool, type(None))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    cmd = [sys.executable, "-m", "bench.quality", "--quick", "--only", "mqar,copy", "--out", out]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = out.glob("quality-*-*.json")
    return out, {**json.loads(path.read_text()), "path": str(path), "stdout": proc.stdout}


def _row(rows, **match):
    (row,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return row


def test_json_and_plots_written(report):
    out, result = report
    (path,) = out.glob("quality-*-*.json")
    assert str(path) == result["path"]
    data = json.loads(path.read_text())
    meta = data["meta"]
    for field in ("cpu", "cores", "threads", "torch", "screening_attn", "git_sha", "date"):
        assert field in meta, field
    assert meta["threads"] == int(os.environ.get("OMP_NUM_THREADS") or 1)
    assert meta["preset"] == "quick" and meta["tasks"] == ["mqar", "copy"]
    assert meta["jobs"] == max(1, os.cpu_count() // meta["threads"])  # processes of trainings
    assert 0 < meta["cpu_s"] and 0 < meta["elapsed_s"]
    assert set(data["tasks"]) == {"mqar", "copy"}
    for name, task in data["tasks"].items():
        assert 0 < task["cpu_s"] <= meta["cpu_s"], name
        assert task["rows"], name
        for row in task["rows"]:
            assert all(isinstance(v, SCALARS) for v in row.values()), row
            assert row["train_cpu_s"] > 0, row
        assert task["plots"], name
        for plot in task["plots"]:
            # named after the run's JSON, so the README can quote one run's files together
            assert plot.startswith(path.stem + "-"), plot
            assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
        text = importlib.import_module(quality.TASKS[name]).markdown(task)
        assert text.startswith("| ") and "\n\n" in text
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        p for t in data["tasks"].values() for p in t["plots"]
    )


def test_mqar_full_attention_learns_recall(report):
    rows = report[1]["tasks"]["mqar"]["rows"]
    assert _row(rows, pairs=2, gap=0, attention="full")["acc_mean"] >= 0.9
    assert _row(rows, pairs=2, gap=24, attention="full")["acc_mean"] >= 0.9


def test_mqar_window_is_blind_across_the_gap(report):
    """The control the benchmark rests on: no pair is within the sliding window's reach."""
    rows = report[1]["tasks"]["mqar"]["rows"]
    for pairs in (2, 4, 8):
        assert _row(rows, pairs=pairs, gap=24, attention="window")["acc_mean"] <= 0.2


def test_copy_small_delay_learned(report):
    rows = report[1]["tasks"]["copy"]["rows"]
    assert _row(rows, T=10, model="relrnn")["acc_mean"] >= 0.6  # chance: 1/8


def test_unknown_task_rejected():
    with pytest.raises(SystemExit):
        quality.parse_args(["--only", "mqar,nope"])


def test_progress_shown(report):
    lines = report[1]["stdout"].splitlines()
    assert sum("mqar full" in line and " step " in line and " loss " in line for line in lines) >= 2
    assert sum("copy T= 10 relrnn" in line and " step " in line for line in lines) >= 2


def test_default_tasks_leave_cnnf_to_be_named():
    assert quality.parse_args([]).tasks == ["mqar", "copy"]
    assert quality.parse_args(["--only", "cnnf"]).tasks == ["cnnf"]


def test_readme_section_quotes_the_run_and_its_plots(report, tmp_path):
    _, result = report
    out = tmp_path / "results"
    out.mkdir()
    (out / Path(result["path"]).name).write_text(Path(result["path"]).read_text())
    payload = {"meta": {**result["meta"], "preset": "default"}, "tasks": result["tasks"]}
    path = out / "quality-machine-20990101-000000.json"
    path.write_text(json.dumps(payload))
    assert readme.latest(out) == path  # the quick run itself is not a default run
    doc = tmp_path / "README.md"
    doc.write_text(f"# x\n\n{readme.BEGIN}\nold\n{readme.END}\n\nhand-written text\n")
    args = ["--json", str(path), "--readme", str(doc)]
    assert readme.main([*args, "--check"]) == 1
    assert readme.main(args) == 0
    text = doc.read_text()
    assert readme.main([*args, "--check"]) == 0  # a second run changes nothing
    assert "old" not in text and text.endswith(f"{readme.END}\n\nhand-written text\n")
    # paths relative to the README: the run's JSON and that same run's plots beside it
    assert f"(`results/{path.name}`;" in text
    for task in result["tasks"].values():
        for plot in task["plots"]:
            assert f"(results/{plot})" in text


def test_repo_readme_quotes_the_latest_default_run():
    assert readme.main(["--check"]) == 0

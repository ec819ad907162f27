"""The benchmark report prints the screening scan's depth table from bench.scan_depth's file."""

import io
import json
from pathlib import Path

from bench.tables import print_scan_depth

ROOT = Path(__file__).resolve().parent.parent


def _record(inputs, depth, **extra):
    record = {
        "inputs": inputs,
        "T": 2048,
        "window": 128,
        "relevant": 64,
        "chunk": 128,
        "depth": depth,
        "rounds_mean": 1.0625,
        "rounds_max": 3,
        "exact_tie_steps_per_row": [0, 2],
        "fallback_steps_per_row": [0, 0],
    }
    record.update(extra)
    return record


def test_prints_one_row_per_family(tmp_path):
    path = tmp_path / "scan-depth.json"
    records = [
        _record("random", 16),
        _record("adversarial", 2100, fallback_steps_per_row=[1990, 2000], rounds_max=2),
    ]
    path.write_text(json.dumps(records))
    out = io.StringIO()
    assert print_scan_depth(path, out) == records
    lines = out.getvalue().splitlines()
    assert "screening scan depth" in lines[1] and "scan-depth.json" in lines[1]
    header = lines[2].split()
    assert header[:7] == ["inputs", "T", "window", "relevant", "chunk", "depth", "T/depth"]
    assert lines[4].split() == "random 2048 128 64 128 16 128.0 1.06 3 2 0".split()
    assert lines[5].split() == "adversarial 2048 128 64 128 2100 1.0 1.06 2 2 2000".split()


def test_older_files_without_the_fallback_fields(tmp_path):
    path = tmp_path / "scan-depth.json"
    record = _record("ties", 40)
    del record["fallback_steps_per_row"], record["chunk"]
    path.write_text(json.dumps([record]))
    out = io.StringIO()
    print_scan_depth(path, out)
    assert out.getvalue().splitlines()[4].split()[-1] == "-"
    assert out.getvalue().splitlines()[4].split()[4] == "-"


def test_missing_file(tmp_path):
    out = io.StringIO()
    assert print_scan_depth(tmp_path / "scan-depth.json", out) is None
    assert "python -m bench.scan_depth" in out.getvalue()


def test_the_committed_file():
    path = ROOT / "bench" / "results" / "scan-depth.json"
    out = io.StringIO()
    records = print_scan_depth(path, out)
    assert records is not None and {r["inputs"] for r in records} == {
        "random",
        "adversarial",
        "ties",
    }
    for r in records:
        assert f" {r['depth']} " in out.getvalue()

"""README.md's results section is generated from the committed benchmark JSON (bench/readme.py),
and the committed result files stay readable after the targets were renamed."""

import json
import shutil
from pathlib import Path

import pytest

from bench import readme, targets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUN = RESULTS / "amd-epyc-2c-20261122-040846.json"


def test_readme_results_match_the_latest_committed_run():
    # fails when README.md was edited by hand or a new run was committed without regenerating
    assert readme.main(["--check"]) == 0, "run: python -m bench.readme"


def test_the_section_reproduces_the_figures_of_the_run():
    section = readme.render(json.loads(RUN.read_text()), RUN, ROOT / "README.md")
    for row in (
        "| 2048 | 22 ms (2.92× dense, 0.91× window) | 65 ms | 20 ms | 68 ms (3.51× dense, "
        "0.91× window) | 239 ms | 62 ms | 80× |",
        "| 16384 | 170 ms (20.8× dense, 0.95× window) | 3.55 s | 162 ms | 598 ms (21.8× dense, "
        "0.92× window) | 13.1 s | 552 ms | — |",
        "| RelRNN | 136 ms | 1.19 s (8.7×) | 76 ms (cpu is 1.8× that) | 4.18 |",
        "| RelLSTM | 215 ms | 1.87 s (8.7×) | 141 ms (cpu is 1.5× that) | 4.29 |",
        "![time vs T](bench/results/amd-epyc-2c-20261122-040846-attention-time.png)",
    ):
        assert row in section
    prose = " ".join(section.split())
    for words in (
        "2026-11-22 04:08 (`bench/results/amd-epyc-2c-20261122-040846.json`)",
        "2-core AMD EPYC, one thread",
        "runs at 0.9–1.0× the speed of the best sliding-window attention",
        "runs 5.5× faster than its eager composition forward, 6.4× forward + backward",
        "takes 62 ms against 53 ms for its convolutions and linear maps alone (1.15×)",
        "457 ms against 412 ms (1.11×); the eager network takes 2.8× and 2.4× longer",
        "11 of the 13 measured pass",  # by the targets of today (#15 retired two, set two)
    ):
        assert words in prose


def _readme_copy(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", path)
    return path


def test_an_edited_figure_is_caught_and_regenerating_is_idempotent(tmp_path):
    path = _readme_copy(tmp_path)
    args = ["--readme", str(path), "--json", str(RUN)]
    original = path.read_text()
    path.write_text(original.replace("| RelRNN | 136 ms |", "| RelRNN | 99 ms |"))
    assert readme.main([*args, "--check"]) == 1
    assert readme.main(args) == 0
    once = path.read_text()
    assert readme.main(args) == 0
    assert path.read_text() == once
    assert readme.main([*args, "--check"]) == 0
    # only the section between the markers was rewritten (the JSON path is relative to README)
    outside = original.split(readme.BEGIN)[0], original.split(readme.END)[1]
    assert once.split(readme.BEGIN)[0] == outside[0] and once.split(readme.END)[1] == outside[1]


def test_a_readme_without_markers_is_an_error(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# no results section\n")
    with pytest.raises(ValueError, match="bench:begin"):
        readme.main(["--readme", str(path), "--json", str(RUN)])


def test_latest_is_the_newest_complete_run(tmp_path):
    payload = json.loads(RUN.read_text())
    (tmp_path / RUN.name).write_text(json.dumps(payload))
    newer = tmp_path / "amd-epyc-2c-20991231-000000.json"
    for preset, families in (("quick", payload["meta"]["families"]), ("default", ["attention"])):
        meta = {**payload["meta"], "preset": preset, "families": families}
        newer.write_text(json.dumps({**payload, "meta": meta}))
        assert readme.latest(tmp_path).name == RUN.name
    newer.write_text(json.dumps(payload))
    assert readme.latest(tmp_path) == newer


def _report_runs() -> list[Path]:
    """The benchmark report's result files (bench/results also holds other JSON)."""
    runs = []
    for path in sorted(RESULTS.glob("*.json")):
        payload = json.loads(path.read_text())
        if isinstance(payload, dict) and "targets" in payload and "meta" in payload:
            runs.append(path)
    return runs


@pytest.mark.parametrize("path", _report_runs(), ids=lambda p: p.stem)
def test_committed_results_keep_their_target_figures(path):
    # files written before the targets had names and families: the recomputed items carry the
    # same values, under the op-prefixed names; a retired target is gone, and a target whose
    # bound changed since keeps its value (its status is the new bound's)
    payload = json.loads(path.read_text())
    items = {t["name"]: t for t in targets.load_targets(payload)}
    assert all(t["family"] in targets.TITLES for t in items.values())
    for old in payload["targets"]:
        name = old["name"]
        if name.startswith("cpu "):
            name = "screened_attention " + name
        if targets.retired(name):
            assert name not in items
            continue
        assert items[name]["value"] == old["value"]
        if items[name]["target"] == old["target"]:
            assert items[name]["status"] == old["status"]

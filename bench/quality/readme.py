"""README.md's MQAR and copy-task results, written from a quality JSON:
``python -m bench.quality.readme [--check] [--json FILE] [--results DIR] [--readme FILE]``.

Replaces what lies between ``<!-- quality:begin -->`` and ``<!-- quality:end -->`` in README.md
with the command, date, threads and CPU time of the latest default-preset run of both tasks in
bench/results/ (``latest``), each task's table and summary (its ``markdown``) and its plots, the
files of that run. What the numbers mean is written by hand after the section. Running it again
changes nothing; ``--check`` changes nothing and exits 1 when README.md differs from what it
would write.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import re
import sys
from pathlib import Path

from bench.quality.__main__ import DEFAULT_TASKS, TASKS

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
_STAMP = re.compile(r"(\d{8}-\d{6})\.json$")
_TITLES = {"mqar": "Multi-query associative recall", "copy": "Copy task (Kerg et al.)"}


def is_default_run(payload: dict) -> bool:
    """A default-preset run of every default task (not --quick, not a single task) that records
    its CPU time (runs of before it did are not quoted)."""
    meta = payload.get("meta", {}) if isinstance(payload, dict) else {}
    return (
        meta.get("preset") == "default"
        and "cpu_s" in meta
        and set(DEFAULT_TASKS) <= set(payload.get("tasks", {}))
    )


def latest(results_dir: Path) -> Path:
    """The latest default run in ``results_dir``, by the date stamp of its name."""
    runs = []
    for path in results_dir.glob("quality-*.json"):
        m = _STAMP.search(path.name)
        if m and is_default_run(json.loads(path.read_text())):
            runs.append((m.group(1), path))
    if not runs:
        raise FileNotFoundError(
            f"no default-preset quality run of {DEFAULT_TASKS} in {results_dir}"
        )
    return max(runs)[1]


def section(payload: dict, json_rel: str) -> str:
    """The README text between the markers (without them)."""
    meta = payload["meta"]
    threads = "one thread" if meta["threads"] == 1 else f"{meta['threads']} threads"
    jobs = meta.get("jobs", 1)
    processes = f", {jobs} worker processes" if jobs > 1 else ""
    argv = " ".join(meta.get("argv") or [])
    command = "make quality" + (f' QUALITY_ARGS="{argv}"' if argv else "")
    when = datetime.datetime.fromisoformat(meta["date"]).strftime("%Y-%m-%d %H:%M")
    results_dir = str(Path(json_rel).parent)
    per_task = ", ".join(
        f"{name} {task['cpu_s']:.0f} s"
        for name, task in payload["tasks"].items()
        if name in _TITLES
    )
    load = (meta.get("loadavg_start") or ["?"])[0], (meta.get("loadavg_end") or ["?"])[0]
    parts = [
        f"`{command}`, {when}, {threads} per training{processes}: {meta['cpu_s']:.0f} s of CPU "
        f"time ({per_task}), what the budget counts; {meta['elapsed_s']:.0f} s of wall time at "
        f"a load average of {load[0]}-{load[1]} on this shared {meta['cores']}-core machine "
        f"(`{json_rel}`; the times per model below are wall (CPU) seconds of one training). "
        "`python -m bench.quality.readme` wrote this section from that file; "
        "`bench/quality/README.md` describes the tasks."
    ]
    for name in DEFAULT_TASKS:
        task = payload["tasks"][name]
        module = importlib.import_module(TASKS[name])
        parts.append(f"**{_TITLES[name]}**\n\n{module.markdown(task)}")
        parts += [f"![{name}]({results_dir}/{plot})" for plot in task["plots"]]
    return "\n\n".join(parts)


def render(readme: str, payload: dict, json_rel: str) -> str:
    """``readme`` with the section between the markers replaced."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {BEGIN} ... {END} section")
    return readme[: start + len(BEGIN)] + "\n" + section(payload, json_rel) + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality.readme", description=__doc__)
    p.add_argument("--json", type=Path, help="the run to quote (default: the latest default run)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is not current")
    args = p.parse_args(argv)
    path = args.json or latest(args.results)
    payload = json.loads(path.read_text())
    try:
        json_rel = str(path.resolve().relative_to(args.readme.resolve().parent))
    except ValueError:
        json_rel = str(path)
    old = args.readme.read_text()
    new = render(old, payload, json_rel)
    if args.check:
        if new != old:
            print(
                f"{args.readme} is not current: run python -m bench.quality.readme", file=sys.stderr
            )
            return 1
        return 0
    args.readme.write_text(new)
    print(f"wrote the quality section of {args.readme} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

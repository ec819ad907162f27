"""``--baseline``: this run's medians against an earlier result JSON's, case by case.

Cases match on (family, op, provider, mode, shape); only cases timed in both runs are
compared. One more than ``REGRESSION`` times slower is listed as SLOWER (and ``--fail-on-
regression`` makes the report exit 1), one that much faster as faster. Machine, thread count
and torch version differences are printed first: they explain more than the code does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench._common import fmt_time

REGRESSION = 1.10  # more than 10% slower


def _key(r: dict) -> tuple:
    return (r["family"], r["op"], r["provider"], r["mode"], json.dumps(r["shape"], sort_keys=True))


def label(r: dict) -> str:
    """``op provider mode shape``: one case, readably."""
    shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if (k, v) != ("device", "cpu"))
    return f"{r['op']} {r['provider']} {r['mode']} {shape}"


def compare_baseline(results: list[dict], meta: dict, path: Path, out=sys.stdout) -> list[dict]:
    """Print the comparison with the result JSON at ``path``; return the slower cases."""
    old = json.loads(path.read_text())
    old_meta = old.get("meta", {})
    print(f"\n== comparison with {path} ==", file=out)
    for field in ("cpu", "threads", "torch"):
        if old_meta.get(field) != meta.get(field):
            print(
                f"  note: {field} differs: {old_meta.get(field)!r} then, {meta.get(field)!r} now",
                file=out,
            )
    print(
        f"  baseline: git {str(old_meta.get('git_sha'))[:10]} of {old_meta.get('date')}", file=out
    )
    before = {_key(r): r for r in old.get("results", []) if r.get("status") == "ok"}
    slower, faster, compared = [], [], 0
    for r in results:
        b = before.get(_key(r))
        if r["status"] != "ok" or b is None:
            continue
        compared += 1
        ratio = r["median_s"] / b["median_s"]
        item = {"case": label(r), "before_s": b["median_s"], "now_s": r["median_s"], "ratio": ratio}
        if ratio > REGRESSION:
            slower.append(item)
        elif ratio < 1 / REGRESSION:
            faster.append(item)
    pct = f"{100 * (REGRESSION - 1):.0f}%"
    print(
        f"  {compared} cases compared; {len(slower)} more than {pct} slower, "
        f"{len(faster)} more than {pct} faster",
        file=out,
    )
    for title, items in (("SLOWER", slower), ("faster", faster)):
        for it in sorted(items, key=lambda x: -x["ratio"]):
            print(
                f"  {title:6} {it['ratio']:6.2f}x time  {fmt_time(it['before_s']):>9} -> "
                f"{fmt_time(it['now_s']):>9}  {it['case']}",
                file=out,
            )
    return slower

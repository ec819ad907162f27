"""The report's console tables: one per op, a row per (shape, provider, mode), the ratio
columns of ``bench.ratios.RATIOS``; skipped and failed cases listed under the table with their
reason; and the screening scan's sequential depth from bench/results/scan-depth.json.
bench/README.md explains the columns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench._common import fmt_time
from bench.ratios import RATIOS


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 10:
        return f"{x:.2f}x"
    return f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def _varying(records: list[dict]) -> tuple[list[str], dict]:
    """Shape keys that differ between the op's cases, and the ones that don't."""
    keys = list(records[0]["shape"])
    varying = [k for k in keys if len({json.dumps(r["shape"].get(k)) for r in records}) > 1]
    fixed = {k: records[0]["shape"][k] for k in keys if k not in varying}
    return varying, fixed


def _table(rows: list[list[str]], header: list[str], right: set[int]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


# The last two columns: model FLOP rates, or for the decode family (no FLOP model) the cache's
# memory after the context and the keys it holds per (layer, batch row, KV head).
LAST_COLUMNS = {"decode": ("cache MB", "keys kept")}
DEFAULT_LAST_COLUMNS = ("GFLOP/s", "%mm")


def _last_cells(r: dict) -> list[str]:
    if r["family"] == "decode":
        return [f"{r['cache_bytes'] / 2**20:.2f}", str(max(r["stored"]))]
    return [
        f"{r['gflops']:.1f}" if "gflops" in r else "-",
        f"{100 * r['frac_matmul']:.0f}%" if "frac_matmul" in r else "-",
    ]


def _row(r: dict, shape: str, ratio_cols: tuple) -> list[str]:
    if r["status"] == "failed":
        return [shape, r["provider"], r["mode"], "FAILED", "", "", *[""] * len(ratio_cols), "", ""]
    ratios = r.get("ratios", {})
    return [
        shape,
        r["provider"],
        r["mode"],
        fmt_time(r["median_s"]),
        f"{100 * r['spread']:.1f}",
        str(r["n"]),
        *(fmt_ratio(ratios.get(key)) for key, _, _, _ in ratio_cols),
        *_last_cells(r),
    ]


def print_tables(results: list[dict], out=sys.stdout) -> None:
    ops = list(dict.fromkeys((r["family"], r["op"]) for r in results))
    for family, op in ops:
        records = [r for r in results if r["op"] == op]
        varying, fixed = _varying(records)
        fixed_txt = ", ".join(f"{k}={v}" for k, v in fixed.items() if (k, v) != ("device", "cpu"))
        print(f"\n== {op} ({family}; {fixed_txt}) ==", file=out)
        ratio_cols = RATIOS[family]
        header = [
            "shape",
            "provider",
            "mode",
            "median",
            "IQR%",
            "n",
            *(label for _, label, _, _ in ratio_cols),
            *LAST_COLUMNS.get(family, DEFAULT_LAST_COLUMNS),
        ]
        rows, notes = [], []
        for r in records:
            if r["status"] == "skipped":
                continue
            shape = " ".join(f"{k}={r['shape'][k]}" for k in varying) or "-"
            rows.append(_row(r, shape, ratio_cols))
            if r["status"] == "failed":
                where = f" {shape}" if shape != "-" else ""
                notes.append(f"  FAILED {r['provider']} {r['mode']}{where}: {r['reason']}")
        if rows:
            print(_table(rows, header, set(range(3, len(header)))), file=out)
        for n in notes:
            print(n, file=out)
        skipped = dict.fromkeys(
            (r["provider"], r["reason"]) for r in records if r["status"] == "skipped"
        )
        for provider, reason in skipped:
            print(f"  skipped {provider}: {reason}", file=out)


def print_scan_depth(path: Path, out=sys.stdout) -> list[dict] | None:
    """The chunk-parallel scan's sequential depth per (b, h) row, as ``python -m
    bench.scan_depth`` last wrote it to ``path`` (read, not re-measured: the T = 16384 emulation
    takes minutes). Returns the file's records, or None (and says so) when there is none."""
    if not path.is_file():
        print(
            f"\n== screening scan depth: no {path.name}; run python -m bench.scan_depth ==",
            file=out,
        )
        return None
    records = json.loads(path.read_text())
    print(
        f"\n== screening scan depth (CPU emulation of the chunk-parallel scan, issue #13; "
        f"{path.name}, written by python -m bench.scan_depth) ==",
        file=out,
    )
    header = ["inputs", "T", "window", "relevant", "chunk", "depth", "T/depth", "rounds mean"]
    header += ["rounds max", "tie steps", "seq steps"]
    rows = []
    for r in records:
        seq = r.get("fallback_steps_per_row")
        rows.append(
            [
                r["inputs"],
                str(r["T"]),
                str(r["window"]),
                str(r["relevant"]),
                str(r.get("chunk", "-")),
                str(r["depth"]),
                f"{r['T'] / r['depth']:.1f}",
                f"{r['rounds_mean']:.2f}",
                str(r["rounds_max"]),
                str(max(r["exact_tie_steps_per_row"])) if "exact_tie_steps_per_row" in r else "-",
                str(max(seq)) if seq else "-",
            ]
        )
    print(_table(rows, header, set(range(1, len(header)))), file=out)
    print(
        "  depth: dependent steps per (b, h) row, the largest row (rounds + 2 per tie step + "
        "sequential steps); the sequential scan's is T",
        file=out,
    )
    return records

"""Ratios between the providers of one run, and looking records up.

Each ratio is time(peer) / time(row), from the same run: > 1 means the row is faster. With
several peers, the fastest one. ``add_ratios`` stores them in each record's ``ratios``; the
tables, the targets and the README read them from there.
"""

from __future__ import annotations

from collections.abc import Iterable

from bench import _cases

# Per family: (JSON key, column label, peer providers, shape keys the peer ignores).
RATIOS = {
    "attention": (
        ("vs_ref", "xref", ("reference",), ()),
        ("vs_dense", "xdense", ("sdpa_dense",), ("window", "relevant")),
        ("vs_window", "xwindow", _cases.WINDOW_PEERS, ()),
    ),
    "rnn": (
        ("vs_ref", "xref", ("reference",), ()),
        ("vs_floor", "xfloor", ("matmul_floor",), ()),
    ),
    "feedback": (
        ("vs_eager", "xeager", ("reference",), ()),
        ("vs_floor", "xfloor", ("conv_floor",), ()),
    ),
    "decode": (
        ("vs_dynamic", "xdynamic", ("sdpa_dynamic",), ()),
        ("vs_window", "xwindow", ("sdpa_window",), ()),
    ),
}


def _same_shape(a: dict, b: dict, ignore: Iterable[str]) -> bool:
    keys = (set(a) | set(b)) - set(ignore)
    return all(a.get(k) == b.get(k) for k in keys)


def find(
    results: list[dict], *, op: str, provider: str, mode: str, shape: dict, ignore=()
) -> dict | None:
    """The timed record of (op, provider, mode) at ``shape`` (keys in ``ignore`` aside)."""
    for r in results:
        if (
            r["status"] == "ok"
            and r["op"] == op
            and r["provider"] == provider
            and r["mode"] == mode
            and _same_shape(r["shape"], shape, ignore)
        ):
            return r
    return None


def add_ratios(results: list[dict], mm_gflops: float) -> None:
    """Set every timed record's ``ratios`` and, with a FLOP model, ``frac_matmul``."""
    for r in results:
        if r["status"] != "ok":
            continue
        if "gflops" in r:
            r["frac_matmul"] = r["gflops"] / mm_gflops
        r["ratios"] = {}
        for key, _, peers, ignore in RATIOS[r["family"]]:
            times = [
                p["median_s"]
                for peer in peers
                if (
                    p := find(
                        results,
                        op=r["op"],
                        provider=peer,
                        mode=r["mode"],
                        shape=r["shape"],
                        ignore=ignore,
                    )
                )
            ]
            if times:
                r["ratios"][key] = min(times) / r["median_s"]


def time_ratio(a: dict | None, b: dict | None) -> float | None:
    """time(a) / time(b), or None when either did not run."""
    return a["median_s"] / b["median_s"] if a and b else None


def ratio(r: dict | None, key: str) -> float | None:
    """The stored ratio ``key`` of ``r``, or None."""
    return r["ratios"].get(key) if r else None

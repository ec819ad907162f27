"""README.md's benchmark results, written from a result JSON:
``python -m bench.readme [--check] [--json FILE] [--results DIR] [--readme FILE]``.

Replaces what lies between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in README.md with
the section generated from the latest complete run in bench/results/ (``latest``): its date,
machine and thread count, the screened-attention T sweep with its ratios to dense and window
attention, the RelRNN / RelLSTM table, the CNN-F figures, the plot and the targets. Running it
again changes nothing; ``--check`` changes nothing and exits 1 when README.md differs from what
it would write (tests/test_bench_readme.py runs it). ``make bench`` runs it after the report.
Only the standard library: it reads JSON and writes Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import textwrap
from pathlib import Path

from bench import _cases
from bench.ratios import find, ratio, time_ratio
from bench.targets import load_targets

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
DASH = "—"
_STAMP = re.compile(r"(\d{8}-\d{6})\.json$")
_RNN_NAMES = {"rel_rnn": "RelRNN", "rel_lstm": "RelLSTM"}
_WINDOW_NAMES = {
    "sdpa_window": "flash SDPA per query chunk",
    "flex_window": "FlexAttention with a sliding-window block mask",
}


def _sig(x: float, digits: int) -> str:
    """``x`` to ``digits`` significant digits, never in exponent notation (79.9 -> "80")."""
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - int(f"{abs(x):e}".split("e")[1]))
    return f"{x:.{decimals}f}"


def fmt_time(seconds: float | None) -> str:
    """3 significant digits from 1 s up, whole milliseconds from 10 ms: 3.32 s, 998 ms, 22 ms."""
    if seconds is None:
        return DASH
    if seconds >= 1:
        return f"{_sig(seconds, 3)} s"
    if seconds >= 1e-2:
        return f"{seconds * 1e3:.0f} ms"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def median(r: dict | None) -> float | None:
    return r["median_s"] if r else None


def fmt_x(x: float | None, digits: int = 2) -> str:
    return DASH if x is None else f"{_sig(x, digits)}×"


def _stamp(path: Path, payload: dict) -> str:
    """``YYYYMMDD-HHMMSS``: the run's end, from the file name; else its recorded start."""
    m = _STAMP.search(path.name)
    if m:
        return m.group(1)
    return datetime.datetime.fromisoformat(payload["meta"]["date"]).strftime("%Y%m%d-%H%M%S")


def is_complete(payload: dict) -> bool:
    """A default or --full run of every family on the CPU: what the README shows (a --quick
    run, an --only run or a GPU run leaves it alone)."""
    meta = payload.get("meta", {})
    return (
        meta.get("preset") in ("default", "full")
        and set(_cases.FAMILIES) <= set(meta.get("families", ()))
        and meta.get("device", "cpu") == "cpu"
    )


def latest(results_dir: Path) -> Path:
    """The latest complete run in ``results_dir``, by the date stamp of its name."""
    runs = []
    for path in results_dir.glob("*.json"):
        payload = json.loads(path.read_text())
        # other JSON lives here too (make quality, the GPU static check): not report runs
        if isinstance(payload, dict) and is_complete(payload):
            runs.append((_stamp(path, payload), path.name, path))
    if not runs:
        raise FileNotFoundError(f"no complete benchmark run (default or --full) in {results_dir}")
    return max(runs)[2]


def _fill(text: str) -> str:
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _header(meta: dict, stamp: str, json_rel: str) -> list[str]:
    threads = meta["threads"]
    thread_txt = "one thread" if threads == 1 else f"{threads} threads"
    when = datetime.datetime.strptime(stamp, "%Y%m%d-%H%M%S").strftime("%Y-%m-%d %H:%M")
    preset = meta.get("preset", "default")
    command = "make bench" + ("" if preset == "default" else f" BENCH_ARGS=--{preset}")
    return [
        f"## Latest results (this machine: {meta['cores']}-core {meta['cpu']}, {thread_txt}, fp32)",
        _fill(
            f"`{command}`, {when} (`{json_rel}`), medians; ratios are from one run (the machine "
            "is shared; absolute times are context). `bench/README.md` explains every column "
            "and target. `python -m bench.readme` wrote this section from that file."
        ),
    ]


def _attention(results: list[dict], png_rel: str | None) -> list[str]:
    op = "screened_attention"
    base = {k: v for k, v in _cases.ATTENTION_BASE.items() if k != "device"}
    keys = base["window"] + base["relevant"]

    def get(provider, T, mode):
        shape = {**base, "T": T}
        return find(results, op=op, provider=provider, mode=mode, shape=shape, ignore=("device",))

    def window(T, mode):
        peers = [r for p in _cases.WINDOW_PEERS if (r := get(p, T, mode))]
        return min(peers, key=lambda r: r["median_s"]) if peers else None

    def cpu_cell(T, mode):
        r = get("cpu", T, mode)
        if r is None:
            return DASH
        vs = [
            f"{fmt_x(r['ratios'][key], digits)} {name}"
            for key, name, digits in (("vs_dense", "dense", 3), ("vs_window", "window", 2))
            if key in r["ratios"]
        ]
        return fmt_time(r["median_s"]) + (f" ({', '.join(vs)})" if vs else "")

    Ts = sorted(
        {
            r["shape"]["T"]
            for r in results
            if r["op"] == op
            and r["status"] == "ok"
            and all(r["shape"][k] == v for k, v in base.items())
        }
    )
    rows, speeds, best = [], [], []
    for T in Ts:
        row = [str(T)]
        for mode in _cases.MODES:
            row += [
                cpu_cell(T, mode),
                fmt_time(median(get("sdpa_dense", T, mode))),
                fmt_time(median(window(T, mode))),
            ]
            cpu, peer = get("cpu", T, mode), window(T, mode)
            if cpu and peer:
                speeds.append(peer["median_s"] / cpu["median_s"])
                best.append(peer["provider"])
        row.append(fmt_x(ratio(get("cpu", T, "fwd+bwd"), "vs_ref")))
        rows.append(row)
    header = ["T"]
    for mode in _cases.MODES:
        header += [f"cpu {mode}", f"dense SDPA {mode}", f"window {mode} ({keys} keys)"]
    header.append("cpu vs reference (fwd+bwd)")
    shape = ", ".join(
        f"{name}={base[k]}"
        for k, name in (("B", "B"), ("H", "H"), ("D", "D"), ("window", "ν"), ("relevant", "ρ"))
    )
    out = [
        _fill(
            f"**Screened attention** ({shape}). In a `cpu` cell: its speedup over dense SDPA "
            "and over the window column, the fastest sliding-window attention over the same "
            f"number of keys ({', or '.join(_WINDOW_NAMES[p] for p in _cases.WINDOW_PEERS)}):"
        ),
        _table(header, rows),
    ]
    if png_rel:
        out.append(f"![time vs T]({png_rel})")
    if speeds:
        lo, hi = min(speeds), max(speeds)
        cost_lo, cost_hi = max(0, round(100 * (1 / hi - 1))), max(0, round(100 * (1 / lo - 1)))
        names = " or ".join(_WINDOW_NAMES[p] for p in dict.fromkeys(best))
        span = f"{lo:.1f}×" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}×"
        cost = f"{cost_lo}%" if cost_lo == cost_hi else f"{cost_lo}–{cost_hi}%"
        out.append(
            _fill(
                f"The screened kernel runs at {span} the speed of the best sliding-window "
                "attention over the same number of keys that we could build on this CPU "
                f"({names}), T = {Ts[0]} to {Ts[-1]}, forward and forward + backward: the "
                f"screening itself costs {cost}."
            )
        )
    return out


def _rnn(results: list[dict]) -> list[str]:
    Ts = sorted({r["shape"]["T"] for r in results if r["family"] == "rnn"})
    if not Ts:
        return []
    T0, T1 = Ts[0], Ts[-1]

    def get(op, provider, T):
        shape = {**_cases.RNN_BASE, "T": T}
        return find(results, op=op, provider=provider, mode="fwd+bwd", shape=shape)

    rows = []
    for op in _cases.RNN_OPS:
        cpu, ref, products = get(op, "cpu", T0), get(op, "reference", T0), get(op, "products", T0)
        speedup, over = ratio(cpu, "vs_ref"), time_ratio(cpu, products)
        scaling = time_ratio(get(op, "cpu", T1), cpu) if T1 > T0 else None
        rows.append(
            [
                _RNN_NAMES[op],
                fmt_time(median(cpu)),
                fmt_time(median(ref)) + (f" ({fmt_x(speedup)})" if speedup else ""),
                fmt_time(median(products)) + (f" (cpu is {fmt_x(over)} that)" if over else ""),
                _sig(scaling, 3) if scaling else DASH,
            ]
        )
    b = _cases.RNN_BASE
    header = ["", "cpu", "reference", "its matrix products alone", f"T={T1} / T={T0}"]
    return [
        _fill(
            f"**RelRNN / RelLSTM**, forward + backward through time (T={T0}, B={b['B']}, input "
            f"{b['input_size']}, hidden {b['hidden']}, ν={b['window']}, ρ={b['relevant']}):"
        ),
        _table(header, rows),
    ]


def _feedback(results: list[dict]) -> list[str]:
    Ns = sorted({r["shape"]["N"] for r in results if r["family"] == "feedback"})
    if not Ns:
        return []
    N = Ns[-1]

    def get(op, provider, mode):
        extra = _cases.FEEDBACK_GATE_SHAPE if op == "ins_bias_ada_relu" else _cases.FEEDBACK_MODEL
        return find(results, op=op, provider=provider, mode=mode, shape={"N": N, **extra})

    def t(op, provider, mode):
        return fmt_time(median(get(op, provider, mode)))

    def vs(op, mode, key):
        return fmt_x(ratio(get(op, "cpu", mode), key), 3 if key == "vs_floor" else 2)

    def over_floor(op, mode):
        return fmt_x(time_ratio(get(op, "cpu", mode), get(op, "conv_floor", mode)), 3)

    fused = "ins_bias_ada_relu"
    return [
        _fill(
            f"**CNN-F** (the paper's Fashion-MNIST CNNF, batch {N}): the fused "
            f"InsNorm·Bias·AdaReLU runs {vs(fused, 'fwd', 'vs_eager')} faster than its eager "
            f"composition forward, {vs(fused, 'fwd+bwd', 'vs_eager')} forward + backward; one "
            f"`feedback_step` takes {t('feedback_step', 'cpu', 'fwd')} against "
            f"{t('feedback_step', 'conv_floor', 'fwd')} for its convolutions and linear maps "
            f"alone ({over_floor('feedback_step', 'fwd')}), `run_cycles` forward + backward "
            f"{t('run_cycles', 'cpu', 'fwd+bwd')} against "
            f"{t('run_cycles', 'conv_floor', 'fwd+bwd')} "
            f"({over_floor('run_cycles', 'fwd+bwd')}); the eager network takes "
            f"{vs('feedback_step', 'fwd', 'vs_eager')} and "
            f"{vs('run_cycles', 'fwd+bwd', 'vs_eager')} longer."
        )
    ]


def _targets(items: list[dict]) -> list[str]:
    measured = [t for t in items if t["value"] is not None]
    if not measured:
        return []
    missed = [t for t in measured if t["status"] == "MISS"]
    text = (
        f"**Targets** (`bench/README.md`): {len(measured) - len(missed)} of the "
        f"{len(measured)} measured pass"
    )
    if len(measured) < len(items):
        text += f" ({len(items) - len(measured)} more are not measured in this preset)"
    if missed:
        text += "; missed: " + ", ".join(
            f"{t['name']}: {t['value']:.2f} (target "
            f"{'>=' if t['higher_is_better'] else '<='} {t['target']:g})"
            for t in missed
        )
    return [_fill(text + ".")]


def render(payload: dict, json_path: Path, readme: Path) -> str:
    """The Markdown between the markers (without them) for the run in ``json_path``."""
    results = payload["results"]

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path, readme.parent)).as_posix()

    png = json_path.with_name(json_path.stem + "-attention-time.png")
    blocks = [
        *_header(payload["meta"], _stamp(json_path, payload), rel(json_path)),
        *_attention(results, rel(png) if png.is_file() else None),
        *_rnn(results),
        *_feedback(results),
        *_targets(load_targets(payload)),
    ]
    return "\n\n".join(blocks)


def update(text: str, section: str) -> str:
    """``text`` with ``section`` between the markers (each marker on its own line)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {BEGIN} ... {END} section")
    return text[: start + len(BEGIN)] + "\n" + section + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    p.add_argument("--json", type=Path, help="result JSON (default: the latest complete run)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    json_path = args.json if args.json is not None else latest(args.results)
    section = render(json.loads(json_path.read_text()), json_path, args.readme)
    old = args.readme.read_text()
    new = update(old, section)
    if args.check:
        if new != old:
            print(
                f"{args.readme} is out of date with {json_path}: run python -m bench.readme",
                file=sys.stderr,
            )
            return 1
        return 0
    if new != old:
        args.readme.write_text(new)
        print(f"updated {args.readme} from {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

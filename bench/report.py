"""The benchmark report: ``python -m bench.report [--quick|--full] [--only attention,rnn,feedback]
[--threads N] [--baseline JSON [--fail-on-regression]] [--device cpu|cuda] [--out DIR]``.

Runs the standard sweep of bench/_cases.py with its own timing loop, prints one table per op
with ratios measured in the same run, a "targets" section (the criteria of issues 3, 4 and 5),
and writes ``<out>/<machine>-<date>.json`` (every figure, machine, versions, git SHA) and PNG plots.
See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from bench import _cases, bench_attention, bench_feedback, bench_rnn
from bench._common import (
    CheckFailed,
    Unavailable,
    fmt_time,
    measure,
    measure_group,
    sync_for,
)

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"attention": bench_attention, "rnn": bench_rnn, "feedback": bench_feedback}

# Ratio columns per family: (JSON key, column label, peer providers, shape keys the peer ignores).
# Each is time(peer) / time(row): > 1 means the row is faster. With several peers, the fastest.
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
}
REGRESSION = 1.10  # --baseline flags cases more than 10% slower


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(threads: int) -> dict:
    import screening_attn

    sha = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    build = screening_attn.build_info()
    build.pop("parallel_info", None)
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "threads": threads,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "screening_attn": screening_attn.__version__,
        "screening_attn_build": build,
        "git_sha": sha,
        "git_dirty": dirty,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": _loadavg(),
    }


def _peak_rss_gb() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    scale = 1e9 if sys.platform == "darwin" else 1e6  # bytes on macOS, KiB elsewhere
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 2)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_slug(info: dict) -> str:
    cpu = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", info["cpu"].lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-") or "machine"
    return f"{cpu}-{info['cores']}c"


def matmul_gflops() -> float:
    """Throughput of a 1024x1024 fp32 matmul at the set threads, from its fastest call (the
    machine's capability; other load on the machine only ever slows calls down)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = measure(lambda: a @ b, min_time=0.5, max_reps=200)
    return 2 * 1024**3 / min(t.times) / 1e9


class Progress:
    """One status line on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int) -> None:
        self.total, self.start = total, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def show(self, i: int, text: str) -> None:
        elapsed = time.perf_counter() - self.start
        width = 24
        filled = int(width * i / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {i}/{self.total} "
            f"{int(elapsed // 60):02d}:{int(elapsed % 60):02d} {text}"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:118].ljust(118))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _record(case: _cases.Case) -> dict:
    return {
        "family": case.family,
        "op": case.op,
        "provider": case.provider,
        "mode": case.mode,
        "shape": case.kwargs,
        "status": "ok",
        "reason": None,
    }


def setup_case(case: _cases.Case, rec: dict):
    """The case's callable after its reference check, or None with ``rec`` saying why."""
    t0 = time.perf_counter()
    try:
        fn = MODULES[case.family].SETUPS[case.op](case.provider, case.mode, **case.kwargs)
    except Unavailable as exc:
        rec.update(status="skipped", reason=str(exc))
        return None
    except CheckFailed as exc:
        rec.update(status="failed", reason=f"check against the reference: {exc}")
        return None
    except Exception as exc:  # the report goes on; the case says what happened
        rec.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None
    rec["setup_s"] = round(time.perf_counter() - t0, 3)
    if case.provider in ("matmul_floor", "conv_floor"):
        rec["check"] = "n/a (not the op)"
    elif case.family == "feedback" and case.provider == "reference":
        rec["check"] = "n/a (is the reference)"
    else:
        rec["check"] = "passed"
    return fn


def run_group(group: list[_cases.Case], timing: dict, progress: Progress, done: int) -> list[dict]:
    """Set up (and check) every provider of one (op, shape, mode), then time them interleaved."""
    records, fns = [], {}
    for i, case in enumerate(group):
        progress.show(done + i, f"{case.op} {case.shape_id} {case.mode}: check {case.provider}")
        rec = _record(case)
        fn = setup_case(case, rec)
        records.append(rec)
        if fn is not None:
            fns[i] = fn
    head = group[0]
    progress.show(done + len(group), f"{head.op} {head.shape_id} {head.mode}: timing")
    try:
        timings = measure_group(fns, sync=sync_for(head.kwargs.get("device", "cpu")), **timing)
    except Exception as exc:  # a provider that passed its check but raises later
        timings = {}
        for i in fns:
            records[i].update(status="failed", reason=f"while timing: {type(exc).__name__}: {exc}")
    fns.clear()
    gc.collect()
    peak = _peak_rss_gb()
    for rec in records:
        rec["peak_rss_gb"] = peak  # of the process so far: to spot a case that blows memory up
    for i, t in timings.items():
        case, rec = group[i], records[i]
        rec.update(median_s=t.median, q1_s=t.q1, q3_s=t.q3, spread=t.spread, n=t.n, times_s=t.times)
        flop = MODULES[case.family].flops(case.op, case.provider, case.mode, case.kwargs)
        if flop is not None:
            rec["flop"] = flop
            rec["gflops"] = flop / t.median / 1e9
    return records


def groups(cases: list[_cases.Case]) -> list[list[_cases.Case]]:
    """Consecutive cases of one (op, shape, mode)."""
    out: list[list[_cases.Case]] = []
    for c in cases:
        g = out[-1][0] if out else None
        if g is not None and (g.op, g.shape, g.mode) == (c.op, c.shape, c.mode):
            out[-1].append(c)
        else:
            out.append([c])
    return out


def _same_shape(a: dict, b: dict, ignore: Iterable[str]) -> bool:
    keys = (set(a) | set(b)) - set(ignore)
    return all(a.get(k) == b.get(k) for k in keys)


def find(results, *, op, provider, mode, shape, ignore=()) -> dict | None:
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


def _fmt_ratio(x: float | None) -> str:
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


def print_tables(results: list[dict], out=sys.stdout) -> None:
    ops = []
    for r in results:
        if (r["family"], r["op"]) not in ops:
            ops.append((r["family"], r["op"]))
    for family, op in ops:
        records = [r for r in results if r["op"] == op]
        shown = [r for r in records if r["status"] != "skipped"]
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
            "GFLOP/s",
            "%mm",
        ]
        rows, notes = [], []
        for r in shown:
            shape = " ".join(f"{k}={r['shape'][k]}" for k in varying) or "-"
            if r["status"] == "failed":
                rows.append(
                    [
                        shape,
                        r["provider"],
                        r["mode"],
                        "FAILED",
                        "",
                        "",
                        *[""] * len(ratio_cols),
                        "",
                        "",
                    ]
                )
                where = f" {shape}" if shape != "-" else ""
                notes.append(f"  FAILED {r['provider']} {r['mode']}{where}: {r['reason']}")
                continue
            ratios = r.get("ratios", {})
            rows.append(
                [
                    shape,
                    r["provider"],
                    r["mode"],
                    fmt_time(r["median_s"]),
                    f"{100 * r['spread']:.1f}",
                    str(r["n"]),
                    *(_fmt_ratio(ratios.get(key)) for key, _, _, _ in ratio_cols),
                    f"{r['gflops']:.1f}" if "gflops" in r else "-",
                    f"{100 * r['frac_matmul']:.0f}%" if "frac_matmul" in r else "-",
                ]
            )
        right = set(range(3, len(header)))
        if rows:
            print(_table(rows, header, right), file=out)
        for n in notes:
            print(n, file=out)
        skipped = {}
        for r in records:
            if r["status"] == "skipped":
                skipped.setdefault((r["provider"], r["reason"]), []).append(r["mode"])
        for (provider, reason), _ in skipped.items():
            print(f"  skipped {provider}: {reason}", file=out)


class _Targets:
    """Collects target items: a measured value against its bound, or why it wasn't measured."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, issue, name, value, target, higher_is_better, missing):
        item = {"issue": issue, "name": name, "value": value, "target": target}
        item["higher_is_better"] = higher_is_better
        if value is None:
            item.update(status="not measured", note=missing)
        else:
            ok = value >= target if higher_is_better else value <= target
            item["status"] = "PASS" if ok else "MISS"
        self.items.append(item)


def _time_ratio(a: dict | None, b: dict | None) -> float | None:
    return a["median_s"] / b["median_s"] if a and b else None


def _ratio(r: dict | None, key: str) -> float | None:
    return r["ratios"].get(key) if r else None


def _attention_targets(results: list[dict], out: _Targets) -> None:
    """Issue 3: the screened-attention CPU kernel."""
    base = {k: _cases.ATTENTION_BASE[k] for k in ("B", "H", "D", "window", "relevant")}

    def cpu(T, mode):
        shape = {**base, "T": T}
        return find(
            results, op="screened_attention", provider="cpu", mode=mode, shape=shape,
            ignore=("device",),
        )  # fmt: skip

    def add(*args):
        out.add(3, *args)

    for mode, target in (("fwd", 20.0), ("fwd+bwd", 10.0)):
        add(
            f"cpu {mode} speedup over dense SDPA at T=16384",
            _ratio(cpu(16384, mode), "vs_dense"),
            target,
            True,
            "needs cpu and sdpa_dense at T=16384 (default or --full)",
        )
    for mode in ("fwd", "fwd+bwd"):
        add(
            f"cpu {mode} time(T=32768) / time(T=8192)",
            _time_ratio(cpu(32768, mode), cpu(8192, mode)),
            4.5,
            False,
            "needs cpu at T=8192 and T=32768 (--full)",
        )
    for mode in ("fwd", "fwd+bwd"):
        # at the largest T where cpu and a window peer both ran
        best = None
        for T in sorted({r["shape"]["T"] for r in results if r["op"] == "screened_attention"}):
            r = cpu(T, mode)
            if r and "vs_window" in r["ratios"]:
                best = (T, r["ratios"]["vs_window"])
        add(
            f"cpu {mode} speed relative to the best window attention"
            + (f" at T={best[0]}" if best else ""),
            best[1] if best else None,
            0.5,
            True,
            "needs cpu and sdpa_window or flex_window at one T",
        )
    add(
        "cpu fwd+bwd speedup over the reference at T=2048",
        _ratio(cpu(2048, "fwd+bwd"), "vs_ref"),
        50.0,
        True,
        "needs cpu and reference fwd+bwd at T=2048 (default or --full)",
    )


def _rnn_targets(results: list[dict], out: _Targets) -> None:
    """Issue 4: RelRNN / RelLSTM forward + backward on the fused CPU kernels, at the smaller
    and the larger T of the preset (1000 and 4000 by default)."""
    Ts = sorted({r["shape"]["T"] for r in results if r["family"] == "rnn"})
    if not Ts:
        return
    T0, T1 = Ts[0], Ts[-1]

    def get(op, provider, T):
        shape = {**_cases.RNN_BASE, "T": T}
        return find(results, op=op, provider=provider, mode="fwd+bwd", shape=shape)

    for op in _cases.RNN_OPS:
        cpu = get(op, "cpu", T0)
        out.add(
            4,
            f"{op} cpu fwd+bwd speedup over the reference at T={T0}",
            _ratio(cpu, "vs_ref"),
            20.0,
            True,
            "needs cpu and reference",
        )
        out.add(
            4,
            f"{op} cpu fwd+bwd time / its matrix products alone at T={T0}",
            _time_ratio(cpu, get(op, "products", T0)),
            2.0,
            False,
            "needs cpu and products",
        )
        out.add(
            4,
            f"{op} cpu fwd+bwd time(T={T1}) / time(T={T0})",
            _time_ratio(get(op, "cpu", T1), cpu) if T1 > T0 else None,
            4.4,
            False,
            "needs cpu at two T (default or --full)",
        )


def _feedback_targets(results: list[dict], out: _Targets) -> None:
    """Issue 5: the CNN-F fused kernels against the eager composition and against the
    convolutions and linear maps alone (CNNF at the preset's batch)."""
    Ns = sorted({r["shape"]["N"] for r in results if r["family"] == "feedback"})
    if not Ns:
        return
    N = Ns[-1]

    def get(op, provider, mode):
        extra = _cases.FEEDBACK_GATE_SHAPE if op == "ins_bias_ada_relu" else _cases.FEEDBACK_MODEL
        shape = {"N": N, **extra}
        return find(results, op=op, provider=provider, mode=mode, shape=shape)

    for mode in _cases.MODES:
        out.add(
            5,
            f"ins_bias_ada_relu cpu {mode} speedup over its eager composition, N={N}",
            _ratio(get("ins_bias_ada_relu", "cpu", mode), "vs_eager"),
            2.0,
            True,
            "needs ins_bias_ada_relu cpu and reference",
        )
    for op, mode in (("feedback_step", "fwd"), ("run_cycles", "fwd+bwd")):
        out.add(
            5,
            f"{op} cpu {mode} time / its convolutions and linear maps alone, N={N}",
            _time_ratio(get(op, "cpu", mode), get(op, "conv_floor", mode)),
            1.2,
            False,
            f"needs {op} cpu and conv_floor",
        )


def targets(results: list[dict]) -> list[dict]:
    """The issues' criteria (3: attention, 4: RNNs, 5: CNN-F), for the families that ran."""
    out = _Targets()
    families = {r["family"] for r in results}
    for family, collect in (
        ("attention", _attention_targets),
        ("rnn", _rnn_targets),
        ("feedback", _feedback_targets),
    ):
        if family in families:
            collect(results, out)
    return out.items


def print_targets(items: list[dict], out=sys.stdout) -> None:
    issue = None
    for t in items:
        if t["issue"] != issue:
            issue = t["issue"]
            print(f"\n== targets of issue {issue}, measured in this run ==", file=out)
        cmp = ">=" if t.get("higher_is_better", True) else "<="
        if t["value"] is None:
            print(
                f"  {'-':>7}  {t['name']} (target {cmp} {t['target']:g}): not measured, "
                f"{t['note']}",
                file=out,
            )
        else:
            print(
                f"  {t['value']:7.2f}  {t['name']} (target {cmp} {t['target']:g}): {t['status']}",
                file=out,
            )


def write_plots(results: list[dict], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    ok = [r for r in results if r["status"] == "ok"]
    providers = list(dict.fromkeys(r["provider"] for r in results))
    cmap = plt.get_cmap("tab10")
    color = {p: cmap(i % 10) for i, p in enumerate(providers)}
    ratio_fmt = FuncFormatter(lambda y, _: f"{y:g}x")
    paths = []

    base = (_cases.ATTENTION_BASE["window"], _cases.ATTENTION_BASE["relevant"])
    attn = [
        r
        for r in ok
        if r["op"] == "screened_attention"
        and (r["shape"]["window"], r["shape"]["relevant"]) == base
    ]
    if attn:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        for ax, mode in zip(axes, _cases.MODES):
            for provider in _cases.ATTENTION_PROVIDERS:
                pts = sorted(
                    (r["shape"]["T"], r["median_s"])
                    for r in attn
                    if r["provider"] == provider and r["mode"] == mode
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=provider, color=color[provider])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T")
            ax.set_title(f"screened_attention {mode} (ν={base[0]}, ρ={base[1]})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("time per call [s]")
        fig.tight_layout()
        path = stem.with_name(stem.name + "-attention-time.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    # speedup bars: per op and mode, every provider over the op's baseline at the largest shape
    # where the baseline ran (attention: dense SDPA; the others: the reference)
    ops = list(dict.fromkeys(r["op"] for r in ok))
    if ops:
        ncols = min(4, len(ops))
        nrows = -(-len(ops) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.8 * nrows), squeeze=False)
        for ax in axes.flat[len(ops) :]:
            ax.set_visible(False)
        for ax, op in zip(axes.flat, ops):
            baseline = "sdpa_dense" if op == "screened_attention" else "reference"
            width = 0.8 / len(_cases.MODES)
            where, per_mode = "", {}
            for mode in _cases.MODES:
                base_recs = [
                    r
                    for r in ok
                    if r["op"] == op and r["provider"] == baseline and r["mode"] == mode
                ]
                if not base_recs:
                    continue
                ref = base_recs[-1]
                where = " ".join(f"{k}={v}" for k, v in ref["shape"].items() if k in ("T", "N"))
                per_mode[mode] = {
                    r["provider"]: ref["median_s"] / r["median_s"]
                    for r in ok
                    if r["op"] == op and r["mode"] == mode and r["shape"] == ref["shape"]
                }
            names = [p for p in providers if any(p in sp for sp in per_mode.values())]
            for i, mode in enumerate(_cases.MODES):
                speedup = per_mode.get(mode, {})
                xs = [j for j, p in enumerate(names) if p in speedup]
                ax.bar(
                    [x + (i - 0.5) * width for x in xs],
                    [speedup[names[x]] for x in xs],
                    width=width,
                    label=mode,
                )
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ratio_fmt)
            ax.yaxis.set_minor_formatter(ratio_fmt)
            ax.tick_params(axis="y", which="both", labelsize=7)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_title(f"{op}: speedup over {baseline}\n{where}", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.with_name(stem.name + "-speedup.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _key(r: dict) -> tuple:
    return (r["family"], r["op"], r["provider"], r["mode"], json.dumps(r["shape"], sort_keys=True))


def compare_baseline(results: list[dict], meta: dict, path: Path, out=sys.stdout) -> list[dict]:
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
        item = {
            "case": _label(r),
            "before_s": b["median_s"],
            "now_s": r["median_s"],
            "ratio": ratio,
        }
        if ratio > REGRESSION:
            slower.append(item)
        elif ratio < 1 / REGRESSION:
            faster.append(item)
    print(
        f"  {compared} cases compared; {len(slower)} more than {100 * (REGRESSION - 1):.0f}% "
        f"slower, {len(faster)} more than {100 * (REGRESSION - 1):.0f}% faster",
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


def _label(r: dict) -> str:
    shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if (k, v) != ("device", "cpu"))
    return f"{r['op']} {r['provider']} {r['mode']} {shape}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--quick", action="store_const", dest="preset", const="quick", help="small sweep (~1 min)"
    )
    g.add_argument(
        "--full",
        action="store_const",
        dest="preset",
        const="full",
        help="adds T=32768 and a window/relevant sweep",
    )
    p.set_defaults(preset="default")
    p.add_argument(
        "--only",
        default=",".join(_cases.FAMILIES),
        help="comma-separated families (default: attention,rnn,feedback)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device of the attention cases (default: cpu)",
    )
    p.add_argument("--baseline", type=Path, help="earlier result JSON to compare with")
    p.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="exit 1 when --baseline finds a case more than 10%% slower",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="directory of the JSON and PNG files (default: bench/results)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    args.families = [f.strip() for f in args.only.split(",") if f.strip()]
    bad = [f for f in args.families if f not in _cases.FAMILIES]
    if bad:
        p.error(f"--only takes {','.join(_cases.FAMILIES)}, got {','.join(bad)}")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.baseline is not None and not args.baseline.is_file():
        p.error(f"--baseline {args.baseline}: no such file")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    meta = machine_info(args.threads)
    meta.update(preset=args.preset, families=args.families, device=args.device, argv=sys.argv[1:])
    print(f"screening_attn benchmark report, preset {args.preset!r}")
    print(f"  machine: {meta['cpu']}, {meta['cores']} cores ({meta['platform']})")
    print(f"  threads: {args.threads} (OMP_NUM_THREADS={meta['omp_num_threads_env']})")
    print(
        f"  python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}; "
        f"git {str(meta['git_sha'])[:10]}{' (dirty)' if meta['git_dirty'] else ''}; "
        f"{meta['date']}"
    )
    load = meta["loadavg_start"]
    if load and load[0] > max(1, (meta["cores_usable"] or 1) - args.threads) + 0.5:
        print(
            f"  WARNING: load average {load[0]} at start: other work on this machine will "
            f"skew the timings"
        )
    meta["matmul_gflops"] = matmul_gflops()
    print(f"  1024x1024 fp32 matmul: {meta['matmul_gflops']:.1f} GFLOP/s (at the start)")
    sys.stdout.flush()

    cases = _cases.cases(args.preset, args.families, device=args.device)
    mm_start = meta["matmul_gflops"]
    progress = Progress(len(cases))
    results = []
    for group in groups(cases):
        timing = _cases.timing(group[0], args.preset)
        results.extend(run_group(group, timing, progress, len(results)))
    progress.show(len(cases), "done")
    progress.done()

    # measured again at the end: the machine's throughput is the better of the two (other load
    # or throttling only ever lowers it)
    meta["matmul_gflops_end"] = matmul_gflops()
    meta["matmul_gflops_start"] = mm_start
    meta["matmul_gflops"] = max(mm_start, meta["matmul_gflops_end"])
    print(
        f"  1024x1024 fp32 matmul: {mm_start:.1f} GFLOP/s at the start, "
        f"{meta['matmul_gflops_end']:.1f} at the end; %mm uses {meta['matmul_gflops']:.1f}"
    )
    add_ratios(results, meta["matmul_gflops"])
    print_tables(results)
    target_items = targets(results)
    if target_items:
        print_targets(target_items)

    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["loadavg_end"] = _loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = args.out / f"{machine_slug(meta)}-{stamp}"
    slower = []
    if args.baseline is not None:
        slower = compare_baseline(results, meta, args.baseline)
    payload = {"meta": meta, "results": results, "targets": target_items}
    if args.baseline is not None:
        payload["baseline"] = {"path": str(args.baseline), "slower": slower}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    print(f"\nwrote {_rel(json_path)}")
    if not args.no_plots:
        for path in write_plots(results, stem):
            print(f"wrote {_rel(path)}")
    n_failed = sum(r["status"] == "failed" for r in results)
    print(
        f"{len(results)} cases ({sum(r['status'] == 'ok' for r in results)} timed, "
        f"{sum(r['status'] == 'skipped' for r in results)} skipped, {n_failed} FAILED) "
        f"in {meta['elapsed_s']:.0f} s"
    )
    if args.fail_on_regression and slower:
        return 1
    return 0


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())

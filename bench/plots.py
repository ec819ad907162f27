"""The report's PNG plots, drawn from the run's records (matplotlib, headless):

* ``<stem>-attention-time.png``: time per call against T, log-log, of every attention provider
  at the base (window, relevant), forward and forward + backward;
* ``<stem>-speedup.png``: per op and mode, every provider's speedup over the op's baseline (dense
  SDPA for attention, the reference for the others) at the largest shape the baseline ran;
* ``<stem>-decode.png``: the decode family's time per token and cache memory against the
  context, per provider.
"""

from __future__ import annotations

from pathlib import Path

from bench import _cases


def _attention_time(plt, ok: list[dict], color: dict, path: Path) -> bool:
    base = (_cases.ATTENTION_BASE["window"], _cases.ATTENTION_BASE["relevant"])
    attn = [
        r
        for r in ok
        if r["op"] == "screened_attention"
        and (r["shape"]["window"], r["shape"]["relevant"]) == base
    ]
    if not attn:
        return False
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _speedups(ok: list[dict], op: str, baseline: str) -> tuple[str, dict]:
    """Per mode, every provider's speedup over ``baseline`` at the largest shape where the
    baseline ran (the last in run order), and that shape's T or N."""
    where, per_mode = "", {}
    for mode in _cases.MODES:
        base_recs = [
            r for r in ok if r["op"] == op and r["provider"] == baseline and r["mode"] == mode
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
    return where, per_mode


def _speedup(plt, ok: list[dict], providers: list[str], path: Path) -> bool:
    from matplotlib.ticker import FuncFormatter

    ops = list(dict.fromkeys(r["op"] for r in ok))
    if not ops:
        return False
    ratio_fmt = FuncFormatter(lambda y, _: f"{y:g}x")
    ncols = min(4, len(ops))
    nrows = -(-len(ops) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(ops) :]:
        ax.set_visible(False)
    width = 0.8 / len(_cases.MODES)
    for ax, op in zip(axes.flat, ops):
        baseline = "sdpa_dense" if op == "screened_attention" else "reference"
        where, per_mode = _speedups(ok, op, baseline)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _decode(plt, ok: list[dict], color: dict, path: Path) -> bool:
    dec = [r for r in ok if r["family"] == "decode"]
    if not dec:
        return False
    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for provider in _cases.DECODE_PROVIDERS:
        rows = sorted(
            (r["shape"]["context"], r["median_s"], r["cache_bytes"])
            for r in dec
            if r["provider"] == provider
        )
        if not rows:
            continue
        ctx, t, mem = zip(*rows)
        t_ax.plot(ctx, [1e3 * x for x in t], marker="o", label=provider, color=color[provider])
        m_ax.plot(ctx, [x / 2**20 for x in mem], marker="o", label=provider, color=color[provider])
    shape = dec[0]["shape"]
    for ax, label in ((t_ax, "time per token [ms]"), (m_ax, "cache memory [MiB]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (positions)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    t_ax.set_title(
        f"greedy decode, {shape['layers']} layers, hidden {shape['hidden']}, "
        f"{shape['heads']}/{shape['kv_heads']} heads",
        fontsize=9,
    )
    m_ax.set_title(
        f"cache after the context (ν={shape['window']}, ρ={shape['relevant']})", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(results: list[dict], stem: Path) -> list[Path]:
    """Draw the plots next to ``stem`` (the JSON's path without its suffix); their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    providers = list(dict.fromkeys(r["provider"] for r in results))
    cmap = plt.get_cmap("tab10")
    color = {p: cmap(i % 10) for i, p in enumerate(providers)}
    paths = []
    path = stem.with_name(stem.name + "-attention-time.png")
    if _attention_time(plt, ok, color, path):
        paths.append(path)
    path = stem.with_name(stem.name + "-speedup.png")
    kernels = [r for r in ok if r["family"] != "decode"]  # decode has its own plot
    if _speedup(plt, kernels, providers, path):
        paths.append(path)
    path = stem.with_name(stem.name + "-decode.png")
    if _decode(plt, ok, color, path):
        paths.append(path)
    return paths

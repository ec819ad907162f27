"""The targets: criteria a run's own figures are held to, each named by what it measures.

Every target is a ratio of times from one run (bench.ratios), against a bound; it prints PASS,
MISS, or "not measured" and what it needs (a preset or a provider that did not run). None of
them fails a build. The list and the reasons behind each bound are in bench/README.md.

An item of the result JSON's ``targets``: ``family``, ``name``, ``value`` (None when not
measured), ``target``, ``higher_is_better``, ``status`` and, when not measured, ``note``. Files
written before the targets were named by what they measure key them by tracker number instead
of family; ``load_targets`` recomputes those from the file's results (the same figures).
"""

from __future__ import annotations

import sys

from bench import _cases
from bench.ratios import find, ratio, time_ratio

TITLES = {
    "attention": "screened attention, the C++ CPU kernel",
    "rnn": "RelRNN / RelLSTM forward + backward, the fused CPU kernels",
    "feedback": "CNN-F, the fused CPU kernels (CNNF at the largest batch)",
    "decode": "greedy decoding with ScreenedCache, per token (bench.bench_decode)",
    "threads": "1 -> 2 threads, time at 1 thread / time at 2 (bench.threads)",
}


class _Targets:
    """Collects target items: a measured value against its bound, or why it wasn't measured."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, family, name, value, target, higher_is_better, missing) -> None:
        item = {"family": family, "name": name, "value": value, "target": target}
        item["higher_is_better"] = higher_is_better
        if value is None:
            item.update(status="not measured", note=missing)
        else:
            ok = value >= target if higher_is_better else value <= target
            item["status"] = "PASS" if ok else "MISS"
        self.items.append(item)


def _attention_targets(results: list[dict], out: _Targets) -> None:
    op = "screened_attention"
    base = {k: _cases.ATTENTION_BASE[k] for k in ("B", "H", "D", "window", "relevant")}

    def cpu(T, mode):
        shape = {**base, "T": T}
        return find(results, op=op, provider="cpu", mode=mode, shape=shape, ignore=("device",))

    def add(*args):
        out.add("attention", *args)

    for mode, target in (("fwd", 20.0), ("fwd+bwd", 10.0)):
        add(
            f"{op} cpu {mode} speedup over dense SDPA at T=16384",
            ratio(cpu(16384, mode), "vs_dense"),
            target,
            True,
            "needs cpu and sdpa_dense at T=16384 (default or --full)",
        )
    for mode in _cases.MODES:
        add(
            f"{op} cpu {mode} time(T=32768) / time(T=8192)",
            time_ratio(cpu(32768, mode), cpu(8192, mode)),
            4.5,
            False,
            "needs cpu at T=8192 and T=32768 (--full)",
        )
    for mode in _cases.MODES:
        # at the largest T where cpu and a window peer both ran
        best = None
        for T in sorted({r["shape"]["T"] for r in results if r["op"] == op}):
            r = cpu(T, mode)
            if r and "vs_window" in r["ratios"]:
                best = (T, r["ratios"]["vs_window"])
        add(
            f"{op} cpu {mode} speed relative to the best window attention"
            + (f" at T={best[0]}" if best else ""),
            best[1] if best else None,
            0.5,
            True,
            "needs cpu and sdpa_window or flex_window at one T",
        )
    add(
        f"{op} cpu fwd+bwd speedup over the reference at T=2048",
        ratio(cpu(2048, "fwd+bwd"), "vs_ref"),
        50.0,
        True,
        "needs cpu and reference fwd+bwd at T=2048 (default or --full)",
    )


# #15: the RNNs' floor is their own matrix products (the bound was 2 until #15 set these).
RNN_PRODUCTS_BOUND = {"rel_rnn": 1.35, "rel_lstm": 1.3}
# Targets no longer held, by name prefix: result files written before keep them as they were.
RETIRED = {
    "rel_rnn cpu fwd+bwd speedup over the reference": "#15: the reference got faster; the "
    "products alone are 10-16x it, so the floor became the products",
    "rel_lstm cpu fwd+bwd speedup over the reference": "#15, as rel_rnn's",
}


def retired(name: str) -> str | None:
    """Why the target ``name`` is no longer held, or None if it is."""
    return next((why for prefix, why in RETIRED.items() if name.startswith(prefix)), None)


def _rnn_targets(results: list[dict], out: _Targets) -> None:
    """At the smaller and the larger T of the preset (1000 and 4000 by default)."""
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
            "rnn",
            f"{op} cpu fwd+bwd time / its matrix products alone at T={T0}",
            time_ratio(cpu, get(op, "products", T0)),
            RNN_PRODUCTS_BOUND[op],
            False,
            "needs cpu and products",
        )
        out.add(
            "rnn",
            f"{op} cpu fwd+bwd time(T={T1}) / time(T={T0})",
            time_ratio(get(op, "cpu", T1), cpu) if T1 > T0 else None,
            4.4,
            False,
            "needs cpu at two T (default or --full)",
        )


def _feedback_targets(results: list[dict], out: _Targets) -> None:
    """Against the eager composition and against the convolutions and linear maps alone."""
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
            "feedback",
            f"ins_bias_ada_relu cpu {mode} speedup over its eager composition, N={N}",
            ratio(get("ins_bias_ada_relu", "cpu", mode), "vs_eager"),
            2.0,
            True,
            "needs ins_bias_ada_relu cpu and reference",
        )
    for op, mode in (("feedback_step", "fwd"), ("run_cycles", "fwd+bwd")):
        out.add(
            "feedback",
            f"{op} cpu {mode} time / its convolutions and linear maps alone, N={N}",
            time_ratio(get(op, "cpu", mode), get(op, "conv_floor", mode)),
            1.2,
            False,
            f"needs {op} cpu and conv_floor",
        )
    out.add(
        "feedback",
        f"run_cycles cpu fwd+bwd time in bfloat16 / in float32, N={N}",
        time_ratio(get("run_cycles", "cpu_bf16", "fwd+bwd"), get("run_cycles", "cpu", "fwd+bwd")),
        1.3,
        False,
        "needs run_cycles cpu and cpu_bf16",
    )


def _decode_targets(results: list[dict], out: _Targets) -> None:
    """At the smallest and the largest context of the preset (1k and 32k with --full)."""
    contexts = sorted({r["shape"]["context"] for r in results if r["family"] == "decode"})
    if not contexts:
        return
    c0, c1 = contexts[0], contexts[-1]

    def get(provider, context):
        return next(
            (
                r
                for r in results
                if r["family"] == "decode"
                and r["status"] == "ok"
                and r["provider"] == provider
                and r["shape"]["context"] == context
            ),
            None,
        )

    def add(*args):
        out.add("decode", *args)

    screened, screened0 = get("screened", c1), get("screened", c0)
    two = "needs screened at two contexts"
    add(
        f"ScreenedCache time per token at context {c1} / at {c0}",
        time_ratio(screened, screened0) if c1 > c0 else None,
        1.15,
        False,
        two,
    )
    add(
        f"ScreenedCache memory at context {c1} / at {c0}",
        screened["cache_bytes"] / screened0["cache_bytes"] if screened and screened0 else None,
        1.0,
        False,
        two,
    )
    add(
        f"ScreenedCache time per token / the sliding-window cache's (ν+ρ keys) at context {c1}",
        time_ratio(screened, get("sdpa_window", c1)),
        1.3,
        False,
        "needs screened and sdpa_window",
    )
    add(
        f"ScreenedCache speedup per token over DynamicCache (dense) at context {c1}",
        ratio(screened, "vs_dynamic"),
        1.0,
        True,
        "needs screened and sdpa_dynamic",
    )


_COLLECT = {
    "attention": _attention_targets,
    "rnn": _rnn_targets,
    "feedback": _feedback_targets,
    "decode": _decode_targets,
}


def targets(results: list[dict]) -> list[dict]:
    """The target items of the families that ran, in the order of ``TITLES``."""
    out = _Targets()
    families = {r["family"] for r in results}
    for family, collect in _COLLECT.items():
        if family in families:
            collect(results, out)
    return out.items


def thread_targets(records: list[dict]) -> list[dict]:
    """The speed-up of each of bench.threads' cases against its target (#15)."""
    out = _Targets()
    for r in records:
        out.add(
            "threads",
            f"{r['label']} fwd+bwd speed-up, 1 -> 2 threads",
            r.get("speedup"),
            r["target"],
            True,
            f"{r['status']}: {r['reason']}",
        )
    return out.items


def load_targets(payload: dict) -> list[dict]:
    """The target items of a result JSON; recomputed for files that predate ``family``."""
    stored = payload.get("targets", [])
    if stored and all("family" in t for t in stored):
        return stored
    return targets(payload.get("results", []))


def print_targets(items: list[dict], out=sys.stdout) -> None:
    family = None
    for t in items:
        if t["family"] != family:
            family = t["family"]
            print(f"\n== targets: {TITLES[family]}, measured in this run ==", file=out)
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

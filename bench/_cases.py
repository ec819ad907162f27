"""The standard sweeps: which (op, provider, mode, shape) cases each preset times.

Presets: ``quick`` (a smoke run, ~1 min), ``default`` (the report, < 5 min on a 2-core CPU,
single thread) and ``full`` (adds T=32768 and a window/relevant sweep). Cases come out in run
order: for one shape, every provider of one mode back to back, so that the ratios the report
prints are measured side by side (this machine throttles under sustained load).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

PRESETS = ("quick", "default", "full")
MODES = ("fwd", "fwd+bwd")
FAMILIES = ("attention", "rnn", "feedback")
# The kernel families above, and the decode family (a transformers model decoding with
# ScreenedCache against transformers' caches); a default run runs them all. The README's results
# section and the thread section are the kernel families'.
ALL_FAMILIES = (*FAMILIES, "decode")

# Timing budget per case (see bench._common.measure).
TIMING = {
    "quick": {"min_time": 0.2, "max_reps": 20},
    "default": {"min_time": 0.4, "max_reps": 50},
    "full": {"min_time": 1.0, "max_reps": 100},
}
# The whole-network cases (CNN-F's feedback_step and run_cycles, the RNNs over T = 1000 and
# 4000 steps) take 0.05-1 s a call, so the budget above gave them 3 to 8 samples, and the
# ratios they enter as targets (to the conv floor, to the matrix products, T-scaling)
# moved by +-5-15% between runs on this shared VM. They get a longer budget.
LONG_OPS = ("feedback_step", "run_cycles", "rel_rnn", "rel_lstm")
LONG_MIN_TIME = {"quick": 0.5, "default": 4.0, "full": 8.0}


def timing(case: Case, preset: str) -> dict:
    """The timing budget of ``case``'s group."""
    if case.family == "decode":
        return DECODE_TIMING[preset]
    if case.op in LONG_OPS:
        return {**TIMING[preset], "min_time": LONG_MIN_TIME[preset]}
    return TIMING[preset]


@dataclass(frozen=True)
class Case:
    family: str
    op: str
    provider: str
    mode: str
    shape: tuple[tuple[str, object], ...]  # (name, value) pairs, hashable

    @property
    def kwargs(self) -> dict:
        return dict(self.shape)

    @property
    def shape_id(self) -> str:
        return "-".join(f"{k}{v}" for k, v in self.shape if (k, v) != ("device", "cpu"))

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape_id}-{self.provider}-{self.mode}"

    @property
    def timing_group(self) -> tuple:
        """Cases timed together, interleaved (bench.run): one (op, shape, mode), except that the
        RNNs' two T share a group, so their ratio time(4T) / time(T), a target, is measured side
        by side like every other ratio (in groups of their own it read 4.1-5.2 for a kernel that
        scales 3.9-4.3 timed alternately)."""
        shape = self.shape
        if self.family == "rnn":
            shape = tuple((k, v) for k, v in shape if k != "T")
        return (self.op, shape, self.mode)


def _make(family: str, op: str, provider: str, mode: str, shape: dict) -> Case:
    return Case(family, op, provider, mode, tuple(shape.items()))


# fp32, B=1, H=8, D=64, ν=128, ρ=64; the window peers attend to ν+ρ=192 keys per query.
ATTENTION_BASE = {"B": 1, "H": 8, "D": 64, "window": 128, "relevant": 64, "device": "cpu"}
ATTENTION_T = {
    "quick": (512, 4096, 16384),
    "default": (1024, 2048, 4096, 8192, 16384),
    "full": (1024, 2048, 4096, 8192, 16384, 32768),
}
# (window, relevant) sweep at fixed T, full preset only; (128, 64) is in the T sweep already.
ATTENTION_WR = {"full": ((32, 16), (64, 32), (256, 128), (512, 256))}
ATTENTION_WR_T = 8192
ATTENTION_PROVIDERS = (
    "reference",  # screening_attn's pure-PyTorch reference (a Python loop over T)
    "cpu",  # the C++ kernel
    "triton",  # GPU kernel (--device cuda)
    "sdpa_dense",  # F.scaled_dot_product_attention(is_causal=True): O(T²)
    "sdpa_window",  # blocked SDPA over query chunks, sliding window of ν+ρ keys
    "flex_window",  # torch.compile'd FlexAttention with a sliding-window block mask
)
WINDOW_PEERS = ("sdpa_window", "flex_window")
# Largest T a slow provider is run at, per preset (the reference takes seconds at T=2048).
ATTENTION_MAX_T = {
    "reference": {"quick": 512, "default": 2048, "full": 2048},
    "sdpa_dense": {"quick": 4096, "default": 16384, "full": 16384},
}


def attention_cases(preset: str, device: str = "cpu") -> Iterator[Case]:
    base = {**ATTENTION_BASE, "device": device}
    shapes = [{**base, "T": T} for T in ATTENTION_T[preset]]
    shapes += [
        {**base, "T": ATTENTION_WR_T, "window": w, "relevant": r}
        for w, r in ATTENTION_WR.get(preset, ())
    ]
    for shape in shapes:
        swept_wr = (shape["window"], shape["relevant"]) != (base["window"], base["relevant"])
        for mode in MODES:
            for provider in ATTENTION_PROVIDERS:
                limit = ATTENTION_MAX_T.get(provider, {}).get(preset)
                if limit is not None and shape["T"] > limit:
                    continue
                if swept_wr and provider in ("reference", "sdpa_dense"):
                    continue  # dense doesn't depend on ν, ρ; the reference is too slow
                yield _make("attention", "screened_attention", provider, mode, shape)


RNN_BASE = {"B": 16, "input_size": 32, "hidden": 128, "window": 10, "relevant": 15}
# T and 4T: the target "time(4T) / time(T)" (the time per step stays flat) compares them.
RNN_T = {"quick": (100, 400), "default": (1000, 4000), "full": (1000, 4000)}
RNN_OPS = ("rel_rnn", "rel_lstm")
RNN_PROVIDERS = (
    "reference",
    "cpu",  # the fused C++ kernels
    "triton",
    "products",  # the cpu provider's own matrix products alone: its floor
    "matmul_floor",  # the matrix products of an eager step, T times
)
# Providers run at the smaller T only (the reference takes seconds per call at T=1000).
RNN_FIRST_T_ONLY = ("reference", "matmul_floor")


def rnn_cases(preset: str, device: str = "cpu") -> Iterator[Case]:
    for op in RNN_OPS:
        for mode in MODES:
            for T in RNN_T[preset]:  # both T of one mode in a row: one timing group
                shape = {**RNN_BASE, "T": T}
                for provider in RNN_PROVIDERS:
                    if provider in RNN_FIRST_T_ONLY and T != RNN_T[preset][0]:
                        continue
                    yield _make("rnn", op, provider, mode, shape)


# ada_relu / ada_relu_feedback at the shape of CNNF's relu2 input, (N, 32, 28, 28);
# feedback_step / run_cycles on the paper's Fashion-MNIST CNNF (ind=0, 2 cycles).
FEEDBACK_N = {"quick": (8,), "default": (64,), "full": (64, 256)}
FEEDBACK_GATE_SHAPE = {"C": 32, "HW": 28}
FEEDBACK_MODEL = {"ind": 0, "cycles": 2}
FEEDBACK_OPS = ("ada_relu", "ins_bias_ada_relu", "ada_relu_feedback", "feedback_step", "run_cycles")
FEEDBACK_PROVIDERS = {
    "ada_relu": ("reference", "cpu", "triton"),
    "ins_bias_ada_relu": ("reference", "cpu", "triton"),  # reference: the eager composition
    "ada_relu_feedback": ("reference", "cpu", "triton"),
    # reference = the eager composition (every gate in PyTorch ops); conv_floor = the same
    # convolutions and linear layers alone
    "feedback_step": ("reference", "cpu", "triton", "conv_floor"),
    # cpu_bf16: the cpu provider's network in bfloat16 (run_cycles only)
    "run_cycles": ("reference", "cpu", "cpu_bf16", "triton", "conv_floor"),
}


def feedback_cases(preset: str, device: str = "cpu") -> Iterator[Case]:
    for op in FEEDBACK_OPS:
        extra = FEEDBACK_MODEL if op in ("feedback_step", "run_cycles") else FEEDBACK_GATE_SHAPE
        for N in FEEDBACK_N[preset]:
            shape = {"N": N, **extra}
            for mode in MODES:
                for provider in FEEDBACK_PROVIDERS[op]:
                    yield _make("feedback", op, provider, mode, shape)


# Greedy decoding of a Llama-shaped model (bench_decode.MODEL) with ScreenedCache (ν=128, ρ=64)
# and transformers' caches: a context of ``context`` positions, then one decode step per call.
DECODE_BASE = {"window": 128, "relevant": 64, "layers": 4, "hidden": 512, "heads": 8, "kv_heads": 2}
DECODE_CONTEXT = {"quick": (256, 1024), "default": (1024, 8192), "full": (1024, 8192, 32768)}
DECODE_PROVIDERS = ("screened", "sdpa_dynamic", "sdpa_window")
# Decode steps per provider and context: a step takes milliseconds, so the count, not a time
# budget, ends the timing (min_time is never reached first).
DECODE_TIMING = {
    "quick": {"min_time": 1e9, "max_reps": 20},
    "default": {"min_time": 1e9, "max_reps": 100},
    "full": {"min_time": 1e9, "max_reps": 300},
}


def decode_cases(preset: str, device: str = "cpu") -> Iterator[Case]:
    for context in DECODE_CONTEXT[preset]:
        shape = {"context": context, **DECODE_BASE}
        for provider in DECODE_PROVIDERS:
            yield _make("decode", "decode", provider, "decode", shape)


_FAMILY_CASES = {
    "attention": attention_cases,
    "rnn": rnn_cases,
    "feedback": feedback_cases,
    "decode": decode_cases,
}


def cases(
    preset: str = "default", families: Iterable[str] = ALL_FAMILIES, device: str = "cpu"
) -> list[Case]:
    """Every case of ``preset`` for ``families``, in run order."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    out: list[Case] = []
    for family in families:
        if family not in _FAMILY_CASES:
            raise ValueError(f"family must be one of {ALL_FAMILIES}, got {family!r}")
        out.extend(_FAMILY_CASES[family](preset, device))
    return out

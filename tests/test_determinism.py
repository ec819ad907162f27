"""Every compiled op gives the same bits, outputs and every gradient, run after run and with 1 or
2 threads (``torch.set_num_threads``): screened attention (C++; Triton under the interpreter
across runs), the RelRNN / RelLSTM sequence ops, every CNN-F kernel and a CNN-F ``run_cycles``.

The CPU kernels split their work with ``at::parallel_for(0, n, grain, f)``, which runs ``f``
inline unless ``n > grain`` and otherwise in ``min(threads, ceil(n / grain))`` equal chunks (torch
2.13, ATen/Parallel-inl.h, ParallelOpenMP.h). The grains below mirror csrc/cpu/*.cpp and every
shape is asserted to exceed its kernel's, so the 2-thread runs really run two tasks (checked
once under gdb: each kernel reached GOMP_parallel with these shapes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _attention_utils import make_qkv
from _rnn_utils import make as make_rnn
from _rnn_utils import run as run_rnn

from screening_attn import _backend
from screening_attn.attention import screened_attention
from screening_attn.feedback import CNNF, functional

pytestmark = pytest.mark.skipif(_backend.C_ERROR is not None, reason=str(_backend.C_ERROR))

THREADS = (1, 2, 2)  # 1 vs 2 threads, and two runs with 2
F32, F64 = torch.float32, torch.float64
_INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, F32: torch.int32,
           F64: torch.int64, torch.bool: torch.uint8}  # fmt: skip


# --- at::parallel_for grains of csrc/cpu/*.cpp ----------------------------------------------------
def assert_splits(n: int, grain: int) -> None:
    """``at::parallel_for(0, n, grain)`` runs more than one task on 2 threads."""
    assert n > grain, f"{n} iterations fit one grain of {grain}: the kernel would run inline"


def feedback_plane_grain(plane_size: int) -> int:
    """csrc/cpu/vec.h ``plane_grain``: planes per task (the gates split elements by kGrain)."""
    return max(1, FEEDBACK_GRAIN // max(1, plane_size))


FEEDBACK_GRAIN = 32768  # csrc/cpu/vec.h kGrain: elements per task


# --- running and comparing --------------------------------------------------------------------
def _tensors(result) -> list[torch.Tensor]:
    """The tensors of nested tuples / lists / dataclasses, in order (None skipped)."""
    if result is None:
        return []
    if isinstance(result, torch.Tensor):
        return [result.detach()]
    if dataclasses.is_dataclass(result):
        result = [getattr(result, f.name) for f in dataclasses.fields(result)]
    return [t for item in result for t in _tensors(item)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so -0.0 and 0.0 differ, as would two NaN payloads)."""
    return t.contiguous().view(_INT_OF[t.dtype]) if t.dtype in _INT_OF else t


def assert_deterministic(
    fn, threads: tuple[int, ...] = THREADS, thread_dependent: frozenset[int] = frozenset()
) -> None:
    """``fn()`` (outputs and gradients) has the same bits under each thread count in turn; the
    results numbered in ``thread_dependent`` only between runs with the same thread count."""
    saved = torch.get_num_threads()
    runs = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            assert torch.get_num_threads() == n
            runs.append(_tensors(fn()))
    finally:
        torch.set_num_threads(saved)
    first = runs[0]
    assert first, "nothing to compare"
    for t in first:  # NaN-free inputs; a NaN here would hint at reads of uninitialized memory
        assert not (t.is_floating_point() and t.isnan().any())
    for j, other in enumerate(runs):
        ref = next(r for i, r in enumerate(runs) if threads[i] == threads[j])
        assert len(other) == len(first)
        for i, (a, b, c) in enumerate(zip(first, ref, other)):
            a = b if i in thread_dependent else a
            assert a.dtype == c.dtype and a.shape == c.shape, i
            assert torch.equal(_bits(a), _bits(c)), f"result {i} ({tuple(a.shape)}) differs"


def _grads(outputs, inputs, seed=1):
    """Gradients of ``inputs`` (those that require one) for fixed random output gradients."""
    outputs = [o for o in outputs if o.is_floating_point() and o.requires_grad]
    inputs = [t for t in inputs if t is not None and t.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    gs = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, gs, allow_unused=True, materialize_grads=True)


def _leaf(shape, dtype, gen, requires_grad=True):
    return torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)


# --- screened attention -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_attention_cpu(dtype):
    B, H, T, D = 2, 3, 300, 16
    assert_splits(B * H, 1)  # one (b, h) row per task (attention.cpp)
    q, k, v = make_qkv(B, H, T, D, dtype=dtype)

    def fn():
        out, state = screened_attention(q, k, v, 20, 8, return_state=True, backend="cpu")
        return out, state, _grads([out], [q, k, v])

    assert_deterministic(fn)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_attention_cpu_one_row(dtype):
    """One (b, KV head) row, fewer than the 2 threads: the forward's blocks and the backward's
    512-query segments are split between the threads (attention.cpp, Pipeline and the
    segments), yet give the bits of one thread. Grouped heads and padding; bfloat16 runs the
    per-row float32 buffers of that path."""
    B, H, Hkv, T, D = 1, 2, 1, 1100, 16
    assert B * Hkv < 2 and T > 2 * 512  # fewer rows than threads; three segments
    gen = torch.Generator().manual_seed(0)
    q = _leaf((B, H, T, D), dtype, gen)
    k, v = _leaf((B, Hkv, T, D), dtype, gen), _leaf((B, Hkv, T, D), dtype, gen)
    real = torch.rand(B, T, generator=gen) < 0.9

    def fn():
        out, state = screened_attention(q, k, v, 70, 9, key_padding_mask=real, return_state=True,
                                        backend="cpu")  # fmt: skip
        return out, state, _grads([out], [q, k, v])

    assert_deterministic(fn)


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")
def test_attention_triton():
    """dK/dV have no atomics: every run gives the same bits. (The interpreter runs programs one
    by one; on a GPU the two runs would be two schedules.)"""
    q, k, v = make_qkv(1, 2, 80, 8, dtype=F32)
    if torch.cuda.is_available():
        q, k, v = (t.detach().cuda().requires_grad_() for t in (q, k, v))

    def fn():
        out, state = screened_attention(q, k, v, 5, 3, return_state=True, backend="triton")
        return out, state, _grads([out], [q, k, v])

    assert_deterministic(fn, threads=(1, 2))


# --- RelRNN / RelLSTM -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "nonlinearity"), [("rnn", "tanh"), ("rnn", "modrelu"), ("lstm", "tanh")]
)
@pytest.mark.parametrize(("B", "dtype"), [(64, F32), (5, F32), (5, F64)])
def test_rnn_sequence(kind, nonlinearity, B, dtype):
    """Forward h and state; gradients of x, h0 and every parameter. T crosses the backward's
    64-step chunks. B = 5: blocks of 3 and 2 rows, whose products take the GEMMs' row tails
    (float64: at::mm on the blocks instead of brgemm)."""
    T, I, Hd, window, relevant = 80, 8, 64, 8, 8
    assert_splits(B, 1)  # the CPU time loops: one block of rows per thread (csrc/cpu/rnn.cpp)
    m = make_rnn(kind, I, Hd, window, relevant, nonlinearity, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    x, h0, g = (
        _leaf((T, B, I), dtype, gen),
        _leaf((B, Hd), dtype, gen),
        _leaf((T, B, Hd), dtype, gen),
    )
    attn = 0.7 if kind == "rnn" else None
    assert_deterministic(lambda: run_rnn(m, x, h0, g, "cpu", attn))


# --- CNN-F kernels ------------------------------------------------------------------------------
N, C, HW, K = 8, 16, 28, 2  # 100352 elements, 128 planes of 784
POOLED = (N, C, HW // K, HW // K)


def _feedback_case(op: str, dtype: torch.dtype):
    """A closure running ``op`` forward and backward on fixed inputs."""
    assert_splits(N * C * HW * HW, FEEDBACK_GRAIN)
    assert_splits(N * C, feedback_plane_grain(HW * HW))
    gen = torch.Generator().manual_seed(0)
    shape = (N, C, HW, HW)
    x, hidden, bias = _leaf(shape, dtype, gen), _leaf(shape, dtype, gen), _leaf(C, dtype, gen)
    mask = torch.rand(shape, generator=gen) > 0.5
    pool_hidden = torch.randint(-1, 2, POOLED, generator=gen).to(dtype)  # zeros too
    z_pooled = _leaf(POOLED, dtype, gen)
    _, amax, amin = functional.ada_pool2d(x.detach(), pool_hidden, K, backend="cpu")
    size = (HW, HW)
    fns = {
        "ada_relu": lambda: functional.ada_relu(x, hidden, 0.3, backend="cpu"),
        "ada_relu-first-pass": lambda: functional.ada_relu(x, None, 0.3, backend="cpu"),
        "ada_relu_feedback": lambda: (functional.ada_relu_feedback(x, mask, backend="cpu"),),
        "ins_norm": lambda: (functional.ins_norm(x, backend="cpu"),),
        "ins_norm-centered": lambda: (functional.ins_norm(x, centered=True, backend="cpu"),),
        "ins_bias_ada_relu": lambda: functional.ins_bias_ada_relu(
            x, bias, hidden, 0.3, backend="cpu"
        ),
        "ins_bias_ada_relu-centered-first-pass": lambda: functional.ins_bias_ada_relu(
            x, bias, None, 0.3, centered=True, backend="cpu"
        ),
        "ins_norm_gate": lambda: functional.ins_norm_gate(x, mask, backend="cpu"),
        "ada_pool2d": lambda: functional.ada_pool2d(x, pool_hidden, K, backend="cpu"),
        "ada_pool2d-first-pass": lambda: functional.ada_pool2d(x, None, K, backend="cpu"),
        "ada_unpool2d": lambda: (
            functional.ada_unpool2d(z_pooled, amax, amin, pool_hidden, K, size, backend="cpu"),
        ),
        "ins_bias_ada_relu_pool2d": lambda: functional.ins_bias_ada_relu_pool2d(
            x, bias, hidden, pool_hidden, 0.3, K, backend="cpu"
        ),
        "ada_unpool_gate": lambda: functional.ada_unpool_gate(
            z_pooled, amax, amin, pool_hidden, mask, K, size, backend="cpu"
        ),
    }
    leaves = [x, hidden, bias, z_pooled]

    def fn():
        outputs = fns[op]()
        return outputs, _grads(outputs, leaves)

    return fn


FEEDBACK_OPS = [
    "ada_relu",
    "ada_relu-first-pass",
    "ada_relu_feedback",
    "ins_norm",
    "ins_norm-centered",
    "ins_bias_ada_relu",
    "ins_bias_ada_relu-centered-first-pass",
    "ins_norm_gate",
    "ada_pool2d",
    "ada_pool2d-first-pass",
    "ada_unpool2d",
    "ins_bias_ada_relu_pool2d",
    "ada_unpool_gate",
]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("op", FEEDBACK_OPS)
def test_feedback_op(op, dtype):
    assert_deterministic(_feedback_case(op, dtype))


def test_cnnf_run_cycles():
    """Logits and the gradients of the input and every parameter through two cycles. The
    weight gradients of the convolutions and linear maps are torch's (oneDNN / MKL reduce over
    the batch in per-thread parts): on this build some differ between 1 and 2 threads, with the
    reference backend too, so those are compared across runs with the same thread count only."""
    n = 8  # conv stages: 128 planes of 784 and more, over every plane grain
    assert_splits(n * 16, feedback_plane_grain(28 * 28))
    assert_splits(n * 64, feedback_plane_grain(14 * 14))
    torch.manual_seed(0)
    model = CNNF(10, cycles=2, backend="cpu")
    x = torch.randn(n, 1, 28, 28, requires_grad=True)
    names = [name for name, _ in model.named_parameters()]
    torch_weights = {
        2 + i  # results: logits, x's gradient, then the parameters'
        for i, name in enumerate(names)
        if name.startswith(("conv", "fc")) and name.endswith(".weight")
    }
    assert len(torch_weights) == 7

    def fn():
        logits = model.run_cycles(x)
        return logits, _grads([logits], [x, *model.parameters()])

    assert_deterministic(fn, thread_dependent=frozenset(torch_weights))

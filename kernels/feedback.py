"""Triton kernels of the CNN-F ops (docs/feedback.md) and their launchers. Each launcher is named
as the op it implements and takes that op's schema arguments (``ins_bias_ada_relu(x, bias,
hidden, eta, eps, centered)``, ...); the Triton custom ops in screening_attn/feedback/_ops/ call
them. The file passes 500 lines on purpose: the three sub-families share the plane/lane
layouts, the ``Gate`` constants and the helpers (device guard, mask bytes, rounding ``_div``,
``_sqrt``), and splitting them would put kernels away from their launchers.

* the AdaReLU gate, elementwise: ``ada_relu``, ``ada_relu_backward``, ``ada_relu_feedback``;
* the instance-norm family, one program per (n, c) plane: ``ins_norm``, ``ins_bias_ada_relu``
  and ``ins_norm_gate`` share one forward and one backward kernel, specialised by ``GATE``;
* AdaPool, one lane per output: ``ada_pool2d``, ``ada_unpool2d``, ``ada_pool2d_gather``.

Launchers take any strides and run the kernels on contiguous buffers. Math in float32 for half
inputs (as the CUDA kernels' opmath); masks are bool buffers seen as uint8. ``HAS_HIDDEN`` is
constexpr so the ungated forward reads one tensor, not two.

The family's kernels and launchers stay in one file, each kernel beside its launcher (as
kernels/<family>.py holds every family's), although that passes 500 lines: the three sections
above are independent and read on their own.
"""

from __future__ import annotations

import contextlib
import inspect
from enum import IntEnum

import torch
import triton
import triton.language as tl
from torch import Tensor

from screening_attn._library import acc_dtype

BLOCK = 1024


def grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _mask_bytes(mask: Tensor) -> Tensor:
    return mask.contiguous().view(torch.uint8)


def _on(t: Tensor):
    """The device guard of a launch: Triton launches on the current CUDA device, which need not
    be ``t``'s."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --- AdaReLU gate ---------------------------------------------------------------------------------
@triton.jit
def ada_relu_kernel(
    x_ptr, h_ptr, y_ptr, mask_ptr, eta, n, HAS_HIDDEN: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n may pass 2**31
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    acc = x.to(tl.float32) if x.dtype.primitive_bitwidth < 32 else x
    if HAS_HIDDEN:
        h = tl.load(h_ptr + offs, mask=inb, other=0.0).to(acc.dtype)
        xr = acc + eta * (h - acc)
        is_open = xr * h > 0
    else:
        xr = acc
        is_open = xr > 0
    # xr * open (not where): a NaN input stays NaN, as in the reference
    tl.store(y_ptr + offs, (xr * is_open.to(xr.dtype)).to(x.dtype), mask=inb)
    tl.store(mask_ptr + offs, is_open.to(tl.uint8), mask=inb)


@triton.jit
def ada_relu_backward_kernel(g_ptr, mask_ptr, gx_ptr, gh_ptr, eta, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n may pass 2**31
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0.0)
    acc = g.to(tl.float32) if g.dtype.primitive_bitwidth < 32 else g
    gm = acc * tl.load(mask_ptr + offs, mask=inb, other=0).to(acc.dtype)
    tl.store(gx_ptr + offs, (gm * (1.0 - eta)).to(g.dtype), mask=inb)
    tl.store(gh_ptr + offs, (gm * eta).to(g.dtype), mask=inb)


@triton.jit
def ada_relu_feedback_kernel(z_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n may pass 2**31
    inb = offs < n
    z = tl.load(z_ptr + offs, mask=inb, other=0.0)
    m = tl.load(mask_ptr + offs, mask=inb, other=0).to(z.dtype)
    tl.store(out_ptr + offs, z * m, mask=inb)


def ada_relu(x: Tensor, hidden: Tensor | None, eta: float) -> tuple[Tensor, Tensor]:
    """``(y, mask)`` of the AdaReLU gate (``hidden=None``: a ReLU)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.bool)
    n = x.numel()
    if n:
        h = x if hidden is None else hidden.contiguous()
        with _on(x):
            ada_relu_kernel[grid(n)](
                x, h, y, mask.view(torch.uint8), eta, n, HAS_HIDDEN=hidden is not None, BLOCK=BLOCK
            )
    return y, mask


def ada_relu_backward(grad_y: Tensor, mask: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_hidden) = ((1 - eta) g [mask], eta g [mask])`` of a gated forward."""
    grad_y, mask = grad_y.contiguous(), mask.contiguous()
    gx, gh = torch.empty_like(grad_y), torch.empty_like(grad_y)
    n = grad_y.numel()
    if n:
        with _on(grad_y):
            ada_relu_backward_kernel[grid(n)](
                grad_y, mask.view(torch.uint8), gx, gh, eta, n, BLOCK=BLOCK
            )
    return gx, gh


def ada_relu_feedback(z: Tensor, mask: Tensor) -> Tensor:
    """``z [mask]``: the gate's top-down pass."""
    z, mask = z.contiguous(), mask.contiguous()
    out = torch.empty_like(z)
    n = z.numel()
    if n:
        with _on(z):
            ada_relu_feedback_kernel[grid(n)](z, mask.view(torch.uint8), out, n, BLOCK=BLOCK)
    return out


# --- Instance-norm family: one program per (n, c) plane ------------------------------------------
class Gate(IntEnum):
    """What the instance-norm kernels do after normalizing: the ``GATE`` constexpr, with the
    values of ``enum class Gate`` in csrc/include/screening_attn/feedback.h (the C++ kernels')."""

    NONE = 0  # ins_norm: y = x r
    RELU = 1  # ins_bias_ada_relu before any feedback: y = relu(x r + b)
    ADA = 2  # ins_bias_ada_relu gated by hidden (AdaReLU)
    FEEDBACK = 3  # ins_norm_gate: zn = x r, out = zn [mask]


# A @triton.jit function reads only constexpr globals: the Gate values as constexprs.
GATE_NONE = tl.constexpr(int(Gate.NONE))
GATE_RELU = tl.constexpr(int(Gate.RELU))
GATE_ADA = tl.constexpr(int(Gate.ADA))
GATE_FEEDBACK = tl.constexpr(int(Gate.FEEDBACK))


PLANE_BLOCKS = (256, 1024)  # the only loop steps: one build per bucket, not per plane size


def plane_block(n: int) -> int:
    """Elements per loop step of an ``n``-element plane: 256 up to 256 (one step), else 1024."""
    return PLANE_BLOCKS[0] if n <= PLANE_BLOCKS[0] else PLANE_BLOCKS[1]


def _triton_acc(x: Tensor):
    return tl.float64 if acc_dtype(x.dtype) == torch.float64 else tl.float32


def _new_rstd(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1]), dtype=acc_dtype(x.dtype))


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    # IEEE division and square root, as the C++ kernels (whose gate decisions the tests compare
    # exactly): Triton's float32 `/` and `tl.sqrt` are approximate on a GPU; float64's are IEEE.
    if ACC == tl.float32:
        return tl.div_rn(a, b * 1.0)  # b may be an int (a plane's size), even a constexpr 1
    else:
        return a / b


@triton.jit
def _sqrt(a, ACC: tl.constexpr):
    if ACC == tl.float32:
        return tl.sqrt_rn(a)
    else:
        return tl.sqrt(a)


@triton.jit
def _plane_rstd(
    x_ptr, base, n, eps, CENTERED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    # two loops when centered: the mean, then the squared deviations, as torch.var
    offs0 = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, n, BLOCK):
        offs = start + offs0
        v = tl.load(x_ptr + base + offs, mask=offs < n, other=0.0).to(ACC)
        if CENTERED:
            acc += v
        else:
            acc += v * v
    total = tl.sum(acc, axis=0)
    if CENTERED:
        mean = _div(total, n, ACC)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, n, BLOCK):
            offs = start + offs0
            inb = offs < n
            v = tl.load(x_ptr + base + offs, mask=inb, other=0.0).to(ACC)
            d = tl.where(inb, v - mean, 0.0)
            acc += d * d
        total = tl.sum(acc, axis=0)
        power = _div(total, n - 1, ACC)
    else:
        power = _div(total, n, ACC)
    return _div(1.0, _sqrt(power + eps, ACC), ACC)


@triton.jit
def ins_norm_family_fwd_kernel(
    x_ptr,
    bias_ptr,
    h_ptr,
    gate_ptr,
    y_ptr,
    out_ptr,
    mask_ptr,
    rstd_ptr,
    C,
    n,
    eta,
    eps,
    GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CENTERED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Forward of ins_norm (GATE_NONE), ins_bias_ada_relu (GATE_RELU, GATE_ADA) and
    ins_norm_gate (GATE_FEEDBACK). Pass 1 reduces the plane to ``r = rstd``, pass 2 writes.
    ACC is float32, or float64 for float64 inputs."""
    plane = tl.program_id(0).to(tl.int64)
    base = plane * n
    r = _plane_rstd(x_ptr, base, n, eps, CENTERED, ACC, BLOCK)
    tl.store(rstd_ptr + plane, r)
    if HAS_BIAS:
        b = tl.load(bias_ptr + plane % C).to(ACC)
    else:
        b = 0.0
    offs0 = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        offs = start + offs0
        inb = offs < n
        x = tl.load(x_ptr + base + offs, mask=inb, other=0.0)
        u = x.to(ACC) * r
        if GATE == GATE_NONE:
            tl.store(y_ptr + base + offs, u.to(x.dtype), mask=inb)
        elif GATE == GATE_FEEDBACK:
            g = tl.load(gate_ptr + base + offs, mask=inb, other=0).to(ACC)
            tl.store(y_ptr + base + offs, u.to(x.dtype), mask=inb)
            tl.store(out_ptr + base + offs, (u * g).to(x.dtype), mask=inb)
        else:
            u = u + b
            if GATE == GATE_ADA:
                h = tl.load(h_ptr + base + offs, mask=inb, other=0.0).to(ACC)
                u = u + eta * (h - u)
                is_open = u * h > 0
            else:
                is_open = u > 0
            # u * open (not where): a NaN input stays NaN, as in the reference
            tl.store(y_ptr + base + offs, (u * is_open.to(ACC)).to(x.dtype), mask=inb)
            tl.store(mask_ptr + base + offs, is_open.to(tl.uint8), mask=inb)


@triton.jit
def ins_norm_family_bwd_kernel(
    g0_ptr,
    g1_ptr,
    mask_ptr,
    x_ptr,
    rstd_ptr,
    gx_ptr,
    gh_ptr,
    gb_ptr,
    n,
    scale1,
    eta,
    HAS_G0: tl.constexpr,
    HAS_G1: tl.constexpr,
    WRITE_GH: tl.constexpr,
    WRITE_GB: tl.constexpr,
    CENTERED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Backward of ins_norm, ins_bias_ada_relu and ins_norm_gate: gu = g0 + scale1 * g1 [mask]
    (terms optional); pass 1 reduces sum(gu x), sum(gu) (the plane's bias gradient) and sum(x)
    (the mean, when centered); pass 2 writes dx = r gu - r^3 sum(gu x) / divisor (x - mean),
    and dhidden = eta g1 [mask] if asked."""
    plane = tl.program_id(0).to(tl.int64)
    base = plane * n
    offs0 = tl.arange(0, BLOCK)
    s_gx = tl.zeros([BLOCK], dtype=ACC)
    s_g = tl.zeros([BLOCK], dtype=ACC)
    s_x = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, n, BLOCK):
        offs = start + offs0
        inb = offs < n
        x = tl.load(x_ptr + base + offs, mask=inb, other=0.0).to(ACC)
        gu = tl.zeros([BLOCK], dtype=ACC)
        if HAS_G0:
            gu += tl.load(g0_ptr + base + offs, mask=inb, other=0.0).to(ACC)
        if HAS_G1:
            g1 = tl.load(g1_ptr + base + offs, mask=inb, other=0.0).to(ACC)
            m = tl.load(mask_ptr + base + offs, mask=inb, other=0).to(ACC)
            gu += scale1 * (g1 * m)
        s_gx += gu * x
        s_g += gu
        s_x += x
    r = tl.load(rstd_ptr + plane)
    if CENTERED:
        mean = _div(tl.sum(s_x, axis=0), n, ACC)
        divisor = n - 1
    else:
        mean = 0.0
        divisor = n
    coef = _div(r * r * r * tl.sum(s_gx, axis=0), divisor, ACC)
    if WRITE_GB:
        tl.store(gb_ptr + plane, tl.sum(s_g, axis=0))
    for start in range(0, n, BLOCK):
        offs = start + offs0
        inb = offs < n
        xr = tl.load(x_ptr + base + offs, mask=inb, other=0.0)
        x = xr.to(ACC)
        gu = tl.zeros([BLOCK], dtype=ACC)
        if HAS_G0:
            gu += tl.load(g0_ptr + base + offs, mask=inb, other=0.0).to(ACC)
        if HAS_G1:
            g1 = tl.load(g1_ptr + base + offs, mask=inb, other=0.0).to(ACC)
            m = tl.load(mask_ptr + base + offs, mask=inb, other=0).to(ACC)
            gm = g1 * m
            gu += scale1 * gm
            if WRITE_GH:
                tl.store(gh_ptr + base + offs, (eta * gm).to(xr.dtype), mask=inb)
        tl.store(gx_ptr + base + offs, (r * gu - coef * (x - mean)).to(xr.dtype), mask=inb)


def _ins_norm_family_fwd(
    x: Tensor,
    bias: Tensor | None,
    hidden: Tensor | None,
    mask_in: Tensor | None,
    eta: float,
    eps: float,
    centered: bool,
    gate: Gate,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """``(y, out, mask, rstd)``; ``out`` is a second tensor for Gate.FEEDBACK only (else ``y``),
    ``mask`` is written for Gate.RELU / Gate.ADA only (else None)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    out = torch.empty_like(x) if gate == Gate.FEEDBACK else y
    mask = torch.empty_like(x, dtype=torch.bool) if gate in (Gate.RELU, Gate.ADA) else None
    rstd = _new_rstd(x)
    n = x.shape[2] * x.shape[3]
    if rstd.numel() and n:
        # unused pointers point at y: any valid buffer will do
        with _on(x):
            ins_norm_family_fwd_kernel[(rstd.numel(),)](
                x,
                x if bias is None else bias.contiguous(),
                x if hidden is None else hidden.contiguous(),
                y if mask_in is None else _mask_bytes(mask_in),
                y,
                out,
                y if mask is None else mask.view(torch.uint8),
                rstd,
                x.shape[1],
                n,
                eta,
                eps,
                GATE=int(gate),
                HAS_BIAS=bias is not None,
                CENTERED=centered,
                ACC=_triton_acc(x),
                BLOCK=plane_block(n),
            )
    elif rstd.numel():  # empty planes: the mean of nothing is NaN, as in the reference
        rstd.fill_(float("nan"))
    return y, out, mask, rstd


def _ins_norm_family_bwd(
    g0: Tensor | None,
    g1: Tensor | None,
    mask: Tensor | None,
    x: Tensor,
    rstd: Tensor,
    scale1: float,
    eta: float,
    write_gh: bool,
    write_gb: bool,
    centered: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_hidden, grad_bias)``; the last two empty unless asked for."""
    x = x.contiguous()
    gx = torch.empty_like(x)
    gh = torch.empty_like(x) if write_gh else x.new_empty((0,))
    parts = x.new_empty(rstd.shape) if write_gb else None
    n = x.shape[2] * x.shape[3]
    if rstd.numel() and n:
        with _on(x):
            ins_norm_family_bwd_kernel[(rstd.numel(),)](
                x if g0 is None else g0.contiguous(),
                x if g1 is None else g1.contiguous(),
                x if mask is None else _mask_bytes(mask),
                x,
                rstd.contiguous(),
                gx,
                gx if not write_gh else gh,
                gx if parts is None else parts,
                n,
                scale1,
                eta,
                HAS_G0=g0 is not None,
                HAS_G1=g1 is not None,
                WRITE_GH=write_gh,
                WRITE_GB=write_gb,
                CENTERED=centered,
                ACC=_triton_acc(x),
                BLOCK=plane_block(n),
            )
    elif parts is not None:
        parts.zero_()
    gb = parts.sum(0) if write_gb else x.new_empty((0,))  # (N, C) -> (C,), in order
    return gx, gh, gb


def ins_norm(x: Tensor, eps: float, centered: bool) -> tuple[Tensor, Tensor]:
    """``(y, rstd)``: ``y = x rstd``, ``rstd`` `(N, C)` in the accumulator dtype."""
    y, _, _, rstd = _ins_norm_family_fwd(x, None, None, None, 0.0, eps, centered, Gate.NONE)
    return y, rstd


def ins_norm_backward(grad_y: Tensor, x: Tensor, rstd: Tensor, centered: bool) -> Tensor:
    return _ins_norm_family_bwd(grad_y, None, None, x, rstd, 1.0, 0.0, False, False, centered)[0]


def ins_bias_ada_relu(
    x: Tensor,
    bias: Tensor | None,
    hidden: Tensor | None,
    eta: float,
    eps: float,
    centered: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mask, rstd)`` of InsNorm -> Bias -> AdaReLU in one pass."""
    gate = Gate.RELU if hidden is None else Gate.ADA
    y, _, mask, rstd = _ins_norm_family_fwd(x, bias, hidden, None, eta, eps, centered, gate)
    return y, mask, rstd


def ins_bias_ada_relu_backward(
    grad_y: Tensor,
    x: Tensor,
    mask: Tensor,
    rstd: Tensor,
    eta: float,
    gated: bool,
    has_bias: bool,
    centered: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_hidden, grad_bias)``; the last two empty unless gated / has_bias."""
    scale1 = 1.0 - eta if gated else 1.0
    return _ins_norm_family_bwd(None, grad_y, mask, x, rstd, scale1, eta, gated, has_bias, centered)


def ins_norm_gate(
    z: Tensor, mask: Tensor, eps: float, centered: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(zn, zn [mask], rstd)``: top-down InsNorm -> gate in one pass."""
    zn, out, _, rstd = _ins_norm_family_fwd(z, None, None, mask, 0.0, eps, centered, Gate.FEEDBACK)
    return zn, out, rstd


def ins_norm_gate_backward(
    grad_zn: Tensor, grad_out: Tensor, z: Tensor, mask: Tensor, rstd: Tensor, centered: bool
) -> Tensor:
    return _ins_norm_family_bwd(grad_zn, grad_out, mask, z, rstd, 1.0, 0.0, False, False, centered)[
        0
    ]


# --- AdaPool: k x k windows, stride k ------------------------------------------------------------
# Positions are window-local, row * K + col, stored as uint8. A candidate replaces the best only
# if strictly better (first element on ties); NaN beats numbers and the first NaN stays.
POOL_BLOCK = 256


def _pool_grid(total: int) -> tuple[int]:
    return (triton.cdiv(total, POOL_BLOCK),)


def _pooled(x: Tensor, k: int) -> tuple[int, int, int, int]:
    return (x.shape[0], x.shape[1], x.shape[2] // k, x.shape[3] // k)


@triton.jit
def ada_pool2d_kernel(
    x_ptr,
    h_ptr,
    y_ptr,
    amax_ptr,
    amin_ptr,
    total,
    H,
    W,
    Ho,
    Wo,
    HAS_HIDDEN: tl.constexpr,
    K,
    BLOCK: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = o < total
    j = o % Wo
    i = (o // Wo) % Ho
    plane = o // (Wo * Ho)
    corner = plane * H * W + i * K * W + j * K
    first = tl.load(x_ptr + corner, mask=valid, other=0.0)
    acc_dtype = tl.float32 if first.dtype.primitive_bitwidth < 32 else first.dtype
    vmax = first.to(acc_dtype)
    vmin = vmax
    am = tl.zeros([BLOCK], dtype=tl.int32)
    an = tl.zeros([BLOCK], dtype=tl.int32)
    for q in range(1, K * K):  # a loop, not unrolled: k = 16 took minutes to compile
        v = tl.load(x_ptr + corner + (q // K) * W + q % K, mask=valid, other=0.0).to(acc_dtype)
        nan = v != v
        up = (v > vmax) | (nan & (vmax == vmax))
        down = (v < vmin) | (nan & (vmin == vmin))
        vmax = tl.where(up, v, vmax)
        am = tl.where(up, q, am)
        vmin = tl.where(down, v, vmin)
        an = tl.where(down, q, an)
    if HAS_HIDDEN:
        h = tl.load(h_ptr + o, mask=valid, other=0.0).to(acc_dtype)
        y = vmax * (h > 0).to(acc_dtype) + vmin * (h < 0).to(acc_dtype)
    else:
        y = vmax
    tl.store(y_ptr + o, y.to(first.dtype), mask=valid)
    tl.store(amax_ptr + o, am.to(tl.uint8), mask=valid)
    tl.store(amin_ptr + o, an.to(tl.uint8), mask=valid)


@triton.jit
def ada_unpool2d_kernel(
    z_ptr,
    h_ptr,
    amax_ptr,
    amin_ptr,
    out_ptr,
    total,
    H,
    W,
    Ho,
    Wo,
    HAS_HIDDEN: tl.constexpr,
    K,
    BLOCK: tl.constexpr,
):
    # one lane per output element: coalesced writes, zeros outside the selected positions
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = e < total
    col = e % W
    row = (e // W) % H
    plane = e // (W * H)
    i = row // K
    j = col // K
    inside = valid & (i < Ho) & (j < Wo)
    o = plane * Ho * Wo + i * Wo + j
    pos = (row - i * K) * K + (col - j * K)
    z = tl.load(z_ptr + o, mask=inside, other=0.0)
    acc_dtype = tl.float32 if z.dtype.primitive_bitwidth < 32 else z.dtype
    za = z.to(acc_dtype)
    am = tl.load(amax_ptr + o, mask=inside, other=0).to(tl.int64)
    if HAS_HIDDEN:
        an = tl.load(amin_ptr + o, mask=inside, other=0).to(tl.int64)
        h = tl.load(h_ptr + o, mask=inside, other=0.0).to(acc_dtype)
        to_max = tl.where(pos == am, za * (h > 0).to(acc_dtype), 0.0)
        to_min = tl.where(pos == an, za * (h < 0).to(acc_dtype), 0.0)
        v = to_max + to_min
    else:
        v = tl.where(pos == am, za, 0.0)
    v = tl.where(inside, v, 0.0)
    tl.store(out_ptr + e, v.to(z.dtype), mask=valid)


@triton.jit
def ada_pool2d_gather_kernel(
    g_ptr,
    h_ptr,
    amax_ptr,
    amin_ptr,
    gz_ptr,
    total,
    H,
    W,
    Ho,
    Wo,
    HAS_HIDDEN: tl.constexpr,
    K,
    BLOCK: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = o < total
    j = o % Wo
    i = (o // Wo) % Ho
    plane = o // (Wo * Ho)
    corner = plane * H * W + i * K * W + j * K
    am = tl.load(amax_ptr + o, mask=valid, other=0).to(tl.int64)
    g_max = tl.load(g_ptr + corner + (am // K) * W + am % K, mask=valid, other=0.0)
    acc_dtype = tl.float32 if g_max.dtype.primitive_bitwidth < 32 else g_max.dtype
    gz = g_max.to(acc_dtype)
    if HAS_HIDDEN:
        an = tl.load(amin_ptr + o, mask=valid, other=0).to(tl.int64)
        g_min = tl.load(g_ptr + corner + (an // K) * W + an % K, mask=valid, other=0.0)
        h = tl.load(h_ptr + o, mask=valid, other=0.0).to(acc_dtype)
        gz = gz * (h > 0).to(acc_dtype) + g_min.to(acc_dtype) * (h < 0).to(acc_dtype)
    tl.store(gz_ptr + o, gz.to(g_max.dtype), mask=valid)


def ada_pool2d(x: Tensor, hidden: Tensor | None, kernel_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, argmax, argmin)``, one lane per pooled output."""
    x = x.contiguous()
    shape = _pooled(x, kernel_size)
    y = x.new_empty(shape)
    argmax = x.new_empty(shape, dtype=torch.uint8)
    argmin = torch.empty_like(argmax)
    if y.numel():
        with _on(x):
            ada_pool2d_kernel[_pool_grid(y.numel())](
                x,
                x if hidden is None else hidden.contiguous(),
                y,
                argmax,
                argmin,
                y.numel(),
                x.shape[2],
                x.shape[3],
                shape[2],
                shape[3],
                HAS_HIDDEN=hidden is not None,
                K=kernel_size,
                BLOCK=POOL_BLOCK,
            )
    return y, argmax, argmin


def ada_unpool2d(
    z: Tensor,
    hidden: Tensor | None,
    argmax: Tensor,
    argmin: Tensor,
    kernel_size: int,
    height: int,
    width: int,
) -> Tensor:
    """The unpooled `(N, C, height, width)` map, one lane per output element."""
    z = z.contiguous()
    out = z.new_empty((z.shape[0], z.shape[1], height, width))
    if out.numel():
        with _on(z):
            ada_unpool2d_kernel[_pool_grid(out.numel())](
                z,
                z if hidden is None else hidden.contiguous(),
                argmax.contiguous(),
                argmin.contiguous(),
                out,
                out.numel(),
                height,
                width,
                z.shape[2],
                z.shape[3],
                HAS_HIDDEN=hidden is not None,
                K=kernel_size,
                BLOCK=POOL_BLOCK,
            )
    return out


def ada_pool2d_gather(
    grad: Tensor, hidden: Tensor | None, argmax: Tensor, argmin: Tensor, kernel_size: int
) -> Tensor:
    """The pooled-shape gather of ``grad`` at the selected positions (the unpool's adjoint)."""
    grad = grad.contiguous()
    shape = _pooled(grad, kernel_size)
    gz = grad.new_empty(shape)
    if gz.numel():
        with _on(grad):
            ada_pool2d_gather_kernel[_pool_grid(gz.numel())](
                grad,
                grad if hidden is None else hidden.contiguous(),
                argmax.contiguous(),
                argmin.contiguous(),
                gz,
                gz.numel(),
                grad.shape[2],
                grad.shape[3],
                shape[2],
                shape[3],
                HAS_HIDDEN=hidden is not None,
                K=kernel_size,
                BLOCK=POOL_BLOCK,
            )
    return gz


# --- Static GPU check (bench/gpu_static.py) -------------------------------------------------------
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_BYTE_PTRS = ("mask", "gate", "amax", "amin")  # bool buffers seen as uint8, pool positions


def _params(fn) -> list[tuple[str, bool]]:
    """(name, is constexpr) of a kernel's arguments."""
    raw = inspect.signature(fn.fn).parameters.values()
    return [(p.name, p.annotation is tl.constexpr) for p in raw]


def _signature(fn, dtype: torch.dtype) -> dict[str, str]:
    """The ``triton.compile`` signature of a kernel for inputs of ``dtype``, as the launchers
    pass them: byte buffers u8, ``rstd`` in the accumulator dtype, every other pointer in
    ``dtype``; ``eta``, ``eps``, ``scale1`` float; every other runtime argument int32."""
    sig = {}
    for name, const in _params(fn):
        if const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            base = name[: -len("_ptr")]
            kind = "u8" if base in _BYTE_PTRS else "fp32" if base == "rstd" else _TL_NAME[dtype]
            sig[name] = "*" + kind
        else:
            sig[name] = "fp32" if name in ("eta", "eps", "scale1") else "i32"
    return sig


def static_builds(dtype: torch.dtype, arch: int):
    """Every CNN-F kernel specialisation the launchers build for inputs of ``dtype`` (float16,
    bfloat16, float32) on CUDA ``arch`` (the same for 80 and 90): a list of ``(name, fn,
    signature, constexprs, options)`` for ``triton.compile`` (bench/gpu_static.py). The norm
    kernels come in each gate / bias / centering the ops use and each of ``PLANE_BLOCKS``; the
    pools' window size is a runtime argument. Options: Triton's defaults (the launchers pass
    none)."""
    acc = tl.float32  # float32 math for half inputs, as the launchers (_triton_acc)
    options = {"num_warps": 4, "num_stages": 3}
    variants = [
        (
            "feedback.ada_relu",
            ada_relu_kernel,
            [{"HAS_HIDDEN": h, "BLOCK": BLOCK} for h in (False, True)],
        ),
        ("feedback.ada_relu_backward", ada_relu_backward_kernel, [{"BLOCK": BLOCK}]),
        ("feedback.ada_relu_feedback", ada_relu_feedback_kernel, [{"BLOCK": BLOCK}]),
    ]
    fwd = [(Gate.NONE, False), (Gate.FEEDBACK, False)]
    fwd += [(g, b) for g in (Gate.RELU, Gate.ADA) for b in (False, True)]
    # (HAS_G0, HAS_G1, WRITE_GH, WRITE_GB): ins_norm, ins_bias_ada_relu (gated?, bias?), gate
    bwd = [(True, False, False, False), (True, True, False, False)]
    bwd += [(False, True, gh, gb) for gh in (False, True) for gb in (False, True)]
    per_plane = [
        {"CENTERED": c, "ACC": acc, "BLOCK": b} for c in (False, True) for b in PLANE_BLOCKS
    ]
    variants.append(
        (
            "feedback.ins_norm_fwd",
            ins_norm_family_fwd_kernel,
            [{"GATE": int(g), "HAS_BIAS": b, **p} for g, b in fwd for p in per_plane],
        )
    )
    variants.append(
        (
            "feedback.ins_norm_bwd",
            ins_norm_family_bwd_kernel,
            [
                {"HAS_G0": g0, "HAS_G1": g1, "WRITE_GH": gh, "WRITE_GB": gb, **p}
                for g0, g1, gh, gb in bwd
                for p in per_plane
            ],
        )
    )
    pools = [{"HAS_HIDDEN": h, "BLOCK": POOL_BLOCK} for h in (False, True)]
    variants += [
        ("feedback.ada_pool2d", ada_pool2d_kernel, pools),
        ("feedback.ada_unpool2d", ada_unpool2d_kernel, pools),
        ("feedback.ada_pool2d_gather", ada_pool2d_gather_kernel, pools),
    ]
    return [
        (name, fn, _signature(fn, dtype), consts, dict(options))
        for name, fn, consts_list in variants
        for consts in consts_list
    ]

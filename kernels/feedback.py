"""Triton kernels of the CNN-F ops (SPEC §3): elementwise over flat contiguous buffers.

Math in float32 for half inputs (as the CUDA kernels' opmath); masks are bool buffers seen as
uint8. ``HAS_HIDDEN`` is constexpr so the ungated forward reads one tensor, not two.
"""

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def ada_relu_fwd_kernel(
    x_ptr, h_ptr, y_ptr, mask_ptr, eta, n, HAS_HIDDEN: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
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
def ada_relu_bwd_kernel(g_ptr, mask_ptr, gx_ptr, gh_ptr, eta, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0.0)
    acc = g.to(tl.float32) if g.dtype.primitive_bitwidth < 32 else g
    gm = acc * tl.load(mask_ptr + offs, mask=inb, other=0).to(acc.dtype)
    tl.store(gx_ptr + offs, (gm * (1.0 - eta)).to(g.dtype), mask=inb)
    tl.store(gh_ptr + offs, (gm * eta).to(g.dtype), mask=inb)


@triton.jit
def gate_kernel(z_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    z = tl.load(z_ptr + offs, mask=inb, other=0.0)
    m = tl.load(mask_ptr + offs, mask=inb, other=0).to(z.dtype)
    tl.store(out_ptr + offs, z * m, mask=inb)


def grid(n: int):
    return (triton.cdiv(n, BLOCK),)

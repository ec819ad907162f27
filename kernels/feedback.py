"""Triton kernels of the CNN-F ops (SPEC §3) over contiguous buffers: the gates elementwise, the
instance-norm family one program per (n, c) plane, AdaPool one lane per output.

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


# --- Instance-norm family: one program per (n, c) plane ------------------------------------------
# Pass 1 reduces the plane (two loops when centered: the mean, then the squared deviations, as
# torch.var), pass 2 writes. ACC is float32, or float64 for float64 inputs. GATE: 0 ins_norm
# (y = x r), 1 ReLU (y = relu(x r + b)), 2 AdaReLU with hidden, 3 the feedback gate
# (y = zn = x r, out = zn [mask]).


@triton.jit
def _plane_rstd(
    x_ptr, base, n, eps, CENTERED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
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
        mean = total / n
        acc = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, n, BLOCK):
            offs = start + offs0
            inb = offs < n
            v = tl.load(x_ptr + base + offs, mask=inb, other=0.0).to(ACC)
            d = tl.where(inb, v - mean, 0.0)
            acc += d * d
        total = tl.sum(acc, axis=0)
        power = total / (n - 1)
    else:
        power = total / n
    return 1.0 / tl.sqrt(power + eps)


@triton.jit
def ins_norm_fwd_kernel(
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
        if GATE == 0:
            tl.store(y_ptr + base + offs, u.to(x.dtype), mask=inb)
        elif GATE == 3:
            g = tl.load(gate_ptr + base + offs, mask=inb, other=0).to(ACC)
            tl.store(y_ptr + base + offs, u.to(x.dtype), mask=inb)
            tl.store(out_ptr + base + offs, (u * g).to(x.dtype), mask=inb)
        else:
            u = u + b
            if GATE == 2:
                h = tl.load(h_ptr + base + offs, mask=inb, other=0.0).to(ACC)
                u = u + eta * (h - u)
                is_open = u * h > 0
            else:
                is_open = u > 0
            # u * open (not where): a NaN input stays NaN, as in the reference
            tl.store(y_ptr + base + offs, (u * is_open.to(ACC)).to(x.dtype), mask=inb)
            tl.store(mask_ptr + base + offs, is_open.to(tl.uint8), mask=inb)


# Backward of every member: gu = g0 + scale1 * g1 [mask] (terms optional); pass 1 reduces
# sum(gu x), sum(gu) (the plane's bias gradient) and sum(x) (the mean, when centered); pass 2
# writes dx = r gu - r^3 sum(gu x) / divisor (x - mean), and dhidden = eta g1 [mask] if asked.


@triton.jit
def ins_norm_bwd_kernel(
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
        mean = tl.sum(s_x, axis=0) / n
        divisor = n - 1
    else:
        mean = 0.0
        divisor = n
    coef = r * r * r * tl.sum(s_gx, axis=0) / divisor
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


def plane_block(n: int) -> int:
    """Elements per loop step of a plane: the plane rounded up to a power of two, at most 1024."""
    return min(1024, triton.next_power_of_2(max(n, 1)))


# --- AdaPool: k x k windows, stride k (K is constexpr) -------------------------------------------
# Positions are window-local, row * K + col, stored as uint8. A candidate replaces the best only
# if strictly better (first element on ties); NaN beats numbers and the first NaN stays.


@triton.jit
def ada_pool_fwd_kernel(
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
    K: tl.constexpr,
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
    for q in tl.static_range(1, K * K):
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
def ada_unpool_kernel(
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
    K: tl.constexpr,
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
def ada_pool_gather_kernel(
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
    K: tl.constexpr,
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

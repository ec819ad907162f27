"""Triton kernels of screened attention (docs/attention.md) and their launchers,
``screened_attention_fwd`` and ``screened_attention_bwd``, which the Triton ops of
``screening_attn/attention/_ops.py`` call. One op's kernels and launchers stay in one file, as
Liger keeps them, although that passes 500 lines: the kernels share the helpers ``_mm``,
``_dot_masked`` and ``_member`` and one layout of the scratch buffers the launchers allocate.

All tensors are contiguous ``(N, T, ·)`` with ``N = B·H`` query rows (q, out, lse, dq) or
``B·Hkv`` KV rows (k, v, spans, snapshots, relevancy, dk, dv); query row ``n`` reads KV row
``n // G`` (grouped heads, ``G = H / Hkv``, never repeated in memory) and key padding row
``n // G // Hkv`` of the ``(B, T)`` mask; a program offsets by ``row·T·width``.
Softmax, relevancy, lse and every accumulator are in ``ACC`` (float32; float64 for float64).
A query block's candidates are the set at its start ``R_t0`` plus the key range
``[t0-ν+1, t1)``, which holds every window key and every key screened in during the block.

Forward (``screened_attention_fwd``), two kernels:

* ``screened_attention_scan_kernel``, grid ``(B·Hkv,)``: the sequential part, one program per
  group. Per query block: write the slot keys to ``snap`` (``R_t0``), then the block's logits of
  each of the group's G query heads against its candidates, two chunked ``tl.dot`` into a
  scratch ``(BLOCK_M, R_PAD + W_PAD + 1)`` per query row. The loop over the block's queries
  then does no D-sized work: per head one gather of its ν+ρ logits, softmax and lse; the
  relevancy ring (key j in lane j % BLOCK_W) summing the heads, and the slot rule, on register
  vectors (slot key, score, scratch column); 4 reductions per query and head (+1 with padding).
* ``screened_attention_chunk_scan_kernel``, the default in its place (``scan_kernel``;
  docs/kernels/triton.md): the same outputs from rounds per chunk of BLOCK_M queries.
* ``screened_attention_fwd_kernel``, grid ``(N, cdiv(T, BLOCK_M), 1)``: given ``snap``, ``span``
  and ``lse``, ``out = P V`` over the same candidates, membership from the spans.

Backward (``screened_attention_bwd``), three kernels (the sets come back from ``span`` alone):

* ``screened_attention_replay_sets_kernel``, grid ``(B·Hkv,)``: ``R_t0`` of every query block
  rebuilt from the spans, one vectorised step per block (keep members whose span goes on, put
  the keys screened in during the block into empty slots, in key order). Only membership
  matters, not slot order.
* ``screened_attention_bwd_dq_kernel``, grid ``(N, cdiv(T, BLOCK_M), 1)``: ``delta`` (written for
  the next kernel) and ``dQ``. ``delta = rowsum(dO ⊙ O)``; for half inputs ``rowsum(P ⊙ dP)``
  from one more sweep, as the rounded O would cost the gradients about one ulp.
* ``screened_attention_bwd_dkdv_kernel``, grid ``(B·Hkv, cdiv(T, BLOCK_N), 1)``: one program owns
  a key block and walks the queries that can see it, for each query head of the group: the
  window queries ``[j0, j1+ν-1)`` and its keys' spans, skipping query tiles where no key is a
  candidate. No atomics: deterministic.

``NATIVE`` (half inputs on a GPU): every product runs on tensor cores in the input dtype with
float32 accumulation, P and dS cast down as FlashAttention does. Elsewhere (and always under the
interpreter, whose bf16 ``tl.dot`` is wrong) tiles are cast to ACC first and every ``tl.dot``
uses ``input_precision="ieee"`` (``"tf32"`` for float32 on a GPU with ``allow_tf32``).
NaN/Inf stay where the reference puts them, out of the hot loop: the hot kernels zero the
non-finite operand entries of the products with P or dS and flag the rows that met one; a fix-up
launch of the same kernel (``EXACT``) recomputes only those rows through ``_dot_masked``.
Launch settings: ``launch_config`` (a pure function, also used by bench/gpu_static.py).

A stream step (``screened_attention_stream_fwd`` / ``_bwd``, docs/streaming.md): with
``HAS_STATE`` k, v and span have ``X = R0 + P + T`` buffer rows per KV row ``[R0 initial slots
| P earlier keys | T new keys]``; query t sits at row ``OFF + t`` (``OFF = R0 + P``), windows
stop at row ``R0``, the scan starts from the earlier keys' relevancy and the initial slots, and
dK/dV are computed for the T new rows only. Without it ``(X, OFF, R0) = (T, 0, 0)``.
"""

import contextlib
import inspect
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from screening_attn import _backend
from screening_attn._library import acc_dtype


@triton.jit
def _mm(a, b, NATIVE: tl.constexpr, TF32: tl.constexpr):
    # a (M, K) @ b (K, N) of raw input tiles, accumulated in float32 / float64.
    if NATIVE:
        return tl.dot(a, b, out_dtype=tl.float32)
    elif TF32:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _mm_rows(a_base, a_rows, a_ok, b_base, b_rows, b_ok, K, MM: tl.constexpr, ACC: tl.constexpr,
             NATIVE: tl.constexpr, TF32: tl.constexpr, BLOCK_A: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """(BLOCK_A, BLOCK_B) in ACC: rows ``a_rows`` of A times rows ``b_rows`` of B transposed, A and
    B row-major with K columns, BLOCK_K columns at a time from memory. For float32 on FMA
    units, whose dot keeps whole operand rows per thread: a 256-wide head spilled 1-6 KB."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(
            a_base + a_rows[:, None] * K + ks[None, :],
            mask=a_ok[:, None] & (ks < K)[None, :],
            other=0.0,
        ).to(MM)
        b = tl.load(
            b_base + b_rows[None, :] * K + ks[:, None],
            mask=b_ok[None, :] & (ks < K)[:, None],
            other=0.0,
        ).to(MM)
        acc += _mm(a, b, NATIVE, TF32).to(ACC)
    return acc


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    # IEEE division, as the C++ kernels divide: a GPU's float32 `/` is approximate (2 ulp),
    # and the relevancies decide the slot rule's ties
    if ACC == tl.float32:
        a, b = tl.broadcast(a, b)
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _dot_masked(a, member, b):
    """a (M, K) @ b (K, N) in ACC, where a is 0 off ``member``. A non-finite entry of b must
    not reach a row of a for which its row of b is no candidate (0 · NaN = NaN would smear
    it over the tile), so tiles holding one take a slow exact path; others a plain tl.dot."""
    inf = float("inf")
    bad = (b != b) | (tl.abs(b) == inf)
    if tl.max(bad.to(tl.int32)) > 0:
        res = tl.dot(a, tl.where(bad, 0.0, b), input_precision="ieee")
        # count the non-finite terms a_ik b_kj over candidates k, by the sign of a_ik (0/1
        # operands: the counts are exact); a NaN in a already made its row NaN above
        pos = (member & (a > 0)).to(b.dtype)
        neg = (member & (a < 0)).to(b.dtype)
        zero = (member & (a == 0)).to(b.dtype)
        b_nan = (b != b).to(b.dtype)
        b_pinf = (b == inf).to(b.dtype)
        b_ninf = (b == -inf).to(b.dtype)
        n_nan = tl.dot(pos + neg + zero, b_nan, input_precision="ieee")
        n_nan += tl.dot(zero, b_pinf + b_ninf, input_precision="ieee")  # 0 · inf
        n_pinf = tl.dot(pos, b_pinf, input_precision="ieee")
        n_pinf += tl.dot(neg, b_ninf, input_precision="ieee")
        n_ninf = tl.dot(pos, b_ninf, input_precision="ieee")
        n_ninf += tl.dot(neg, b_pinf, input_precision="ieee")
        res = tl.where(n_pinf > 0, inf, tl.where(n_ninf > 0, -inf, res))
        res = tl.where((n_nan > 0) | ((n_pinf > 0) & (n_ninf > 0)), float("nan"), res)
    else:
        res = tl.dot(a, b, input_precision="ieee")
    return res


@triton.jit
def _dot_p(a, member, b, hit, MM: tl.constexpr, NATIVE: tl.constexpr, TF32: tl.constexpr,
           EXACT: tl.constexpr):  # fmt: skip
    """``(a @ b, hit)`` for a product with P or dS: ``a`` (M, K) in ACC, 0 off ``member``;
    ``b`` (K, N) in MM. EXACT: ``_dot_masked``. Otherwise the hot path: non-finite entries of
    ``b`` are zeroed (a zero weight must not carry 0 · NaN into other rows) and ``hit`` (M,)
    marks the rows with a candidate whose row of ``b`` holds one: the fix-up launch
    (EXACT) recomputes exactly those rows. NATIVE: ``a`` cast to the input dtype, tensor
    cores with float32 accumulation, as FlashAttention."""
    if EXACT:
        return _dot_masked(a, member, b.to(a.dtype)), hit
    else:
        bad = (b != b) | (tl.abs(b) == float("inf"))
        bad_row = tl.max(bad.to(tl.int32), 1)
        hit = tl.maximum(hit, tl.max(tl.where(member, bad_row[None, :], 0), 1))
        bz = tl.where(bad, 0.0, b).to(MM)
        if NATIVE:
            res = tl.dot(a.to(MM), bz, out_dtype=tl.float32)
        elif TF32:
            res = tl.dot(a, bz, input_precision="tf32")
        else:
            res = tl.dot(a, bz, input_precision="ieee")
        return res, hit


# A stream step's buffer rows and offsets change with every decode step: Triton would build a
# kernel per value class (1, multiples of 16, others) of each; one build takes them all.
# Without HAS_STATE the kernels use (T, 0, 0), constants: the plain op's code is unchanged.
_STREAM_ROWS = ("X", "OFF", "R0")


@triton.jit
def _member(rows, rows_ok, keys, keys_ok, span_base, mask_base, nu, off, FROM_SET: tl.constexpr,
            HAS_MASK: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_N) bool: buffer row ``keys[c]`` is a candidate of query ``rows[i]``,
    which sits at row ``off + rows[i]``.

    FROM_SET: the keys are the set at the block start, members until their span ends.
    Otherwise the keys are the block's key range (never an initial slot): in the window
    (unless padded: HAS_MASK reads ``mask_base``), or inside their span (a padded key never
    has one).
    """
    end = tl.load(span_base + 2 * keys + 1, mask=keys_ok, other=-1)
    t = rows[:, None]
    if FROM_SET:
        m = t < end[None, :]
    else:
        start = tl.load(span_base + 2 * keys, mask=keys_ok, other=-1)
        j = keys[None, :] - off
        win = (j <= t) & (j > t - nu)
        if HAS_MASK:
            real = tl.load(mask_base + keys, mask=keys_ok, other=0) != 0
            win = win & real[None, :]
        m = win | ((start[None, :] <= t) & (t < end[None, :]))
    return m & rows_ok[:, None] & keys_ok[None, :]


@triton.jit
def _block_logits(q_ptr, k_base, scr_ptr, snap_ptr, n, t0, T, D, G, RL, R_PAD, NCOL, lo, col0,
                  x1, scale, MM: tl.constexpr, ACC: tl.constexpr, NATIVE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """A query block's logits, per query head of the group, into its scratch rows
    ``(BLOCK_M, NCOL)``: columns ``[0, R_PAD)`` the slot keys at ``snap_ptr`` (slot order),
    ``R_PAD + x - col0`` the key range, buffer rows ``x`` in ``[lo, x1)``."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows = t0 + offs_m
    for g in range(G):
        row = n * G + g  # the query row (int64)
        scr = scr_ptr + row * BLOCK_M * NCOL
        qb = tl.load(
            q_ptr + row * T * D + rows[:, None] * D + offs_d[None, :],
            mask=(rows < T)[:, None] & d_ok[None, :],
            other=0.0,
        ).to(MM)
        for c0 in range(0, R_PAD, BLOCK_N):
            cols = c0 + offs_n
            keys = tl.load(snap_ptr + cols, mask=cols < RL, other=-1)
            kt = tl.load(
                k_base + keys[None, :] * D + offs_d[:, None],
                mask=(keys >= 0)[None, :] & d_ok[:, None],
                other=0.0,
            ).to(MM)
            s = _mm(qb, kt, NATIVE, False).to(ACC) * scale
            tl.store(scr + offs_m[:, None] * NCOL + cols[None, :], s)
        for c0 in range(0, x1 - col0, BLOCK_N):
            keys = col0 + c0 + offs_n
            kt = tl.load(
                k_base + keys[None, :] * D + offs_d[:, None],
                mask=((keys >= lo) & (keys < x1))[None, :] & d_ok[:, None],
                other=0.0,
            ).to(MM)
            s = _mm(qb, kt, NATIVE, False).to(ACC) * scale
            tl.store(scr + offs_m[:, None] * NCOL + (R_PAD + c0 + offs_n)[None, :], s)


@triton.jit(do_not_specialize=_STREAM_ROWS)
def screened_attention_scan_kernel(
    q_ptr,  # (N, T, D): N = B·H query rows, G consecutive ones per KV row
    k_ptr,  # (NKV, T, D): NKV = B·HKV
    mask_ptr,  # (B, T) uint8, 1 = a real token (read only with HAS_MASK)
    lse_ptr,  # (N, T) ACC, written (+inf for a query without any candidate)
    rel_ptr,  # (NKV, T) ACC, written: relevancy, the group mean
    span_ptr,  # (NKV, T, 2) int32, prefilled with -1
    idx_ptr,  # (NKV, RHO) int64, prefilled with -1: final slot keys
    score_ptr,  # (NKV, RHO) ACC, prefilled with -inf: final slot scores
    snap_ptr,  # (NKV, NB, SW) int32, written: slot keys at every block start
    scr_ptr,  # (N, BLOCK_M, NCOL) ACC scratch: the block's logits of each query head
    rel0_ptr,  # HAS_STATE: (NKV, P) ACC, the relevancy so far of the P earlier keys
    idx0_ptr,  # HAS_STATE: (NKV, R0) int64, >= 0: initial slot c holds buffer row c
    score0_ptr,  # HAS_STATE: (NKV, R0) ACC, the initial slots' scores
    T,  # queries per row
    X,  # HAS_STATE: buffer rows per KV row, R0 + P + T (else T)
    OFF,  # HAS_STATE: the buffer row of query 0, R0 + P (else 0)
    R0,  # HAS_STATE: initial slots, buffer rows [0, R0) (else 0)
    D,
    nu,
    G,  # query heads per KV head
    HKV,
    RL,  # live slots: min(ρ, R0 + S-ν+1); slots beyond can never fill
    RHO,
    NB,
    SW,
    R_PAD,  # slot columns of the scratch: RL rounded up to BLOCK_N
    NCOL,  # R_PAD + range columns + 1 column of -inf (the last)
    scale,
    MM: tl.constexpr,
    ACC: tl.constexpr,
    NATIVE: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    GROUPED: tl.constexpr,  # G > 1: a relevancy is the ring's sum over the heads / G
    HAS_STATE: tl.constexpr,  # a stream step from an initial state (rel0, idx0, score0)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,  # relevancy ring: key x in lane x % BLOCK_W (>= the window)
    BLOCK_L: tl.constexpr,  # lanes: [ring | RL slots | dead]
):
    # one program per (b, KV head): the G query heads of the group share its window and set.
    # Keys are buffer rows x (the sequence key x - r0); query t sits at row off + t, and its
    # window is the rows (off + t - ν, off + t] from r0 on.
    n = tl.program_id(0).to(tl.int64)
    if HAS_STATE:  # buffer rows, the row of query 0, the first sequence row
        nx, off, r0 = X, OFF, R0
    else:
        nx, off, r0 = T, 0, 0
    k_base = k_ptr + n * nx * D
    rel_base = rel_ptr + n * (nx - r0) - r0  # + x: relevancy (NKV, S) of the sequence keys
    span_base = span_ptr + n * nx * 2
    snap_base = snap_ptr + n * NB * SW
    mask_base = mask_ptr + (n // HKV) * (nx - r0) - r0  # + x: the (B, S) mask

    offs_m = tl.arange(0, BLOCK_M)
    neg_inf = float("-inf")
    NEG = NCOL - 1  # the scratch column that holds -inf: the logit of a non-candidate lane

    # One vector of lanes per query, so that a step is a single gather per query head and few
    # reductions. Ring lanes: a window key's relevancy (a padded key's lane reads -inf).
    # Slot lanes (c = lane - BLOCK_W): key, score, and `sel_key`, the slot rule's order:
    # empty -inf < NaN score -1 < real scores (>= 0).
    lane = tl.arange(0, BLOCK_L)
    is_ring = lane < BLOCK_W
    slot_live = (lane >= BLOCK_W) & (lane < BLOCK_W + RL)
    col = tl.full([BLOCK_L], 0, tl.int32) + NEG  # scratch column of each lane's logit
    ring = tl.zeros([BLOCK_L], ACC)
    slot_key = tl.full([BLOCK_L], -1, tl.int32)
    slot_score = tl.full([BLOCK_L], neg_inf, ACC)
    sel_key = tl.where(slot_live, neg_inf, float("inf")).to(ACC)
    w_prev = 0  # the first block's window start
    if HAS_STATE:
        w_prev = tl.maximum(off - nu + 1, r0)
        # the earlier keys still in the window, rows [w_prev, off), with their relevancy so far
        x0 = off - 1 - ((off - 1 - lane) % BLOCK_W + BLOCK_W) % BLOCK_W  # lane's newest row
        early = is_ring & (x0 >= w_prev)
        ring = tl.load(rel0_ptr + n * (off - r0) + x0 - r0, mask=early, other=0.0)
        if GROUPED:
            ring = ring * G.to(ACC)
        if HAS_MASK:
            early = early & (tl.load(mask_base + x0, mask=early, other=0) != 0)
        col = tl.where(early, R_PAD + x0 - w_prev, col)
        # the initial slots, in slot order: buffer rows [0, R0), members from query 0 on
        c = lane - BLOCK_W
        init = slot_live & (c < r0)
        idx0 = tl.load(idx0_ptr + n * r0 + c, mask=init, other=-1)
        score0 = tl.load(score0_ptr + n * r0 + c, mask=init, other=neg_inf)
        slot_key = tl.where(init & (idx0 >= 0), c, -1)
        slot_score = tl.where(slot_key >= 0, score0, neg_inf)
        sel_key = tl.where(slot_key >= 0, tl.where(score0 != score0, -1.0, score0), sel_key)
        tl.store(span_base + 2 * slot_key, 0, mask=slot_key >= 0)

    for t0 in range(0, T, BLOCK_M):
        blk = t0 // BLOCK_M
        w0 = tl.maximum(off + t0 - nu + 1, r0)
        t1 = tl.minimum(t0 + BLOCK_M, T)
        x1 = off + t1  # the block's key range: rows [w0, x1)
        tl.debug_barrier()  # the previous block is done reading the scratch
        tl.store(snap_base + blk * SW + lane - BLOCK_W, slot_key, mask=slot_live)
        tl.debug_barrier()  # the snapshot is re-read by other threads below

        _block_logits(q_ptr, k_base, scr_ptr, snap_base + blk * SW, n, t0, T, D, G, RL, R_PAD,
                      NCOL, w0, w0, x1, scale, MM, ACC, NATIVE, BLOCK_M, BLOCK_N,
                      BLOCK_D)  # fmt: skip
        for g in range(G):
            scr = scr_ptr + (n * G + g) * BLOCK_M * NCOL
            tl.store(scr + offs_m * NCOL + NEG, tl.full([BLOCK_M], neg_inf, ACC))
        tl.debug_barrier()  # scratch complete before the per-query reads
        # re-base the columns: window keys move with w0, slots point at the snapshot columns
        col = tl.where(
            is_ring,
            tl.where(col == NEG, NEG, col - (w0 - w_prev)),
            tl.where(slot_key >= 0, lane - BLOCK_W, NEG),
        )
        w_prev = w0

        for t in range(t0, t1):
            x = off + t  # the query's own key enters the window (the lane's old key has left)
            enter = lane == x % BLOCK_W
            if HAS_MASK:
                real_t = tl.load(mask_base + x) != 0
                # a padded key is never a candidate: its lane reads the -inf column
                col = tl.where(enter, tl.where(real_t, R_PAD + x - w0, NEG), col)
                # a query without any candidate (no real window key, no slot): zeros, lse +inf
                any_c = tl.max((col != NEG).to(tl.int32), 0) > 0
                counts = any_c & real_t  # a padded query adds no relevancy
            else:
                col = tl.where(enter, R_PAD + x - w0, col)
            ring = tl.where(enter, 0.0, ring)
            # the ring sums the weights of the group's heads; r = ring / G when read (GROUPED)
            for g in range(G):
                row = n * G + g
                s = tl.load(scr_ptr + row * BLOCK_M * NCOL + (t - t0) * NCOL + col)
                m = tl.max(s, 0)  # without padding finite: key t is a candidate
                if HAS_MASK:
                    m = tl.where(any_c, m, 0.0)
                p = tl.exp(s - m)
                z = tl.sum(p, 0)
                if HAS_MASK:
                    z = tl.where(any_c, z, 1.0)  # no candidate: p = 0, and lse +inf below
                lse = m + tl.log(z)
                if HAS_MASK:
                    lse = tl.where(any_c, lse, float("inf"))
                tl.store(lse_ptr + row * T + t, lse)
                w = _div(p, z, ACC)  # slot lanes collect junk that is never read
                if HAS_MASK:
                    w = tl.where(counts, w, 0.0)
                ring += w

            # screening of the row e = x-ν+1, which leaves the window with its final r
            e = x - nu + 1
            leave = lane == tl.where(e >= r0, e % BLOCK_W, -1)
            col = tl.where(leave, NEG, col)
            r_e = tl.sum(tl.where(leave, ring, 0.0), 0)
            if GROUPED:  # the group mean
                r_e = _div(r_e, G.to(ACC), ACC)
            tl.store(rel_base + e, r_e, mask=e >= r0)
            if HAS_SLOTS:
                # first empty slot, else the smallest score (NaN smallest), lowest slot on ties
                low, target = tl.min(
                    sel_key, 0, return_indices=True, return_indices_tie_break_left=True
                )
                # replace only if r_e > low strictly; a NaN slot (-1) is never replaced
                insert = (e >= r0) & ((low == neg_inf) | ((low >= 0) & (r_e > low)))
                if HAS_MASK:  # a padded key takes no slot
                    insert = insert & (tl.load(mask_base + e, mask=e >= r0, other=0) != 0)
                # (where, not &: the interpreter can't broadcast this scalar bool in an &)
                sel = tl.where(insert, lane == target, False)
                tl.store(span_base + 2 * slot_key + 1, t + 1, mask=sel & (slot_key >= 0))
                tl.store(span_base + 2 * e, t + 1, mask=insert)
                slot_key = tl.where(sel, e, slot_key)
                slot_score = tl.where(sel, r_e, slot_score)
                sel_key = tl.where(sel, tl.where(r_e != r_e, -1.0, r_e), sel_key)
                col = tl.where(sel, R_PAD + e - w0, col)

    # keys still in the set; keys still in the window (never screened) keep their partial r
    tl.store(span_base + 2 * slot_key + 1, T, mask=slot_live & (slot_key >= 0))
    tl.store(idx_ptr + n * RHO + lane - BLOCK_W, slot_key.to(tl.int64), mask=slot_live)
    tl.store(score_ptr + n * RHO + lane - BLOCK_W, slot_score, mask=slot_live)
    if GROUPED:
        ring = _div(ring, G.to(ACC), ACC)
    tl.store(rel_base + col - R_PAD + w_prev, ring, mask=is_ring & (col != NEG))


@triton.jit
def _slot_step(key, score, r_e, RL, BLOCK_R: tl.constexpr):
    """The slot rule for one key: the slot it takes (first empty; else the lowest score, NaN
    lowest, lowest slot on ties, replaced only if ``r_e`` is strictly larger), or -1."""
    c = tl.arange(0, BLOCK_R)
    sel = tl.where(score != score, -1.0, score)  # relevancies are >= 0 or NaN
    sel = tl.where(c < RL, tl.where(key < 0, float("-inf"), sel), float("inf"))
    low, tgt = tl.min(sel, 0, return_indices=True, return_indices_tie_break_left=True)
    ins = (low == float("-inf")) | ((low >= 0) & (r_e > low))
    return tl.where(ins, tgt, -1)


@triton.jit
def _slots_at(key0, score0, target, r, f, base, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """The slots before step ``f``: those of the chunk start (``key0``, ``score0``) with the
    writes ``target`` (slot per step, -1 none) of the steps before ``f``; step j writes key
    ``base + j`` with score ``r[j]``."""
    c = tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_M)
    hit = (target[None, :] == c[:, None]) & (j[None, :] < f)
    last = tl.max(tl.where(hit, j[None, :], -1), 1)
    key = tl.where(last >= 0, base + last, key0)
    picked = tl.sum(tl.where(j[None, :] == last[:, None], r[None, :], 0.0), 1)
    return key, tl.where(last >= 0, picked, score0)


@triton.jit
def _slot_pass(key0, score0, r, active, RL, vals, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
               LOG_M: tl.constexpr):  # fmt: skip
    """The slot rule over a chunk's active steps at once, from prefix counts (docs/kernels/
    triton.md, "The slot rule in parallel"). ``key0``, ``score0`` [BLOCK_R]: the slots before
    the first active step; ``r`` [BLOCK_M]: each step's relevancy; ``active`` [BLOCK_M];
    ``vals``: BLOCK_R elements of scratch.

    Returns ``(target, bad)``: the slot each step writes (-1: dropped), exact for the steps
    before ``bad``, the first entering step whose victim ties a member the counts cannot order
    (one of the two entered during the pass; BLOCK_M if none)."""
    c = tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_M)
    ci, jy, jk = c[:, None], j[:, None], j[None, :]
    slot_ok = c < RL
    n0 = tl.sum((slot_ok & (key0 >= 0)).to(tl.int32), 0)  # the filled slots are a prefix
    act = active.to(tl.int32)
    rank = tl.cumsum(act, 0) - act
    # fill: the first RL - n0 active keys take the empty slots in order
    fill = active & (rank < RL - n0)
    post = active & (rank >= RL - n0)
    hit = fill[None, :] & (rank[None, :] == (c - n0)[:, None])  # [R, M]
    took = tl.max(hit.to(tl.int32), 1) > 0
    value = tl.where(took, tl.sum(tl.where(hit, r[None, :], 0.0), 1), score0)
    # a NaN score in the full set is its minimum and is never beaten: nothing enters after it
    frozen = tl.max((slot_ok & (value != value)).to(tl.int32), 0)
    vv, rr, rx = value[:, None], r[None, :], r[:, None]
    # a post-fill key enters iff fewer than RL earlier arrivals beat it (ties: the earlier)
    beaters = tl.sum((slot_ok[:, None] & (vv >= rr)).to(tl.int32), 0)
    beaters += tl.sum((post[:, None] & (jy < jk) & (rx >= rr)).to(tl.int32), 0)
    enters = post & (r == r) & (beaters < RL) & (frozen == 0)
    # members of the full set, ordered by score, then the higher slot
    # (BLOCK_M members at a time from memory: a BLOCK_R x BLOCK_R comparison would not fit)
    tl.debug_barrier()
    tl.store(vals + c, value)
    tl.debug_barrier()
    slot_beaters = tl.zeros([BLOCK_R], tl.int32)
    for c0 in tl.static_range(0, BLOCK_R, BLOCK_M):
        co = c0 + j
        vc = tl.load(vals + co, mask=co < BLOCK_R, other=float("-inf"))[None, :]
        above = (vc > vv) | ((vc == vv) & (co[None, :] > ci))
        slot_beaters += tl.sum(((co < RL)[None, :] & above).to(tl.int32), 1)
    # an item leaves at the later entrant that brings its beaters to RL (an entrant beats it
    # iff strictly larger: it arrived later)
    later = (enters[None, :] & (rr > vv)).to(tl.int32)
    reach = (slot_beaters[:, None] + tl.cumsum(later, 1)) >= RL
    leave_m = tl.where(slot_ok, tl.min(tl.where(reach, jk, BLOCK_M), 1), BLOCK_M)
    later_e = (enters[None, :] & (jy < jk) & (rr > rx)).to(tl.int32)
    reach_e = (beaters[:, None] + tl.cumsum(later_e, 1)) >= RL
    leave_e = tl.where(enters, tl.min(tl.where(reach_e, jk, BLOCK_M), 1), BLOCK_M)
    # the victim of each entering step; a tie with another member present then is unordered
    # when the victim or the other entered during the pass (their slot order is unknown)
    vm = leave_m[:, None] == jk  # [R, M]
    ve = leave_e[:, None] == jk  # [M, M]
    by_member = tl.max(vm.to(tl.int32), 0) > 0
    vval = tl.where(by_member, tl.sum(tl.where(vm, vv, 0.0), 0), tl.sum(tl.where(ve, rx, 0.0), 0))
    vk = vval[None, :]
    tie_m = slot_ok[:, None] & (leave_m[:, None] >= jk) & (vm == 0) & (vv == vk)
    tie_m = tie_m & (by_member[None, :] == 0)
    tie_e = enters[:, None] & (jy < jk) & (leave_e[:, None] >= jk) & (ve == 0) & (rx == vk)
    tied = (tl.max(tie_m.to(tl.int32), 0) + tl.max(tie_e.to(tl.int32), 0)) > 0
    bad = tl.min(tl.where(enters & tied, j, BLOCK_M), 0)
    # an entrant takes its victim's slot: pointer jumping back to a member
    slot_of = tl.where(by_member, tl.min(tl.where(vm, ci, BLOCK_R), 0), -1)
    parent = tl.min(tl.where(ve, jy, BLOCK_M), 0)
    for _ in tl.static_range(LOG_M + 1):
        pick = parent[:, None] == jk
        up = tl.sum(tl.where(pick, slot_of[None, :], 0), 1)
        parent = tl.sum(tl.where(pick, parent[None, :], 0), 1)
        slot_of = tl.where(slot_of < 0, up, slot_of)
    target = tl.where(fill, n0 + rank, tl.where(enters, slot_of, -1))
    return target, bad


@triton.jit
def _slot_rule(key0, score0, r, valid, base, RL, vals, BLOCK_R: tl.constexpr,
               BLOCK_M: tl.constexpr, LOG_M: tl.constexpr):  # fmt: skip
    """The exact slot rule over a chunk's valid steps: parallel passes, and the one-key rule
    at each step a pass cannot order. Returns ``(target, exact steps)``."""
    j = tl.arange(0, BLOCK_M)
    target = tl.full([BLOCK_M], -1, tl.int32)
    key, score = key0, score0
    start = 0
    exact = 0
    pending = 1
    while pending > 0:
        act = valid & (j >= start)
        got, bad = _slot_pass(key, score, r, act, RL, vals, BLOCK_R, BLOCK_M, LOG_M)
        target = tl.where(act & (j < bad), got, target)
        pending = (bad < BLOCK_M).to(tl.int32)
        if pending > 0:
            key, score = _slots_at(key0, score0, target, r, bad, base, BLOCK_R, BLOCK_M)
            r_bad = tl.sum(tl.where(j == bad, r, 0.0), 0)
            target = tl.where(j == bad, _slot_step(key, score, r_bad, RL, BLOCK_R), target)
            exact += 1
            start = bad + 1
            key, score = _slots_at(key0, score0, target, r, start, base, BLOCK_R, BLOCK_M)
    return target, exact


@triton.jit
def _chunk_slots(qi, cols, skey, guess, BLOCK_M: tl.constexpr):
    """The chunk-start slots ``skey`` (columns ``cols``; -1 empty) seen by query steps ``qi``
    under the decisions ``guess``: a member leaves at the first step that writes its slot,
    and step j's decision is seen from query step j + 1 on."""
    j = tl.arange(0, BLOCK_M)
    leave = tl.min(tl.where(guess[:, None] == cols[None, :], j[:, None], BLOCK_M), 0)
    return (skey >= 0)[None, :] & (qi <= leave[None, :])


@triton.jit
def _chunk_range(qi, xq, base, cols, guess, eleave, nu, r0, x1, mask_base,
                 HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """``(candidate, window)`` of query steps ``qi`` (buffer rows ``xq``) over the range
    columns ``cols`` (buffer rows ``base + cols``): the window keys, and the chunk's entrants
    (column j is step j's key) from the query after their step until they leave."""
    x = (base + cols)[None, :]
    win = (x > xq - nu) & (x <= xq) & (x >= r0)
    if HAS_MASK:
        ok = (base + cols >= r0) & (base + cols < x1)
        win = win & (tl.load(mask_base + base + cols, mask=ok, other=0) != 0)[None, :]
    ent = ((cols < BLOCK_M) & (guess >= 0))[None, :] & (qi > cols[None, :])
    return win | (ent & (qi <= eleave[None, :])), win


@triton.jit
def _chunk_softmax(scr, qv, snap_blk, guess, eleave, base, xq0, x1, nu, r0, mask_base, RL,
                   R_PAD, NCOL, ACC: tl.constexpr, HAS_MASK: tl.constexpr, Q: tl.constexpr,
                   BLOCK_M: tl.constexpr):  # fmt: skip
    """The softmax of query steps ``qv`` [Q] (buffer rows ``xq0 + qv``) over the sets the
    decisions ``guess`` imply, from the scratch logits ``scr``: ``(m, z, lse)``, weights
    ``exp(s - m) / z`` as the sequential scan divides (exact on saturated inputs); without a
    candidate ``(0, 1, +inf)``. ``m`` and ``z`` go to the scratch's last two columns."""
    offs = tl.arange(0, BLOCK_M)
    qi = qv[:, None]
    xq = xq0 + qi
    m = tl.full([Q], float("-inf"), ACC)
    cnt = tl.zeros([Q], tl.int32)
    for c0 in range(0, R_PAD, BLOCK_M):
        cols = c0 + offs
        skey = tl.load(snap_blk + cols, mask=cols < RL, other=-1)
        mem = _chunk_slots(qi, cols, skey, guess, BLOCK_M)
        s = tl.where(mem, tl.load(scr + qi * NCOL + cols[None, :]), float("-inf"))
        m = tl.maximum(m, tl.max(s, 1))
        cnt += tl.sum(mem.to(tl.int32), 1)
    for c0 in range(0, x1 - base, BLOCK_M):
        cols = c0 + offs
        mem, _ = _chunk_range(qi, xq, base, cols, guess, eleave, nu, r0, x1, mask_base,
                              HAS_MASK, BLOCK_M)  # fmt: skip
        s = tl.where(mem, tl.load(scr + qi * NCOL + R_PAD + cols[None, :]), float("-inf"))
        m = tl.maximum(m, tl.max(s, 1))
        cnt += tl.sum(mem.to(tl.int32), 1)
    ms = tl.where(m == float("-inf"), 0.0, m)[:, None]
    z = tl.zeros([Q], ACC)
    for c0 in range(0, R_PAD, BLOCK_M):
        cols = c0 + offs
        skey = tl.load(snap_blk + cols, mask=cols < RL, other=-1)
        mem = _chunk_slots(qi, cols, skey, guess, BLOCK_M)
        s = tl.where(mem, tl.load(scr + qi * NCOL + cols[None, :]), float("-inf"))
        z += tl.sum(tl.exp(s - ms), 1)
    for c0 in range(0, x1 - base, BLOCK_M):
        cols = c0 + offs
        mem, _ = _chunk_range(qi, xq, base, cols, guess, eleave, nu, r0, x1, mask_base,
                              HAS_MASK, BLOCK_M)  # fmt: skip
        s = tl.where(mem, tl.load(scr + qi * NCOL + R_PAD + cols[None, :]), float("-inf"))
        z += tl.sum(tl.exp(s - ms), 1)
    lse = m + tl.log(z)
    if HAS_MASK:
        lse = tl.where(cnt > 0, lse, float("inf"))
        z = tl.where(cnt > 0, z, 1.0)
    ms = tl.where(m == float("-inf"), 0.0, m)
    tl.store(scr + qv * NCOL + NCOL - 2, ms)
    tl.store(scr + qv * NCOL + NCOL - 1, z)
    return lse


@triton.jit
def _window_sums(acc, i0, i1, x, kok, scr_ptr, n, G, xq0, nu, mask_base, NCOL, R_PAD, base,
                 ACC: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """``acc`` plus the window weights of query steps ``i0 … i1-1`` on buffer rows ``x``
    (``kok``: real keys of the range), added query by query and head by head as the
    sequential scan adds them (a relevancy is then bitwise the sequential one, which exact
    ties need). A step's weights: ``exp(s - m) / z`` from the scratch's maxima and sums."""
    for i in range(i0, i1):
        xi = xq0 + i
        win = kok & (x > xi - nu) & (x <= xi)
        if HAS_MASK:  # a padded query adds no relevancy
            win = win & (tl.load(mask_base + xi) != 0)
        for g in range(G):
            scr = scr_ptr + (n * G + g) * BLOCK_M * NCOL + i * NCOL
            m = tl.load(scr + NCOL - 2)
            z = tl.load(scr + NCOL - 1)
            s = tl.load(scr + R_PAD + x - base, mask=kok, other=0.0)
            acc += tl.where(win, _div(tl.exp(s - m), z, ACC), 0.0)
    return acc


@triton.jit
def _range_keys(x, r0, x1, mask_base, HAS_MASK: tl.constexpr):
    """Buffer rows ``x`` that are real keys of the range ``[r0, x1)``."""
    ok = (x >= r0) & (x < x1)
    if HAS_MASK:
        ok = ok & (tl.load(mask_base + x, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _entrant_leave(guess, BLOCK_M: tl.constexpr):
    """The step at which each step's entrant leaves (the next step writing its slot;
    BLOCK_M: never in the chunk)."""
    j = tl.arange(0, BLOCK_M)
    later = (guess[None, :] == guess[:, None]) & (j[None, :] > j[:, None])
    return tl.min(tl.where(later, j[None, :], BLOCK_M), 1)


@triton.jit(do_not_specialize=_STREAM_ROWS)
def screened_attention_chunk_scan_kernel(
    q_ptr,  # (N, T, D)
    k_ptr,  # (NKV, X, D)
    mask_ptr,  # (B, S) uint8 (HAS_MASK)
    lse_ptr,  # (N, T) ACC, written
    rel_ptr,  # (NKV, S) ACC: zeros, or the earlier keys' relevancy so far (HAS_STATE); summed
    span_ptr,  # (NKV, X, 2) int32, prefilled with -1
    idx_ptr,  # (NKV, RHO) int64, prefilled with -1
    score_ptr,  # (NKV, RHO) ACC, prefilled with -inf
    snap_ptr,  # (NKV, NB, SW) int32, written: slot keys at every chunk start
    scr_ptr,  # (N, BLOCK_M, NCOL) ACC scratch: the chunk's logits of each query head
    csum_ptr,  # (NKV, RANGE + BLOCK_R) ACC scratch: a round's window weights summed per range
    # column, then the slot rule's member scores
    stats_ptr,  # (NKV, 4) int32, written: rounds, exact tie steps, one-query steps, max rounds
    rel0_ptr,  # HAS_STATE: (NKV, P) ACC (read through rel_ptr, which the launcher seeds)
    idx0_ptr,  # HAS_STATE: (NKV, R0) int64
    score0_ptr,  # HAS_STATE: (NKV, R0) ACC
    T,
    X,
    OFF,
    R0,
    D,
    nu,
    G,
    HKV,
    RL,
    RHO,
    NB,
    SW,
    R_PAD,  # slot columns of the scratch: RL rounded up to BLOCK_M
    NCOL,  # R_PAD + RANGE + 2: the last two hold each query's softmax max and sum
    RANGE,  # range columns: BLOCK_M + ν - 1 rounded up to BLOCK_M
    scale,
    fb_rounds,  # the sequential fallback (docs/kernels/triton.md): after fb_rounds rounds
    fb_progress,  # that each made fewer than fb_progress decisions final, fb_stretch one-query
    fb_stretch,  # steps (doubling per fallback in a chunk); fb_rounds = 0: never
    MM: tl.constexpr,
    ACC: tl.constexpr,
    NATIVE: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    GROUPED: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per chunk, and the column tile
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,  # slot lanes: RL rounded up to a power of two
    LOG_M: tl.constexpr,  # log2(BLOCK_M): pointer-jumping steps
):
    # One program per (b, KV head). Per chunk of BLOCK_M queries: speculate that no key enters
    # during the chunk, then verify in rounds (docs/kernels/triton.md, "Chunk-parallel scan"):
    # each round computes every query's softmax over the sets the current decisions imply, the
    # relevancy of every key leaving the window, and the slot rule over them in parallel, until
    # the decisions reproduce themselves. Decisions are a vector `guess` (the slot each step
    # writes, -1 none); the sets follow from it, so a round does no D-sized work.
    n = tl.program_id(0).to(tl.int64)
    if HAS_STATE:
        nx, off, r0 = X, OFF, R0
    else:
        nx, off, r0 = T, 0, 0
    k_base = k_ptr + n * nx * D
    rel_base = rel_ptr + n * (nx - r0) - r0  # + x: relevancy of the sequence keys
    span_base = span_ptr + n * nx * 2
    snap_base = snap_ptr + n * NB * SW
    mask_base = mask_ptr + (n // HKV) * (nx - r0) - r0
    csum_base = csum_ptr + n * (RANGE + BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_R)
    slot_ok = c < RL
    key = tl.full([BLOCK_R], -1, tl.int32)
    score = tl.full([BLOCK_R], float("-inf"), ACC)
    if HAS_STATE:
        init = slot_ok & (c < r0)
        idx0 = tl.load(idx0_ptr + n * r0 + c, mask=init, other=-1)
        score0 = tl.load(score0_ptr + n * r0 + c, mask=init, other=float("-inf"))
        key = tl.where(init & (idx0 >= 0), c, -1)
        score = tl.where(key >= 0, score0, float("-inf"))
        tl.store(span_base + 2 * key, 0, mask=key >= 0)
        if GROUPED:  # the earlier keys still in the window: undivided sums while they are
            for c0 in range(0, nu, BLOCK_M):
                x = off - nu + 1 + c0 + offs_m
                ok = _range_keys(x, r0, off, mask_base, HAS_MASK)
                raw = tl.load(rel_base + x, mask=ok, other=0.0)
                tl.store(rel_base + x, raw * G.to(ACC), mask=ok)
            tl.debug_barrier()
    n_rounds = 0
    n_exact = 0
    n_steps = 0
    max_rounds = 0

    for t0 in range(0, T, BLOCK_M):
        blk = t0 // BLOCK_M
        nq = tl.minimum(t0 + BLOCK_M, T) - t0
        base = off + t0 - nu + 1  # step j screens buffer row base + j; range column x - base
        x1 = off + t0 + nq
        xq0 = off + t0
        snap_blk = snap_base + blk * SW
        tl.debug_barrier()  # the previous chunk is done reading the scratch and the snapshot
        tl.store(snap_blk + c, key, mask=slot_ok)
        tl.debug_barrier()
        _block_logits(q_ptr, k_base, scr_ptr, snap_blk, n, t0, T, D, G, RL, R_PAD, NCOL,
                      tl.maximum(base, r0), base, x1, scale, MM, ACC, NATIVE, BLOCK_M, BLOCK_M,
                      BLOCK_D)  # fmt: skip
        tl.debug_barrier()
        e = base + offs_m
        valid = (offs_m < nq) & (e >= r0)
        if HAS_MASK:
            valid = valid & (tl.load(mask_base + e, mask=valid, other=0) != 0)
        if not HAS_SLOTS:
            valid = valid & (offs_m < 0)
        rows = t0 + offs_m
        rok = offs_m < nq

        guess = tl.full([BLOCK_M], -1, tl.int32)  # speculation: nothing enters
        r = tl.zeros([BLOCK_M], ACC)
        verified = 0  # decisions known final
        low = 0  # rounds that made little progress
        stretch = fb_stretch
        rounds = 0
        done = 0
        while done == 0:
            rounds += 1
            eleave = _entrant_leave(guess, BLOCK_M)
            for g in range(G):
                row = n * G + g
                scr = scr_ptr + row * BLOCK_M * NCOL
                lse = _chunk_softmax(scr, offs_m, snap_blk, guess, eleave, base, xq0, x1, nu,
                                     r0, mask_base, RL, R_PAD, NCOL, ACC, HAS_MASK, BLOCK_M,
                                     BLOCK_M)  # fmt: skip
                tl.store(lse_ptr + row * T + rows, lse, mask=rok)
            tl.debug_barrier()  # the maxima and sums are re-read by other threads
            # each range key's relevancy so far (undivided: the sum over the group's heads),
            # with this chunk's queries; a key leaving during the chunk has its final one
            for c0 in range(0, x1 - base, 8 * BLOCK_M):  # wide: the query loop is serial
                x = base + c0 + tl.arange(0, 8 * BLOCK_M)
                kok = _range_keys(x, r0, x1, mask_base, HAS_MASK)
                acc = tl.load(rel_base + x, mask=kok, other=0.0)
                acc = _window_sums(acc, 0, nq, x, kok, scr_ptr, n, G, xq0, nu, mask_base, NCOL,
                                   R_PAD, base, ACC, HAS_MASK, BLOCK_M)  # fmt: skip
                tl.store(csum_base + x - base, acc, mask=x - base < RANGE)
            tl.debug_barrier()
            r = tl.load(csum_base + offs_m)
            if GROUPED:  # the group mean
                r = _div(r, G.to(ACC), ACC)
            if HAS_SLOTS:
                new, ex = _slot_rule(key, score, r, valid, base, RL, csum_base + RANGE, BLOCK_R,
                                     BLOCK_M, LOG_M)  # fmt: skip
                n_exact += ex
            else:
                new = guess
            # the last step's decision is seen by no query of the chunk: only the earlier ones
            # must reproduce themselves
            first = tl.min(tl.where((new != guess) & (offs_m < nq - 1), offs_m, BLOCK_M), 0)
            if first >= BLOCK_M:
                done = 1
                guess = new
            else:
                # decisions up to `first` are final; queries from first + 1 saw wrong sets
                low += (first + 1 - verified < fb_progress).to(tl.int32)
                verified = first + 1
                guess = new
                if (fb_rounds > 0) & (low >= fb_rounds):
                    # one-query steps from the final prefix, then speculation again
                    stop = tl.minimum(verified + stretch, nq)
                    skey, sscore = _slots_at(key, score, guess, r, verified, base, BLOCK_R,
                                             BLOCK_M)  # fmt: skip
                    # the entrants' relevancy from the final queries, then query by query
                    kok = _range_keys(e, r0, x1, mask_base, HAS_MASK)
                    ent = tl.load(rel_base + e, mask=kok, other=0.0)
                    ent = _window_sums(ent, 0, verified, e, kok, scr_ptr, n, G, xq0, nu,
                                       mask_base, NCOL, R_PAD, base, ACC, HAS_MASK,
                                       BLOCK_M)  # fmt: skip
                    for s in range(verified, stop):
                        sv = tl.full([1], 0, tl.int32) + s
                        eleave = _entrant_leave(guess, BLOCK_M)
                        for g in range(G):
                            row = n * G + g
                            scr = scr_ptr + row * BLOCK_M * NCOL
                            lse1 = _chunk_softmax(scr, sv, snap_blk, guess, eleave, base, xq0,
                                                  x1, nu, r0, mask_base, RL, R_PAD, NCOL, ACC,
                                                  HAS_MASK, 1, BLOCK_M)  # fmt: skip
                            tl.store(lse_ptr + row * T + t0 + sv, lse1)
                        tl.debug_barrier()
                        ent = _window_sums(ent, s, s + 1, e, kok, scr_ptr, n, G, xq0, nu,
                                           mask_base, NCOL, R_PAD, base, ACC, HAS_MASK,
                                           BLOCK_M)  # fmt: skip
                        r_s = tl.sum(tl.where(offs_m == s, ent, 0.0), 0)
                        if GROUPED:
                            r_s = _div(r_s, G.to(ACC), ACC)
                        vs = tl.sum(tl.where(offs_m == s, valid.to(tl.int32), 0), 0) > 0
                        tgt = tl.where(vs, _slot_step(skey, sscore, r_s, RL, BLOCK_R), -1)
                        skey = tl.where(c == tgt, (base + s).to(tl.int32), skey)
                        sscore = tl.where(c == tgt, r_s, sscore)
                        guess = tl.where(offs_m == s, tgt, guess)
                        r = tl.where(offs_m == s, r_s, r)
                    guess = tl.where(offs_m >= stop, -1, guess)
                    n_steps += stop - verified
                    verified = stop
                    low = 0
                    stretch = 2 * stretch
        n_rounds += rounds
        max_rounds = tl.maximum(max_rounds, rounds)

        # commit: relevancy of the range keys, spans, the slots after the chunk
        for c0 in range(0, x1 - base, BLOCK_M):
            cols = c0 + offs_m
            x = base + cols
            raw = tl.load(csum_base + cols)
            if GROUPED:  # the keys that left the window take the group mean
                raw = tl.where(cols < nq, _div(raw, G.to(ACC), ACC), raw)
            tl.store(rel_base + x, raw, mask=_range_keys(x, r0, x1, mask_base, HAS_MASK))
        if HAS_SLOTS:
            ins = guess >= 0
            tq = t0 + offs_m + 1  # an entrant of step j is in the set from query t0 + j + 1
            tl.store(span_base + 2 * e, tq, mask=ins)
            same = (guess[None, :] == guess[:, None]) & (offs_m[None, :] < offs_m[:, None])
            prev = tl.max(tl.where(same, offs_m[None, :], -1), 1)
            held = tl.sum(tl.where(c[None, :] == guess[:, None], key[None, :], 0), 1)
            victim = tl.where(prev >= 0, base + prev, held)
            tl.store(span_base + 2 * victim + 1, tq, mask=ins & (victim >= 0))
            key, score = _slots_at(key, score, guess, r, BLOCK_M, base, BLOCK_R, BLOCK_M)
        tl.debug_barrier()  # the relevancy is re-read by the next chunk

    if GROUPED:  # the keys still in the window take the group mean too
        for c0 in range(0, nu, BLOCK_M):
            x = off + T - nu + 1 + c0 + offs_m
            ok = _range_keys(x, r0, off + T, mask_base, HAS_MASK)
            raw = tl.load(rel_base + x, mask=ok, other=0.0)
            tl.store(rel_base + x, _div(raw, G.to(ACC), ACC), mask=ok)
    tl.store(span_base + 2 * key + 1, T, mask=slot_ok & (key >= 0))
    tl.store(idx_ptr + n * RHO + c, key.to(tl.int64), mask=slot_ok)
    tl.store(score_ptr + n * RHO + c, score, mask=slot_ok)
    so = tl.arange(0, 4)
    st = tl.where(so == 2, n_steps, max_rounds)
    st = tl.where(so == 0, n_rounds, tl.where(so == 1, n_exact, st))
    tl.store(stats_ptr + n * 4 + so, st)


@triton.jit
def _fwd_chunk(
    acc, l, hit, qb, lse, rows, rows_ok, keys, keys_ok, offs_dv, k_base, v_base, span_base,
    mask_base, D, DV, nu, off, scale,
    FROM_SET: tl.constexpr, MM: tl.constexpr, ACC: tl.constexpr, NATIVE: tl.constexpr,
    TF32: tl.constexpr, EXACT: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    member = _member(
        rows, rows_ok, keys, keys_ok, span_base, mask_base, nu, off, FROM_SET, HAS_MASK
    )
    kt = tl.load(
        k_base + keys[None, :] * D + offs_d[:, None],
        mask=keys_ok[None, :] & (offs_d < D)[:, None],
        other=0.0,
    ).to(MM)
    vb = tl.load(
        v_base + keys[:, None] * DV + offs_dv[None, :],
        mask=keys_ok[:, None] & (offs_dv < DV)[None, :],
        other=0.0,
    ).to(MM)
    s = _mm(qb, kt, NATIVE, TF32).to(ACC) * scale
    p = tl.where(member, tl.exp(s - lse[:, None]), 0.0)
    l += tl.sum(p, 1)
    res, hit = _dot_p(p, member, vb, hit, MM, NATIVE, TF32, EXACT)
    return acc + res, l, hit


@triton.jit(do_not_specialize=_STREAM_ROWS)
def screened_attention_fwd_kernel(
    q_ptr,  # (N, T, D): N = B·H query rows
    k_ptr,  # (NKV, T, D): query row n reads KV row n // G
    v_ptr,  # (NKV, T, DV)
    mask_ptr,  # (B, T) uint8, 1 = a real token (read only with HAS_MASK)
    lse_ptr,  # (N, T) ACC, from the scan
    span_ptr,  # (NKV, T, 2) int32
    snap_ptr,  # (NKV, NB, SW) int32: the set at each SNAP_M block start, RCOUNT slots used
    out_ptr,  # (N, T, DV), written (EXACT: only the flagged rows)
    flag_ptr,  # (N, T) int32: rows that met a non-finite V row (written; EXACT: read)
    T,
    X,  # HAS_STATE: k, v, span have X buffer rows per KV row (the scan's); else T
    OFF,
    R0,
    D,
    DV,
    nu,
    G,
    HKV,
    RCOUNT,
    NB,
    SW,
    scale,
    MM: tl.constexpr,
    ACC: tl.constexpr,
    NATIVE: tl.constexpr,
    TF32: tl.constexpr,
    EXACT: tl.constexpr,  # the fix-up launch: recompute the flagged rows with _dot_masked
    HAS_MASK: tl.constexpr,
    HAS_STATE: tl.constexpr,
    SNAP_M: tl.constexpr,  # the scan's query block, which the snapshot is indexed by
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    nkv = n // G
    if HAS_STATE:  # buffer rows, the row of query 0, the first sequence row
        nx, off, r0 = X, OFF, R0
    else:
        nx, off, r0 = T, 0, 0
    k_base = k_ptr + nkv * nx * D
    v_base = v_ptr + nkv * nx * DV
    span_base = span_ptr + nkv * nx * 2
    mask_base = mask_ptr + (nkv // HKV) * (nx - r0) - r0
    # axis 2: BLOCK_DV output columns per program (the fix-up splits the head)
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    # axis 1 holds at most 65535 programs: they stride over the query blocks
    for blk in range(tl.program_id(1), tl.cdiv(T, BLOCK_M), tl.num_programs(1)):
        t0 = blk * BLOCK_M
        rows = t0 + tl.arange(0, BLOCK_M)
        rows_ok = rows < T
        # the set at the snapshot block start ts <= t0 plus the keys [ts-ν+1, t1) hold every
        # candidate of the rows (membership itself comes from the spans)
        ts = (t0 // SNAP_M) * SNAP_M
        snap_base = snap_ptr + (nkv * NB + t0 // SNAP_M) * SW
        w0 = tl.maximum(off + ts - nu + 1, r0)
        x1 = off + tl.minimum(t0 + BLOCK_M, T)  # key rows [w0, x1)
        rcount = RCOUNT
        if EXACT:
            flag = tl.load(flag_ptr + n * T + rows, mask=rows_ok, other=0)
            rows_ok = rows_ok & (flag != 0)
            todo = tl.max(rows_ok.to(tl.int32), 0) > 0
            rcount = tl.where(todo, RCOUNT, 0)  # nothing flagged: no work
            x1 = tl.where(todo, x1, w0)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        qb = tl.load(
            q_ptr + n * T * D + rows[:, None] * D + offs_d[None, :],
            mask=rows_ok[:, None] & (offs_d < D)[None, :],
            other=0.0,
        ).to(MM)
        lse = tl.load(lse_ptr + n * T + rows, mask=rows_ok, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
        l = tl.zeros([BLOCK_M], ACC)
        hit = tl.zeros([BLOCK_M], tl.int32)

        for c0 in range(0, rcount, BLOCK_N):
            cols = c0 + offs_n
            keys = tl.load(snap_base + cols, mask=cols < RCOUNT, other=-1)
            acc, l, hit = _fwd_chunk(
                acc, l, hit, qb, lse, rows, rows_ok, keys, keys >= 0, offs_dv, k_base, v_base,
                span_base, mask_base, D, DV, nu, off, scale, True, MM, ACC, NATIVE, TF32, EXACT,
                HAS_MASK, BLOCK_D,
            )  # fmt: skip
        for c0 in range(w0, x1, BLOCK_N):
            keys = c0 + offs_n
            acc, l, hit = _fwd_chunk(
                acc, l, hit, qb, lse, rows, rows_ok, keys, keys < x1, offs_dv, k_base, v_base,
                span_base, mask_base, D, DV, nu, off, scale, False, MM, ACC, NATIVE, TF32, EXACT,
                HAS_MASK, BLOCK_D,
            )  # fmt: skip
        # l = Σ exp(s - lse) is 1 up to rounding; dividing makes each row exactly normalised
        # (a query without any candidate has l = 0 and outputs zeros)
        out = _div(acc, tl.where(l > 0, l, 1.0)[:, None], ACC)
        tl.store(
            out_ptr + n * T * DV + rows[:, None] * DV + offs_dv[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=rows_ok[:, None] & (offs_dv < DV)[None, :],
        )
        if not EXACT:
            tl.store(flag_ptr + n * T + rows, hit, mask=rows_ok)


@triton.jit(do_not_specialize=_STREAM_ROWS)
def screened_attention_replay_sets_kernel(
    span_ptr,  # (N, X, 2) int32
    snap_ptr,  # (N, NB, SW) int32, written: the set at each block start, CAP slots used
    T,  # queries
    X,  # HAS_STATE: buffer rows per KV row (else T)
    OFF,
    R0,
    nu,
    CAP,  # a bound on the set size (ρ, or the size of the last set: sets never shrink)
    NB,
    SW,
    HAS_STATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,  # slots per step: the sets pass through snap in chunks
):
    n = tl.program_id(0).to(tl.int64)
    if HAS_STATE:  # buffer rows, the row of query 0, the first sequence row
        nx, off, r0 = X, OFF, R0
    else:
        nx, off, r0 = T, 0, 0
    span_base = span_ptr + n * nx * 2
    snap_base = snap_ptr + n * NB * SW
    c = tl.arange(0, BLOCK_R)
    offs = tl.arange(0, BLOCK_M)
    for c0 in range(0, CAP, BLOCK_R):
        cols = c0 + c
        first = tl.full([BLOCK_R], -1, tl.int32)
        if HAS_STATE:  # initial slot c holds buffer row c (its span starts at query 0)
            init = cols < tl.minimum(CAP, r0)
            start0 = tl.load(span_base + 2 * cols, mask=init, other=-1)
            first = tl.where(init & (start0 >= 0), cols, first)
        tl.store(snap_base + cols, first, mask=cols < CAP)
    # Row blk of snap from row blk-1, a chunk of slots at a time (a whole set in registers
    # would need (CAP, BLOCK_M) match tiles, which spill for large ρ).
    for blk in range(1, NB):
        t1 = blk * BLOCK_M
        tl.debug_barrier()  # row blk-1 is complete, whichever thread stored it
        # the set at t1: members whose span goes on, plus the keys e = t-ν+1 screened in
        # after the queries t of the previous block (span start t+1 <= t1) still there at t1
        e = off + t1 - BLOCK_M - nu + 1 + offs  # buffer rows
        e_ok = (e >= r0) & (e < nx)
        start = tl.load(span_base + 2 * e, mask=e_ok, other=-1)
        end = tl.load(span_base + 2 * e + 1, mask=e_ok, other=-1)
        new = e_ok & (start >= 0) & (start <= t1) & (end > t1)
        # k-th new key -> k-th empty slot, counting the empty slots across the chunks
        new_rank = tl.cumsum(new.to(tl.int32), 0) - 1
        empties = 0
        for c0 in range(0, CAP, BLOCK_R):
            cols = c0 + c
            live = cols < CAP
            slot = tl.load(snap_base + (blk - 1) * SW + cols, mask=live, other=-1)
            slot_end = tl.load(span_base + 2 * slot + 1, mask=slot >= 0, other=-1)
            slot = tl.where(slot_end > t1, slot, -1)
            empty = live & (slot < 0)
            empty_rank = empties + tl.cumsum(empty.to(tl.int32), 0) - 1
            empties += tl.sum(empty.to(tl.int32), 0)
            match = empty[:, None] & new[None, :] & (empty_rank[:, None] == new_rank[None, :])
            add = tl.max(tl.where(match, e[None, :], -1), 1)
            slot = tl.where(add >= 0, add, slot)
            tl.store(snap_base + blk * SW + cols, slot, mask=live)


@triton.jit
def _dq_chunk(
    acc, hit, qb, dob, lse, delta, rows, rows_ok, keys, keys_ok, offs_c, q_base, do_base,
    k_base, v_base, span_base, mask_base, D, DV, nu, off, scale,
    FROM_SET: tl.constexpr, DELTA_ONLY: tl.constexpr, MM: tl.constexpr, ACC: tl.constexpr,
    NATIVE: tl.constexpr, TF32: tl.constexpr, EXACT: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # DELTA_ONLY: acc (BLOCK_M,) += rowsum(P ⊙ dP); else acc (BLOCK_M, BLOCK_C) += dS K[:, offs_c]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    member = _member(
        rows, rows_ok, keys, keys_ok, span_base, mask_base, nu, off, FROM_SET, HAS_MASK
    )
    if BLOCK_K < BLOCK_D or BLOCK_K < BLOCK_DV:  # S and dP from memory, BLOCK_K columns at a time
        s = _mm_rows(q_base, rows, rows_ok, k_base, keys, keys_ok, D, MM, ACC, NATIVE, TF32,
                     BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        dp = _mm_rows(do_base, rows, rows_ok, v_base, keys, keys_ok, DV, MM, ACC, NATIVE, TF32,
                      BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        s = s * scale
    else:
        kt = tl.load(
            k_base + keys[None, :] * D + offs_d[:, None],
            mask=keys_ok[None, :] & (offs_d < D)[:, None],
            other=0.0,
        ).to(MM)
        vt = tl.load(
            v_base + keys[None, :] * DV + offs_dv[:, None],
            mask=keys_ok[None, :] & (offs_dv < DV)[:, None],
            other=0.0,
        ).to(MM)
        s = _mm(qb, kt, NATIVE, TF32).to(ACC) * scale
        dp = _mm(dob, vt, NATIVE, TF32).to(ACC)
    p = tl.where(member, tl.exp(s - lse[:, None]), 0.0)
    if DELTA_ONLY:
        return acc + tl.sum(tl.where(member, p * dp, 0.0), 1), hit
    else:
        ds = tl.where(member, p * (dp - delta[:, None]), 0.0)  # where: dp may be NaN off C_t
        if BLOCK_C == BLOCK_D and BLOCK_K >= BLOCK_D and BLOCK_K >= BLOCK_DV:
            kc = tl.trans(kt)  # the whole head: K is in registers already
        else:
            kc = tl.load(
                k_base + keys[:, None] * D + offs_c[None, :],
                mask=keys_ok[:, None] & (offs_c < D)[None, :],
                other=0.0,
            ).to(MM)
        res, hit = _dot_p(ds, member, kc, hit, MM, NATIVE, TF32, EXACT)
        return acc + res, hit


@triton.jit
def _dq_pass(
    acc, qb, dob, lse, delta, rows, rows_ok, offs_c, w0, x1, q_base, do_base, k_base, v_base,
    span_base, snap_base, mask_base, D, DV, nu, off, RCOUNT, rcount, scale,
    DELTA_ONLY: tl.constexpr, MM: tl.constexpr, ACC: tl.constexpr, NATIVE: tl.constexpr,
    TF32: tl.constexpr, EXACT: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One sweep over the rows' candidates: the set at the snapshot block start ts, then the
    key rows [w0, x1) (from ts-ν+1 on). Returns (acc, hit)."""
    offs_n = tl.arange(0, BLOCK_N)
    hit = tl.zeros([BLOCK_M], tl.int32)
    for c0 in range(0, rcount, BLOCK_N):
        cols = c0 + offs_n
        keys = tl.load(snap_base + cols, mask=cols < RCOUNT, other=-1)
        acc, hit = _dq_chunk(
            acc, hit, qb, dob, lse, delta, rows, rows_ok, keys, keys >= 0, offs_c, q_base,
            do_base, k_base, v_base, span_base, mask_base, D, DV, nu, off, scale, True, DELTA_ONLY,
            MM, ACC, NATIVE, TF32, EXACT, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
            BLOCK_C, BLOCK_K,
        )  # fmt: skip
    for c0 in range(w0, x1, BLOCK_N):
        keys = c0 + offs_n
        acc, hit = _dq_chunk(
            acc, hit, qb, dob, lse, delta, rows, rows_ok, keys, keys < x1, offs_c, q_base,
            do_base, k_base, v_base, span_base, mask_base, D, DV, nu, off, scale, False, DELTA_ONLY,
            MM, ACC, NATIVE, TF32, EXACT, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
            BLOCK_C, BLOCK_K,
        )  # fmt: skip
    return acc, hit


@triton.jit(do_not_specialize=_STREAM_ROWS)
def screened_attention_bwd_dq_kernel(
    q_ptr,  # (N, T, D): N = B·H query rows
    k_ptr,  # (NKV, T, D): query row n reads KV row n // G
    v_ptr,  # (NKV, T, DV)
    mask_ptr,  # (B, T) uint8, 1 = a real token (read only with HAS_MASK)
    o_ptr,  # (N, T, DV)
    do_ptr,  # (N, T, DV)
    lse_ptr,  # (N, T) ACC
    span_ptr,  # (NKV, T, 2) int32
    snap_ptr,  # (NKV, NB, SW) int32 from screened_attention_replay_sets_kernel
    dq_ptr,  # (N, T, D), written (EXACT: only the flagged rows)
    delta_ptr,  # (N, T) ACC, written: rowsum(dO ⊙ O) (EXACT: read)
    flag_ptr,  # (N, T) int32: rows that met a non-finite K row (written; EXACT: read)
    T,
    X,  # HAS_STATE: k, v, span have X buffer rows per KV row; else T
    OFF,
    R0,
    D,
    DV,
    nu,
    G,
    HKV,
    RCOUNT,
    NB,
    SW,
    scale,
    MM: tl.constexpr,
    ACC: tl.constexpr,
    NATIVE: tl.constexpr,
    TF32: tl.constexpr,
    EXACT: tl.constexpr,  # the fix-up launch: recompute the flagged rows with _dot_masked
    HAS_MASK: tl.constexpr,
    HAS_STATE: tl.constexpr,
    DELTA_FROM_P: tl.constexpr,
    SNAP_M: tl.constexpr,  # the replay's query block, which the snapshot is indexed by
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_C: tl.constexpr,  # dQ columns per program (grid axis 2): BLOCK_D, less in the fix-up
    BLOCK_K: tl.constexpr,  # < the head: S and dP by _mm_rows (float32 on FMA units)
):
    n = tl.program_id(0).to(tl.int64)
    nkv = n // G
    if HAS_STATE:  # buffer rows, the row of query 0, the first sequence row
        nx, off, r0 = X, OFF, R0
    else:
        nx, off, r0 = T, 0, 0
    q_base = q_ptr + n * T * D
    do_base = do_ptr + n * T * DV
    k_base = k_ptr + nkv * nx * D
    v_base = v_ptr + nkv * nx * DV
    span_base = span_ptr + nkv * nx * 2
    mask_base = mask_ptr + (nkv // HKV) * (nx - r0) - r0
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    # axis 1 holds at most 65535 programs: they stride over the query blocks
    for blk in range(tl.program_id(1), tl.cdiv(T, BLOCK_M), tl.num_programs(1)):
        t0 = blk * BLOCK_M
        rows = t0 + tl.arange(0, BLOCK_M)
        rows_ok = rows < T
        ts = (t0 // SNAP_M) * SNAP_M
        snap_base = snap_ptr + (nkv * NB + t0 // SNAP_M) * SW
        w0 = tl.maximum(off + ts - nu + 1, r0)
        x1 = off + tl.minimum(t0 + BLOCK_M, T)  # key rows [w0, x1)
        rcount = RCOUNT
        if EXACT:
            flag = tl.load(flag_ptr + n * T + rows, mask=rows_ok, other=0)
            rows_ok = rows_ok & (flag != 0)
            todo = tl.max(rows_ok.to(tl.int32), 0) > 0
            rcount = tl.where(todo, RCOUNT, 0)  # nothing flagged: no work
            x1 = tl.where(todo, x1, w0)
        qmask = rows_ok[:, None] & (offs_d < D)[None, :]
        omask = rows_ok[:, None] & (offs_dv < DV)[None, :]
        qb = tl.load(q_ptr + n * T * D + rows[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        qb = qb.to(MM)
        o_off = n * T * DV + rows[:, None] * DV + offs_dv[None, :]
        dob = tl.load(do_ptr + o_off, mask=omask, other=0.0)
        lse = tl.load(lse_ptr + n * T + rows, mask=rows_ok, other=0.0)
        if EXACT:
            delta = tl.load(delta_ptr + n * T + rows, mask=rows_ok, other=0.0)
        elif DELTA_FROM_P:
            # delta = dO · O with O unrounded: a half-precision O would cost the gradients
            # about one ulp of that dtype, so half inputs pay one more sweep (2 GEMMs) for it
            delta, _ = _dq_pass(
                tl.zeros([BLOCK_M], ACC), qb, dob.to(MM), lse, lse, rows, rows_ok, offs_c,
                w0, x1, q_base, do_base, k_base, v_base, span_base, snap_base, mask_base, D, DV,
                nu, off, RCOUNT, rcount, scale, True, MM, ACC, NATIVE, TF32, EXACT, HAS_MASK,
                BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_C, BLOCK_K,
            )  # fmt: skip
        else:
            ob = tl.load(o_ptr + o_off, mask=omask, other=0.0)
            delta = tl.sum(dob.to(ACC) * ob.to(ACC), 1)
        if not EXACT:
            tl.store(delta_ptr + n * T + rows, delta, mask=rows_ok)
        dq, hit = _dq_pass(
            tl.zeros([BLOCK_M, BLOCK_C], ACC), qb, dob.to(MM), lse, delta, rows, rows_ok,
            offs_c, w0, x1, q_base, do_base, k_base, v_base, span_base, snap_base, mask_base,
            D, DV, nu, off, RCOUNT, rcount, scale, False, MM, ACC, NATIVE, TF32, EXACT, HAS_MASK,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_C, BLOCK_K,
        )  # fmt: skip
        tl.store(
            dq_ptr + n * T * D + rows[:, None] * D + offs_c[None, :],
            (dq * scale).to(dq_ptr.dtype.element_ty),
            mask=rows_ok[:, None] & (offs_c < D)[None, :],
        )
        if not EXACT:
            tl.store(flag_ptr + n * T + rows, hit, mask=rows_ok)


@triton.jit(do_not_specialize=_STREAM_ROWS)
def screened_attention_bwd_dkdv_kernel(
    q_ptr,  # (N, T, D): N = B·H query rows, G per KV row
    k_ptr,  # (NKV, T, D)
    v_ptr,  # (NKV, T, DV)
    mask_ptr,  # (B, T) uint8, 1 = a real token (read only with HAS_MASK)
    do_ptr,  # (N, T, DV)
    lse_ptr,  # (N, T) ACC
    delta_ptr,  # (N, T) ACC
    span_ptr,  # (NKV, T, 2) int32
    dk_ptr,  # (NKV, T, D), written (EXACT: only the flagged keys)
    dv_ptr,  # (NKV, T, DV), written (EXACT: only the flagged keys)
    flag_ptr,  # (NKV, T) int32: keys that met a non-finite dO or Q row (written; EXACT: read)
    T,  # queries, and the keys whose gradients are computed: key j at buffer row OFF + j
    X,  # HAS_STATE: k, v, span have X buffer rows per KV row (the cached ones get none)
    OFF,
    R0,
    D,
    DV,
    nu,
    G,
    HKV,
    scale,
    MM: tl.constexpr,
    ACC: tl.constexpr,
    NATIVE: tl.constexpr,
    TF32: tl.constexpr,
    EXACT: tl.constexpr,  # the fix-up launch: recompute the flagged keys with _dot_masked
    HAS_MASK: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_CK: tl.constexpr,  # dK columns per program (grid axis 2): BLOCK_D, less in the fix-up
    BLOCK_CV: tl.constexpr,  # dV columns per program: BLOCK_DV, less in the fix-up
    BLOCK_K: tl.constexpr,  # < the head: S and dP by _mm_rows (float32 on FMA units)
):
    # one program per (b, KV head) and key block: dK and dV sum over the G query heads. Key j
    # is the query's own row: in the window of the queries [j, j+ν), as without a state.
    n = tl.program_id(0).to(tl.int64)
    if HAS_STATE:  # buffer rows, the row of query 0, the first sequence row
        nx, off, r0 = X, OFF, R0
    else:
        nx, off, r0 = T, 0, 0
    k_base = k_ptr + (n * nx + off) * D
    v_base = v_ptr + (n * nx + off) * DV
    span_base = span_ptr + (n * nx + off) * 2
    SPLIT_K: tl.constexpr = BLOCK_K < BLOCK_D or BLOCK_K < BLOCK_DV
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_ck = tl.program_id(2) * BLOCK_CK + tl.arange(0, BLOCK_CK)
    offs_cv = tl.program_id(2) * BLOCK_CV + tl.arange(0, BLOCK_CV)
    # axis 1 holds at most 65535 programs: they stride over the key blocks
    for kblk in range(tl.program_id(1), tl.cdiv(T, BLOCK_N), tl.num_programs(1)):
        j0 = kblk * BLOCK_N
        keys = j0 + tl.arange(0, BLOCK_N)
        keys_ok = keys < T
        if EXACT:
            flag = tl.load(flag_ptr + n * T + keys, mask=keys_ok, other=0)
            keys_ok = keys_ok & (flag != 0)
        kmask = keys_ok[:, None] & (offs_d < D)[None, :]
        vmask = keys_ok[:, None] & (offs_dv < DV)[None, :]
        if not SPLIT_K:
            kb = tl.load(k_base + keys[:, None] * D + offs_d[None, :], mask=kmask, other=0.0)
            kb = kb.to(MM)
            vb = tl.load(v_base + keys[:, None] * DV + offs_dv[None, :], mask=vmask, other=0.0)
            vb = vb.to(MM)
        start = tl.load(span_base + 2 * keys, mask=keys_ok, other=-1)
        end = tl.load(span_base + 2 * keys + 1, mask=keys_ok, other=-1)
        j = keys[:, None]
        if HAS_MASK:  # a padded key is in no window (and has no span)
            mask_base = mask_ptr + (n // HKV) * (nx - r0) + off - r0  # + key j
            real = tl.load(mask_base + keys, mask=keys_ok, other=0) != 0
        dk = tl.zeros([BLOCK_N, BLOCK_CK], ACC)
        dv = tl.zeros([BLOCK_N, BLOCK_CV], ACC)
        hit = tl.zeros([BLOCK_N], tl.int32)

        # queries that can see a key of the block: its window, then its span (starts >= j + ν)
        q_end = tl.maximum(tl.minimum(j0 + BLOCK_N - 1 + nu, T), tl.max(end, 0))
        if EXACT:
            q_end = tl.where(tl.max(keys_ok.to(tl.int32), 0) > 0, q_end, j0)  # nothing flagged
        for tq0 in range(j0, q_end, BLOCK_M):
            rows = tq0 + offs_m
            rows_ok = rows < T
            t = rows[None, :]
            win = (j <= t) & (j > t - nu)
            if HAS_MASK:
                win = win & real[:, None]
            member_t = win | ((start[:, None] <= t) & (t < end[:, None]))
            member_t = member_t & keys_ok[:, None] & rows_ok[None, :]  # (BLOCK_N, BLOCK_M)
            if tl.max(member_t.to(tl.int32)) > 0:  # spans leave gaps: skip empty tiles
                for g in range(G):  # the query heads of the group, one query row each
                    row = n * G + g
                    q_base = q_ptr + row * T * D
                    do_base = do_ptr + row * T * DV
                    omask = rows_ok[:, None] & (offs_dv < DV)[None, :]
                    dob = tl.load(
                        do_base + rows[:, None] * DV + offs_dv[None, :], mask=omask, other=0.0
                    )
                    dob = dob.to(MM)
                    lse = tl.load(lse_ptr + row * T + rows, mask=rows_ok, other=0.0)
                    delta = tl.load(delta_ptr + row * T + rows, mask=rows_ok, other=0.0)
                    if SPLIT_K:  # (BLOCK_N, BLOCK_M) = S^T and dP^T, BLOCK_K columns at a time
                        s_t = _mm_rows(k_base, keys, keys_ok, q_base, rows, rows_ok, D, MM, ACC,
                                       NATIVE, TF32, BLOCK_N, BLOCK_M, BLOCK_K)  # fmt: skip
                        dp_t = _mm_rows(v_base, keys, keys_ok, do_base, rows, rows_ok, DV, MM,
                                        ACC, NATIVE, TF32, BLOCK_N, BLOCK_M, BLOCK_K)  # fmt: skip
                        s_t = s_t * scale
                    else:
                        qt = tl.load(
                            q_base + rows[None, :] * D + offs_d[:, None],
                            mask=rows_ok[None, :] & (offs_d < D)[:, None],
                            other=0.0,
                        ).to(MM)
                        s_t = _mm(kb, qt, NATIVE, TF32).to(ACC) * scale  # S^T
                        dp_t = _mm(vb, tl.trans(dob), NATIVE, TF32).to(ACC)
                    p_t = tl.where(member_t, tl.exp(s_t - lse[None, :]), 0.0)
                    ds_t = tl.where(member_t, p_t * (dp_t - delta[None, :]), 0.0)
                    # the product operands: the whole head in registers, or a column chunk
                    if BLOCK_CV == BLOCK_DV:
                        doc = dob
                    else:
                        doc = tl.load(
                            do_base + rows[:, None] * DV + offs_cv[None, :],
                            mask=rows_ok[:, None] & (offs_cv < DV)[None, :],
                            other=0.0,
                        ).to(MM)
                    if BLOCK_CK == BLOCK_D and not SPLIT_K:
                        qc = tl.trans(qt)
                    else:
                        qc = tl.load(
                            q_base + rows[:, None] * D + offs_ck[None, :],
                            mask=rows_ok[:, None] & (offs_ck < D)[None, :],
                            other=0.0,
                        ).to(MM)
                    res, hit = _dot_p(p_t, member_t, doc, hit, MM, NATIVE, TF32, EXACT)
                    dv += res
                    res, hit = _dot_p(ds_t, member_t, qc, hit, MM, NATIVE, TF32, EXACT)
                    dk += res
        tl.store(
            dk_ptr + n * T * D + keys[:, None] * D + offs_ck[None, :],
            (dk * scale).to(dk_ptr.dtype.element_ty),
            mask=keys_ok[:, None] & (offs_ck < D)[None, :],
        )
        tl.store(
            dv_ptr + n * T * DV + keys[:, None] * DV + offs_cv[None, :],
            dv.to(dv_ptr.dtype.element_ty),
            mask=keys_ok[:, None] & (offs_cv < DV)[None, :],
        )
        if not EXACT:
            tl.store(flag_ptr + n * T + keys, hit, mask=keys_ok)


# grid axes 1 and 2 hold at most 65535 programs: B·H goes on axis 0 (up to 2³¹ - 1), the
# query/key blocks on axis 1, where the programs stride over them
_GRID_YZ = 65535
GPU_ARCHS = (80, 90)  # sm_80 (A100), sm_90 (H100/H200): what the static check builds for
HEAD_DIMS = (32, 64, 128, 256)  # the head-dim buckets (BLOCK_D, BLOCK_DV are powers of two)


@dataclass(frozen=True)
class LaunchConfig:
    """How one kernel is launched: its block sizes and compile options. A pure function of
    the dtype, head dims, ν, ρ and target (``launch_config``), so that the launchers and the
    static GPU check (bench/gpu_static.py) build exactly the same specialisations."""

    block_m: int
    block_n: int
    block_d: int
    block_dv: int
    num_warps: int
    num_stages: int
    native: bool  # half inputs on a GPU: tl.dot in the input dtype, float32 accumulation
    tf32: bool  # float32 inputs on a GPU with allow_tf32: TF32 tensor cores
    block_w: int = 0  # scan only: relevancy ring lanes
    block_l: int = 0  # scan only: ring + slot lanes
    block_c: int = 0  # fix-ups: output columns per program (grid axis 2); 0: the whole head
    block_k: int = 0  # dq/dkdv: S and dP over head columns in chunks of block_k; 0: at once

    def columns(self) -> tuple[int, int]:
        """Output columns per program of q/k-wide (dQ, dK) and v-wide (out, dV) results."""
        if self.block_c == 0:
            return self.block_d, self.block_dv
        return min(self.block_c, self.block_d), min(self.block_c, self.block_dv)

    def k_chunk(self) -> int:
        """BLOCK_K of dq/dkdv: ``block_k``, or the whole head (no split)."""
        return self.block_k or max(self.block_d, self.block_dv)


def _pow2(x: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(x, 1)))


def launch_config(
    kernel: str,
    dtype: torch.dtype,
    d: int,
    dv: int,
    window: int,
    live: int,
    target,
    allow_tf32: bool = False,
    grouped: bool = False,
) -> LaunchConfig:
    """The launch configuration of ``kernel``: "scan", "fwd", "replay", "dq", "dkdv", or a
    fix-up launch "fwd_fix", "dq_fix", "dkdv_fix" (the same kernels with EXACT, over the
    rows flagged non-finite: small blocks, so that the exact path fits too).

    Args:
        dtype: the input dtype.
        d, dv: head dims of q/k and v.
        window: ν, clipped to T (scan) or T + 1; ``live``: the live slots (scan) or the
            replay capacity (replay).
        target: ``"interpreter"`` or a CUDA arch (80, 90). Under the interpreter, whose
            cost is per tl op, blocks are 16 so that small test sizes still span several
            query and key blocks.
        allow_tf32: ``torch.backends.cuda.matmul.allow_tf32``: float32 products on TF32
            tensor cores (a GPU only).
        grouped: grouped heads (G > 1): the scan's loop over the group's heads keeps the lane
            vectors live across the block products, dK/dV's the key tiles across the query
            tiles: both get half the query block (at least 16).

    On a GPU, blocks shrink with the head dim and the operand width so that every
    specialisation fits the shared memory and registers of sm_80 and sm_90 (checked by
    ``make gpu-static``); the fix-up kernels use 16 × 16 blocks.
    """
    interpret = target == "interpreter"
    native = not interpret and dtype in (torch.float16, torch.bfloat16)
    tf32 = not interpret and dtype == torch.float32 and allow_tf32
    bd, bdv = _pow2(d, 16), _pow2(dv, 16)
    bw = bl = 0
    if kernel == "scan":
        bw = _pow2(window)
        bl = _pow2(bw + live)
    elif kernel == "chunk_scan":  # block_l: the slot lanes
        bl = _pow2(live)
    fix = kernel.endswith("_fix")
    backward = kernel.startswith(("dq", "dkdv"))
    if interpret:  # 16-column chunks (fix-up outputs, backward S and dP), so that D=32 spans two
        bc = 16 if fix else 0
        bk = 16 if backward and max(bd, bdv) > 16 else 0
        return LaunchConfig(16, 16, bd, bdv, 4, 1, native, tf32, bw, bl, bc, bk)
    wide = dtype in (torch.float32, torch.float64)  # operand bytes: half the tile fits
    hd = max(bd, bdv) * (2 if wide else 1)
    warps = 8 if hd >= 256 else 4  # the operand tiles of a wide head over more threads
    # IEEE float32 runs tl.dot on FMA units, which hold whole operand rows per thread: the
    # backward's S and dP over a 256-wide head spilled 1-6 KB, so they go 64 columns at a time;
    # with TF32 too in the fix-ups (dK/dV's spilled 312-408 B at once), not in the hot kernels
    bk = 64 if backward and wide and (fix or not tf32) and max(bd, bdv) >= 256 else 0
    if fix:
        # the exact path's masked products and counts over a whole head spill (5 KB at D=128):
        # 32 output columns per program (16 in float32), S recomputed per chunk
        # grouped dK/dV fix-ups keep the key tiles live across the group's heads: 16 columns
        # and 8 warps (sm_80 fp16 D=128 spilled 528 B at 32 and 4, 272 B at 16 and 4; 16 B now)
        gfix = grouped and kernel == "dkdv_fix"
        bc = 16 if wide or gfix else 32
        warps = 8 if gfix else warps
        return LaunchConfig(16, 16, bd, bdv, warps, 1, native, tf32, block_c=bc, block_k=bk)
    if kernel == "replay":  # block_n: the slots per step (a (block_n, block_m) match tile)
        return LaunchConfig(64, min(_pow2(live), 32), bd, bdv, 4, 1, native, tf32)
    if kernel == "chunk_scan":
        # the slot rule's (BLOCK_R, BLOCK_M) and (BLOCK_M, BLOCK_M) count matrices: at 64
        # queries fp16 D=64 ρ=16 stacked 1672 B on sm_90, at 32 none; ρ=256 1416 B with 4
        # warps, 24 B with 8; float32 D=256 (logits on FMA units) 280-304 B at 32 on sm_80,
        # float32 D=128 288-456 B on sm_90 with 4 warps
        warps = 8 if bl >= 128 or (wide and hd >= 256) else 4
        bm = 16 if hd >= 512 else 32
        return LaunchConfig(bm, bm, bd, bdv, warps, 1, native, tf32, 0, bl)
    if kernel == "scan":  # float32 at 64 × 64 spilled 400-660 B (make gpu-static)
        bm = 64 if hd <= 128 and not wide else 32
        if grouped:  # fp16 D=64 ν=1024 ρ=256 spilled 408 B at 64 rows, D=256 136 B at 32
            bm = max(16, bm // 2)
        # float32 D=256 (logits on FMA units) spilled 6.5 KB on sm_90 with 4 warps
        return LaunchConfig(bm, bm, bd, bdv, 8 if hd >= 512 else 4, 1, native, tf32, bw, bl)
    # Measured (make gpu-static): 64 × 64 tiles spill on both archs at every head dim (the
    # (BLOCK_M, BLOCK_N) logits, P, dP, dS and masks are live together); 32 × 32 fits up to a
    # 64-wide half head, 16 × 16 beyond.
    bm = bn = 32 if hd <= 64 else 16
    if grouped and kernel == "dkdv":
        # the loop over the group's heads keeps the key tiles live across each query tile
        # (fp16 D=64 spilled 568 B on sm_80 as above): half the query tile, 8 warps, and S
        # and dP from memory for wide operands (fp16 D=256 spilled 416 B on sm_80 without,
        # fp32 D=128 248 B)
        bm, warps = max(16, bm // 2), 8
        bk = 64 if hd >= 256 else bk
    return LaunchConfig(bm, bn, bd, bdv, warps, 1, native, tf32, block_k=bk)


def _target(q: Tensor):
    """``"interpreter"`` for CPU tensors, else the CUDA arch of ``q``'s device."""
    if q.device.type == "cpu":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(q.device)
    return major * 10 + minor


def _device(q: Tensor):
    """The device guard of a launch: Triton launches on the current CUDA device."""
    return torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()


def _setup(q: Tensor):
    """The target of ``q`` (``_target``), or an error saying why the kernels can't run on
    ``q``'s device or dtype."""
    interpret = q.device.type == "cpu"
    if interpret and not _backend.triton_interpret():
        raise ValueError(
            "screened_attention_triton on CPU tensors runs only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton)"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    return _target(q)


def _check_sizes(T: int, D: int, Dv: int) -> None:
    """The kernels offset inside one (b, h) row in int32 (the row base is int64): a row of
    2³¹ elements or more would wrap around, so it is refused before any launch."""
    if T * max(D, Dv, 2) >= 2**31:
        raise ValueError(
            f"screened_attention_triton: T * max(D, Dv, 2) = {T * max(D, Dv, 2)} must be < 2^31 "
            f"(int32 offsets inside a (batch, head) row); got T={T}, D={D}, Dv={Dv}"
        )


def _store_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the kernels write their results in: the interpreter's float32 -> bfloat16
    conversion truncates (a GPU rounds to nearest), so there bf16 results go through float32
    and torch rounds them."""
    return torch.float32 if dtype == torch.bfloat16 and device.type == "cpu" else dtype


def _tl_dtypes(dtype: torch.dtype, native: bool) -> tuple[tl.dtype, tl.dtype]:
    """(MM, ACC): the dtype of the tiles fed to ``tl.dot`` and of the accumulators."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    mm = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype] if native else acc
    return mm, acc


def _mask_arg(key_padding_mask: Tensor | None, q: Tensor) -> tuple[Tensor, bool]:
    """``(mask, HAS_MASK)`` for the kernels: the ``(B, T)`` mask as uint8 (bool has the same
    bytes), or a 1-byte placeholder that the kernels never read."""
    if key_padding_mask is None:
        return torch.ones(1, dtype=torch.uint8, device=q.device), False
    return key_padding_mask.contiguous().view(torch.uint8), True


SCANS = ("chunked", "sequential")


def scan_kernel() -> str:
    """The scan kernel the launchers run: ``SCREENING_ATTN_TRITON_SCAN`` in the environment,
    "chunked" (the default: speculate and verify per chunk of queries) or "sequential" (one
    query at a time)."""
    name = os.environ.get("SCREENING_ATTN_TRITON_SCAN", "chunked")
    if name not in SCANS:
        raise ValueError(f"SCREENING_ATTN_TRITON_SCAN must be one of {SCANS}, got {name!r}")
    return name


def scan_depth(
    q: Tensor, k: Tensor, window: int, relevant: int, scale: float, chunk: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The chunked scan alone (no output pass), for its work per (b, KV head) row, counted by
    the kernel itself (under the interpreter for CPU tensors).

    Args:
        q: `(B, H, T, D)`; k: `(B, Hkv, T, D)`; window, relevant, scale: as for the op.
        chunk: queries per chunk (a power of two >= 16); default: the launchers' choice.

    Returns:
        ``(counts, relevant_index, span, lse)``: counts `(B·Hkv, 4)` int32, the verification
        rounds, the exact tie steps, the one-query steps of the fallback and the most rounds
        of one chunk (depth, the dependent steps: rounds + 2 · tie steps + steps); the slots
        and spans as the op returns them; lse `(B, H, T)`.
    """
    stats: dict = {"scan_only": True}
    if chunk is not None:
        stats["chunk"] = chunk
    v = k.new_zeros(*k.shape[:-1], 1)
    stats["scan"] = "chunked"
    _, lse, index, _, _, span = _forward(q, k, v, window, relevant, scale, None, None, stats)
    return stats["counts"], index, span, lse


def screened_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    relevant: int,
    scale: float,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of screened attention on checked arguments: the scan, then the output pass.

    Args:
        q (Tensor): `(B, H, T, D)`.
        k (Tensor): `(B, Hkv, T, D)` with `H % Hkv == 0`: query head `h` reads KV head
            `h // (H / Hkv)` in place (never repeated), and the group shares one set.
        v (Tensor): `(B, Hkv, T, Dv)`.
        window (int): `ν >= 1`.
        relevant (int): `ρ >= 0`.
        scale (float): factor on the logits.
        key_padding_mask (Optional[Tensor]): `(B, T)` bool, True = a real token; None: all
            real.

    Returns:
        `(out, lse, relevant_index, relevant_score, relevancy, span)`: `out (B, H, T, Dv)` in
        the dtype of `q`; `lse (B, H, T)`, the log-sum-exp of each query's logits (`+inf` for
        a query without any candidate), for the backward; the state with `Hkv` heads as
        ``screened_attention_reference`` returns it.
    """
    return _forward(q, k, v, window, relevant, scale, key_padding_mask, None)


def screened_attention_stream_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    slot_keys: Tensor,
    slot_values: Tensor,
    keys: Tensor,
    values: Tensor,
    relevancy0: Tensor,
    slot_index0: Tensor,
    slot_score0: Tensor,
    window: int,
    relevant: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step of a stream (docs/streaming.md) on checked arguments: the n new queries over
    the buffer ``[R0 initial slot keys | P earlier keys | n new keys]``, one launch of each
    kernel, whatever n, P and R0 (runtime arguments; no output for the cached rows). With
    ``R0 = P = 0`` (a stream's start) the kernels of ``screened_attention_fwd`` run.

    Args:
        q (Tensor): `(B, H, n, D)`; k (Tensor): `(B, Hkv, n, D)`; v (Tensor): `(B, Hkv, n, Dv)`.
        key_padding_mask (Optional[Tensor]): `(B, P + n)` bool over the earlier and new
            positions, True = a real token; None: all real.
        slot_keys, slot_values (Tensor): `(B, Hkv, R0, D)`, `(B, Hkv, R0, Dv)`: the initial
            slots, in slot order.
        keys, values (Tensor): `(B, Hkv, P, D)`, `(B, Hkv, P, Dv)`: the earlier positions.
        relevancy0 (Tensor): `(B, Hkv, P)` their relevancy so far (accumulation dtype).
        slot_index0 (Tensor): `(B, Hkv, R0)` int64: slot c holds buffer row c if `>= 0`.
        slot_score0 (Tensor): `(B, Hkv, R0)` the slots' scores (accumulation dtype).
        window (int): `ν >= 1`.
        relevant (int): `ρ >= R0`, the slot columns of the result.
        scale (float): factor on the logits.

    Returns:
        `(out, lse, relevant_index, relevant_score, relevancy, span)` as the C++ op
        ``screened_attention_stream`` returns them: `out (B, H, n, Dv)`, `lse (B, H, n)`;
        the slots `(B, Hkv, ρ)` as buffer rows; `relevancy (B, Hkv, P + n)`; `span
        (B, Hkv, R0 + P + n, 2)` in the query numbers of this call.
    """
    if slot_keys.shape[2] + keys.shape[2] == 0:  # a stream's start: the plain kernels
        return _forward(q, k, v, window, relevant, scale, key_padding_mask, None)
    k_all = torch.cat([slot_keys, keys, k], dim=2)
    v_all = torch.cat([slot_values, values, v], dim=2)
    state = (relevancy0, slot_index0, slot_score0)
    return _forward(q, k_all, v_all, window, relevant, scale, key_padding_mask, state)


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    relevant: int,
    scale: float,
    key_padding_mask: Tensor | None,
    state: tuple[Tensor, Tensor, Tensor] | None,
    stats: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward launches: ``k``, ``v`` `(B, Hkv, R0 + P + n, ·)` buffers, ``state`` the
    initial ``(relevancy0 (B, Hkv, P), slot_index0, slot_score0 (B, Hkv, R0))`` or None
    (then the buffers are the n positions). ``stats``: receives the chunked scan's counts
    (``scan_depth``; its ``"scan"``, ``"chunk"`` and ``"scan_only"`` override the scan
    kernel, the chunk and skip the output pass)."""
    target = _setup(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, T, D = q.shape
    Hkv, X, Dv, acc = k.shape[1], k.shape[2], v.shape[-1], acc_dtype(q.dtype)
    N, Nkv = B * H, B * Hkv
    G = H // Hkv if Hkv else 1
    P = 0 if state is None else state[0].shape[-1]
    R0 = X - P - T
    S = P + T
    _check_sizes(max(X, T), D, Dv)
    out = torch.empty(B, H, T, Dv, dtype=_store_dtype(q.dtype, q.device), device=q.device)
    lse = torch.empty(B, H, T, dtype=acc, device=q.device)
    index = torch.full((B, Hkv, relevant), -1, dtype=torch.int64, device=q.device)
    score = torch.full((B, Hkv, relevant), float("-inf"), dtype=acc, device=q.device)
    if state is None:
        relevancy = torch.zeros(B, Hkv, T, dtype=acc, device=q.device)
    else:  # the earlier keys start from their relevancy so far (the kernel adds to a copy)
        relevancy = torch.cat([state[0], state[0].new_zeros(B, Hkv, T)], dim=2)
    span = torch.full((B, Hkv, X, 2), -1, dtype=torch.int32, device=q.device)
    if N == 0 or T == 0:
        return out.to(q.dtype), lse, index, score, relevancy, span

    mask, has_mask = _mask_arg(key_padding_mask, q)
    window = min(window, S + 1)  # the same op for any ν > S (and an int32 argument)
    live = min(relevant, R0 + max(0, S - window + 1))  # only rows R0 .. R0+S-ν ever leave
    if state is None:
        rel0 = torch.empty(1, dtype=acc, device=q.device)  # placeholders, never read
        idx0 = torch.empty(1, dtype=torch.int64, device=q.device)
        score0 = rel0
    else:
        rel0, idx0, score0 = (x.contiguous() for x in state)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    sc = launch_config("scan", q.dtype, D, Dv, min(window, S), live, target, grouped=G > 1)
    mm, acc_tl = _tl_dtypes(q.dtype, sc.native)
    bm, bn = sc.block_m, sc.block_n
    nb = -(-T // bm)
    sw = max(live, 1)
    r_pad = -(-live // bn) * bn
    ncol = r_pad + -(-min(bm + window - 1, S) // bn) * bn + 1  # + a column of -inf
    flag = torch.empty(N, T, dtype=torch.int32, device=q.device)
    off = R0 + P
    has_state = state is not None
    chunked = (stats or {}).get("scan", scan_kernel()) == "chunked"
    with _device(q):
        if chunked:
            cc = launch_config("chunk_scan", q.dtype, D, Dv, min(window, S), live, target,
                               grouped=G > 1)  # fmt: skip
            bm = cc.block_m if stats is None else stats.get("chunk", cc.block_m)
            nb = -(-T // bm)
            snap = torch.empty(Nkv, nb, sw, dtype=torch.int32, device=q.device)
            r_pad = -(-live // bm) * bm
            rng = -(-(bm + window - 1) // bm) * bm
            # + 2 columns: each query's softmax max and sum
            scratch = torch.empty(N, bm, r_pad + rng + 2, dtype=acc, device=q.device)
            csum = torch.empty(Nkv, rng + cc.block_l, dtype=acc, device=q.device)
            counts = torch.zeros(Nkv, 4, dtype=torch.int32, device=q.device)
            fb = (2, -(-bm // 8), max(window, -(-bm // 8)))  # docs/kernels/triton.md
            screened_attention_chunk_scan_kernel[(Nkv,)](
                q, k, mask, lse, relevancy, span, index, score, snap, scratch, csum, counts,
                rel0, idx0, score0, T, X, off, R0, D, window, G, Hkv, live, relevant, nb, sw,
                r_pad, r_pad + rng + 2, rng, scale, *fb, MM=mm, ACC=acc_tl, NATIVE=cc.native,
                HAS_SLOTS=live > 0, HAS_MASK=has_mask, GROUPED=G > 1, HAS_STATE=has_state,
                BLOCK_M=bm, BLOCK_D=cc.block_d, BLOCK_R=cc.block_l,
                LOG_M=bm.bit_length() - 1, num_warps=cc.num_warps, num_stages=cc.num_stages,
            )  # fmt: skip
            if stats is not None:
                stats.update(counts=counts, chunk=bm)
                if stats.get("scan_only"):
                    return out, lse, index, score, relevancy, span
        else:
            snap = torch.empty(Nkv, nb, sw, dtype=torch.int32, device=q.device)
            scratch = torch.empty(N, bm, ncol, dtype=acc, device=q.device)
            screened_attention_scan_kernel[(Nkv,)](
                q, k, mask, lse, relevancy, span, index, score, snap, scratch, rel0, idx0,
                score0, T, X, off, R0, D, window, G, Hkv, live, relevant, nb, sw, r_pad, ncol,
                scale, MM=mm, ACC=acc_tl, NATIVE=sc.native, HAS_SLOTS=live > 0,
                HAS_MASK=has_mask, GROUPED=G > 1, HAS_STATE=has_state, BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_D=sc.block_d, BLOCK_W=sc.block_w, BLOCK_L=sc.block_l,
                num_warps=sc.num_warps, num_stages=sc.num_stages,
            )  # fmt: skip
        # the output, then the rows that met a non-finite V row, recomputed exactly
        for kernel in ("fwd", "fwd_fix"):
            c = launch_config(kernel, q.dtype, D, Dv, window, live, target, tf32)
            cv = c.columns()[1]
            screened_attention_fwd_kernel[(N, min(-(-T // c.block_m), _GRID_YZ), -(-Dv // cv))](
                q, k, v, mask, lse, span, snap, out, flag,
                T, X, off, R0, D, Dv, window, G, Hkv, live, nb, sw, scale,
                MM=mm, ACC=acc_tl, NATIVE=c.native, TF32=c.tf32, EXACT=kernel == "fwd_fix",
                HAS_MASK=has_mask, HAS_STATE=has_state, SNAP_M=bm, BLOCK_M=c.block_m,
                BLOCK_N=c.block_n, BLOCK_D=c.block_d, BLOCK_DV=cv, num_warps=c.num_warps,
                num_stages=c.num_stages,
            )  # fmt: skip
    return out.to(q.dtype), lse, index, score, relevancy, span


def screened_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    span: Tensor,
    window: int,
    scale: float,
    relevant: int = -1,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of screened attention: the sets replayed from ``span``, then dQ, then dK and dV.

    Args:
        grad_out (Tensor): `(B, H, T, Dv)`, dtype of `q`.
        q, k, v (Tensor): the forward's checked inputs (`k`, `v` with `Hkv` heads).
        out (Tensor): `(B, H, T, Dv)`, the forward's output.
        lse (Tensor): `(B, H, T)`, float32 (float64 for float64 inputs), from the forward.
        span (Tensor): `(B, Hkv, T, 2)` int32, from the forward.
        window (int): `ν >= 1`.
        scale (float): factor on the logits.
        relevant (int): the forward's `ρ`, which bounds every set and so sizes the replay
            without a host sync; -1 if unknown: then one sync reads the largest set off `span`.
        key_padding_mask (Optional[Tensor]): the forward's `(B, T)` bool mask, or None.

    Returns:
        `(dq, dk, dv)`, shapes and dtype of `q`, `k`, `v`; `dk`, `dv` sum over the query heads
        of each group.
    """
    args = (grad_out, q, k, v, out, lse, span, window, scale, relevant, key_padding_mask)
    return _backward(*args, initial_slots=0, stream=False)


def screened_attention_stream_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slot_keys: Tensor,
    slot_values: Tensor,
    keys: Tensor,
    values: Tensor,
    out: Tensor,
    lse: Tensor,
    span: Tensor,
    key_padding_mask: Tensor | None,
    window: int,
    scale: float,
    relevant: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``screened_attention_stream_fwd`` (its arguments and results): the
    gradients of the n new q, k, v only (the cached keys and values get none, nor any work).

    Returns:
        `(dq, dk, dv)`, shapes and dtype of `q`, `k`, `v`.
    """
    R0, P = slot_keys.shape[2], keys.shape[2]
    if R0 + P > 0:
        k = torch.cat([slot_keys, keys, k], dim=2)
        v = torch.cat([slot_values, values, v], dim=2)
    args = (grad_out, q, k, v, out, lse, span, window, scale, relevant, key_padding_mask)
    return _backward(*args, initial_slots=R0, stream=R0 + P > 0)


def _backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    span: Tensor,
    window: int,
    scale: float,
    relevant: int,
    key_padding_mask: Tensor | None,
    initial_slots: int,
    stream: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward launches on the buffers ``k``, ``v`` `(B, Hkv, R0 + P + n, ·)` (``R0 =
    initial_slots``; the n positions alone without a stream): dk, dv of the n new rows."""
    B, H, T, _ = q.shape
    Hkv, X = k.shape[1], k.shape[2]
    # the kernels index these buffers by raw offsets: a wrong shape would read out of bounds
    for name, x, shape, dtype in [
        ("grad_out", grad_out, (*q.shape[:3], v.shape[-1]), q.dtype),
        ("out", out, (*q.shape[:3], v.shape[-1]), q.dtype),
        ("lse", lse, (B, H, T), acc_dtype(q.dtype)),
        ("span", span, (B, Hkv, X, 2), torch.int32),
    ]:
        if x.shape != shape or x.dtype != dtype or x.device != q.device:
            raise ValueError(
                f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {q.device}, "
                f"got {x.dtype} {tuple(x.shape)} on {x.device}"
            )
    target = _setup(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, out = grad_out.contiguous(), out.contiguous()
    lse, span = lse.contiguous(), span.contiguous()
    B, H, T, D = q.shape
    Dv, N, Nkv = v.shape[-1], B * H, B * Hkv
    G = H // Hkv if Hkv else 1
    R0 = initial_slots
    S = X - R0
    off = X - T  # the buffer row of query 0
    _check_sizes(max(X, T), D, Dv)
    store = _store_dtype(q.dtype, q.device)
    dq = torch.empty_like(q, dtype=store)
    dk = torch.empty(B, Hkv, T, D, dtype=store, device=q.device)
    dv = torch.empty(B, Hkv, T, Dv, dtype=store, device=q.device)
    if N == 0 or T == 0:
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)

    mask, has_mask = _mask_arg(key_padding_mask, q)
    window = min(window, S + 1)
    if relevant >= 0:  # the forward's live slots bound every set
        cap = min(relevant, R0 + max(0, S - window + 1))
    else:
        # Sets never shrink (a key leaves only when another takes its slot), so the largest
        # one is the last: the keys whose span runs to the end. A host sync, to size `snap`.
        cap = int(((span[..., 0] >= 0) & (span[..., 0] < T) & (span[..., 1] == T)).sum(-1).max())
    sw = max(cap, 1)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    rc = launch_config("replay", q.dtype, D, Dv, window, cap, target)
    mm, acc_tl = _tl_dtypes(q.dtype, rc.native)
    nb = -(-T // rc.block_m)
    snap = torch.empty(Nkv, nb, sw, dtype=torch.int32, device=q.device)
    delta = torch.empty(N, T, dtype=acc_dtype(q.dtype), device=q.device)
    flag = torch.empty(N, T, dtype=torch.int32, device=q.device)  # dkdv uses its first Nkv rows
    rows = (T, X, off, R0)
    with _device(q):
        if cap > 0:
            screened_attention_replay_sets_kernel[(Nkv,)](
                span, snap, *rows, window, cap, nb, sw, HAS_STATE=stream, BLOCK_M=rc.block_m,
                BLOCK_R=rc.block_n, num_warps=rc.num_warps, num_stages=rc.num_stages,
            )  # fmt: skip
        # each hot kernel flags the rows (dq) or keys (dk, dv) that met a non-finite row of
        # K, Q or dO; its fix-up launch recomputes just those exactly
        for kernel in ("dq", "dq_fix"):
            c = launch_config(kernel, q.dtype, D, Dv, window, cap, target, tf32)
            ck = c.columns()[0]
            screened_attention_bwd_dq_kernel[(N, min(-(-T // c.block_m), _GRID_YZ), -(-D // ck))](
                q, k, v, mask, out, grad_out, lse, span, snap, dq, delta, flag,
                *rows, D, Dv, window, G, Hkv, cap, nb, sw, scale,
                MM=mm, ACC=acc_tl, NATIVE=c.native, TF32=c.tf32, EXACT=kernel == "dq_fix",
                HAS_MASK=has_mask, HAS_STATE=stream,
                DELTA_FROM_P=q.dtype in (torch.float16, torch.bfloat16),
                SNAP_M=rc.block_m, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=c.block_d,
                BLOCK_DV=c.block_dv, BLOCK_C=ck, BLOCK_K=c.k_chunk(), num_warps=c.num_warps,
                num_stages=c.num_stages,
            )  # fmt: skip
        for kernel in ("dkdv", "dkdv_fix"):
            c = launch_config(kernel, q.dtype, D, Dv, window, cap, target, tf32, G > 1)
            ck, cv = c.columns()
            chunks = max(-(-D // ck), -(-Dv // cv))
            screened_attention_bwd_dkdv_kernel[(Nkv, min(-(-T // c.block_n), _GRID_YZ), chunks)](
                q, k, v, mask, grad_out, lse, delta, span, dk, dv, flag,
                *rows, D, Dv, window, G, Hkv, scale,
                MM=mm, ACC=acc_tl, NATIVE=c.native, TF32=c.tf32, EXACT=kernel == "dkdv_fix",
                HAS_MASK=has_mask, HAS_STATE=stream, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                BLOCK_D=c.block_d, BLOCK_DV=c.block_dv, BLOCK_CK=ck, BLOCK_CV=cv,
                BLOCK_K=c.k_chunk(), num_warps=c.num_warps, num_stages=c.num_stages,
            )  # fmt: skip
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


_PTR_KIND = {
    **dict.fromkeys(("q", "k", "v", "o", "do", "out", "dq", "dk", "dv"), "in"),
    **dict.fromkeys(("lse", "rel", "score", "scr", "delta", "rel0", "score0", "csum"), "acc"),
    **dict.fromkeys(("span", "snap", "flag", "stats"), "i32"),
    **dict.fromkeys(("idx", "idx0"), "i64"),
    "mask": "u8",
}
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(fn, dtype: torch.dtype) -> dict[str, str]:
    """The ``triton.compile`` signature of a kernel for inputs of ``dtype``: pointers by the
    role their name says, ``scale`` float, every other runtime argument int32 (unspecialised,
    as the launchers pass them)."""
    kind = {"in": _TL_NAME[dtype], "acc": "fp32", "i32": "i32", "i64": "i64", "u8": "u8"}
    sig = {}
    for name, const in _params(fn):
        if const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + kind[_PTR_KIND[name[: -len("_ptr")]]]
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    return sig


def _params(fn) -> list[tuple[str, bool]]:
    """(name, is constexpr) of a kernel's arguments, compiled or interpreted alike."""
    raw = inspect.signature(fn.fn).parameters.values()
    return [(p.name, p.annotation is tl.constexpr) for p in raw]


def static_builds(
    dtype: torch.dtype,
    d: int,
    dv: int,
    window: int,
    live: int,
    arch: int,
    allow_tf32: bool = False,
    padded: bool = False,
    stream: bool = False,
):
    """Every kernel the launchers build for inputs of ``dtype``, head dims ``d``/``dv``,
    window ``window`` (≤ T) and ``live`` slots (= the replay capacity), on CUDA ``arch``: a
    list of ``(name, fn, signature, constexprs, options)`` for ``triton.compile``
    (bench/gpu_static.py). Mirrors ``screened_attention_fwd`` / ``screened_attention_bwd``,
    with ``allow_tf32`` standing for ``torch.backends.cuda.matmul.allow_tf32``: as there, it
    reaches every kernel but the scan (whose logits stay IEEE) and the replay (no products).
    ``padded``: the builds of a call with a ``key_padding_mask`` and grouped heads;
    ``stream`` (with ``padded``): those of a stream step from a non-empty state (HAS_STATE;
    the stream always passes the state's padding)."""
    half = dtype in (torch.float16, torch.bfloat16)
    snap_m = {
        k: launch_config(k, dtype, d, dv, window, live, arch, grouped=padded).block_m
        for k in ("scan", "replay")
    }
    if scan_kernel() == "chunked":
        snap_m["scan"] = launch_config(
            "chunk_scan", dtype, d, dv, window, live, arch, grouped=padded
        ).block_m
    out = []
    for name, fn in [
        ("scan", screened_attention_scan_kernel),
        ("chunk_scan", screened_attention_chunk_scan_kernel),
        ("fwd", screened_attention_fwd_kernel),
        ("fwd_fix", screened_attention_fwd_kernel),
        ("replay", screened_attention_replay_sets_kernel),
        ("dq", screened_attention_bwd_dq_kernel),
        ("dq_fix", screened_attention_bwd_dq_kernel),
        ("dkdv", screened_attention_bwd_dkdv_kernel),
        ("dkdv_fix", screened_attention_bwd_dkdv_kernel),
    ]:
        tf32 = allow_tf32 and name not in ("scan", "chunk_scan", "replay")
        c = launch_config(name, dtype, d, dv, window, live, arch, tf32, grouped=padded)
        mm, acc = _tl_dtypes(dtype, c.native)
        ck, cv = c.columns()
        consts = {
            "MM": mm, "ACC": acc, "NATIVE": c.native, "TF32": c.tf32,
            "EXACT": name.endswith("_fix"), "HAS_SLOTS": live > 0, "DELTA_FROM_P": half,
            "HAS_MASK": padded, "GROUPED": padded, "HAS_STATE": stream,
            "SNAP_M": snap_m["scan" if name.startswith("fwd") else "replay"],
            "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_D": c.block_d,
            "BLOCK_DV": cv if name.startswith("fwd") else c.block_dv, "BLOCK_C": ck,
            "BLOCK_CK": ck, "BLOCK_CV": cv, "BLOCK_K": c.k_chunk(), "BLOCK_W": c.block_w,
            "BLOCK_L": c.block_l,
            "BLOCK_R": c.block_l if name == "chunk_scan" else c.block_n,
            "LOG_M": c.block_m.bit_length() - 1,
        }  # fmt: skip
        names = {name for name, const in _params(fn) if const}
        consts = {k: v for k, v in consts.items() if k in names}
        sig = _signature(fn, dtype)
        if not padded and "G" in sig:
            # Triton specialises an int argument equal to 1 as a constexpr: without grouped
            # heads the launchers' loops over the group are one unrolled iteration
            sig["G"], consts["G"] = "constexpr", 1
        options = {"num_warps": c.num_warps, "num_stages": c.num_stages}
        out.append((name, fn, sig, consts, options))
    return out

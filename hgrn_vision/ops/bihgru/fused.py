"""Fused Triton kernels of the bidirectional HGRU scan, forward and backward.

A program owns `BLOCK_C` channels (one per thread) of one batch row and walks the tokens one at a time, in groups of
4 rows whose loads are issued together so that their latencies overlap (a group's stores come after all its loads: a
store before a load that may alias it would make the load wait). The forward makes a forward sweep that runs hf and
stashes only the state entering each group (2 fp32 per group and channel), then a reverse sweep, a group at a time,
that re-reads the group's u and z (at large batches mostly from DRAM again: docs/performance.md), recomputes its hf from
the stash in registers, runs hr and writes hf + hr once. No flipped copies, no gates or states materialised by
PyTorch, fp32 state for any input dtype. Measured speed and its limits: docs/performance.md.

Short sequences in small batches (N <= ONCHIP_MAX_N, at most 1.5 programs per SM) take a one-read forward instead:
a program loads its whole sequence of BLOCK_C channels once, into registers, as W chunks of T rows (one thread per
chunk and channel), builds each chunk's maps of both recurrences, combines them across chunks with two small scans
and then runs hf forward and hr backward over the held rows. It reads u and z once but holds so much per program
that few programs fit on an SM: faster where the GPU is mostly idle anyway (latency), slower at large batches.

When B x C alone cannot fill the GPU (long sequences, small batches) the sequence is split into chunks run by
separate programs, a two-level scan: a first launch writes each chunk's map `h -> A h + b` per recurrence (from a
zero state; the reverse kind composed in ascending order), the main launch folds the maps of the chunks before
(forward) or after (reverse) its own into its incoming states.

Backward recomputes the states instead of saving them. With `G = dL/dRe + i dL/dIm` of a complex value:
    df_t = g_t + conj(af_{t+1}) df_{t+1}          (adjoint of the forward state, a reverse recurrence)
    dr_t = g_t + conj(ar_{t-1}) dr_{t-1}          (adjoint of the reverse state, a forward recurrence)
    dv_t = df_t + dr_t,   d af_t = df_t conj(hf_{t-1}),   d ar_t = dr_t conj(hr_{t+1})
Each gradient pairs a forward-order quantity with a reverse-order one. A forward sweep runs hf and dr and stashes
only what enters each group of 4 rows (hf, dr: 4 fp32 per group and channel, 4 bytes per (B, N, C) element, freed
after the call; the lam entering a group is recomputed from the row before's z, read with the stash); the reverse
sweep, a group at a time, re-loads the group's rows (which it needs anyway), recomputes hf_{t-1} and dr_t inside the
group in registers and walks the rows backwards beside hr_{t+1} and df_t.
Both sweeps load the next group's rows (and stash) one group ahead, so that those loads fly while this group
computes (the same in the forward measured slower at split sequences: docs/performance.md). Nothing divides by a gate.
Per-channel gradients (gamma, theta_f, theta_r, and the sums of du and dz over the tokens: a bias's gradient) are fp32
partials per program, reduced once afterwards.
"""
import functools
import os
from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# (channels per program (one per thread), warps, programs per SM to aim for) of each kernel by input element size,
# and the shortest chunk when a sequence is split. From sweeps on an H100 (scripts/gpu_scan_tune.py tune / compare,
# docs/performance.md): more resident warps keep more loads in flight, so small programs and few registers win. The
# 16-bit forward gains from more, smaller programs (1.07-1.26x at the split and C = 192 shapes, run19); so does the
# 16-bit backward once it loads a group ahead (run21: 415 vs 434 us at (256, 256, 384), equal at (16, 5329, 384)).
# The fp32 forward lost with them (0.83x at (64, 1024, 384), a run whose log was lost: docs/performance.md) and the fp32
# configs were not swept again, so they keep (64, 2, 8).
FWD_CFG = {2: (32, 1, 16), 4: (64, 2, 8)}
BWD_CFG = {2: (32, 1, 16), 4: (64, 2, 8)}
# Whether the two-sweep forward loads each group a group ahead, by input element size. H200 (run69-run71), against the
# kernel before (no loads ahead, rows stored through a shared-memory tile): bf16 1.02x-1.10x (1.10x at (256, 256, 384));
# fp32 0.87x-0.99x ahead, 0.98x-0.99x not (the rows loaded ahead cost registers, so resident programs, and fp32 rows
# already keep twice the bytes in flight).
FWD_AHEAD = {2: True, 4: False}
# The two-sweep backward's register cap: uncapped it takes 144 registers, which hold 14 one-warp programs an SM; at 128
# (no spills, Triton 3.6 sm_90a) 16 fit. H200 bf16 (run69): 1.00x-1.03x of uncapped; against the kernel before row
# stores (a tile through shared memory), 1.04x at (256, 256, 384), 1.15x at (16, 5329, 384); fp32 0.95x-1.16x.
BWD_MAXNREG = 128
MIN_CHUNK = 64
# The one-read forward (`_bihgru_fwd_onchip_kernel`): (channels per program, rows per chunk T), one thread per
# chunk and channel. A program holds its whole sequence in registers, so few programs fit on an SM: it wins where
# the two-sweep kernel cannot fill the GPU anyway and loses at large batches. H100, bf16 / fp32 (run25): up to 1.45
# programs per SM it was 1.07-8.4x faster ((1, 256, 192) 16.6 vs 92.1 us bf16; (16, 256, 192) 30.0 vs 31.9 us);
# at 46.5 per SM ((256, 256, 384)) 0.36x. Hence: N <= ONCHIP_MAX_N and at most 1.5 programs per SM.
ONCHIP_CFG = (16, 8)
ONCHIP_MAX_N = 256
# rows per group (their loads issued together; one stashed state per group): fixed, both reverse sweeps are written
# out for 4 rows held as separate values
GROUP = 4


# sigmoid in 4 instructions (ex2 and rcp, both flushing denormals) instead of tl.sigmoid's ~11 (a denormal-exact exp and
# a range-checked division): 27% fewer instructions per element in the forward's loops (SASS for sm_90a), 1.04-1.08x
# on the bf16 forward (docs/performance.md, run20). Triton's interpreter cannot run PTX, so there it is tl.sigmoid; on
# the GPU `scripts/gpu_scan_tune.py check` covers the PTX against float64.
_INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'
_PTX_SIGMOID = tl.constexpr(not _INTERPRET)


@triton.jit
def _sigmoid(x):
    """1 / (1 + 2^(-x log2 e)) in fp32 (relative error a few ulp; 0 and 1 at the extremes, NaN stays NaN)."""
    if _PTX_SIGMOID:
        return tl.inline_asm_elementwise(
            '{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; '
            'rcp.approx.ftz.f32 $0, t; }', '=r,r', [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.sigmoid(x)


@triton.jit
def _fold_carries(sum_ptr, s_sk, s_ss, cs, cmask, k, n_chunks, SLOT: tl.constexpr, FORWARD: tl.constexpr):
    """State entering chunk k from the summaries (A, b) at slots SLOT..SLOT+3 of the chunks before (or after) it;
    zero for the first (last) chunk, and so whenever the sequence is not split."""
    cr = tl.zeros(cs.shape, dtype=tl.float32)
    ci = tl.zeros(cs.shape, dtype=tl.float32)
    if FORWARD:
        n = k
    else:
        n = n_chunks - 1 - k
    for j in range(0, n):
        if FORWARD:
            kk = j
        else:
            kk = n_chunks - 1 - j
        Ar, Ai, br, bi = _load_map(sum_ptr + kk * s_sk + cs, s_ss, SLOT, cmask)
        cr, ci = Ar * cr - Ai * ci + br, Ar * ci + Ai * cr + bi
    return cr, ci


@triton.jit
def _channels(gamma_ptr, tf_ptr, tr_ptr, cs, cmask):
    """gamma and cos / sin of both angles (fp32) of the channels cs (masked by cmask). The kernels compute cs
    themselves: torch.compile's mutation analysis of a kernel takes every pointer passed to a helper as written
    when a store address derives from one of the helper's results."""
    gamma = tl.load(gamma_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tf = tl.load(tf_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tr = tl.load(tr_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    return gamma, tl.cos(tf), tl.sin(tf), tl.cos(tr), tl.sin(tr)


@triton.jit
def _channel_mask(cs, C, EVEN: tl.constexpr):
    """cs < C; a constant where the launch guarantees it (EVEN), so that the masks built on it fold away."""
    if EVEN:
        return tl.full(cs.shape, True, tl.int1)
    else:
        return cs < C


@triton.jit
def _before(t, t1, EVEN: tl.constexpr):
    """t < t1 (row t inside its chunk); True where the launch guarantees it (EVEN: every chunk a whole number of
    groups), so that full groups carry no row masks: 10% of the backward's instructions (scripts/kernel_sass.py)."""
    if EVEN:
        return True
    else:
        return t < t1


@triton.jit
def _load_row(u_ptr, z_ptr, cs, m):
    """z, Re u, Im u of one token row of BLOCK_C channels (channel stride 1) in fp32; 0 outside the mask. An int32
    u holds bf16 (Re, Im) pairs (`_as_pairs`): one 32-bit load a channel, each half widened by a shift or a mask
    (bf16 is the upper half of an fp32)."""
    z = tl.load(z_ptr + cs, mask=m, other=0.).to(tl.float32)
    if u_ptr.dtype.element_ty == tl.int32:
        w = tl.load(u_ptr + cs, mask=m, other=0)
        ur = (w << 16).to(tl.float32, bitcast=True)
        ui = (w & -65536).to(tl.float32, bitcast=True)
    else:
        ur = tl.load(u_ptr + 2 * cs, mask=m, other=0.).to(tl.float32)
        ui = tl.load(u_ptr + 2 * cs + 1, mask=m, other=0.).to(tl.float32)
    return z, ur, ui


@triton.jit
def _load_group(ub, zb, s_un, s_zn, cs, m, g, t1, EVEN: tl.constexpr):
    """`_load_row` of the 4 rows from g, as a tuple of 4 rows; rows at or past t1 (all where m is false) read as 0."""
    return (_load_row(ub + g * s_un, zb + g * s_zn, cs, m & _before(g, t1, EVEN)),
            _load_row(ub + (g + 1) * s_un, zb + (g + 1) * s_zn, cs, m & _before(g + 1, t1, EVEN)),
            _load_row(ub + (g + 2) * s_un, zb + (g + 2) * s_zn, cs, m & _before(g + 2, t1, EVEN)),
            _load_row(ub + (g + 3) * s_un, zb + (g + 3) * s_zn, cs, m & _before(g + 3, t1, EVEN)))


@triton.jit
def _group_and_stash(ub, zb, xb, s_un, s_zn, s_xn, cs, C, m, g, t1, EVEN: tl.constexpr):
    """The two-sweep forward's reverse-sweep inputs of the group from g: its rows (`_load_group`) and the stashed
    hf entering it (Re, Im)."""
    x = xb + (g // 4) * s_xn
    grp = _load_group(ub, zb, s_un, s_zn, cs, m, g, t1, EVEN)
    return grp, tl.load(x, mask=m, other=0.), tl.load(x + C, mask=m, other=0.)


@triton.jit
def _load_dout_group(db, s_dn, cs, C, m, g, t1, EVEN: tl.constexpr):
    """`_load_complex` of dout's 4 rows from g (Re g, Im g per row), as `_load_group` does for u and z."""
    return (_load_complex(db + g * s_dn + cs, C, m & _before(g, t1, EVEN)),
            _load_complex(db + (g + 1) * s_dn + cs, C, m & _before(g + 1, t1, EVEN)),
            _load_complex(db + (g + 2) * s_dn + cs, C, m & _before(g + 2, t1, EVEN)),
            _load_complex(db + (g + 3) * s_dn + cs, C, m & _before(g + 3, t1, EVEN)))


@triton.jit
def _row_gates(u_ptr, z_ptr, cs, m, gamma):
    """One token row of BLOCK_C channels (channel stride 1): lam, Re v, Im v in fp32; 0 outside the mask."""
    return _gates(_load_row(u_ptr, z_ptr, cs, m), m, gamma)


@triton.jit
def _gates(row, m, gamma):
    """lam, Re v, Im v in fp32 of a row from `_load_row`; 0 outside the mask m."""
    z, ur, ui = row
    lam = tl.where(m, gamma + (1. - gamma) * _sigmoid(z), 0.)
    w = 1. - lam
    return lam, w * ur * _sigmoid(ur), w * ui * _sigmoid(ui)


@triton.jit
def _store_row(p, C, m, yr, yi):
    """One output row: Re at p, Im at p + C, in the pointer's dtype."""
    tl.store(p, yr.to(p.dtype.element_ty), mask=m)
    tl.store(p + C, yi.to(p.dtype.element_ty), mask=m)


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _state_maps(m, lam, vr, vi, cf, sf, cr_, sr_, Afr, Afi, Hfr, Hfi, Arr, Ari, Hrr, Hri):
    """Extend the chunk maps of hf (forward kind: (A, b) <- (a A, a b + v)) and of hr (reverse kind, composed in
    ascending order: b <- b + A v, A <- A a) by one row; identity on masked rows."""
    ar, ai = tl.where(m, lam * cf, 1.), lam * sf
    Hfr, Hfi = ar * Hfr - ai * Hfi + vr, ar * Hfi + ai * Hfr + vi
    Afr, Afi = _cmul(ar, ai, Afr, Afi)
    ar, ai = tl.where(m, lam * cr_, 1.), lam * sr_
    Hrr, Hri = Hrr + Arr * vr - Ari * vi, Hri + Arr * vi + Ari * vr
    Arr, Ari = _cmul(Arr, Ari, ar, ai)
    return Afr, Afi, Hfr, Hfi, Arr, Ari, Hrr, Hri


@triton.jit
def _load_complex(p, C, m):
    """Re at p and Im at p + C (the `[Re | Im]` layout of out and dout), as fp32."""
    return tl.load(p, mask=m, other=0.).to(tl.float32), tl.load(p + C, mask=m, other=0.).to(tl.float32)


@triton.jit
def _load_map(p, s_ss, SLOT: tl.constexpr, cmask):
    """The 4 fp32 values at slots SLOT..SLOT+3 (stride s_ss) from p, as `_store_map` wrote them."""
    return (tl.load(p + SLOT * s_ss, mask=cmask, other=0.).to(tl.float32),
            tl.load(p + (SLOT + 1) * s_ss, mask=cmask, other=0.).to(tl.float32),
            tl.load(p + (SLOT + 2) * s_ss, mask=cmask, other=0.).to(tl.float32),
            tl.load(p + (SLOT + 3) * s_ss, mask=cmask, other=0.).to(tl.float32))


@triton.jit
def _store_map(p, s_ss, SLOT: tl.constexpr, cmask, Ar, Ai, Br, Bi):
    tl.store(p + SLOT * s_ss, Ar, mask=cmask)
    tl.store(p + (SLOT + 1) * s_ss, Ai, mask=cmask)
    tl.store(p + (SLOT + 2) * s_ss, Br, mask=cmask)
    tl.store(p + (SLOT + 3) * s_ss, Bi, mask=cmask)


@triton.jit
def _bihgru_fwd_kernel(
        u_ptr, z_ptr, gamma_ptr, tf_ptr, tr_ptr, out_ptr, sum_ptr, scr_ptr,
        N, C, n_chunks, chunk_len,
        s_ub, s_un, s_zb, s_zn, s_ob, s_on, s_sb, s_sk, s_ss, s_xb, s_xn,
        BLOCK_C: tl.constexpr, UNROLL: tl.constexpr, SUMMARY: tl.constexpr, EVEN: tl.constexpr,
        AHEAD: tl.constexpr,
):
    """Token by token, BLOCK_C channels wide: a forward sweep writes hf, a reverse sweep adds hr (rows still cached).

    SUMMARY: write the chunk's (A, b) per direction instead. Loads are unrolled UNROLL rows deep so they overlap.
    EVEN: C is a multiple of BLOCK_C and every chunk a whole number of groups (`_even`): no masks.
    AHEAD: both sweeps issue the next group's loads before this group's math (`FWD_AHEAD`).
    """
    b, k = tl.program_id(1).to(tl.int64), tl.program_id(2)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = _channel_mask(cs, C, EVEN)
    gamma, cf, sf, cr_, sr_ = _channels(gamma_ptr, tf_ptr, tr_ptr, cs, cmask)
    ub, zb, ob = u_ptr + b * s_ub, z_ptr + b * s_zb, out_ptr + b * s_ob
    t0 = k * chunk_len
    t1 = tl.minimum(t0 + chunk_len, N)
    if SUMMARY:
        zero = tl.zeros([BLOCK_C], tl.float32)
        afr_t, afi_t, hfr, hfi = zero + 1., zero, zero, zero
        arr_t, ari_t, hrr, hri = zero + 1., zero, zero, zero
        for g in range(t0, t1, UNROLL):
            for r in tl.static_range(UNROLL):
                t = g + r
                m = cmask & _before(t, t1, EVEN)
                lam, vr, vi = _row_gates(ub + t * s_un, zb + t * s_zn, cs, m, gamma)
                afr_t, afi_t, hfr, hfi, arr_t, ari_t, hrr, hri = _state_maps(
                    m, lam, vr, vi, cf, sf, cr_, sr_, afr_t, afi_t, hfr, hfi, arr_t, ari_t, hrr, hri)
        p = sum_ptr + b * s_sb + k * s_sk + cs
        _store_map(p, s_ss, 0, cmask, afr_t, afi_t, hfr, hfi)
        _store_map(p, s_ss, 4, cmask, arr_t, ari_t, hrr, hri)
    else:
        tl.static_assert(UNROLL == 4, 'the reverse sweep below is written out for groups of 4 rows (GROUP)')
        # forward sweep: hf over the chunk, only the state entering each group of 4 rows stashed (2 floats)
        hr_, hi_ = _fold_carries(sum_ptr + b * s_sb, s_sk, s_ss, cs, cmask, k, n_chunks, 0, True)
        grp = _load_group(ub, zb, s_un, s_zn, cs, cmask, t0, t1, EVEN)
        for g in range(t0, t1, 4):
            if AHEAD:
                nxt = _load_group(ub, zb, s_un, s_zn, cs, cmask, g + 4, t1, False)  # in flight during this group
            x = scr_ptr + b * s_xb + (g // 4) * s_xn + cs
            tl.store(x, hr_, mask=cmask)
            tl.store(x + C, hi_, mask=cmask)
            for r in tl.static_range(4):
                m = cmask & _before(g + r, t1, EVEN)
                lam, vr, vi = _gates(grp[r], m, gamma)
                hr_, hi_ = _step(hr_, hi_, lam, vr, vi, cf, sf)
            if AHEAD:
                grp = nxt
            else:
                grp = _load_group(ub, zb, s_un, s_zn, cs, cmask, g + 4, t1, False)
        tl.debug_barrier()  # the reverse sweep reads the stash just written: order those stores before its loads
        # reverse sweep, a group at a time from the last: the group's gates once, hf recomputed from the stash going
        # up, hr going down, hf + hr written once
        hr_, hi_ = _fold_carries(sum_ptr + b * s_sb, s_sk, s_ss, cs, cmask, k, n_chunks, 4, False)
        n_groups = tl.cdiv(t1 - t0, 4)
        xb = scr_ptr + b * s_xb + cs
        grp, fr, fi = _group_and_stash(ub, zb, xb, s_un, s_zn, s_xn, cs, C, cmask, t0 + (n_groups - 1) * 4, t1, EVEN)
        for j in range(0, n_groups):
            g = t0 + (n_groups - 1 - j) * 4
            mn = cmask & (j + 1 < n_groups)  # the group before this one
            if AHEAD:
                nxt = _group_and_stash(ub, zb, xb, s_un, s_zn, s_xn, cs, C, mn, g - 4, t1, EVEN)
            m0, m1 = cmask & _before(g, t1, EVEN), cmask & _before(g + 1, t1, EVEN)
            m2, m3 = cmask & _before(g + 2, t1, EVEN), cmask & _before(g + 3, t1, EVEN)
            l0, vr0, vi0 = _gates(grp[0], m0, gamma)
            l1, vr1, vi1 = _gates(grp[1], m1, gamma)
            l2, vr2, vi2 = _gates(grp[2], m2, gamma)
            l3, vr3, vi3 = _gates(grp[3], m3, gamma)
            # rows past t1 (only in the sequence's last group, whose incoming hr is 0) have lam = v = 0: h stays 0
            fr0, fi0 = _step(fr, fi, l0, vr0, vi0, cf, sf)
            fr1, fi1 = _step(fr0, fi0, l1, vr1, vi1, cf, sf)
            fr2, fi2 = _step(fr1, fi1, l2, vr2, vi2, cf, sf)
            fr3, fi3 = _step(fr2, fi2, l3, vr3, vi3, cf, sf)
            hr_, hi_ = _step(hr_, hi_, l3, vr3, vi3, cr_, sr_)
            y3r, y3i = fr3 + hr_, fi3 + hi_
            hr_, hi_ = _step(hr_, hi_, l2, vr2, vi2, cr_, sr_)
            y2r, y2i = fr2 + hr_, fi2 + hi_
            hr_, hi_ = _step(hr_, hi_, l1, vr1, vi1, cr_, sr_)
            y1r, y1i = fr1 + hr_, fi1 + hi_
            hr_, hi_ = _step(hr_, hi_, l0, vr0, vi0, cr_, sr_)
            y0r, y0i = fr0 + hr_, fi0 + hi_
            # the group's rows stored one by one after its math (no tile: no layout change through shared memory)
            _store_row(ob + g * s_on + cs, C, m0, y0r, y0i)
            _store_row(ob + (g + 1) * s_on + cs, C, m1, y1r, y1i)
            _store_row(ob + (g + 2) * s_on + cs, C, m2, y2r, y2i)
            _store_row(ob + (g + 3) * s_on + cs, C, m3, y3r, y3i)
            if AHEAD:
                grp, fr, fi = nxt
            else:
                grp, fr, fi = _group_and_stash(ub, zb, xb, s_un, s_zn, s_xn, cs, C, mn, g - 4, t1, EVEN)


@triton.jit
def _compose(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
    """The map h -> a2 (a1 h + b1) + b2 (first (a1, b1), then (a2, b2)), complex a and b."""
    return ar2 * ar1 - ai2 * ai1, ar2 * ai1 + ai2 * ar1, ar2 * br1 - ai2 * bi1 + br2, ar2 * bi1 + ai2 * br1 + bi2


@triton.jit
def _compose_excl(er1, ei1, fr1, fi1, ar1, ai1, br1, bi1, er2, ei2, fr2, fi2, ar2, ai2, br2, bi2):
    """Scan combine of segments held as (all maps but the last, all maps): gives an exclusive scan of maps."""
    er, ei, fr, fi = _compose(ar1, ai1, br1, bi1, er2, ei2, fr2, fi2)
    ar, ai, br, bi = _compose(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2)
    return er, ei, fr, fi, ar, ai, br, bi


@triton.jit
def _entering(Ar, Ai, Br, Bi, REVERSE: tl.constexpr):
    """State entering each chunk (rows of the (W, BLOCK_C) chunk maps `h -> A h + B`) from the chunks before it
    (REVERSE: after it), starting from 0."""
    one = tl.full(Ar.shape, 1., tl.float32)
    zero = tl.zeros(Ar.shape, tl.float32)
    _, _, hr_, hi_, _, _, _, _ = tl.associative_scan(
        (one, zero, zero, zero, Ar, Ai, Br, Bi), 0, _compose_excl, reverse=REVERSE)
    return hr_, hi_


@triton.jit
def _bihgru_fwd_onchip_kernel(
        u_ptr, z_ptr, gamma_ptr, tf_ptr, tr_ptr, out_ptr, N, C, s_ub, s_un, s_zb, s_zn, s_ob, s_on,
        BLOCK_C: tl.constexpr, T: tl.constexpr, W: tl.constexpr,
):
    """The forward with one read of u and z: the program's sequence (W chunks of T rows, W x T >= N) is loaded once
    into registers as (W, BLOCK_C) tiles of row j of every chunk; the chunks' maps of both recurrences are combined
    across chunks by two small scans; then hf runs forward and hr backward over the held rows and hf + hr is
    written once."""
    b = tl.program_id(1).to(tl.int64)
    cs = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    cmask = cs < C
    gamma = tl.load(gamma_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tf = tl.load(tf_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tr = tl.load(tr_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    cf, sf, cr_, sr_ = tl.cos(tf), tl.sin(tf), tl.cos(tr), tl.sin(tr)
    first = tl.arange(0, W)[:, None] * T  # each chunk's first row
    ub, zb, ob = u_ptr + b * s_ub, z_ptr + b * s_zb, out_ptr + b * s_ob
    one = tl.full([W, BLOCK_C], 1., tl.float32)
    zero = tl.zeros([W, BLOCK_C], tl.float32)
    # one read: every row's gates held, each chunk's maps of hf and hr (from a zero state) built on the way
    Afr, Afi, Hfr, Hfi, Arr, Ari, Hrr, Hri = one, zero, zero, zero, one, zero, zero, zero
    lams, vrs, vis = (), (), ()
    for j in tl.static_range(T):
        t = first + j
        m = cmask & (t < N)
        lam, vr, vi = _row_gates(ub + t * s_un, zb + t * s_zn, cs, m, gamma)
        Afr, Afi, Hfr, Hfi, Arr, Ari, Hrr, Hri = _state_maps(
            m, lam, vr, vi, cf, sf, cr_, sr_, Afr, Afi, Hfr, Hfi, Arr, Ari, Hrr, Hri)
        lams, vrs, vis = lams + (lam,), vrs + (vr,), vis + (vi,)
    hr_, hi_ = _entering(Afr, Afi, Hfr, Hfi, False)
    hfs = ()
    for j in tl.static_range(T):
        hr_, hi_ = _step(hr_, hi_, lams[j], vrs[j], vis[j], cf, sf)
        hfs = hfs + ((hr_, hi_),)
    hr_, hi_ = _entering(Arr, Ari, Hrr, Hri, True)
    for j in tl.static_range(T - 1, -1, -1):
        hr_, hi_ = _step(hr_, hi_, lams[j], vrs[j], vis[j], cr_, sr_)
        t = first + j
        m = cmask & (t < N)
        o = ob + t * s_on + cs
        tl.store(o, (hfs[j][0] + hr_).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(o + C, (hfs[j][1] + hi_).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _step(hr_, hi_, lam, vr, vi, c, s):
    """One step h <- lam e^{i theta} h + v of a complex recurrence (c, s = cos, sin theta)."""
    ar, ai = lam * c, lam * s
    return ar * hr_ - ai * hi_ + vr, ar * hi_ + ai * hr_ + vi


@triton.jit
def _bihgru_bwd_kernel(
        u_ptr, z_ptr, gamma_ptr, tf_ptr, tr_ptr, do_ptr, du_ptr, dz_ptr, part_ptr, sum_ptr, scr_ptr,
        N, C, n_chunks, chunk_len,
        s_ub, s_un, s_zb, s_zn, s_db, s_dn, s_gb, s_gn, s_hb, s_hn, s_sb, s_sk, s_ss, s_pb, s_pk, s_ps, s_xb, s_xn,
        BLOCK_C: tl.constexpr, UNROLL: tl.constexpr, SUMMARY: tl.constexpr, DZ_IN_DU: tl.constexpr,
        EVEN: tl.constexpr,
):
    """Backward, token by token. A forward sweep runs hf and the reverse adjoint dr and stashes their values entering
    each group of 4 rows; a reverse sweep recomputes them inside each group and runs hr and the forward adjoint df
    to form the gradients.

    SUMMARY: write the chunk's maps of the four recurrences (hf, hr, df, dr) instead. DZ_IN_DU: du_ptr is one
    gradient buffer whose rows hold du in columns [0, 2C) and dz in [2C, 3C) (dz_ptr unused), passed whole because
    torch.compile copies a view that a kernel writes and scatters it back into its base. EVEN: as in the forward.
    """
    b, k = tl.program_id(1).to(tl.int64), tl.program_id(2)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = _channel_mask(cs, C, EVEN)
    gamma, cf, sf, cr_, sr_ = _channels(gamma_ptr, tf_ptr, tr_ptr, cs, cmask)
    ub, zb, db = u_ptr + b * s_ub, z_ptr + b * s_zb, do_ptr + b * s_db
    t0 = k * chunk_len
    t1 = tl.minimum(t0 + chunk_len, N)
    zero = tl.zeros([BLOCK_C], tl.float32)
    one = tl.full([BLOCK_C], 1., tl.float32)
    # lam of the rows just outside the chunk (0 beyond the sequence): the adjoints' gates at the chunk edges
    lam_before = tl.where(cmask & (t0 > 0), gamma + (1. - gamma) * _sigmoid(
        tl.load(zb + (t0 - 1) * s_zn + cs, mask=cmask & (t0 > 0), other=0.).to(tl.float32)), 0.)
    lam_after = tl.where(cmask & (t1 < N), gamma + (1. - gamma) * _sigmoid(
        tl.load(zb + t1 * s_zn + cs, mask=cmask & (t1 < N), other=0.).to(tl.float32)), 0.)
    if SUMMARY:
        Afr, Afi, Hfr, Hfi = one, zero, zero, zero  # hf and hr, as in the forward
        Arr, Ari, Hrr, Hri = one, zero, zero, zero
        Pfr, Pfi, Qfr, Qfi = one, zero, zero, zero  # df: reverse type, gate conj(af_{t+1})
        Prr, Pri, Qrr, Qri = one, zero, zero, zero  # dr: forward type, gate conj(ar_{t-1})
        lam_prev = lam_before
        for g in range(t0, t1, UNROLL):
            for r in tl.static_range(UNROLL):
                t = g + r
                m = cmask & _before(t, t1, EVEN)
                lam, vr, vi = _row_gates(ub + t * s_un, zb + t * s_zn, cs, m, gamma)
                gr, gi = _load_complex(db + t * s_dn + cs, C, m)
                Afr, Afi, Hfr, Hfi, Arr, Ari, Hrr, Hri = _state_maps(
                    m, lam, vr, vi, cf, sf, cr_, sr_, Afr, Afi, Hfr, Hfi, Arr, Ari, Hrr, Hri)
                # df: the previous row's gate is conj(af_t), known now
                gate = m & (t > t0)
                Pfr, Pfi = _cmul(Pfr, Pfi, tl.where(gate, lam * cf, 1.), tl.where(gate, -lam * sf, 0.))
                Qfr, Qfi = Qfr + Pfr * gr - Pfi * gi, Qfi + Pfr * gi + Pfi * gr
                # dr: this row's gate is conj(ar_{t-1})
                dr_r, dr_i = tl.where(m, lam_prev * cr_, 1.), tl.where(m, -lam_prev * sr_, 0.)
                Qrr, Qri = dr_r * Qrr - dr_i * Qri + gr, dr_r * Qri + dr_i * Qrr + gi
                Prr, Pri = _cmul(dr_r, dr_i, Prr, Pri)
                lam_prev = tl.where(m, lam, lam_prev)
        Pfr, Pfi = _cmul(Pfr, Pfi, lam_after * cf, -lam_after * sf)
        p = sum_ptr + b * s_sb + k * s_sk + cs
        _store_map(p, s_ss, 0, cmask, Afr, Afi, Hfr, Hfi)
        _store_map(p, s_ss, 4, cmask, Arr, Ari, Hrr, Hri)
        _store_map(p, s_ss, 8, cmask, Pfr, Pfi, Qfr, Qfi)
        _store_map(p, s_ss, 12, cmask, Prr, Pri, Qrr, Qri)
    else:
        tl.static_assert(UNROLL == 4, 'the reverse sweep below is written out for groups of 4 rows (GROUP)')
        sp = sum_ptr + b * s_sb
        # forward sweep: hf and dr over the chunk; each group's entering (hf, dr) stashed, 4 floats per group
        hr_, hi_ = _fold_carries(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 0, True)
        er, ei = _fold_carries(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 12, True)
        lam_prev = lam_before
        rows = _load_group(ub, zb, s_un, s_zn, cs, cmask, t0, t1, EVEN)
        grows = _load_dout_group(db, s_dn, cs, C, cmask, t0, t1, EVEN)
        for g in range(t0, t1, 4):
            nxt = _load_group(ub, zb, s_un, s_zn, cs, cmask, g + 4, t1, False)  # in flight while this group computes
            gnxt = _load_dout_group(db, s_dn, cs, C, cmask, g + 4, t1, False)
            x = scr_ptr + b * s_xb + (g // 4) * s_xn + cs
            _store_map(x, C, 0, cmask, hr_, hi_, er, ei)
            for r in tl.static_range(4):
                _, carry = _fwd_row(rows[r], grows[r], gamma, cf, sf, cr_, sr_, cmask & _before(g + r, t1, EVEN),
                                    (hr_, hi_, er, ei, lam_prev))
                hr_, hi_, er, ei, lam_prev = carry
            rows, grows = nxt, gnxt
        tl.debug_barrier()  # the reverse sweep reads the stash just written: order those stores before its loads
        # reverse sweep, a group at a time from the last: recompute the group's hf_{t-1} and dr_t from its stash
        # (in registers, one value per row), then walk it backwards with hr and df and form the gradients
        hr_, hi_ = _fold_carries(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 4, False)
        fr, fi = _fold_carries(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 8, False)
        lam_next = lam_after
        dgam, dthf, dthr = zero, zero, zero
        sz, sur, sui = zero, zero, zero  # sums of dz, Re du, Im du over the chunk's tokens
        n_groups = tl.cdiv(t1 - t0, 4)
        g = t0 + (n_groups - 1) * 4
        rows = _load_group(ub, zb, s_un, s_zn, cs, cmask, g, t1, EVEN)
        grows = _load_dout_group(db, s_dn, cs, C, cmask, g, t1, EVEN)
        x = scr_ptr + b * s_xb + (g // 4) * s_xn + cs
        stash = _load_stash(x, C, cmask, zb + (g - 1) * s_zn + cs, g, gamma)
        if DZ_IN_DU:
            dzb = du_ptr + 2 * C + b * s_hb + cs
        else:
            dzb = dz_ptr + b * s_hb + cs
        dub = du_ptr + b * s_gb + 2 * cs
        for j in range(0, n_groups):
            g = t0 + (n_groups - 1 - j) * 4
            mn = cmask & (j + 1 < n_groups)  # the group before this one, loaded a group ahead
            nxt = _load_group(ub, zb, s_un, s_zn, cs, mn, g - 4, t1, EVEN)
            gnxt = _load_dout_group(db, s_dn, cs, C, mn, g - 4, t1, EVEN)
            x = scr_ptr + b * s_xb + (g // 4 - 1) * s_xn + cs
            snxt = _load_stash(x, C, mn, zb + (g - 5) * s_zn + cs, g - 4, gamma)
            m0, m1 = cmask & _before(g, t1, EVEN), cmask & _before(g + 1, t1, EVEN)
            m2, m3 = cmask & _before(g + 2, t1, EVEN), cmask & _before(g + 3, t1, EVEN)
            row0, carry = _fwd_row(rows[0], grows[0], gamma, cf, sf, cr_, sr_, m0, stash)
            row1, carry = _fwd_row(rows[1], grows[1], gamma, cf, sf, cr_, sr_, m1, carry)
            row2, carry = _fwd_row(rows[2], grows[2], gamma, cf, sf, cr_, sr_, m2, carry)
            row3, carry = _fwd_row(rows[3], grows[3], gamma, cf, sf, cr_, sr_, m3, carry)
            st = (hr_, hi_, fr, fi, lam_next, dgam, dthf, dthr)
            st, d3 = _grad_row(st, row3, g + 3, t1, cmask, gamma, cf, sf, cr_, sr_, EVEN)
            st, d2 = _grad_row(st, row2, g + 2, t1, cmask, gamma, cf, sf, cr_, sr_, EVEN)
            st, d1 = _grad_row(st, row1, g + 1, t1, cmask, gamma, cf, sf, cr_, sr_, EVEN)
            st, d0 = _grad_row(st, row0, g, t1, cmask, gamma, cf, sf, cr_, sr_, EVEN)
            hr_, hi_, fr, fi, lam_next, dgam, dthf, dthr = st
            # the group's rows stored one by one after its math (no tile: no layout change through shared memory)
            sums = (sz, sur, sui)
            sums = _store_grads(dzb + g * s_hn, dub + g * s_gn, m0, d0, sums)
            sums = _store_grads(dzb + (g + 1) * s_hn, dub + (g + 1) * s_gn, m1, d1, sums)
            sums = _store_grads(dzb + (g + 2) * s_hn, dub + (g + 2) * s_gn, m2, d2, sums)
            sums = _store_grads(dzb + (g + 3) * s_hn, dub + (g + 3) * s_gn, m3, d3, sums)
            sz, sur, sui = sums
            rows, grows, stash = nxt, gnxt, snxt
        pp = part_ptr + b * s_pb + k * s_pk + cs
        sums = (dgam, dthf, dthr, sz, sur, sui)
        for i in tl.static_range(6):
            tl.store(pp + i * s_ps, sums[i], mask=cmask)


@triton.jit
def _store_grads(dzp, dup, m, d, sums):
    """One row's dz at dzp and (Re du, Im du) pairs at dup, in the pointers' dtype; `sums` (of dz, Re du, Im du over
    the rows so far) plus this row's."""
    dz, dur, dui = d
    tl.store(dzp, dz.to(dzp.dtype.element_ty), mask=m)
    tl.store(dup, dur.to(dup.dtype.element_ty), mask=m)
    tl.store(dup + 1, dui.to(dup.dtype.element_ty), mask=m)
    return sums[0] + tl.where(m, dz, 0.), sums[1] + tl.where(m, dur, 0.), sums[2] + tl.where(m, dui, 0.)


@triton.jit
def _load_stash(x, C, m, zp, g, gamma):
    """A group's backward stash at x: (hf, dr) entering the group from g, as the forward sweep stored them, and the
    lam entering it, the row before's (its z at zp; 0 before the sequence)."""
    hr_, hi_, er, ei = _load_map(x, C, 0, m)
    mz = m & (g > 0)
    lam = tl.where(mz, gamma + (1. - gamma) * _sigmoid(tl.load(zp, mask=mz, other=0.).to(tl.float32)), 0.)
    return hr_, hi_, er, ei, lam


@triton.jit
def _fwd_row(row, grow, gamma, cf, sf, cr_, sr_, m, carry):
    """Row t (masked by m: false past t1) of the backward's forward-order recurrences, from its inputs (row = z, Re u,
    Im u from `_load_row`, grow = Re g, Im g) and carry = (hf_{t-1}, dr_{t-1}, lam_{t-1}): returns the row (its
    inputs and the states its gradients need, hf_{t-1} and dr_t) and the carry for row t+1 (unchanged past t1)."""
    hr_, hi_, er, ei, lam_prev = carry
    z, ur, ui = row
    gr, gi = grow
    lam = gamma + (1. - gamma) * _sigmoid(z)
    w = 1. - lam
    er_n, ei_n = _step(er, ei, lam_prev, gr, gi, cr_, -sr_)
    hr_n, hi_n = _step(hr_, hi_, lam, w * ur * _sigmoid(ur), w * ui * _sigmoid(ui), cf, sf)
    row = (z, ur, ui, gr, gi, hr_, hi_, er_n, ei_n)
    return row, (tl.where(m, hr_n, hr_), tl.where(m, hi_n, hi_), tl.where(m, er_n, er), tl.where(m, ei_n, ei),
                 tl.where(m, lam, lam_prev))


@triton.jit
def _grad_row(st, row, t, t1, cmask, gamma, cf, sf, cr_, sr_, EVEN: tl.constexpr):
    """Row t of the reverse sweep, from st = (hr_{t+1}, df_{t+1}, lam_{t+1}, the dgamma / dtheta sums) and the row
    of `_fwd_row`: returns st for row t-1 (unchanged past t1) and the row's (dz, Re du, Im du)."""
    hr_, hi_, fr, fi, lam_next, dgam, dthf, dthr = st
    z, ur, ui, gr, gi, pr, pi, er, ei = row
    m = cmask & _before(t, t1, EVEN)
    sig = _sigmoid(z)
    lam = gamma + (1. - gamma) * sig
    sur, sui = _sigmoid(ur), _sigmoid(ui)
    cre, cim = ur * sur, ui * sui
    fr_n, fi_n = lam_next * (cf * fr + sf * fi) + gr, lam_next * (cf * fi - sf * fr) + gi
    dvr, dvi = fr_n + er, fi_n + ei
    # q = d conj(e^{i theta} h_neighbour): Re -> dlam, lam Im -> dtheta
    hpr, hpi = _cmul(cf, sf, pr, pi)
    qfr, qfi = fr_n * hpr + fi_n * hpi, fi_n * hpr - fr_n * hpi
    hnr, hni = _cmul(cr_, sr_, hr_, hi_)
    qrr, qri = er * hnr + ei * hni, ei * hnr - er * hni
    dlam = tl.where(m, qfr + qrr - (dvr * cre + dvi * cim), 0.)
    w = 1. - lam
    hr_n, hi_n = _step(hr_, hi_, lam, w * cre, w * cim, cr_, sr_)
    st = (tl.where(m, hr_n, hr_), tl.where(m, hi_n, hi_), tl.where(m, fr_n, fr), tl.where(m, fi_n, fi),
          tl.where(m, lam, lam_next), dgam + dlam * (1. - sig), dthf + tl.where(m, lam * qfi, 0.),
          dthr + tl.where(m, lam * qri, 0.))
    return st, (dlam * (1. - gamma) * sig * (1. - sig), w * dvr * sur * (1. + ur * (1. - sur)),
                w * dvi * sui * (1. + ui * (1. - sui)))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """SMs of the device (4 on the CPU, for the interpreter); cached: every forward and backward call asks."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 4


def _onchip_fits(B: int, N: int, C: int, device: torch.device) -> bool:
    """Whether the forward takes the one-read kernel: a short sequence and at most 1.5 of its programs per SM."""
    return N <= ONCHIP_MAX_N and 2 * B * triton.cdiv(C, ONCHIP_CFG[0]) <= 3 * _num_sms(device)


def _chunks(B: int, N: int, C: int, device: torch.device, cfg: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Channel blocks, chunks and chunk length for a kernel's `cfg` (an entry of FWD_CFG / BWD_CFG): split the
    sequence only when B x C alone cannot fill the GPU (the cfg's programs per SM), and then into enough chunks for
    twice that: the split costs a summary pass either way, and more, shorter chains hide more latency (measured:
    docs/performance.md)."""
    block_c, _, programs_per_sm = cfg
    n_cblocks = triton.cdiv(C, block_c)
    target = programs_per_sm * _num_sms(device)
    n_chunks = 1 if B * n_cblocks >= target else min(triton.cdiv(2 * target, B * n_cblocks), triton.cdiv(N, MIN_CHUNK))
    chunk_len = triton.cdiv(triton.cdiv(N, max(n_chunks, 1)), GROUP) * GROUP  # whole groups per chunk
    return n_cblocks, triton.cdiv(N, chunk_len), chunk_len


def _as_pairs(u: torch.Tensor) -> torch.Tensor:
    """u as the kernels read it: bf16 as int32 (Re, Im) pairs where its layout allows (every stride and the storage
    offset even), else itself. Measured: docs/performance.md."""
    if u.dtype == torch.bfloat16 and u.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in u.stride()[:-1]):
        return u.view(torch.int32)
    return u


def _even(N: int, C: int, block_c: int) -> bool:
    """Whether a two-sweep launch runs without masks (the kernels' EVEN): whole channel blocks, and whole groups in
    every chunk (chunk lengths are whole groups, so the sequence must be one too)."""
    return C % block_c == 0 and N % GROUP == 0


def bihgru_fwd(u, z, gamma, theta_f, theta_r) -> torch.Tensor:
    """Forward of the fused kernels; returns (B, N, 2C) in the dtype of u. Short sequences in small batches
    (`_onchip_fits`) take the one-read kernel, everything else the two-sweep one."""
    u, z = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, z))
    B, N, C = z.shape
    out = torch.empty(B, N, 2 * C, device=u.device, dtype=u.dtype)
    up = _as_pairs(u)
    if _onchip_fits(B, N, C, u.device):
        block_c, T = ONCHIP_CFG
        T = min(T, triton.next_power_of_2(N))
        W = triton.next_power_of_2(triton.cdiv(N, T))
        wrap_triton(_bihgru_fwd_onchip_kernel)[(triton.cdiv(C, block_c), B)](
            up, z, gamma, theta_f, theta_r, out, N, C, up.stride(0), up.stride(1), z.stride(0), z.stride(1),
            out.stride(0), out.stride(1), BLOCK_C=block_c, T=T, W=W, num_warps=max(1, W * block_c // 32))
        return out
    cfg = FWD_CFG[u.element_size()]  # (BLOCK_C, warps, programs per SM)
    n_cblocks, n_chunks, chunk_len = _chunks(B, N, C, u.device, cfg)
    summ = torch.empty(B, n_chunks, 8, C, device=u.device, dtype=torch.float32) if n_chunks > 1 else out
    stash = torch.empty(B, triton.cdiv(N, GROUP), 2 * C, device=u.device, dtype=torch.float32)
    grid = (n_cblocks, B, n_chunks)
    args = (up, z, gamma, theta_f, theta_r, out, summ, stash, N, C, n_chunks, chunk_len, up.stride(0), up.stride(1),
            z.stride(0), z.stride(1), out.stride(0), out.stride(1), *_sum_strides(summ, n_chunks), stash.stride(0),
            stash.stride(1))
    meta = dict(BLOCK_C=cfg[0], UNROLL=GROUP, num_warps=cfg[1], EVEN=_even(N, C, cfg[0]),
                AHEAD=FWD_AHEAD[u.element_size()])
    if n_chunks > 1:
        wrap_triton(_bihgru_fwd_kernel)[grid](*args, SUMMARY=True, **meta)
    wrap_triton(_bihgru_fwd_kernel)[grid](*args, SUMMARY=False, **meta)
    return out


def bihgru_bwd(dout, u, z, gamma, theta_f, theta_r, dx=None):
    """Backward of the fused kernel: grads of u, z, gamma, theta_f, theta_r, then the sums of the grads of z, Re u
    and Im u over batch and tokens (fp32 (3, C): the gradient of a bias added into them). With `dx`, a (B, N, >= 3C)
    buffer with unit channel stride, the grads of u and z are written into its columns [0, 2C) and [2C, 3C) (and
    returned as those views), else into new tensors."""
    u, z, dout = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, z, dout))
    B, N, C = z.shape
    if dx is None:
        du = torch.empty(u.shape, device=u.device, dtype=u.dtype)
        dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
        du_arg, dz_arg = du, dz
    else:  # the kernel writes into dx itself; the views give the strides
        du, dz = dx[..., :2 * C], dx[..., 2 * C:3 * C]
        du_arg, dz_arg = dx, None
    cfg = BWD_CFG[u.element_size()]  # (BLOCK_C, warps, programs per SM)
    n_cblocks, n_chunks, chunk_len = _chunks(B, N, C, u.device, cfg)
    part = torch.empty(B, n_chunks, 6, C, device=u.device, dtype=torch.float32)
    summ = torch.empty(B, n_chunks, 16, C, device=u.device, dtype=torch.float32) if n_chunks > 1 else part
    stash = torch.empty(B, triton.cdiv(N, GROUP), 4 * C, device=u.device, dtype=torch.float32)
    grid = (n_cblocks, B, n_chunks)
    up = _as_pairs(u)
    args = (up, z, gamma, theta_f, theta_r, dout, du_arg, dz_arg, part, summ, stash, N, C, n_chunks, chunk_len,
            up.stride(0), up.stride(1), z.stride(0), z.stride(1), dout.stride(0), dout.stride(1),
            du.stride(0), du.stride(1), dz.stride(0), dz.stride(1), *_sum_strides(summ, n_chunks),
            *part.stride()[:3], stash.stride(0), stash.stride(1))
    meta = dict(BLOCK_C=cfg[0], UNROLL=GROUP, num_warps=cfg[1], maxnreg=BWD_MAXNREG, DZ_IN_DU=dx is not None,
                EVEN=_even(N, C, cfg[0]))
    if n_chunks > 1:
        wrap_triton(_bihgru_bwd_kernel)[grid](*args, SUMMARY=True, **meta)
    wrap_triton(_bihgru_bwd_kernel)[grid](*args, SUMMARY=False, **meta)
    sums = part.sum(dim=(0, 1))  # one reduction; copies so that the op's outputs do not alias
    dgamma, dtf, dtr = sums[:3].unbind(0)
    return du, dz, dgamma.to(gamma.dtype, copy=True), dtf.to(theta_f.dtype, copy=True), \
        dtr.to(theta_r.dtype, copy=True), sums[3:]


def _sum_strides(summ: torch.Tensor, n_chunks: int) -> Tuple[int, int, int]:
    return (summ.stride(0), summ.stride(1), summ.stride(2)) if n_chunks > 1 else (0, 0, 0)


# ---- the op: registered with torch.library so torch.compile traces through it, forward and backward ----

def kernel_op(name: str, fake: Callable):
    """Registers the decorated function, whose kernels it launches through `wrap_triton`, as the operator `name`.

    On the GPU a `torch.library.triton_op`: torch.compile traces into it and launches its kernels from its own
    generated code, without the function's Python, the custom op's dispatch and Triton's launcher on every call
    (0.36 + 1.18 ms of host time per block and training step as a custom op, docs/performance.md). Triton's
    interpreter runs kernels that cannot be traced: there a `torch.library.custom_op` with the fake `fake`."""
    def register(fn):
        if _INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, fn, mutates_args=())
    return register


def linear_param_grads(dout: torch.Tensor, inp: torch.Tensor, bias_grad: bool
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The gradients of `F.linear(inp, weight, bias)`'s weight and (with `bias_grad`, else None) bias for its output's
    gradient dout: the backward of an op that runs a projection and writes its input `inp` again instead of keeping
    it."""
    dout2 = dout.reshape(-1, dout.shape[-1])
    return dout2.t() @ inp.reshape(-1, inp.shape[-1]), dout2.sum(0) if bias_grad else None


def _fwd_fake(u, z, gamma, theta_f, theta_r):
    return u.new_empty(u.shape)


@kernel_op('hgrn_vision::bihgru_scan_fwd', _fwd_fake)
def _fwd_op(u: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor,
            theta_r: torch.Tensor) -> torch.Tensor:
    return bihgru_fwd(u, z, gamma, theta_f, theta_r)


def _bwd_fake(dout, u, z, gamma, theta_f, theta_r):
    return u.new_empty(u.shape), z.new_empty(z.shape), torch.empty_like(gamma), torch.empty_like(theta_f), \
        torch.empty_like(theta_r)


@kernel_op('hgrn_vision::bihgru_scan_bwd', _bwd_fake)
def _bwd_op(dout: torch.Tensor, u: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor,
            theta_r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return bihgru_bwd(dout, u, z, gamma, theta_f, theta_r)[:5]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    return _bwd_op(dout, *ctx.saved_tensors)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def check_triton_device(x: torch.Tensor) -> None:
    """The Triton kernels run on CUDA tensors, or on any with TRITON_INTERPRET=1 set before import."""
    if not x.is_cuda and os.environ.get('TRITON_INTERPRET', '0') != '1':
        raise ValueError(
            f"impl='triton' needs CUDA tensors, got tensors on {x.device}; use impl='torch' (or None) there, or "
            f'set TRITON_INTERPRET=1 before importing hgrn_vision to run the kernel in the Triton interpreter.')


def bihgru_scan_triton(u, z, gamma, theta_f, theta_r) -> torch.Tensor:
    """The fused Triton op (see `hgrn_vision.ops.bihgru_scan` for the math)."""
    check_triton_device(u)
    return _fwd_op(u, z, gamma, theta_f, theta_r)

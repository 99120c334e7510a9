"""The scan's two-sweep forward kernel, its config table and its launcher; names as in `common.py`.

A forward sweep runs hf and stashes only the state entering each group (2 fp32 per group and channel), then a
reverse sweep, a group at a time, re-reads the group's u and z, recomputes its hf from the stash in registers, runs
hr and writes hf + hr once. No flipped copies, no gates or states materialised by PyTorch, fp32 state for any input
dtype; u and z are read twice.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import (
    GROUP,
    as_pairs,
    before,
    channel_mask,
    channels,
    chunks,
    even,
    fold_carries,
    gates,
    load_group,
    row_gates,
    state_maps,
    step,
    store_map,
    sum_strides,
)


class FwdConfig(NamedTuple):
    """Launch config of the two-sweep forward."""
    block_c: int  # channels per program, one per thread
    num_warps: int
    programs_per_sm: int  # the occupancy to aim for: below it the sequence is split into chunks (`common.chunks`)
    load_ahead: bool  # both sweeps issue the next group's loads before this group's math


# By input element size. Tuned on an H100 at (256, 256, 384), (16, 5329, 384), (1, 256, 192) (bf16; the fp32 row kept
# from an earlier sweep), load_ahead on an H200; re-tune: `python scripts/gpu_scan_tune.py tune`. More resident warps
# keep more loads in flight, so small programs win; fp32 rows already keep twice the bytes in flight, and loading
# ahead costs them registers, so resident programs.
FWD_CONFIGS = {2: FwdConfig(32, 1, 16, True), 4: FwdConfig(64, 2, 8, False)}


@triton.jit
def _store_row(p, C, m, y_re, y_im):
    """One output row: Re at p, Im at p + C, in the pointer's dtype."""
    tl.store(p, y_re.to(p.dtype.element_ty), mask=m)
    tl.store(p + C, y_im.to(p.dtype.element_ty), mask=m)


@triton.jit
def _group_and_stash(ub, zb, xb, s_un, s_zn, s_xn, cs, C, m, g, t1, EVEN: tl.constexpr):
    """The reverse sweep's inputs of the group from g: its rows (`load_group`) and the stashed hf entering it (Re,
    Im)."""
    x = xb + (g // 4) * s_xn
    grp = load_group(ub, zb, s_un, s_zn, cs, m, g, t1, EVEN)
    return grp, tl.load(x, mask=m, other=0.), tl.load(x + C, mask=m, other=0.)


@triton.jit
def bihgru_fwd_kernel(
        u_ptr, z_ptr, gamma_ptr, tf_ptr, tr_ptr, out_ptr, sum_ptr, scr_ptr,
        N, C, n_chunks, chunk_len,
        s_ub, s_un, s_zb, s_zn, s_ob, s_on, s_sb, s_sk, s_ss, s_xb, s_xn,
        BLOCK_C: tl.constexpr, UNROLL: tl.constexpr, SUMMARY: tl.constexpr, EVEN: tl.constexpr,
        AHEAD: tl.constexpr,
):
    """Token by token, BLOCK_C channels wide: a forward sweep stashes hf, a reverse sweep writes hf + hr.

    SUMMARY: write the chunk's maps of hf and hr instead. Loads are unrolled UNROLL rows deep so they overlap.
    EVEN: C is a multiple of BLOCK_C and every chunk a whole number of groups (`common.even`): no masks.
    AHEAD: both sweeps issue the next group's loads before this group's math (`FwdConfig.load_ahead`).
    """
    b, k = tl.program_id(1).to(tl.int64), tl.program_id(2)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = channel_mask(cs, C, EVEN)
    gamma, cos_f, sin_f, cos_r, sin_r = channels(gamma_ptr, tf_ptr, tr_ptr, cs, cmask)
    ub, zb, ob = u_ptr + b * s_ub, z_ptr + b * s_zb, out_ptr + b * s_ob
    t0 = k * chunk_len
    t1 = tl.minimum(t0 + chunk_len, N)
    if SUMMARY:
        zero = tl.zeros([BLOCK_C], tl.float32)
        Ahf_re, Ahf_im, Bhf_re, Bhf_im = zero + 1., zero, zero, zero
        Ahr_re, Ahr_im, Bhr_re, Bhr_im = zero + 1., zero, zero, zero
        for g in range(t0, t1, UNROLL):
            for r in tl.static_range(UNROLL):
                t = g + r
                m = cmask & before(t, t1, EVEN)
                lam, v_re, v_im = row_gates(ub + t * s_un, zb + t * s_zn, cs, m, gamma)
                Ahf_re, Ahf_im, Bhf_re, Bhf_im, Ahr_re, Ahr_im, Bhr_re, Bhr_im = state_maps(
                    m, lam, v_re, v_im, cos_f, sin_f, cos_r, sin_r, Ahf_re, Ahf_im, Bhf_re, Bhf_im, Ahr_re, Ahr_im,
                    Bhr_re, Bhr_im)
        p = sum_ptr + b * s_sb + k * s_sk + cs
        store_map(p, s_ss, 0, cmask, Ahf_re, Ahf_im, Bhf_re, Bhf_im)
        store_map(p, s_ss, 4, cmask, Ahr_re, Ahr_im, Bhr_re, Bhr_im)
    else:
        tl.static_assert(UNROLL == 4, 'the reverse sweep below is written out for groups of 4 rows (GROUP)')
        # forward sweep: hf over the chunk, only the state entering each group of 4 rows stashed (2 floats)
        hf_re, hf_im = fold_carries(sum_ptr + b * s_sb, s_sk, s_ss, cs, cmask, k, n_chunks, 0, True)
        grp = load_group(ub, zb, s_un, s_zn, cs, cmask, t0, t1, EVEN)
        for g in range(t0, t1, 4):
            if AHEAD:
                nxt = load_group(ub, zb, s_un, s_zn, cs, cmask, g + 4, t1, False)  # in flight during this group
            x = scr_ptr + b * s_xb + (g // 4) * s_xn + cs
            tl.store(x, hf_re, mask=cmask)
            tl.store(x + C, hf_im, mask=cmask)
            for r in tl.static_range(4):
                m = cmask & before(g + r, t1, EVEN)
                lam, v_re, v_im = gates(grp[r], m, gamma)
                hf_re, hf_im = step(hf_re, hf_im, lam, v_re, v_im, cos_f, sin_f)
            if AHEAD:
                grp = nxt
            else:
                grp = load_group(ub, zb, s_un, s_zn, cs, cmask, g + 4, t1, False)
        tl.debug_barrier()  # the reverse sweep reads the stash just written: order those stores before its loads
        # reverse sweep, a group at a time from the last: the group's gates once, hf recomputed from the stash going
        # up, hr going down, hf + hr written once
        hr_re, hr_im = fold_carries(sum_ptr + b * s_sb, s_sk, s_ss, cs, cmask, k, n_chunks, 4, False)
        n_groups = tl.cdiv(t1 - t0, 4)
        xb = scr_ptr + b * s_xb + cs
        grp, hf_re, hf_im = _group_and_stash(ub, zb, xb, s_un, s_zn, s_xn, cs, C, cmask, t0 + (n_groups - 1) * 4, t1,
                                             EVEN)
        for j in range(0, n_groups):
            g = t0 + (n_groups - 1 - j) * 4
            mn = cmask & (j + 1 < n_groups)  # the group before this one
            if AHEAD:
                nxt = _group_and_stash(ub, zb, xb, s_un, s_zn, s_xn, cs, C, mn, g - 4, t1, EVEN)
            m0, m1 = cmask & before(g, t1, EVEN), cmask & before(g + 1, t1, EVEN)
            m2, m3 = cmask & before(g + 2, t1, EVEN), cmask & before(g + 3, t1, EVEN)
            l0, v0_re, v0_im = gates(grp[0], m0, gamma)
            l1, v1_re, v1_im = gates(grp[1], m1, gamma)
            l2, v2_re, v2_im = gates(grp[2], m2, gamma)
            l3, v3_re, v3_im = gates(grp[3], m3, gamma)
            # rows past t1 (only in the sequence's last group, whose incoming hr is 0) have lam = v = 0: h stays 0
            hf0_re, hf0_im = step(hf_re, hf_im, l0, v0_re, v0_im, cos_f, sin_f)
            hf1_re, hf1_im = step(hf0_re, hf0_im, l1, v1_re, v1_im, cos_f, sin_f)
            hf2_re, hf2_im = step(hf1_re, hf1_im, l2, v2_re, v2_im, cos_f, sin_f)
            hf3_re, hf3_im = step(hf2_re, hf2_im, l3, v3_re, v3_im, cos_f, sin_f)
            hr_re, hr_im = step(hr_re, hr_im, l3, v3_re, v3_im, cos_r, sin_r)
            y3_re, y3_im = hf3_re + hr_re, hf3_im + hr_im
            hr_re, hr_im = step(hr_re, hr_im, l2, v2_re, v2_im, cos_r, sin_r)
            y2_re, y2_im = hf2_re + hr_re, hf2_im + hr_im
            hr_re, hr_im = step(hr_re, hr_im, l1, v1_re, v1_im, cos_r, sin_r)
            y1_re, y1_im = hf1_re + hr_re, hf1_im + hr_im
            hr_re, hr_im = step(hr_re, hr_im, l0, v0_re, v0_im, cos_r, sin_r)
            y0_re, y0_im = hf0_re + hr_re, hf0_im + hr_im
            # the group's rows stored one by one after its math (no tile: no layout change through shared memory)
            _store_row(ob + g * s_on + cs, C, m0, y0_re, y0_im)
            _store_row(ob + (g + 1) * s_on + cs, C, m1, y1_re, y1_im)
            _store_row(ob + (g + 2) * s_on + cs, C, m2, y2_re, y2_im)
            _store_row(ob + (g + 3) * s_on + cs, C, m3, y3_re, y3_im)
            if AHEAD:
                grp, hf_re, hf_im = nxt
            else:
                grp, hf_re, hf_im = _group_and_stash(ub, zb, xb, s_un, s_zn, s_xn, cs, C, mn, g - 4, t1, EVEN)


def two_sweep_fwd(u: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor,
                  theta_r: torch.Tensor, out: torch.Tensor) -> None:
    """Writes the scan of u, z (unit channel stride) into out (B, N, 2C), splitting the sequence where B x C alone
    cannot fill the GPU."""
    B, N, C = z.shape
    up = as_pairs(u)
    cfg = FWD_CONFIGS[u.element_size()]
    n_cblocks, n_chunks, chunk_len = chunks(B, N, C, u.device, cfg)
    summ = torch.empty(B, n_chunks, 8, C, device=u.device, dtype=torch.float32) if n_chunks > 1 else out
    stash = torch.empty(B, triton.cdiv(N, GROUP), 2 * C, device=u.device, dtype=torch.float32)
    grid = (n_cblocks, B, n_chunks)
    args = (up, z, gamma, theta_f, theta_r, out, summ, stash, N, C, n_chunks, chunk_len, up.stride(0), up.stride(1),
            z.stride(0), z.stride(1), out.stride(0), out.stride(1), *sum_strides(summ, n_chunks), stash.stride(0),
            stash.stride(1))
    meta = dict(BLOCK_C=cfg.block_c, UNROLL=GROUP, num_warps=cfg.num_warps, EVEN=even(N, C, cfg.block_c),
                AHEAD=cfg.load_ahead)
    if n_chunks > 1:
        wrap_triton(bihgru_fwd_kernel)[grid](*args, SUMMARY=True, **meta)
    wrap_triton(bihgru_fwd_kernel)[grid](*args, SUMMARY=False, **meta)

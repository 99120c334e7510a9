"""The scan's backward kernel, its config table and its launcher; names as in `common.py`.

The backward recomputes the states instead of saving them. With `G = dL/dRe + i dL/dIm` of a complex value:

    dhf_t = do_t + conj(af_{t+1}) dhf_{t+1}        (adjoint of the forward state, a reverse recurrence)
    dhr_t = do_t + conj(ar_{t-1}) dhr_{t-1}        (adjoint of the reverse state, a forward recurrence)
    dv_t = dhf_t + dhr_t,   d af_t = dhf_t conj(hf_{t-1}),   d ar_t = dhr_t conj(hr_{t+1})

Each gradient pairs a forward-order quantity with a reverse-order one. A forward sweep runs hf and dhr and stashes only
what enters each group of 4 rows (hf, dhr: 4 fp32 per group and channel, freed after the call; the lam entering a
group is recomputed from the row before's z, read with the stash); the reverse sweep, a group at a time, re-loads the
group's rows (which it needs anyway), recomputes hf_{t-1} and dhr_t inside the group in registers and walks the rows
backwards beside hr_{t+1} and dhf_t. Both sweeps load the next group's rows (and stash) one group ahead, so that those
loads fly while this group computes. Nothing divides by a gate. Per-channel gradients (gamma, theta_f, theta_r, and
the sums of du and dz over the tokens: a bias's gradient) are fp32 partials per program, reduced once afterwards.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..triton_utils import sigmoid
from .common import (
    GROUP,
    as_pairs,
    before,
    channel_mask,
    channels,
    chunks,
    cmul,
    even,
    fold_carries,
    load_group,
    load_map,
    row_gates,
    state_maps,
    step,
    store_map,
    sum_strides,
)


class BwdConfig(NamedTuple):
    """Launch config of the backward."""
    block_c: int  # channels per program, one per thread
    num_warps: int
    programs_per_sm: int  # the occupancy to aim for: below it the sequence is split into chunks (`common.chunks`)
    max_registers: Optional[int]  # registers a thread at most (maxnreg; None: uncapped)


# By input element size. Tuned on an H100 at (256, 256, 384), (16, 5329, 384), (1, 256, 192) (bf16; the fp32 row kept
# from an earlier sweep), max_registers on an H200 with Triton 3.6 (128: 16 one-warp programs an SM instead of 14,
# no spills); re-tune: `python scripts/gpu_scan_tune.py tune`.
BWD_CONFIGS = {2: BwdConfig(32, 1, 16, 128), 4: BwdConfig(64, 2, 8, 128)}


@triton.jit
def _load_complex(p, C, m):
    """Re at p and Im at p + C (the `[Re | Im]` layout of out and its gradient), as fp32."""
    return tl.load(p, mask=m, other=0.).to(tl.float32), tl.load(p + C, mask=m, other=0.).to(tl.float32)


@triton.jit
def _load_do_group(db, s_dn, cs, C, m, g, t1, EVEN: tl.constexpr):
    """`_load_complex` of do's 4 rows from g (Re do, Im do per row), as `load_group` does for u and z."""
    return (_load_complex(db + g * s_dn + cs, C, m & before(g, t1, EVEN)),
            _load_complex(db + (g + 1) * s_dn + cs, C, m & before(g + 1, t1, EVEN)),
            _load_complex(db + (g + 2) * s_dn + cs, C, m & before(g + 2, t1, EVEN)),
            _load_complex(db + (g + 3) * s_dn + cs, C, m & before(g + 3, t1, EVEN)))


@triton.jit
def _store_grads(dzp, dup, m, d, sums):
    """One row's dz at dzp and (Re du, Im du) pairs at dup, in the pointers' dtype; `sums` (of dz, Re du, Im du over
    the rows so far) plus this row's."""
    dz, du_re, du_im = d
    tl.store(dzp, dz.to(dzp.dtype.element_ty), mask=m)
    tl.store(dup, du_re.to(dup.dtype.element_ty), mask=m)
    tl.store(dup + 1, du_im.to(dup.dtype.element_ty), mask=m)
    return sums[0] + tl.where(m, dz, 0.), sums[1] + tl.where(m, du_re, 0.), sums[2] + tl.where(m, du_im, 0.)


@triton.jit
def _load_stash(x, C, m, zp, g, gamma):
    """A group's stash at x: (hf, dhr) entering the group from g, as the forward sweep stored them, and the lam
    entering it, the row before's (its z at zp; 0 before the sequence)."""
    hf_re, hf_im, dhr_re, dhr_im = load_map(x, C, 0, m)
    mz = m & (g > 0)
    lam = tl.where(mz, gamma + (1. - gamma) * sigmoid(tl.load(zp, mask=mz, other=0.).to(tl.float32)), 0.)
    return hf_re, hf_im, dhr_re, dhr_im, lam


@triton.jit
def _fwd_row(row, do_row, gamma, cos_f, sin_f, cos_r, sin_r, m, carry):
    """Row t (masked by m: false past t1) of the forward-order recurrences, from its inputs (row = z, Re u, Im u from
    `load_row`, do_row = Re do, Im do) and carry = (hf_{t-1}, dhr_{t-1}, lam_{t-1}): returns the row (its inputs and
    the states its gradients need, hf_{t-1} and dhr_t) and the carry for row t+1 (unchanged past t1)."""
    hf_re, hf_im, dhr_re, dhr_im, lam_prev = carry
    z, u_re, u_im = row
    do_re, do_im = do_row
    lam = gamma + (1. - gamma) * sigmoid(z)
    w = 1. - lam
    dhr_re_n, dhr_im_n = step(dhr_re, dhr_im, lam_prev, do_re, do_im, cos_r, -sin_r)
    hf_re_n, hf_im_n = step(hf_re, hf_im, lam, w * u_re * sigmoid(u_re), w * u_im * sigmoid(u_im), cos_f, sin_f)
    row = (z, u_re, u_im, do_re, do_im, hf_re, hf_im, dhr_re_n, dhr_im_n)
    return row, (tl.where(m, hf_re_n, hf_re), tl.where(m, hf_im_n, hf_im), tl.where(m, dhr_re_n, dhr_re),
                 tl.where(m, dhr_im_n, dhr_im), tl.where(m, lam, lam_prev))


@triton.jit
def _grad_row(st, row, t, t1, cmask, gamma, cos_f, sin_f, cos_r, sin_r, EVEN: tl.constexpr):
    """Row t of the reverse sweep, from st = (hr_{t+1}, dhf_{t+1}, lam_{t+1}, the dgamma / dtheta sums) and the row
    of `_fwd_row`: returns st for row t-1 (unchanged past t1) and the row's (dz, Re du, Im du)."""
    hr_re, hr_im, dhf_re, dhf_im, lam_next, dgam, dthf, dthr = st
    z, u_re, u_im, do_re, do_im, hfp_re, hfp_im, dhr_re, dhr_im = row
    m = cmask & before(t, t1, EVEN)
    sig = sigmoid(z)
    lam = gamma + (1. - gamma) * sig
    su_re, su_im = sigmoid(u_re), sigmoid(u_im)
    c_re, c_im = u_re * su_re, u_im * su_im
    dhf_re_n, dhf_im_n = (lam_next * (cos_f * dhf_re + sin_f * dhf_im) + do_re,
                          lam_next * (cos_f * dhf_im - sin_f * dhf_re) + do_im)
    dv_re, dv_im = dhf_re_n + dhr_re, dhf_im_n + dhr_im
    # q = d conj(e^{i theta} h_neighbour): Re -> dlam, lam Im -> dtheta
    hp_re, hp_im = cmul(cos_f, sin_f, hfp_re, hfp_im)
    qf_re, qf_im = dhf_re_n * hp_re + dhf_im_n * hp_im, dhf_im_n * hp_re - dhf_re_n * hp_im
    hn_re, hn_im = cmul(cos_r, sin_r, hr_re, hr_im)
    qr_re, qr_im = dhr_re * hn_re + dhr_im * hn_im, dhr_im * hn_re - dhr_re * hn_im
    dlam = tl.where(m, qf_re + qr_re - (dv_re * c_re + dv_im * c_im), 0.)
    w = 1. - lam
    hr_re_n, hr_im_n = step(hr_re, hr_im, lam, w * c_re, w * c_im, cos_r, sin_r)
    st = (tl.where(m, hr_re_n, hr_re), tl.where(m, hr_im_n, hr_im), tl.where(m, dhf_re_n, dhf_re),
          tl.where(m, dhf_im_n, dhf_im), tl.where(m, lam, lam_next), dgam + dlam * (1. - sig),
          dthf + tl.where(m, lam * qf_im, 0.), dthr + tl.where(m, lam * qr_im, 0.))
    return st, (dlam * (1. - gamma) * sig * (1. - sig), w * dv_re * su_re * (1. + u_re * (1. - su_re)),
                w * dv_im * su_im * (1. + u_im * (1. - su_im)))


@triton.jit
def bihgru_bwd_kernel(
        u_ptr, z_ptr, gamma_ptr, tf_ptr, tr_ptr, do_ptr, du_ptr, dz_ptr, part_ptr, sum_ptr, scr_ptr,
        N, C, n_chunks, chunk_len,
        s_ub, s_un, s_zb, s_zn, s_db, s_dn, s_gb, s_gn, s_hb, s_hn, s_sb, s_sk, s_ss, s_pb, s_pk, s_ps, s_xb, s_xn,
        BLOCK_C: tl.constexpr, UNROLL: tl.constexpr, SUMMARY: tl.constexpr, DZ_IN_DU: tl.constexpr,
        EVEN: tl.constexpr,
):
    """Backward, token by token. A forward sweep runs hf and dhr and stashes their values entering each group of 4
    rows; a reverse sweep recomputes them inside each group and runs hr and dhf to form the gradients.

    SUMMARY: write the chunk's maps of the four recurrences (hf, hr, dhf, dhr) instead. DZ_IN_DU: du_ptr is one
    gradient buffer whose rows hold du in columns [0, 2C) and dz in [2C, 3C) (dz_ptr unused), passed whole because
    torch.compile copies a view that a kernel writes and scatters it back into its base. EVEN: as in the forward.
    """
    b, k = tl.program_id(1).to(tl.int64), tl.program_id(2)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = channel_mask(cs, C, EVEN)
    gamma, cos_f, sin_f, cos_r, sin_r = channels(gamma_ptr, tf_ptr, tr_ptr, cs, cmask)
    ub, zb, db = u_ptr + b * s_ub, z_ptr + b * s_zb, do_ptr + b * s_db
    t0 = k * chunk_len
    t1 = tl.minimum(t0 + chunk_len, N)
    zero = tl.zeros([BLOCK_C], tl.float32)
    one = tl.full([BLOCK_C], 1., tl.float32)
    # lam of the rows just outside the chunk (0 beyond the sequence): the adjoints' gates at the chunk edges
    lam_before = tl.where(cmask & (t0 > 0), gamma + (1. - gamma) * sigmoid(
        tl.load(zb + (t0 - 1) * s_zn + cs, mask=cmask & (t0 > 0), other=0.).to(tl.float32)), 0.)
    lam_after = tl.where(cmask & (t1 < N), gamma + (1. - gamma) * sigmoid(
        tl.load(zb + t1 * s_zn + cs, mask=cmask & (t1 < N), other=0.).to(tl.float32)), 0.)
    if SUMMARY:
        Ahf_re, Ahf_im, Bhf_re, Bhf_im = one, zero, zero, zero  # hf and hr, as in the forward
        Ahr_re, Ahr_im, Bhr_re, Bhr_im = one, zero, zero, zero
        Adhf_re, Adhf_im, Bdhf_re, Bdhf_im = one, zero, zero, zero  # dhf: reverse kind, gate conj(af_{t+1})
        Adhr_re, Adhr_im, Bdhr_re, Bdhr_im = one, zero, zero, zero  # dhr: forward kind, gate conj(ar_{t-1})
        lam_prev = lam_before
        for g in range(t0, t1, UNROLL):
            for r in tl.static_range(UNROLL):
                t = g + r
                m = cmask & before(t, t1, EVEN)
                lam, v_re, v_im = row_gates(ub + t * s_un, zb + t * s_zn, cs, m, gamma)
                do_re, do_im = _load_complex(db + t * s_dn + cs, C, m)
                Ahf_re, Ahf_im, Bhf_re, Bhf_im, Ahr_re, Ahr_im, Bhr_re, Bhr_im = state_maps(
                    m, lam, v_re, v_im, cos_f, sin_f, cos_r, sin_r, Ahf_re, Ahf_im, Bhf_re, Bhf_im, Ahr_re, Ahr_im,
                    Bhr_re, Bhr_im)
                # dhf: the previous row's gate is conj(af_t), known now
                mg = m & (t > t0)
                Adhf_re, Adhf_im = cmul(Adhf_re, Adhf_im, tl.where(mg, lam * cos_f, 1.), tl.where(mg, -lam * sin_f, 0.))
                Bdhf_re, Bdhf_im = (Bdhf_re + Adhf_re * do_re - Adhf_im * do_im,
                                    Bdhf_im + Adhf_re * do_im + Adhf_im * do_re)
                # dhr: this row's gate is conj(ar_{t-1})
                a_re, a_im = tl.where(m, lam_prev * cos_r, 1.), tl.where(m, -lam_prev * sin_r, 0.)
                Bdhr_re, Bdhr_im = a_re * Bdhr_re - a_im * Bdhr_im + do_re, a_re * Bdhr_im + a_im * Bdhr_re + do_im
                Adhr_re, Adhr_im = cmul(a_re, a_im, Adhr_re, Adhr_im)
                lam_prev = tl.where(m, lam, lam_prev)
        Adhf_re, Adhf_im = cmul(Adhf_re, Adhf_im, lam_after * cos_f, -lam_after * sin_f)
        p = sum_ptr + b * s_sb + k * s_sk + cs
        store_map(p, s_ss, 0, cmask, Ahf_re, Ahf_im, Bhf_re, Bhf_im)
        store_map(p, s_ss, 4, cmask, Ahr_re, Ahr_im, Bhr_re, Bhr_im)
        store_map(p, s_ss, 8, cmask, Adhf_re, Adhf_im, Bdhf_re, Bdhf_im)
        store_map(p, s_ss, 12, cmask, Adhr_re, Adhr_im, Bdhr_re, Bdhr_im)
    else:
        tl.static_assert(UNROLL == 4, 'the reverse sweep below is written out for groups of 4 rows (GROUP)')
        sp = sum_ptr + b * s_sb
        # forward sweep: hf and dhr over the chunk; each group's entering (hf, dhr) stashed, 4 floats per group
        hf_re, hf_im = fold_carries(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 0, True)
        dhr_re, dhr_im = fold_carries(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 12, True)
        lam_prev = lam_before
        rows = load_group(ub, zb, s_un, s_zn, cs, cmask, t0, t1, EVEN)
        do_rows = _load_do_group(db, s_dn, cs, C, cmask, t0, t1, EVEN)
        for g in range(t0, t1, 4):
            nxt = load_group(ub, zb, s_un, s_zn, cs, cmask, g + 4, t1, False)  # in flight while this group computes
            do_nxt = _load_do_group(db, s_dn, cs, C, cmask, g + 4, t1, False)
            x = scr_ptr + b * s_xb + (g // 4) * s_xn + cs
            store_map(x, C, 0, cmask, hf_re, hf_im, dhr_re, dhr_im)
            for r in tl.static_range(4):
                _, carry = _fwd_row(rows[r], do_rows[r], gamma, cos_f, sin_f, cos_r, sin_r,
                                    cmask & before(g + r, t1, EVEN), (hf_re, hf_im, dhr_re, dhr_im, lam_prev))
                hf_re, hf_im, dhr_re, dhr_im, lam_prev = carry
            rows, do_rows = nxt, do_nxt
        tl.debug_barrier()  # the reverse sweep reads the stash just written: order those stores before its loads
        # reverse sweep, a group at a time from the last: recompute the group's hf_{t-1} and dhr_t from its stash
        # (in registers, one value per row), then walk it backwards with hr and dhf and form the gradients
        hr_re, hr_im = fold_carries(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 4, False)
        dhf_re, dhf_im = fold_carries(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 8, False)
        lam_next = lam_after
        dgam, dthf, dthr = zero, zero, zero
        sum_dz, sum_du_re, sum_du_im = zero, zero, zero  # over the chunk's tokens
        n_groups = tl.cdiv(t1 - t0, 4)
        g = t0 + (n_groups - 1) * 4
        rows = load_group(ub, zb, s_un, s_zn, cs, cmask, g, t1, EVEN)
        do_rows = _load_do_group(db, s_dn, cs, C, cmask, g, t1, EVEN)
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
            nxt = load_group(ub, zb, s_un, s_zn, cs, mn, g - 4, t1, EVEN)
            do_nxt = _load_do_group(db, s_dn, cs, C, mn, g - 4, t1, EVEN)
            x = scr_ptr + b * s_xb + (g // 4 - 1) * s_xn + cs
            stash_nxt = _load_stash(x, C, mn, zb + (g - 5) * s_zn + cs, g - 4, gamma)
            m0, m1 = cmask & before(g, t1, EVEN), cmask & before(g + 1, t1, EVEN)
            m2, m3 = cmask & before(g + 2, t1, EVEN), cmask & before(g + 3, t1, EVEN)
            row0, carry = _fwd_row(rows[0], do_rows[0], gamma, cos_f, sin_f, cos_r, sin_r, m0, stash)
            row1, carry = _fwd_row(rows[1], do_rows[1], gamma, cos_f, sin_f, cos_r, sin_r, m1, carry)
            row2, carry = _fwd_row(rows[2], do_rows[2], gamma, cos_f, sin_f, cos_r, sin_r, m2, carry)
            row3, carry = _fwd_row(rows[3], do_rows[3], gamma, cos_f, sin_f, cos_r, sin_r, m3, carry)
            st = (hr_re, hr_im, dhf_re, dhf_im, lam_next, dgam, dthf, dthr)
            st, d3 = _grad_row(st, row3, g + 3, t1, cmask, gamma, cos_f, sin_f, cos_r, sin_r, EVEN)
            st, d2 = _grad_row(st, row2, g + 2, t1, cmask, gamma, cos_f, sin_f, cos_r, sin_r, EVEN)
            st, d1 = _grad_row(st, row1, g + 1, t1, cmask, gamma, cos_f, sin_f, cos_r, sin_r, EVEN)
            st, d0 = _grad_row(st, row0, g, t1, cmask, gamma, cos_f, sin_f, cos_r, sin_r, EVEN)
            hr_re, hr_im, dhf_re, dhf_im, lam_next, dgam, dthf, dthr = st
            # the group's rows stored one by one after its math (no tile: no layout change through shared memory)
            sums = (sum_dz, sum_du_re, sum_du_im)
            sums = _store_grads(dzb + g * s_hn, dub + g * s_gn, m0, d0, sums)
            sums = _store_grads(dzb + (g + 1) * s_hn, dub + (g + 1) * s_gn, m1, d1, sums)
            sums = _store_grads(dzb + (g + 2) * s_hn, dub + (g + 2) * s_gn, m2, d2, sums)
            sums = _store_grads(dzb + (g + 3) * s_hn, dub + (g + 3) * s_gn, m3, d3, sums)
            sum_dz, sum_du_re, sum_du_im = sums
            rows, do_rows, stash = nxt, do_nxt, stash_nxt
        pp = part_ptr + b * s_pb + k * s_pk + cs
        sums = (dgam, dthf, dthr, sum_dz, sum_du_re, sum_du_im)
        for i in tl.static_range(6):
            tl.store(pp + i * s_ps, sums[i], mask=cmask)


def bihgru_bwd(dout: torch.Tensor, u: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor,
               theta_r: torch.Tensor, dx: Optional[torch.Tensor] = None):
    """Backward of the fused kernels: grads of u, z, gamma, theta_f, theta_r, then the sums of the grads of z, Re u
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
    cfg = BWD_CONFIGS[u.element_size()]
    n_cblocks, n_chunks, chunk_len = chunks(B, N, C, u.device, cfg)
    part = torch.empty(B, n_chunks, 6, C, device=u.device, dtype=torch.float32)
    summ = torch.empty(B, n_chunks, 16, C, device=u.device, dtype=torch.float32) if n_chunks > 1 else part
    stash = torch.empty(B, triton.cdiv(N, GROUP), 4 * C, device=u.device, dtype=torch.float32)
    grid = (n_cblocks, B, n_chunks)
    up = as_pairs(u)
    args = (up, z, gamma, theta_f, theta_r, dout, du_arg, dz_arg, part, summ, stash, N, C, n_chunks, chunk_len,
            up.stride(0), up.stride(1), z.stride(0), z.stride(1), dout.stride(0), dout.stride(1),
            du.stride(0), du.stride(1), dz.stride(0), dz.stride(1), *sum_strides(summ, n_chunks),
            *part.stride()[:3], stash.stride(0), stash.stride(1))
    meta = dict(BLOCK_C=cfg.block_c, UNROLL=GROUP, num_warps=cfg.num_warps, maxnreg=cfg.max_registers,
                DZ_IN_DU=dx is not None, EVEN=even(N, C, cfg.block_c))
    if n_chunks > 1:
        wrap_triton(bihgru_bwd_kernel)[grid](*args, SUMMARY=True, **meta)
    wrap_triton(bihgru_bwd_kernel)[grid](*args, SUMMARY=False, **meta)
    sums = part.sum(dim=(0, 1))  # one reduction; copies so that the op's outputs do not alias
    dgamma, dtf, dtr = sums[:3].unbind(0)
    return du, dz, dgamma.to(gamma.dtype, copy=True), dtf.to(theta_f.dtype, copy=True), \
        dtr.to(theta_r.dtype, copy=True), sums[3:]

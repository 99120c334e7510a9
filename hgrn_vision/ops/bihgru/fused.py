"""Fused Triton kernels of the bidirectional HGRU scan, forward and backward.

Layout of the work: a program owns `BLOCK_C` channels of one batch row and a chunk of `BLOCK_T` consecutive tokens
held in registers. Within the chunk each direction is one `tl.associative_scan` over complex affine maps
`h -> a h + v` (their composition is `(a2 a1, a2 b1 + b2)`), so every token of the chunk is processed in parallel.

* One chunk covers the whole sequence (N <= BLOCK_T): both directions run on the tile in registers, and the kernel
  reads `u` and `z` once and writes `[Re h | Im h]` once: the byte floor.
* Longer sequences are split into chunks processed by separate programs (a two-level scan, so long sequences fill
  the GPU too): a first kernel writes each chunk's summary (the product of its gates and its local scan from a zero
  state, per direction); the main kernel folds the summaries of the chunks before (forward) and after (reverse) it
  into its carries and applies them to its local scans.

Backward recomputes the states instead of saving them. With `G = dL/dRe + i dL/dIm` of a complex value:
    df_t = g_t + conj(af_{t+1}) df_{t+1}          (adjoint of the forward state, a reverse scan)
    dr_t = g_t + conj(ar_{t-1}) dr_{t-1}          (adjoint of the reverse state, a forward scan)
    dv_t = df_t + dr_t,   d af_t = df_t conj(hf_{t-1}),   d ar_t = dr_t conj(hr_{t+1})
The shifted gates and the exclusive states hf_{t-1}, hr_{t+1} come from loading the neighbouring rows (cache hits),
never from dividing by a gate. Per-channel gradients (gamma, theta_f, theta_r) are fp32 partials per program,
reduced once afterwards. All state and accumulation is fp32 whatever the input dtype.
"""
import os
from typing import Tuple

import torch
import triton
import triton.language as tl

# chunk length cap, channel tile and warps, forward and backward: the fastest of a sweep on an H200
# (scripts/gpu_scan_tune.py); the backward keeps ~3x more tiles live, so it takes shorter chunks
FWD_MAX_T, FWD_BLOCK_C, FWD_WARPS = 256, 8, 8
BWD_MAX_T, BWD_BLOCK_C, BWD_WARPS = 32, 8, 4


@triton.jit
def _compose(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
    """Apply `h -> a1 h + b1`, then `h -> a2 h + b2` (complex): returns `(a2 a1, a2 b1 + b2)`."""
    return (
        ar2 * ar1 - ai2 * ai1,
        ar2 * ai1 + ai2 * ar1,
        ar2 * br1 - ai2 * bi1 + br2,
        ar2 * bi1 + ai2 * br1 + bi2,
    )


@triton.jit
def _lam(z_ptr, rows, cs, mask, s_zn, s_zc, gamma):
    """Load rows of z and return the gate modulus lam (fp32), 0 outside the mask."""
    z = tl.load(z_ptr + rows[:, None] * s_zn + cs[None, :] * s_zc, mask=mask, other=0.).to(tl.float32)
    return tl.where(mask, gamma[None, :] + (1. - gamma[None, :]) * tl.sigmoid(z), 0.)


@triton.jit
def _gates(u_ptr, z_ptr, rows, cs, mask, s_un, s_uc, s_zn, s_zc, gamma):
    """Load rows of u, z and return lam, Re v, Im v (fp32); outside the mask lam = 0 and v = 0."""
    lam = _lam(z_ptr, rows, cs, mask, s_zn, s_zc, gamma)
    ur = tl.load(u_ptr + rows[:, None] * s_un + (2 * cs)[None, :] * s_uc, mask=mask, other=0.).to(tl.float32)
    ui = tl.load(u_ptr + rows[:, None] * s_un + (2 * cs + 1)[None, :] * s_uc, mask=mask, other=0.).to(tl.float32)
    w = 1. - lam
    return lam, w * ur * tl.sigmoid(ur), w * ui * tl.sigmoid(ui)


@triton.jit
def _with_carry(sum_ptr, s_sk, s_ss, cs, cmask, k, n_chunks, SLOT: tl.constexpr, FORWARD: tl.constexpr,
                Ar, Ai, Hr, Hi):
    """Local scan (A = cumulative gate product, H = states from zero) plus A times the state entering chunk k."""
    cr, ci = _fold_carries(sum_ptr, s_sk, s_ss, cs, cmask, k, n_chunks, SLOT, FORWARD)
    return Hr + Ar * cr[None, :] - Ai * ci[None, :], Hi + Ar * ci[None, :] + Ai * cr[None, :]


@triton.jit
def _row(x, rows_local, r: tl.constexpr):
    """Row `r` of a (BLOCK_T, BLOCK_C) register tile."""
    return tl.sum(tl.where(rows_local[:, None] == r, x, 0.), axis=0)


@triton.jit
def _fold_carries(sum_ptr, s_sk, s_ss, cs, cmask, k, n_chunks, SLOT: tl.constexpr, FORWARD: tl.constexpr):
    """State entering chunk k from the summaries (A, b) at slots SLOT..SLOT+3 of the chunks before (or after) it."""
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
        p = sum_ptr + kk * s_sk + cs
        Ar = tl.load(p + (SLOT + 0) * s_ss, mask=cmask, other=0.)
        Ai = tl.load(p + (SLOT + 1) * s_ss, mask=cmask, other=0.)
        br = tl.load(p + (SLOT + 2) * s_ss, mask=cmask, other=0.)
        bi = tl.load(p + (SLOT + 3) * s_ss, mask=cmask, other=0.)
        cr, ci = Ar * cr - Ai * ci + br, Ar * ci + Ai * cr + bi
    return cr, ci


@triton.jit
def _store_summary(sum_ptr, s_ss, cs, cmask, rows_local, SLOT: tl.constexpr, ROW: tl.constexpr, Ar, Ai, Hr, Hi):
    p = sum_ptr + cs
    tl.store(p + (SLOT + 0) * s_ss, _row(Ar, rows_local, ROW), mask=cmask)
    tl.store(p + (SLOT + 1) * s_ss, _row(Ai, rows_local, ROW), mask=cmask)
    tl.store(p + (SLOT + 2) * s_ss, _row(Hr, rows_local, ROW), mask=cmask)
    tl.store(p + (SLOT + 3) * s_ss, _row(Hi, rows_local, ROW), mask=cmask)


@triton.jit
def _scan_pair(lam, vr, vi, valid, cf, sf, cr_, sr_):
    """Local forward and reverse scans of one chunk: (A, H) per direction, identity maps on invalid rows."""
    afr = tl.where(valid, lam * cf[None, :], 1.)
    afi = lam * sf[None, :]
    arr = tl.where(valid, lam * cr_[None, :], 1.)
    ari = lam * sr_[None, :]
    Fr, Fi, HFr, HFi = tl.associative_scan((afr, afi, vr, vi), 0, _compose)
    Rr, Ri, HRr, HRi = tl.associative_scan((arr, ari, vr, vi), 0, _compose, reverse=True)
    return Fr, Fi, HFr, HFi, Rr, Ri, HRr, HRi


@triton.jit
def _tile(gamma_ptr, tf_ptr, tr_ptr, N, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's batch row, chunk, channels, rows and per-channel constants (gamma, cos/sin of the angles)."""
    pid_c, b, k = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    rows_local = tl.arange(0, BLOCK_T)
    rows = k * BLOCK_T + rows_local
    valid = (rows < N)[:, None] & cmask[None, :]
    gamma = tl.load(gamma_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tf = tl.load(tf_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tr = tl.load(tr_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    return b, k, cs, cmask, rows_local, rows, valid, gamma, tl.cos(tf), tl.sin(tf), tl.cos(tr), tl.sin(tr)


@triton.jit
def _bihgru_fwd_kernel(
        u_ptr, z_ptr, gamma_ptr, tf_ptr, tr_ptr, out_ptr, sum_ptr,
        N, C, n_chunks,
        s_ub, s_un, s_uc, s_zb, s_zn, s_zc, s_ob, s_on, s_sb, s_sk, s_ss,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SUMMARY: tl.constexpr, HAS_CARRY: tl.constexpr,
):
    """SUMMARY: write each chunk's (A, b) per direction. Else: scan with carries (if HAS_CARRY) and write out."""
    b, k, cs, cmask, rows_local, rows, valid, gamma, cf, sf, cr_, sr_ = _tile(
        gamma_ptr, tf_ptr, tr_ptr, N, C, BLOCK_T, BLOCK_C)

    lam, vr, vi = _gates(u_ptr + b * s_ub, z_ptr + b * s_zb, rows, cs, valid, s_un, s_uc, s_zn, s_zc, gamma)
    Fr, Fi, HFr, HFi, Rr, Ri, HRr, HRi = _scan_pair(lam, vr, vi, valid, cf, sf, cr_, sr_)

    if SUMMARY:
        sp = sum_ptr + b * s_sb + k * s_sk
        _store_summary(sp, s_ss, cs, cmask, rows_local, 0, BLOCK_T - 1, Fr, Fi, HFr, HFi)
        _store_summary(sp, s_ss, cs, cmask, rows_local, 4, 0, Rr, Ri, HRr, HRi)
    else:
        if HAS_CARRY:
            sp = sum_ptr + b * s_sb
            HFr, HFi = _with_carry(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 0, True, Fr, Fi, HFr, HFi)
            HRr, HRi = _with_carry(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 4, False, Rr, Ri, HRr, HRi)
        o = out_ptr + b * s_ob + rows[:, None] * s_on + cs[None, :]
        tl.store(o, (HFr + HRr).to(out_ptr.dtype.element_ty), mask=valid)
        tl.store(o + C, (HFi + HRi).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _bihgru_bwd_kernel(
        u_ptr, z_ptr, gamma_ptr, tf_ptr, tr_ptr, do_ptr, du_ptr, dz_ptr, part_ptr, sum_ptr,
        N, C, n_chunks,
        s_ub, s_un, s_uc, s_zb, s_zn, s_zc, s_db, s_dn, s_dc, s_gb, s_gn, s_hb, s_hn, s_sb, s_sk, s_ss,
        s_pb, s_pk, s_ps,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SUMMARY: tl.constexpr, HAS_CARRY: tl.constexpr,
):
    """SUMMARY: write each chunk's summaries of the 4 scans. Else: gradients of u, z and per-channel partials."""
    b, k, cs, cmask, rows_local, rows, valid, gamma, cf, sf, cr_, sr_ = _tile(
        gamma_ptr, tf_ptr, tr_ptr, N, C, BLOCK_T, BLOCK_C)
    # neighbours inside the chunk; the chunk's edges link to the carries instead
    prev_ok = (rows_local > 0)[:, None] & valid
    next_ok = ((rows_local < BLOCK_T - 1) & (rows + 1 < N))[:, None] & valid
    ub, zb = u_ptr + b * s_ub, z_ptr + b * s_zb

    # rows t-1: inputs of the exclusive forward state hf_{t-1}, gates of the reverse adjoint
    lam_p, vr_p, vi_p = _gates(ub, zb, rows - 1, cs, prev_ok, s_un, s_uc, s_zn, s_zc, gamma)
    # rows t+1: inputs of the exclusive reverse state hr_{t+1}, gates of the forward adjoint
    lam_n, vr_n, vi_n = _gates(ub, zb, rows + 1, cs, next_ok, s_un, s_uc, s_zn, s_zc, gamma)
    d = do_ptr + b * s_db + rows[:, None] * s_dn + cs[None, :] * s_dc
    gr = tl.load(d, mask=valid, other=0.).to(tl.float32)
    gi = tl.load(d + C * s_dc, mask=valid, other=0.).to(tl.float32)

    # exclusive states: identity maps outside the chunk so that the chunk's first (last) row holds the carry
    Pfr, Pfi, SFr, SFi = tl.associative_scan(
        (tl.where(prev_ok, lam_p * cf[None, :], 1.), lam_p * sf[None, :], vr_p, vi_p), 0, _compose)
    Prr, Pri, SRr, SRi = tl.associative_scan(
        (tl.where(next_ok, lam_n * cr_[None, :], 1.), lam_n * sr_[None, :], vr_n, vi_n), 0, _compose, reverse=True)
    # adjoints: gates conj(a) of the neighbour; on the chunk edge the neighbour is the next chunk's first row
    edge_n = (rows_local == BLOCK_T - 1)[:, None] & (rows + 1 < N)[:, None] & cmask[None, :]
    lam_e = _lam(zb, rows + 1, cs, edge_n, s_zn, s_zc, gamma)
    lam_fn = lam_n + lam_e  # lam_{t+1} wherever t+1 < N
    Dfr, Dfi, DFr, DFi = tl.associative_scan(
        (tl.where(valid, lam_fn * cf[None, :], 1.), -lam_fn * sf[None, :], gr, gi), 0, _compose, reverse=True)
    edge_p = (rows_local == 0)[:, None] & (rows >= 1)[:, None] & valid
    lam_s = _lam(zb, rows - 1, cs, edge_p, s_zn, s_zc, gamma)
    lam_rp = lam_p + lam_s  # lam_{t-1} wherever t >= 1
    Drr, Dri, DRr, DRi = tl.associative_scan(
        (tl.where(valid, lam_rp * cr_[None, :], 1.), -lam_rp * sr_[None, :], gr, gi), 0, _compose)

    if SUMMARY:
        # state summaries as in the forward (the exclusive scans above are shifted by a row, so not these)
        lam, vr, vi = _gates(ub, zb, rows, cs, valid, s_un, s_uc, s_zn, s_zc, gamma)
        Fr, Fi, HFr, HFi, Rr, Ri, HRr, HRi = _scan_pair(lam, vr, vi, valid, cf, sf, cr_, sr_)
        sp = sum_ptr + b * s_sb + k * s_sk
        _store_summary(sp, s_ss, cs, cmask, rows_local, 0, BLOCK_T - 1, Fr, Fi, HFr, HFi)
        _store_summary(sp, s_ss, cs, cmask, rows_local, 4, 0, Rr, Ri, HRr, HRi)
        _store_summary(sp, s_ss, cs, cmask, rows_local, 8, 0, Dfr, Dfi, DFr, DFi)
        _store_summary(sp, s_ss, cs, cmask, rows_local, 12, BLOCK_T - 1, Drr, Dri, DRr, DRi)
    else:
        if HAS_CARRY:
            sp = sum_ptr + b * s_sb
            # hf entering the chunk is hf_{t0-1}: the exclusive scan's first row holds it, all rows carry it
            SFr, SFi = _with_carry(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 0, True, Pfr, Pfi, SFr, SFi)
            SRr, SRi = _with_carry(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 4, False, Prr, Pri, SRr, SRi)
            DFr, DFi = _with_carry(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 8, False, Dfr, Dfi, DFr, DFi)
            DRr, DRi = _with_carry(sp, s_sk, s_ss, cs, cmask, k, n_chunks, 12, True, Drr, Dri, DRr, DRi)

        # this row's own values
        z = tl.load(zb + rows[:, None] * s_zn + cs[None, :] * s_zc, mask=valid, other=0.).to(tl.float32)
        ur = tl.load(ub + rows[:, None] * s_un + (2 * cs)[None, :] * s_uc, mask=valid, other=0.).to(tl.float32)
        ui = tl.load(ub + rows[:, None] * s_un + (2 * cs + 1)[None, :] * s_uc, mask=valid, other=0.).to(tl.float32)
        sig = tl.sigmoid(z)
        lam = gamma[None, :] + (1. - gamma[None, :]) * sig
        sur, sui = tl.sigmoid(ur), tl.sigmoid(ui)
        dvr, dvi = DFr + DRr, DFi + DRi
        # d(a_f) = df conj(hf_{t-1}); q = df conj(e^{i theta} hf_{t-1}) gives dlam (Re) and dtheta / lam (Im)
        hpr, hpi = cf[None, :] * SFr - sf[None, :] * SFi, cf[None, :] * SFi + sf[None, :] * SFr
        qfr, qfi = DFr * hpr + DFi * hpi, DFi * hpr - DFr * hpi
        hnr, hni = cr_[None, :] * SRr - sr_[None, :] * SRi, cr_[None, :] * SRi + sr_[None, :] * SRr
        qrr, qri = DRr * hnr + DRi * hni, DRi * hnr - DRr * hni
        cre, cim = ur * sur, ui * sui
        dlam = qfr + qrr - (dvr * cre + dvi * cim)
        dlam = tl.where(valid, dlam, 0.)
        w = 1. - lam
        dur = w * dvr * sur * (1. + ur * (1. - sur))
        dui = w * dvi * sui * (1. + ui * (1. - sui))
        dz = dlam * (1. - gamma[None, :]) * sig * (1. - sig)
        tl.store(dz_ptr + b * s_hb + rows[:, None] * s_hn + cs[None, :], dz.to(dz_ptr.dtype.element_ty), mask=valid)
        dub = du_ptr + b * s_gb + rows[:, None] * s_gn
        tl.store(dub + (2 * cs)[None, :], dur.to(du_ptr.dtype.element_ty), mask=valid)
        tl.store(dub + (2 * cs + 1)[None, :], dui.to(du_ptr.dtype.element_ty), mask=valid)
        pp = part_ptr + b * s_pb + k * s_pk + cs
        tl.store(pp, tl.sum(dlam * (1. - sig), axis=0), mask=cmask)
        tl.store(pp + s_ps, tl.sum(tl.where(valid, lam * qfi, 0.), axis=0), mask=cmask)
        tl.store(pp + 2 * s_ps, tl.sum(tl.where(valid, lam * qri, 0.), axis=0), mask=cmask)


def _chunking(N: int, max_t: int) -> Tuple[int, int]:
    block_t = min(triton.next_power_of_2(max(N, 1)), max_t)
    return block_t, triton.cdiv(N, block_t)


def bihgru_fwd(u, z, gamma, theta_f, theta_r) -> torch.Tensor:
    """Forward of the fused kernel; returns (B, N, 2C) in the dtype of u."""
    B, N, C = z.shape
    out = torch.empty(B, N, 2 * C, device=u.device, dtype=u.dtype)
    block_t, n_chunks = _chunking(N, FWD_MAX_T)
    grid = (triton.cdiv(C, FWD_BLOCK_C), B, n_chunks)
    summ = torch.empty(B, n_chunks, 8, C, device=u.device, dtype=torch.float32) if n_chunks > 1 else out
    args = (u, z, gamma, theta_f, theta_r, out, summ, N, C, n_chunks,
            *u.stride(), *z.stride(), out.stride(0), out.stride(1), *_sum_strides(summ, n_chunks))
    meta = dict(BLOCK_T=block_t, BLOCK_C=FWD_BLOCK_C, num_warps=FWD_WARPS)
    if n_chunks > 1:
        _bihgru_fwd_kernel[grid](*args, SUMMARY=True, HAS_CARRY=False, **meta)
    _bihgru_fwd_kernel[grid](*args, SUMMARY=False, HAS_CARRY=n_chunks > 1, **meta)
    return out


def bihgru_bwd(dout, u, z, gamma, theta_f, theta_r):
    """Backward of the fused kernel: grads of u, z, gamma, theta_f, theta_r."""
    B, N, C = z.shape
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    block_t, n_chunks = _chunking(N, BWD_MAX_T)
    grid = (triton.cdiv(C, BWD_BLOCK_C), B, n_chunks)
    part = torch.empty(B, n_chunks, 3, C, device=u.device, dtype=torch.float32)
    summ = torch.empty(B, n_chunks, 16, C, device=u.device, dtype=torch.float32) if n_chunks > 1 else part
    args = (u, z, gamma, theta_f, theta_r, dout, du, dz, part, summ, N, C, n_chunks,
            *u.stride(), *z.stride(), *dout.stride(), du.stride(0), du.stride(1), dz.stride(0), dz.stride(1),
            *_sum_strides(summ, n_chunks), *part.stride()[:3])
    meta = dict(BLOCK_T=block_t, BLOCK_C=BWD_BLOCK_C, num_warps=BWD_WARPS)
    if n_chunks > 1:
        _bihgru_bwd_kernel[grid](*args, SUMMARY=True, HAS_CARRY=False, **meta)
    _bihgru_bwd_kernel[grid](*args, SUMMARY=False, HAS_CARRY=n_chunks > 1, **meta)
    dgamma, dtf, dtr = part.sum(dim=(0, 1)).unbind(0)  # one reduction; copies so that the outputs do not alias
    return du, dz, dgamma.to(gamma.dtype, copy=True), dtf.to(theta_f.dtype, copy=True), \
        dtr.to(theta_r.dtype, copy=True)


def _sum_strides(summ: torch.Tensor, n_chunks: int) -> Tuple[int, int, int]:
    return (summ.stride(0), summ.stride(1), summ.stride(2)) if n_chunks > 1 else (0, 0, 0)


# ---- the op: registered with torch.library so torch.compile traces through it, forward and backward ----

@torch.library.custom_op('hgrn_vision::bihgru_scan_fwd', mutates_args=())
def _fwd_op(u: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor,
            theta_r: torch.Tensor) -> torch.Tensor:
    return bihgru_fwd(u, z, gamma, theta_f, theta_r)


@_fwd_op.register_fake
def _(u, z, gamma, theta_f, theta_r):
    return u.new_empty(u.shape)


@torch.library.custom_op('hgrn_vision::bihgru_scan_bwd', mutates_args=())
def _bwd_op(dout: torch.Tensor, u: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor,
            theta_r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return bihgru_bwd(dout, u, z, gamma, theta_f, theta_r)


@_bwd_op.register_fake
def _(dout, u, z, gamma, theta_f, theta_r):
    return u.new_empty(u.shape), z.new_empty(z.shape), torch.empty_like(gamma), torch.empty_like(theta_f), \
        torch.empty_like(theta_r)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    return _bwd_op(dout, *ctx.saved_tensors)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def bihgru_scan_triton(u, z, gamma, theta_f, theta_r) -> torch.Tensor:
    """The fused Triton op (see `hgrn_vision.ops.bihgru_scan` for the math); CUDA tensors, or any with
    TRITON_INTERPRET=1 set before import."""
    if not u.is_cuda and os.environ.get('TRITON_INTERPRET', '0') != '1':
        raise ValueError(
            f"impl='triton' needs CUDA tensors, got tensors on {u.device}; use impl='torch' (or None) there, or "
            f'set TRITON_INTERPRET=1 before importing hgrn_vision to run the kernel in the Triton interpreter.')
    return _fwd_op(u, z, gamma, theta_f, theta_r)

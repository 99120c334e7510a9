"""The HGRU mixer between its two projections as one op: `y = LayerNorm(bihgru_scan(u, z)) * silu(g)` for the
input projection's whole output `x = [u | z | g]` (B, N, 5C).

Why one op: the mixer's backward must hand `in_proj` one (B, N, 5C) gradient `[du | dz | dg]`. With the scan as its
own op, du and dz come out as separate tensors and torch.compile's graph copies them next to dg into a new buffer
(with the LayerNorm recomputed for dg beside it: 3.3 ms of a 43 ms training step at 224, docs/PERF.md). Here the
backward allocates that buffer once; a row kernel writes dg into its last 2C columns while computing the LayerNorm
backward, and the scan's backward kernel writes du and dz into the first 3C. Both kernels also sum what they write
over the tokens, which is the gradient of in_proj's bias: the mixer adds that bias detached in in_proj and passes it
here as `in_bias`, so that its gradient comes from these sums instead of another pass over the (B, N, 5C) gradient.

Row kernels: a program takes ROWS tokens x all 2C channels (the LayerNorm needs a whole token), in fp32, loads first.
The forward reads h and g, writes y; the backward reads dy, h and g, recomputes the token's mean and rstd from h (no
stats kept), writes dh and dg, and sums the LayerNorm's weight and bias gradients over its tokens (fp32 partials per
program, one reduction afterwards). The op keeps h for the backward (2C per token, as the separate ops did).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fused import (
    MIN_CHUNK,
    _channels,
    _compose,
    _fold_carries,
    _num_sms,
    _sigmoid,
    _store_map,
    bihgru_bwd,
    bihgru_fwd,
    check_triton_device,
)

# (tokens per program tile, warps) of the forward, and (tokens per tile, warps, programs per SM) of the backward, whose
# programs loop over tiles summing the weight and bias gradients of their tokens. H100, bf16, 2C = 768
# (`scripts/gpu_scan_tune.py normgate_tune`, run27/run28): forward 109 us at (256, 256, 384), 92% of the copy
# bandwidth over h, g, y (inductor's LayerNorm + gate 106 us); backward 255 us, 66% over dy, h, g, dh, dg. The
# backward at (2, 4) takes 255 registers without spilling (ptxas, sm_90a); larger tiles per warp spill (4 x 4 warps:
# 764 bytes, 8 x 4: 11 KB) and ran 1.3x to 20x slower.
FWD_CFG = (1, 2)
BWD_CFG = (2, 4, 8)


@triton.jit
def _normalize(h, m, D, eps):
    """Rows of the (ROWS, BLOCK_D) tile h (masked by m) normalized over their D channels, and the rows' rstd."""
    mean = tl.sum(h, axis=1) / D
    hc = tl.where(m, h - mean[:, None], 0.)
    rstd = 1. / tl.sqrt(tl.sum(hc * hc, axis=1) / D + eps)
    return hc * rstd[:, None], rstd


@triton.jit
def _tile(rows, M, N, D, s_b, s_n, BLOCK_D: tl.constexpr):
    """Offsets of a (ROWS, BLOCK_D) tile of tokens `rows` (b * N + n) in a (B, N, .) tensor of strides s_b, s_n, and
    its mask."""
    cols = tl.arange(0, BLOCK_D)
    r = rows.to(tl.int64)
    off = ((r // N) * s_b + (r % N) * s_n)[:, None] + cols[None, :]
    return off, (rows < M)[:, None] & (cols < D)[None, :]


@triton.jit
def _norm_gate_fwd_kernel(h_ptr, x_ptr, w_ptr, b_ptr, y_ptr, M, N, D, s_hb, s_hn, s_xb, s_xn, g_off, eps,
                          BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    oh, m = _tile(rows, M, N, D, s_hb, s_hn, BLOCK_D)
    ox, _ = _tile(rows, M, N, D, s_xb, s_xn, BLOCK_D)
    cols = tl.arange(0, BLOCK_D)
    h = tl.load(h_ptr + oh, mask=m, other=0.).to(tl.float32)
    g = tl.load(x_ptr + g_off + ox, mask=m, other=0.).to(tl.float32)  # all loads before the reductions' barriers
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < D, other=0.).to(tl.float32)
    xhat, _ = _normalize(h, m, D, eps)
    y = (xhat * w[None, :] + b[None, :]) * g * _sigmoid(g)
    tl.store(y_ptr + oh, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _load_bwd_tile(dy_ptr, h_ptr, x_ptr, tile, M, N, D, s_hb, s_hn, s_xb, s_xn, s_dyb, s_dyn, g_off,
                   BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """A backward tile's h, g and dy in fp32 (zeros past M and D)."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    oh, m = _tile(rows, M, N, D, s_hb, s_hn, BLOCK_D)
    ox, _ = _tile(rows, M, N, D, s_xb, s_xn, BLOCK_D)
    ody, _ = _tile(rows, M, N, D, s_dyb, s_dyn, BLOCK_D)
    return (tl.load(h_ptr + oh, mask=m, other=0.).to(tl.float32),
            tl.load(x_ptr + g_off + ox, mask=m, other=0.).to(tl.float32),
            tl.load(dy_ptr + ody, mask=m, other=0.).to(tl.float32))


@triton.jit
def _norm_gate_bwd_kernel(dy_ptr, h_ptr, x_ptr, w_ptr, b_ptr, dh_ptr, dx_ptr, part_ptr, M, N, D, s_hb, s_hn, s_xb,
                          s_xn, s_dyb, s_dyn, s_dxb, s_dxn, g_off, eps, n_tiles, BLOCK_D: tl.constexpr,
                          ROWS: tl.constexpr):
    """Tiles pid, pid + programs, ...; the next tile's loads are issued before this tile's reductions. Sums the
    weight and bias gradients and dg over the program's tokens."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < D, other=0.).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    dgs = tl.zeros([BLOCK_D], dtype=tl.float32)
    h, g, dy = _load_bwd_tile(dy_ptr, h_ptr, x_ptr, pid, M, N, D, s_hb, s_hn, s_xb, s_xn, s_dyb, s_dyn, g_off,
                              BLOCK_D, ROWS)
    for tile in range(pid, n_tiles, step):
        nxt = _load_bwd_tile(dy_ptr, h_ptr, x_ptr, tile + step, M, N, D, s_hb, s_hn, s_xb, s_xn, s_dyb, s_dyn,
                             g_off, BLOCK_D, ROWS)
        rows = tile * ROWS + tl.arange(0, ROWS)
        oh, m = _tile(rows, M, N, D, s_hb, s_hn, BLOCK_D)
        odx, _ = _tile(rows, M, N, D, s_dxb, s_dxn, BLOCK_D)
        xhat, rstd = _normalize(h, m, D, eps)
        sg = _sigmoid(g)
        dn = dy * g * sg  # gradient of the normalized, scaled and shifted h
        dg = dy * (xhat * w[None, :] + b[None, :]) * sg * (1. + g * (1. - sg))
        dw += tl.sum(dn * xhat, axis=0)  # rows are a thread's own registers: no exchange between threads
        db += tl.sum(dn, axis=0)
        dgs += tl.sum(dg, axis=0)
        dxhat = dn * w[None, :]
        c1, c2 = tl.reduce((dxhat * xhat, dxhat), 1, _add2)
        dh = (dxhat - xhat * (c1 / D)[:, None] - (c2 / D)[:, None]) * rstd[:, None]
        tl.store(dh_ptr + oh, dh.to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(dx_ptr + g_off + odx, dg.to(dx_ptr.dtype.element_ty), mask=m)
        h, g, dy = nxt
    tl.store(part_ptr + pid * 3 * D + cols, dw, mask=cols < D)
    tl.store(part_ptr + pid * 3 * D + D + cols, db, mask=cols < D)
    tl.store(part_ptr + pid * 3 * D + 2 * D + cols, dgs, mask=cols < D)


def norm_gate_fwd(h, x, weight, bias, eps):
    """`LayerNorm(h) * silu(g)` of h (B, N, 2C) and g = x[..., 3C:] (x (B, N, 5C)), in the dtype of h."""
    B, N, D = h.shape
    y = torch.empty_like(h)
    rows, warps = FWD_CFG
    _norm_gate_fwd_kernel[(triton.cdiv(B * N, rows),)](
        h, x, weight, bias, y, B * N, N, D, h.stride(0), h.stride(1), x.stride(0), x.stride(1), x.shape[-1] - D,
        eps, BLOCK_D=triton.next_power_of_2(D), ROWS=rows, num_warps=warps)
    return y


def norm_gate_bwd(dy, h, x, weight, bias, eps, dx):
    """Backward of `norm_gate_fwd`: writes dg into dx[..., 3C:], returns dh, the weight and bias gradients and the
    sum of dg over batch and tokens (fp32)."""
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    B, N, D = h.shape
    dh = torch.empty_like(h)
    rows, warps, programs_per_sm = BWD_CFG
    n_tiles = triton.cdiv(B * N, rows)
    grid = min(n_tiles, programs_per_sm * _num_sms(h.device))
    part = torch.empty(grid, 3, D, device=h.device, dtype=torch.float32)
    _norm_gate_bwd_kernel[(grid,)](
        dy, h, x, weight, bias, dh, dx, part, B * N, N, D, h.stride(0), h.stride(1), x.stride(0), x.stride(1),
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), x.shape[-1] - D, eps, n_tiles,
        BLOCK_D=triton.next_power_of_2(D), ROWS=rows, num_warps=warps)
    dw, db, dgs = part.sum(0).unbind(0)
    return dh, dw.to(weight.dtype, copy=True), db.to(bias.dtype, copy=True), dgs


# ---- the inference forward: the whole mixer in one kernel, h never written ----

# (tokens per group, warps per 512 channels, programs per SM): a program owns all channels of one batch row (a chunk
# of it when B alone cannot fill the GPU), one thread per channel, and groups of MIXER_ROWS tokens as tiles.
MIXER_CFG = (4, 16, 1, 3)


@triton.jit
def _mixer_group(xb, s_xn, g, t1, cs, cmask, C, gamma, GATE: tl.constexpr, ROWS: tl.constexpr):
    """Gates of the group of ROWS tokens from g: lam (0 on masked rows and channels), Re v, Im v, and the gate g of
    the output (Re, Im halves) when GATE, else zeros."""
    ts = g + tl.arange(0, ROWS)
    mt = (ts < t1)[:, None] & cmask[None, :]
    cl = tl.where(cmask, cs, 0)[None, :]  # not provably contiguous: no vectorised loads, one column per thread
    p = xb + ts.to(tl.int64)[:, None] * s_xn + cl
    z = tl.load(p + 2 * C, mask=mt, other=0.).to(tl.float32)
    ur = tl.load(p + cl, mask=mt, other=0.).to(tl.float32)
    ui = tl.load(p + cl + 1, mask=mt, other=0.).to(tl.float32)
    if GATE:
        gr = tl.load(p + 3 * C, mask=mt, other=0.).to(tl.float32)
        gi = tl.load(p + 4 * C, mask=mt, other=0.).to(tl.float32)
    else:
        gr = tl.zeros(z.shape, tl.float32)
        gi = gr
    lam = tl.where(mt, gamma[None, :] + (1. - gamma[None, :]) * _sigmoid(z), 0.)
    w = 1. - lam
    return mt, lam, w * ur * _sigmoid(ur), w * ui * _sigmoid(ui), gr, gi


@triton.jit
def _last_row(x, ROWS: tl.constexpr):
    """Row ROWS - 1 of a (ROWS, BLOCK_C) tile (a thread holds a column: no exchange)."""
    return tl.sum(tl.where(tl.arange(0, ROWS)[:, None] == ROWS - 1, x, 0.), 0)


@triton.jit
def _first_row(x, ROWS: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, ROWS)[:, None] == 0, x, 0.), 0)


@triton.jit
def _group_maps(mt, lam, vr, vi, cos, sin, REVERSE: tl.constexpr):
    """Per row, the map of the group's rows up to it (REVERSE: from it to the group's end) of one recurrence
    h <- lam e^{i theta} h + v: (A, B) tiles, h_row = A h_entering + B."""
    ar = tl.where(mt, lam * cos[None, :], 1.)
    ai = lam * sin[None, :]
    return tl.associative_scan((ar, ai, vr, vi), 0, _compose, reverse=REVERSE)


@triton.jit
def _apply(Ar, Ai, Br, Bi, hr, hi):
    """A h + B for tiles A, B and a carried state h (one per channel)."""
    return Ar * hr[None, :] - Ai * hi[None, :] + Br, Ar * hi[None, :] + Ai * hr[None, :] + Bi


@triton.jit
def _mixer_fwd_kernel(
        x_ptr, gamma_ptr, tf_ptr, tr_ptr, w_ptr, b_ptr, y_ptr, sum_ptr, scr_ptr,
        N, C, n_chunks, chunk_len, eps,
        s_xb, s_xn, s_yb, s_yn, s_sb, s_sk, s_ss, s_kb, s_kn,
        BLOCK_C: tl.constexpr, ROWS: tl.constexpr, SUMMARY: tl.constexpr, STAGES: tl.constexpr,
):
    """y = LayerNorm(hf + hr) * silu(g) for one chunk of one batch row, all channels. A forward sweep over the
    chunk's groups runs hf and stashes the state entering each group (2 fp32 per channel); a reverse sweep re-reads
    each group with its gate, rebuilds hf from the stash, runs hr, normalizes each token over its 2C channels and
    writes y. SUMMARY: write the chunk's maps of both recurrences (as `_bihgru_fwd_kernel` does) instead."""
    b, k = tl.program_id(1).to(tl.int64), tl.program_id(2)
    cs, cmask, gamma, cf, sf, cr_, sr_ = _channels(gamma_ptr, tf_ptr, tr_ptr, C, BLOCK_C)
    xb = x_ptr + b * s_xb
    t0 = k * chunk_len
    t1 = tl.minimum(t0 + chunk_len, N)
    zero = tl.zeros([BLOCK_C], tl.float32)
    if SUMMARY:
        Afr, Afi, Bfr, Bfi = zero + 1., zero, zero, zero
        Arr, Ari, Brr, Bri = zero + 1., zero, zero, zero
        for g in tl.range(t0, t1, ROWS, num_stages=STAGES):
            mt, lam, vr, vi, _, _ = _mixer_group(xb, s_xn, g, t1, cs, cmask, C, gamma, False, ROWS)
            Fr, Fi, Gr, Gi = _group_maps(mt, lam, vr, vi, cf, sf, False)
            Afr, Afi, Bfr, Bfi = _compose(Afr, Afi, Bfr, Bfi, _last_row(Fr, ROWS), _last_row(Fi, ROWS),
                                          _last_row(Gr, ROWS), _last_row(Gi, ROWS))
            Rr, Ri, Sr, Si = _group_maps(mt, lam, vr, vi, cr_, sr_, True)
            Arr, Ari, Brr, Bri = _compose(_first_row(Rr, ROWS), _first_row(Ri, ROWS), _first_row(Sr, ROWS),
                                          _first_row(Si, ROWS), Arr, Ari, Brr, Bri)
        p = sum_ptr + b * s_sb + k * s_sk + cs
        _store_map(p, s_ss, 0, cmask, Afr, Afi, Bfr, Bfi)
        _store_map(p, s_ss, 4, cmask, Arr, Ari, Brr, Bri)
    else:
        hr_, hi_ = _fold_carries(sum_ptr + b * s_sb, s_sk, s_ss, cs, cmask, k, n_chunks, 0, True)
        for g in tl.range(t0, t1, ROWS, num_stages=STAGES):
            x = scr_ptr + b * s_kb + (g // ROWS) * s_kn + cs
            tl.store(x, hr_, mask=cmask)
            tl.store(x + C, hi_, mask=cmask)
            mt, lam, vr, vi, _, _ = _mixer_group(xb, s_xn, g, t1, cs, cmask, C, gamma, False, ROWS)
            Fr, Fi, Gr, Gi = _group_maps(mt, lam, vr, vi, cf, sf, False)
            tr, ti = _apply(Fr, Fi, Gr, Gi, hr_, hi_)
            hr_, hi_ = _last_row(tr, ROWS), _last_row(ti, ROWS)
        tl.debug_barrier()  # the reverse sweep reads the stash just written: order those stores before its loads
        wr = tl.load(w_ptr + cs, mask=cmask, other=0.).to(tl.float32)[None, :]
        wi = tl.load(w_ptr + C + cs, mask=cmask, other=0.).to(tl.float32)[None, :]
        br = tl.load(b_ptr + cs, mask=cmask, other=0.).to(tl.float32)[None, :]
        bi = tl.load(b_ptr + C + cs, mask=cmask, other=0.).to(tl.float32)[None, :]
        qr, qi = _fold_carries(sum_ptr + b * s_sb, s_sk, s_ss, cs, cmask, k, n_chunks, 4, False)
        n_groups = tl.cdiv(t1 - t0, ROWS)
        for j in tl.range(0, n_groups, num_stages=STAGES):
            g = t0 + (n_groups - 1 - j) * ROWS
            x = scr_ptr + b * s_kb + (g // ROWS) * s_kn + cs
            fr, fi = tl.load(x, mask=cmask, other=0.), tl.load(x + C, mask=cmask, other=0.)
            mt, lam, vr, vi, gr, gi = _mixer_group(xb, s_xn, g, t1, cs, cmask, C, gamma, True, ROWS)
            Fr, Fi, Gr, Gi = _group_maps(mt, lam, vr, vi, cf, sf, False)
            hfr, hfi = _apply(Fr, Fi, Gr, Gi, fr, fi)
            Rr, Ri, Sr, Si = _group_maps(mt, lam, vr, vi, cr_, sr_, True)
            hrr, hri = _apply(Rr, Ri, Sr, Si, qr, qi)
            qr, qi = _first_row(hrr, ROWS), _first_row(hri, ROWS)
            hre, him = hfr + hrr, hfi + hri
            mean = tl.sum(hre + him, 1) / (2 * C)
            dre = tl.where(mt, hre - mean[:, None], 0.)
            dim = tl.where(mt, him - mean[:, None], 0.)
            rstd = 1. / tl.sqrt(tl.sum(dre * dre + dim * dim, 1) / (2 * C) + eps)
            yr = (dre * rstd[:, None] * wr + br) * gr * _sigmoid(gr)
            yi = (dim * rstd[:, None] * wi + bi) * gi * _sigmoid(gi)
            ts = g + tl.arange(0, ROWS)
            o = y_ptr + b * s_yb + ts.to(tl.int64)[:, None] * s_yn + tl.where(cmask, cs, 0)[None, :]
            tl.store(o, yr.to(y_ptr.dtype.element_ty), mask=mt)
            tl.store(o + C, yi.to(y_ptr.dtype.element_ty), mask=mt)


def _mixer_chunks(B: int, N: int, device: torch.device) -> Tuple[int, int]:
    """Chunks per batch row and their length (whole groups): split the rows only when B programs cannot fill the
    GPU, into enough chunks for twice its programs, none shorter than MIN_CHUNK."""
    rows, _, programs_per_sm, _ = MIXER_CFG
    target = programs_per_sm * _num_sms(device)
    n_chunks = 1 if B >= target else max(1, min(triton.cdiv(2 * target, B), N // MIN_CHUNK))
    chunk_len = triton.cdiv(triton.cdiv(N, n_chunks), rows) * rows
    return triton.cdiv(N, chunk_len), chunk_len


def mixer_fwd(x, gamma, theta_f, theta_r, weight, bias, eps, chunks: Optional[Tuple[int, int]] = None):
    """`LayerNorm(bihgru_scan(u, z)) * silu(g)` of x = [u | z | g] (B, N, 5C) by one kernel (and a summary pass when
    rows are split into chunks); `chunks` = (n_chunks, chunk_len) overrides the split (tests)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    B, N, C5 = x.shape
    C = C5 // 5
    rows, warps, _, stages = MIXER_CFG
    n_chunks, chunk_len = chunks or _mixer_chunks(B, N, x.device)
    y = torch.empty(B, N, 2 * C, device=x.device, dtype=x.dtype)
    summ = torch.empty(B, n_chunks, 8, C, device=x.device, dtype=torch.float32) if n_chunks > 1 else y
    stash = torch.empty(B, triton.cdiv(N, rows), 2 * C, device=x.device, dtype=torch.float32)
    block_c = triton.next_power_of_2(C)
    s_sum = (summ.stride(0), summ.stride(1), summ.stride(2)) if n_chunks > 1 else (0, 0, 0)
    args = (x, gamma, theta_f, theta_r, weight, bias, y, summ, stash, N, C, n_chunks, chunk_len, eps,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), *s_sum, stash.stride(0), stash.stride(1))
    meta = dict(BLOCK_C=block_c, ROWS=rows, STAGES=stages, num_warps=max(1, min(32, warps * block_c // 512)))
    grid = (1, B, n_chunks)
    if n_chunks > 1:
        _mixer_fwd_kernel[grid](*args, SUMMARY=True, **meta)
    _mixer_fwd_kernel[grid](*args, SUMMARY=False, **meta)
    return y


# ---- the op: registered with torch.library so torch.compile traces through it, forward and backward ----

@torch.library.custom_op('hgrn_vision::bihgru_norm_gate_fwd', mutates_args=())
def _fwd_op(x: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor, theta_r: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor, eps: float, in_bias: Optional[torch.Tensor]
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, h): the mixer's output and the scan's, which the backward needs. `in_bias` is only differentiated."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    C = x.shape[-1] // 5
    h = bihgru_fwd(x[..., :2 * C], x[..., 2 * C:3 * C], gamma, theta_f, theta_r)
    return norm_gate_fwd(h, x, weight, bias, eps), h


@_fwd_op.register_fake
def _(x, gamma, theta_f, theta_r, weight, bias, eps, in_bias):
    shape = (*x.shape[:-1], x.shape[-1] // 5 * 2)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op('hgrn_vision::bihgru_norm_gate_bwd', mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor,
            theta_r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grads of x (one (B, N, 5C) buffer: dg from the row kernel, du and dz from the scan's), gamma, theta_f,
    theta_r, weight and bias, and x's gradient summed over batch and tokens (fp32 (5C,), from the kernels' sums)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    C = x.shape[-1] // 5
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dh, dw, db, dgs = norm_gate_bwd(dy, h, x, weight, bias, eps, dx)
    _, _, dgamma, dtf, dtr, sums = bihgru_bwd(dh, x[..., :2 * C], x[..., 2 * C:3 * C], gamma, theta_f, theta_r,
                                              du=dx[..., :2 * C], dz=dx[..., 2 * C:3 * C])
    dx_sum = torch.cat([sums[1:].t().flatten(), sums[0], dgs])  # sums rows: z, Re u, Im u; u is (re, im) pairs
    return dx, dgamma, dtf, dtr, dw, db, dx_sum


@_bwd_op.register_fake
def _(dy, x, h, gamma, theta_f, theta_r, weight, bias, eps):
    return (torch.empty_like(x), torch.empty_like(gamma), torch.empty_like(theta_f), torch.empty_like(theta_r),
            torch.empty_like(weight), torch.empty_like(bias), x.new_empty(x.shape[-1], dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, gamma, theta_f, theta_r, weight, bias, eps, in_bias = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, output[1], gamma, theta_f, theta_r, weight, bias)
    ctx.eps = eps
    ctx.in_bias_dtype = None if in_bias is None else in_bias.dtype


def _backward(ctx, dy, _):
    x, h, gamma, theta_f, theta_r, weight, bias = ctx.saved_tensors
    *grads, dx_sum = _bwd_op(dy, x, h, gamma, theta_f, theta_r, weight, bias, ctx.eps)
    return *grads, None, None if ctx.in_bias_dtype is None else dx_sum.to(ctx.in_bias_dtype)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op('hgrn_vision::bihgru_mixer_infer', mutates_args=())
def _infer_op(x: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor, theta_r: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """y alone, by the one-kernel forward: for calls that need no gradient."""
    return mixer_fwd(x, gamma, theta_f, theta_r, weight, bias, eps)


@_infer_op.register_fake
def _(x, gamma, theta_f, theta_r, weight, bias, eps):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 5 * 2))


def bihgru_scan_norm_gate_triton(x, gamma, theta_f, theta_r, weight, bias, eps, in_bias=None) -> torch.Tensor:
    """The fused op (see `hgrn_vision.ops.bihgru_scan_norm_gate`): the one-kernel forward when no gradient is
    needed, else the scan and row kernels whose forward keeps h for the backward."""
    check_triton_device(x)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (x, gamma, theta_f, theta_r, weight, bias, in_bias))):
        return _infer_op(x, gamma, theta_f, theta_r, weight, bias, eps)
    return _fwd_op(x, gamma, theta_f, theta_r, weight, bias, eps, in_bias)[0]

"""The HGRU mixer between its two projections as one op: `y = LayerNorm(bihgru_scan(u, z)) * silu(g)` for the
input projection's whole output `x = [u | z | g]` (B, N, 5C).

Why one op: the mixer's backward must hand `in_proj` one (B, N, 5C) gradient `[du | dz | dg]`. With the scan as its
own op, du and dz come out as separate tensors and torch.compile's graph copies them next to dg into a new buffer
(with the LayerNorm recomputed for dg beside it: 3.3 ms of a 43 ms training step at 224, docs/performance.md). Here the
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

from .fused import _compose, _gates, _load_row, _num_sms, _sigmoid, bihgru_bwd, check_triton_device

# (tokens per tile, warps, programs per SM) of the backward row kernel, whose programs loop over tiles summing the
# weight and bias gradients of their tokens; it takes at least a warp per BWD_CHANNELS_PER_WARP channels (2C = 1536,
# the base model: 4 warps, untuned). H200 (run42): (2, 2, 16) takes 133 us at (256, 256, 192) where (2, 4, 8) took 520
# (3.9x), and 218 against 243 us at (256, 256, 384); on the H100 (2, 4, 8) had won at 2C = 768 (255 registers, no
# spills); larger tiles per warp spill and ran 1.3x to 20x slower.
BWD_CFG = (2, 2, 16)
BWD_CHANNELS_PER_WARP = 512


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


# Chunked forward (tokens per chunk, elements per thread of a (T, C) tile): a program holds T tokens x all C complex
# channels. Untuned first guess; see `scripts/gpu_scan_tune.py chunked`.
CHUNK_CFG = (16, 16)
CARRY_BLOCK_C = 128


@triton.jit
def _chunk_maps(x_ptr, gamma_ptr, tf_ptr, tr_ptr, b, k, N, C, s_xb, s_xn, T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chunk k (tokens kT .. kT + T - 1) of batch row b as per-token maps of both recurrences, scanned within the
    chunk from a zero state: the inclusive forward maps, then the inclusive reverse maps, each A re, A im, B re, B im
    as (T, BLOCK_C) tiles, so that hf_t = A_t hf_in + B_t for the state hf_in entering the chunk (hr likewise from the
    right). Rows past N and channels past C are identity maps. Also returns the token rows, the channels, the mask
    and lam."""
    t = k * T + tl.arange(0, T)[:, None]
    cs = tl.arange(0, BLOCK_C)[None, :]
    cmask = cs < C
    m = (t < N) & cmask
    gamma = tl.load(gamma_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tf = tl.load(tf_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tr = tl.load(tr_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    xb = x_ptr + b * s_xb + t * s_xn
    lam, vr, vi = _gates(_load_row(xb, xb + 2 * C, cs, m), m, gamma)
    afr, afi, bfr, bfi = tl.associative_scan(
        (tl.where(m, lam * tl.cos(tf), 1.), lam * tl.sin(tf), vr, vi), 0, _compose)
    arr, ari, brr, bri = tl.associative_scan(
        (tl.where(m, lam * tl.cos(tr), 1.), lam * tl.sin(tr), vr, vi), 0, _compose, reverse=True)
    return afr, afi, bfr, bfi, arr, ari, brr, bri, t, cs, m, lam


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _chunk_summary_kernel(x_ptr, gamma_ptr, tf_ptr, tr_ptr, carry_ptr, N, C, n_chunks, s_xb, s_xn, s_cb, s_ck,
                          T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per chunk and channel, 5 fp32 at carry[b, k, 0..4]: the product of the chunk's lam, then B of its forward map
    (the state it leaves from a zero state) and B of its reverse map (re, im each). The chunk's A of either direction
    is that product times e^{i L theta} for its L tokens."""
    pid = tl.program_id(0)
    b, k = (pid // n_chunks).to(tl.int64), pid % n_chunks
    _, _, bfr, bfi, _, _, brr, bri, t, cs, m, lam = _chunk_maps(
        x_ptr, gamma_ptr, tf_ptr, tr_ptr, b, k, N, C, s_xb, s_xn, T, BLOCK_C)
    rows = tl.arange(0, T)[:, None]
    last, first = rows == T - 1, rows == 0
    p = carry_ptr + b * s_cb + k * s_ck + cs
    cmask = cs < C
    tl.store(p, tl.reduce(tl.where(m, lam, 1.), 0, _mul, keep_dims=True), mask=cmask)
    tl.store(p + C, tl.sum(tl.where(last, bfr, 0.), 0, keep_dims=True), mask=cmask)
    tl.store(p + 2 * C, tl.sum(tl.where(last, bfi, 0.), 0, keep_dims=True), mask=cmask)
    tl.store(p + 3 * C, tl.sum(tl.where(first, brr, 0.), 0, keep_dims=True), mask=cmask)
    tl.store(p + 4 * C, tl.sum(tl.where(first, bri, 0.), 0, keep_dims=True), mask=cmask)


@triton.jit
def _chunk_carry_kernel(carry_ptr, tf_ptr, tr_ptr, N, C, n_chunks, s_cb, s_ck, T: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Walks the chunks of batch row b forward and backward through the summaries, replacing each chunk's B of
    either direction with the state entering the chunk from that direction."""
    b = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    tf = tl.load(tf_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tr = tl.load(tr_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    base = carry_ptr + b * s_cb + cs
    for d in tl.static_range(2):
        theta = tf if d == 0 else tr
        sr = tl.zeros([BLOCK_C], tl.float32)
        si = tl.zeros([BLOCK_C], tl.float32)
        for j in range(0, n_chunks):
            k = j if d == 0 else n_chunks - 1 - j
            p = base + k * s_ck
            prod = tl.load(p, mask=cmask, other=0.)
            br = tl.load(p + (1 + 2 * d) * C, mask=cmask, other=0.)
            bi = tl.load(p + (2 + 2 * d) * C, mask=cmask, other=0.)
            tl.store(p + (1 + 2 * d) * C, sr, mask=cmask)
            tl.store(p + (2 + 2 * d) * C, si, mask=cmask)
            rot = tl.minimum(N - k * T, T).to(tl.float32) * theta
            ar, ai = prod * tl.cos(rot), prod * tl.sin(rot)
            sr, si = ar * sr - ai * si + br, ar * si + ai * sr + bi


@triton.jit
def _mixer_fwd_kernel(x_ptr, gamma_ptr, tf_ptr, tr_ptr, w_ptr, bias_ptr, carry_ptr, y_ptr, h_ptr, N, C, n_chunks,
                      s_xb, s_xn, s_yb, s_yn, s_cb, s_ck, eps, T: tl.constexpr, BLOCK_C: tl.constexpr,
                      CARRY: tl.constexpr, STORE_H: tl.constexpr):
    """The mixer forward of one chunk: the scan inside it from the entering states (CARRY: from `carry`, else zero),
    then h's LayerNorm over its 2C channels and the gate, y written once (and h if STORE_H)."""
    pid = tl.program_id(0)
    b, k = (pid // n_chunks).to(tl.int64), pid % n_chunks
    afr, afi, hr_, hi_, arr, ari, rr, ri, t, cs, m, _ = _chunk_maps(
        x_ptr, gamma_ptr, tf_ptr, tr_ptr, b, k, N, C, s_xb, s_xn, T, BLOCK_C)
    xb = x_ptr + b * s_xb + t * s_xn
    gr = tl.load(xb + 3 * C + cs, mask=m, other=0.).to(tl.float32)
    gi = tl.load(xb + 4 * C + cs, mask=m, other=0.).to(tl.float32)
    hr_, hi_ = hr_ + rr, hi_ + ri
    cmask = cs < C
    if CARRY:
        p = carry_ptr + b * s_cb + k * s_ck + cs
        fr, fi = tl.load(p + C, mask=cmask, other=0.), tl.load(p + 2 * C, mask=cmask, other=0.)
        er, ei = tl.load(p + 3 * C, mask=cmask, other=0.), tl.load(p + 4 * C, mask=cmask, other=0.)
        hr_ += afr * fr - afi * fi + arr * er - ari * ei
        hi_ += afr * fi + afi * fr + arr * ei + ari * er
    hr_, hi_ = tl.where(m, hr_, 0.), tl.where(m, hi_, 0.)
    mean = (tl.sum(hr_, 1, keep_dims=True) + tl.sum(hi_, 1, keep_dims=True)) / (2 * C)
    cr_, ci_ = tl.where(m, hr_ - mean, 0.), tl.where(m, hi_ - mean, 0.)
    var = (tl.sum(cr_ * cr_, 1, keep_dims=True) + tl.sum(ci_ * ci_, 1, keep_dims=True)) / (2 * C)
    rstd = 1. / tl.sqrt(var + eps)
    wr = tl.load(w_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    wi = tl.load(w_ptr + C + cs, mask=cmask, other=0.).to(tl.float32)
    br = tl.load(bias_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    bi = tl.load(bias_ptr + C + cs, mask=cmask, other=0.).to(tl.float32)
    yr = (cr_ * rstd * wr + br) * gr * _sigmoid(gr)
    yi = (ci_ * rstd * wi + bi) * gi * _sigmoid(gi)
    o = b * s_yb + t * s_yn + cs
    tl.store(y_ptr + o, yr.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(y_ptr + o + C, yi.to(y_ptr.dtype.element_ty), mask=m)
    if STORE_H:
        tl.store(h_ptr + o, hr_.to(h_ptr.dtype.element_ty), mask=m)
        tl.store(h_ptr + o + C, hi_.to(h_ptr.dtype.element_ty), mask=m)


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


def mixer_fwd(x, gamma, theta_f, theta_r, weight, bias, eps, keep_h):
    """`LayerNorm(scan(u, z)) * silu(g)` of x = [u | z | g] (B, N, 5C, unit channel stride) by chunks of tokens,
    and h = scan(u, z) when keep_h (else None), both (B, N, 2C) in the dtype of x."""
    B, N, C5 = x.shape
    C = C5 // 5
    T, per_thread = CHUNK_CFG
    T = min(T, triton.next_power_of_2(N))
    block_c = triton.next_power_of_2(C)
    warps = min(32, max(1, T * block_c // (32 * per_thread)))
    n_chunks = triton.cdiv(N, T)
    y = x.new_empty(B, N, 2 * C)
    h = torch.empty_like(y) if keep_h else None
    carry = x.new_empty(B, n_chunks, 5, C, dtype=torch.float32) if n_chunks > 1 else y
    s_cb, s_ck = (carry.stride(0), carry.stride(1)) if n_chunks > 1 else (0, 0)
    if n_chunks > 1:
        _chunk_summary_kernel[(B * n_chunks,)](
            x, gamma, theta_f, theta_r, carry, N, C, n_chunks, x.stride(0), x.stride(1), s_cb, s_ck, T=T,
            BLOCK_C=block_c, num_warps=warps)
        _chunk_carry_kernel[(triton.cdiv(C, CARRY_BLOCK_C), B)](
            carry, theta_f, theta_r, N, C, n_chunks, s_cb, s_ck, T=T, BLOCK_C=CARRY_BLOCK_C, num_warps=4)
    _mixer_fwd_kernel[(B * n_chunks,)](
        x, gamma, theta_f, theta_r, weight, bias, carry, y, y if h is None else h, N, C, n_chunks, x.stride(0),
        x.stride(1), y.stride(0), y.stride(1), s_cb, s_ck, eps, T=T, BLOCK_C=block_c, CARRY=n_chunks > 1,
        STORE_H=keep_h, num_warps=warps)
    return y, h


def norm_gate_bwd(dy, h, x, weight, bias, eps, dx):
    """Backward of `norm_gate_fwd`: writes dg into dx[..., 3C:], returns dh, the weight and bias gradients and the
    sum of dg over batch and tokens (fp32)."""
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    B, N, D = h.shape
    dh = torch.empty_like(h)
    rows, warps, programs_per_sm = BWD_CFG
    block_d = triton.next_power_of_2(D)
    warps = max(warps, block_d // BWD_CHANNELS_PER_WARP)
    n_tiles = triton.cdiv(B * N, rows)
    grid = min(n_tiles, programs_per_sm * _num_sms(h.device))
    part = torch.empty(grid, 3, D, device=h.device, dtype=torch.float32)
    _norm_gate_bwd_kernel[(grid,)](
        dy, h, x, weight, bias, dh, dx, part, B * N, N, D, h.stride(0), h.stride(1), x.stride(0), x.stride(1),
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), x.shape[-1] - D, eps, n_tiles,
        BLOCK_D=block_d, ROWS=rows, num_warps=warps)
    dw, db, dgs = part.sum(0).unbind(0)
    return dh, dw.to(weight.dtype, copy=True), db.to(bias.dtype, copy=True), dgs


# ---- the op: registered with torch.library so torch.compile traces through it, forward and backward ----

@torch.library.custom_op('hgrn_vision::bihgru_norm_gate_fwd', mutates_args=())
def _fwd_op(x: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor, theta_r: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor, eps: float, in_bias: Optional[torch.Tensor], keep_h: bool
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, h): the mixer's output and, when keep_h (for the backward), the scan's (else an empty tensor). `in_bias`
    is only differentiated."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    y, h = mixer_fwd(x, gamma, theta_f, theta_r, weight, bias, eps, keep_h)
    return y, x.new_empty(0) if h is None else h


@_fwd_op.register_fake
def _(x, gamma, theta_f, theta_r, weight, bias, eps, in_bias, keep_h):
    shape = (*x.shape[:-1], x.shape[-1] // 5 * 2)
    return x.new_empty(shape), x.new_empty(shape if keep_h else 0)


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
    x, gamma, theta_f, theta_r, weight, bias, eps, in_bias, keep_h = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, output[1], gamma, theta_f, theta_r, weight, bias)
    ctx.eps = eps
    ctx.in_bias_dtype = None if in_bias is None else in_bias.dtype


def _backward(ctx, dy, _):
    x, h, gamma, theta_f, theta_r, weight, bias = ctx.saved_tensors
    if h.shape != dy.shape:
        raise RuntimeError('bihgru_scan_norm_gate: the forward ran without keeping h (no input required grad when it '
                           'ran), so it cannot be differentiated; run it with grad enabled.')
    *grads, dx_sum = _bwd_op(dy, x, h, gamma, theta_f, theta_r, weight, bias, ctx.eps)
    return *grads, None, None if ctx.in_bias_dtype is None else dx_sum.to(ctx.in_bias_dtype), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def bihgru_scan_norm_gate_triton(x, gamma, theta_f, theta_r, weight, bias, eps, in_bias=None) -> torch.Tensor:
    """The fused op (see `hgrn_vision.ops.bihgru_scan_norm_gate`)."""
    check_triton_device(x)
    keep_h = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, gamma, theta_f, theta_r, weight, bias, in_bias))
    return _fwd_op(x, gamma, theta_f, theta_r, weight, bias, eps, in_bias, keep_h)[0]

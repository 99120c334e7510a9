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
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton
from torch.utils.flop_counter import register_flop_formula

from .fused import _num_sms, _sigmoid, bihgru_bwd, bihgru_fwd, check_triton_device, kernel_op, linear_param_grads

# (tokens per tile, warps, programs per SM) of the forward and the backward, whose programs loop over tiles (the
# forward loading w and b once, the backward summing the weight and bias gradients of its tokens); the backward takes
# at least a warp per BWD_CHANNELS_PER_WARP channels (2C = 1536, the base model: 4 warps, untuned). The forward's
# loop is new and its config a first guess (before: one program per token, w and b loaded by each, 1 token x 2 warps;
# H100, bf16, 2C = 768, `scripts/gpu_scan_tune.py normgate_tune`, run27/run28: 109 us at (256, 256, 384), 92% of the
# copy bandwidth over h, g, y; inductor's LayerNorm + gate 106 us; H200 run55: ~96 us a block). H200 (run42): the
# backward at (2, 2, 16) takes 133 us at (256, 256, 192) where (2, 4, 8) took 520 (3.9x), and 218 against 243 us at
# (256, 256, 384); on the H100 (2, 4, 8) had won at 2C = 768 (255 registers, no spills); larger tiles per warp spill
# and ran 1.3x to 20x slower.
FWD_CFG = (1, 2, 8)
BWD_CFG = (2, 2, 16)
BWD_CHANNELS_PER_WARP = 512


@triton.jit
def _normalize(h, m, D, eps):
    """Rows of the (ROWS, BLOCK_D) tile h (masked by m) normalized over their D channels, and the rows' rstd. eps is
    cast: inductor launches a kernel with a Python float as fp64, which would make the result fp64."""
    mean = tl.sum(h, axis=1) / D
    hc = tl.where(m, h - mean[:, None], 0.)
    rstd = 1. / tl.sqrt((tl.sum(hc * hc, axis=1) / D + eps).to(tl.float32))
    return hc * rstd[:, None], rstd


@triton.jit
def _tile(rows, M, N, D, s_b, s_n, BLOCK_D: tl.constexpr, FLAT: tl.constexpr):
    """Offsets of a (ROWS, BLOCK_D) tile of tokens `rows` (b * N + n) in a (B, N, .) tensor of strides s_b, s_n, and
    its mask. FLAT: s_b = N s_n (or one batch row), so token r sits at r s_n: no 64-bit division a row (-21% of the
    forward's instructions, -11% of the backward's: scripts/kernel_sass.py)."""
    cols = tl.arange(0, BLOCK_D)
    r = rows.to(tl.int64)
    if FLAT:
        off = (r * s_n)[:, None] + cols[None, :]
    else:
        off = ((r // N) * s_b + (r % N) * s_n)[:, None] + cols[None, :]
    return off, (rows < M)[:, None] & (cols < D)[None, :]


@triton.jit
def _load_hg(h_ptr, x_ptr, tile, M, N, D, s_hb, s_hn, s_xb, s_xn, g_off, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
             FLAT: tl.constexpr):
    """A tile's h and g in fp32 (zeros past M and D)."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    oh, m = _tile(rows, M, N, D, s_hb, s_hn, BLOCK_D, FLAT)
    ox, _ = _tile(rows, M, N, D, s_xb, s_xn, BLOCK_D, FLAT)
    return (tl.load(h_ptr + oh, mask=m, other=0.).to(tl.float32),
            tl.load(x_ptr + g_off + ox, mask=m, other=0.).to(tl.float32))


@triton.jit
def _norm_gate_fwd_kernel(h_ptr, x_ptr, w_ptr, b_ptr, y_ptr, M, N, D, s_hb, s_hn, s_xb, s_xn, g_off, eps, n_tiles,
                          BLOCK_D: tl.constexpr, ROWS: tl.constexpr, FLAT: tl.constexpr):
    """Tiles pid, pid + programs, ...: w and b loaded once, the next tile's h and g issued before this tile's
    reductions and store."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < D, other=0.).to(tl.float32)
    h, g = _load_hg(h_ptr, x_ptr, pid, M, N, D, s_hb, s_hn, s_xb, s_xn, g_off, BLOCK_D, ROWS, FLAT)
    for tile in range(pid, n_tiles, step):
        nxt = _load_hg(h_ptr, x_ptr, tile + step, M, N, D, s_hb, s_hn, s_xb, s_xn, g_off, BLOCK_D, ROWS, FLAT)
        oh, m = _tile(tile * ROWS + tl.arange(0, ROWS), M, N, D, s_hb, s_hn, BLOCK_D, FLAT)
        xhat, _ = _normalize(h, m, D, eps)
        y = (xhat * w[None, :] + b[None, :]) * g * _sigmoid(g)
        tl.store(y_ptr + oh, y.to(y_ptr.dtype.element_ty), mask=m)
        h, g = nxt


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _load_bwd_tile(dy_ptr, h_ptr, x_ptr, tile, M, N, D, s_hb, s_hn, s_xb, s_xn, s_dyb, s_dyn, g_off,
                   BLOCK_D: tl.constexpr, ROWS: tl.constexpr, FLAT: tl.constexpr):
    """A backward tile's h, g and dy in fp32 (zeros past M and D)."""
    h, g = _load_hg(h_ptr, x_ptr, tile, M, N, D, s_hb, s_hn, s_xb, s_xn, g_off, BLOCK_D, ROWS, FLAT)
    ody, m = _tile(tile * ROWS + tl.arange(0, ROWS), M, N, D, s_dyb, s_dyn, BLOCK_D, FLAT)
    return h, g, tl.load(dy_ptr + ody, mask=m, other=0.).to(tl.float32)


@triton.jit
def _norm_gate_bwd_kernel(dy_ptr, h_ptr, x_ptr, w_ptr, b_ptr, dh_ptr, dx_ptr, part_ptr, y_ptr, M, N, D, s_hb, s_hn,
                          s_xb, s_xn, s_dyb, s_dyn, s_dxb, s_dxn, g_off, eps, n_tiles, BLOCK_D: tl.constexpr,
                          ROWS: tl.constexpr, WRITE_Y: tl.constexpr, FLAT: tl.constexpr):
    """Tiles pid, pid + programs, ...; the next tile's loads are issued before this tile's reductions. Sums the
    weight and bias gradients and dg over the program's tokens. WRITE_Y: also writes the forward's output y again
    (strides of h) for the output projection's weight gradient. FLAT: as in `_tile`, for every tensor."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < D, other=0.).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    dgs = tl.zeros([BLOCK_D], dtype=tl.float32)
    h, g, dy = _load_bwd_tile(dy_ptr, h_ptr, x_ptr, pid, M, N, D, s_hb, s_hn, s_xb, s_xn, s_dyb, s_dyn, g_off,
                              BLOCK_D, ROWS, FLAT)
    for tile in range(pid, n_tiles, step):
        nxt = _load_bwd_tile(dy_ptr, h_ptr, x_ptr, tile + step, M, N, D, s_hb, s_hn, s_xb, s_xn, s_dyb, s_dyn,
                             g_off, BLOCK_D, ROWS, FLAT)
        rows = tile * ROWS + tl.arange(0, ROWS)
        oh, m = _tile(rows, M, N, D, s_hb, s_hn, BLOCK_D, FLAT)
        odx, _ = _tile(rows, M, N, D, s_dxb, s_dxn, BLOCK_D, FLAT)
        xhat, rstd = _normalize(h, m, D, eps)
        sg = _sigmoid(g)
        dn = dy * g * sg  # gradient of the normalized, scaled and shifted h
        yn = xhat * w[None, :] + b[None, :]
        dg = dy * yn * sg * (1. + g * (1. - sg))
        if WRITE_Y:
            tl.store(y_ptr + oh, (yn * g * sg).to(y_ptr.dtype.element_ty), mask=m)
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


def _flat(N: int, *tensors: torch.Tensor) -> bool:
    """Whether token r = b N + n of every (B, N, .) tensor sits at r * stride(1) (batch rows back to back, or one
    batch row): the row kernels' FLAT."""
    return all(t.shape[0] == 1 or t.stride(0) == N * t.stride(1) for t in tensors)


def norm_gate_fwd(h, x, weight, bias, eps):
    """`LayerNorm(h) * silu(g)` of h (B, N, 2C) and g = x[..., 3C:] (x (B, N, 5C)), in the dtype of h."""
    B, N, D = h.shape
    y = torch.empty_like(h)
    rows, warps, programs_per_sm = FWD_CFG
    n_tiles = triton.cdiv(B * N, rows)
    grid = max(1, min(n_tiles, programs_per_sm * _num_sms(h.device)))
    wrap_triton(_norm_gate_fwd_kernel)[(grid,)](
        h, x, weight, bias, y, B * N, N, D, h.stride(0), h.stride(1), x.stride(0), x.stride(1), x.shape[-1] - D,
        eps, n_tiles, BLOCK_D=triton.next_power_of_2(D), ROWS=rows, FLAT=_flat(N, h, x), num_warps=warps)
    return y


def norm_gate_bwd(dy, h, x, weight, bias, eps, dx, y=None):
    """Backward of `norm_gate_fwd`: writes dg into dx[..., 3C:] (and the forward's output into `y`, a tensor like h,
    if given), returns dh, the weight and bias gradients and the sum of dg over batch and tokens (fp32)."""
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    B, N, D = h.shape
    dh = torch.empty_like(h)
    rows, warps, programs_per_sm = BWD_CFG
    block_d = triton.next_power_of_2(D)
    warps = max(warps, block_d // BWD_CHANNELS_PER_WARP)
    n_tiles = triton.cdiv(B * N, rows)
    grid = min(n_tiles, programs_per_sm * _num_sms(h.device))
    part = torch.empty(grid, 3, D, device=h.device, dtype=torch.float32)
    wrap_triton(_norm_gate_bwd_kernel)[(grid,)](
        dy, h, x, weight, bias, dh, dx, part, y, B * N, N, D, h.stride(0), h.stride(1), x.stride(0), x.stride(1),
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), x.shape[-1] - D, eps, n_tiles,
        BLOCK_D=block_d, ROWS=rows, WRITE_Y=y is not None, FLAT=_flat(N, h, x, dy, dx), num_warps=warps)
    dw, db, dgs = part.sum(0).unbind(0)
    return dh, dw.to(weight.dtype, copy=True), db.to(bias.dtype, copy=True), dgs


# ---- the op: registered with torch.library so torch.compile traces through it, forward and backward ----

def _fwd_fake(x, gamma, theta_f, theta_r, weight, bias, eps, in_bias, out_weight, out_bias):
    shape = (*x.shape[:-1], x.shape[-1] // 5 * 2)
    out = shape if out_weight is None else (*x.shape[:-1], out_weight.shape[0])
    return x.new_empty(out), x.new_empty(shape)


@kernel_op('hgrn_vision::bihgru_norm_gate_fwd', _fwd_fake)
def _fwd_op(x: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor, theta_r: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor, eps: float, in_bias: Optional[torch.Tensor],
            out_weight: Optional[torch.Tensor], out_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, h): the mixer's output y, or `F.linear(y, out_weight, out_bias)` with an out_weight, and the scan's h,
    which the backward needs. `in_bias` is only differentiated."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    C = x.shape[-1] // 5
    h = bihgru_fwd(x[..., :2 * C], x[..., 2 * C:3 * C], gamma, theta_f, theta_r)
    y = norm_gate_fwd(h, x, weight, bias, eps)
    return (y if out_weight is None else F.linear(y, out_weight, out_bias)), h


def _bwd_fake(dy, x, h, gamma, theta_f, theta_r, weight, bias, eps, write_y):
    return (torch.empty_like(x), torch.empty_like(gamma), torch.empty_like(theta_f), torch.empty_like(theta_r),
            torch.empty_like(weight), torch.empty_like(bias), x.new_empty(x.shape[-1], dtype=torch.float32),
            torch.empty_like(h) if write_y else h.new_empty(0))


@kernel_op('hgrn_vision::bihgru_norm_gate_bwd', _bwd_fake)
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor,
            theta_r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, write_y: bool
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grads of x (one (B, N, 5C) buffer: dg from the row kernel, du and dz from the scan's), gamma, theta_f,
    theta_r, weight and bias, x's gradient summed over batch and tokens (fp32 (5C,), from the kernels' sums), and
    with `write_y` the forward's y written again (else an empty tensor)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    C = x.shape[-1] // 5
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    y = torch.empty_like(h) if write_y else h.new_empty(0)
    dh, dw, db, dgs = norm_gate_bwd(dy, h, x, weight, bias, eps, dx, y if write_y else None)
    _, _, dgamma, dtf, dtr, sums = bihgru_bwd(dh, x[..., :2 * C], x[..., 2 * C:3 * C], gamma, theta_f, theta_r,
                                              dx=dx)
    dx_sum = torch.cat([sums[1:].t().flatten(), sums[0], dgs])  # sums rows: z, Re u, Im u; u is (re, im) pairs
    return dx, dgamma, dtf, dtr, dw, db, dx_sum, y


def _setup_context(ctx, inputs, output):
    x, gamma, theta_f, theta_r, weight, bias, eps, in_bias, out_weight, out_bias = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, output[1], gamma, theta_f, theta_r, weight, bias, out_weight)
    ctx.eps = eps
    ctx.in_bias_dtype = None if in_bias is None else in_bias.dtype


def _backward(ctx, dout, _):
    x, h, gamma, theta_f, theta_r, weight, bias, out_weight = ctx.saved_tensors
    if out_weight is None:
        *grads, dx_sum, _ = _bwd_op(dout, x, h, gamma, theta_f, theta_r, weight, bias, ctx.eps, False)
        return *grads, None, None if ctx.in_bias_dtype is None else dx_sum.to(ctx.in_bias_dtype), None, None
    # the output projection's weight gradient from y written again by the backward's row kernel, not kept
    *grads, dx_sum, y = _bwd_op(dout @ out_weight, x, h, gamma, theta_f, theta_r, weight, bias, ctx.eps, True)
    d_out_weight, d_out_bias = linear_param_grads(dout, y, ctx.needs_input_grad[9])
    return (*grads, None, None if ctx.in_bias_dtype is None else dx_sum.to(ctx.in_bias_dtype), d_out_weight,
            d_out_bias)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.hgrn_vision.bihgru_norm_gate_fwd)
def _flops(x_shape, gamma_shape, theta_f_shape, theta_r_shape, weight_shape, bias_shape, eps, in_bias_shape,
           out_weight_shape, *args, **kwargs) -> int:
    """The output projection's matmul (none without it), for FlopCounterMode (which cannot see into the op)."""
    return 0 if out_weight_shape is None else 2 * math.prod(x_shape[:-1]) * out_weight_shape[1] * out_weight_shape[0]


def bihgru_scan_norm_gate_triton(x, gamma, theta_f, theta_r, weight, bias, eps, in_bias=None, out_weight=None,
                                 out_bias=None) -> torch.Tensor:
    """The fused op (see `hgrn_vision.ops.bihgru_scan_norm_gate`)."""
    check_triton_device(x)
    return _fwd_op(x, gamma, theta_f, theta_r, weight, bias, eps, in_bias, out_weight, out_bias)[0]

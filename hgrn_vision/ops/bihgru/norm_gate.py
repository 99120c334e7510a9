"""The HGRU mixer between its two projections as one op: `y = LayerNorm(bihgru_scan(u, z)) * silu(g)` for the
input projection's whole output `x = [u | z | g]` (B, N, 5C); with `out_weight` the output projection too.

Why one op: the mixer's backward must hand `in_proj` one (B, N, 5C) gradient `[du | dz | dg]`. With the scan as its
own op, du and dz come out as separate tensors and torch.compile's graph copies them next to dg into a new buffer
(with the LayerNorm recomputed for dg beside it). Here the backward allocates that buffer once; a row kernel writes dg
into its last 2C columns while computing the LayerNorm backward, and the scan's backward kernel writes du and dz into
the first 3C. Both kernels also sum what they write over the tokens, which is the gradient of in_proj's bias: the
mixer adds that bias detached in in_proj and passes it here as `in_bias`, so that its gradient comes from these sums
instead of another pass over the (B, N, 5C) gradient.

Row kernels: a program takes ROWS tokens x all 2C channels (the LayerNorm needs a whole token), in fp32, loads first,
each token's channels as NP pieces of a power of two P (`launch_meta`: 768 = 3 x 256 rather than a 1024-wide tile
a quarter idle). The forward reads h and g, writes y; the backward reads dy, h and g, recomputes the token's mean and
rstd from h (no stats kept), writes dh and dg, and sums the LayerNorm's weight and bias gradients over its tokens (fp32
partials per program, one reduction afterwards). The op keeps h for the backward (2C per token, as the separate ops
did).
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

from ..triton_utils import (
    BWD_CHANNELS_PER_WARP,
    FWD_CHANNELS_PER_WARP,
    RowConfig,
    check_triton_device,
    kernel_op,
    linear_param_grads,
    num_sms,
    row_warps,
    sigmoid,
)
from .bwd import bihgru_bwd
from .fused import bihgru_fwd

# The row kernels' configs by a token's width D = 2C (the tiny, small and base models'); another width takes the
# nearest tuned width at or above it (`_config`). Tuned on an H200 at (256, 256, C), bf16, for C = 192, 384, 768;
# re-tune: `python scripts/gpu_scan_tune.py normgate_tune`. The backward runs fastest when its persistent programs make
# whole waves (at 2C = 768 and 2 warps 6 fit an SM); larger tiles per warp spill.
FWD_CONFIGS = {384: RowConfig(2, 2, 16), 768: RowConfig(1, 1, 16), 1536: RowConfig(1, 1, 16)}
BWD_CONFIGS = {384: RowConfig(1, 2, 8), 768: RowConfig(1, 2, 12), 1536: RowConfig(1, 2, 12)}


@triton.jit
def _cols(i: tl.constexpr, D, P: tl.constexpr, EVEN: tl.constexpr):
    """Columns of piece i (i P ... i P + P - 1) and their mask (< D; a constant where EVEN: NP P = D)."""
    cols = i * P + tl.arange(0, P)
    if EVEN:
        return cols, tl.full([P], 1, tl.int1)
    else:
        return cols, cols < D


@triton.jit
def _rows(tile, M, N, s_b, s_n, ROWS: tl.constexpr, FLAT: tl.constexpr):
    """Offsets of a tile's tokens r = b N + n (ROWS of them from tile * ROWS) in a (B, N, .) tensor of strides s_b,
    s_n, and their mask (< M). FLAT: s_b = N s_n (or one batch row), so token r sits at r s_n: no 64-bit division
    a row."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    r = rows.to(tl.int64)
    if FLAT:
        return r * s_n, rows < M
    else:
        return (r // N) * s_b + (r % N) * s_n, rows < M


@triton.jit
def _load(ptr, base, rmask, D, P: tl.constexpr, NP: tl.constexpr, EVEN: tl.constexpr):
    """A tile as NP (ROWS, P) pieces in fp32 (zeros past M and D), rows at offsets `base` (from `_rows`)."""
    pieces = ()
    for i in tl.static_range(NP):
        cols, cm = _cols(i, D, P, EVEN)
        pieces = pieces + (tl.load(ptr + base[:, None] + cols[None, :], mask=rmask[:, None] & cm[None, :],
                                   other=0.).to(tl.float32),)
    return pieces


@triton.jit
def _store(ptr, base, rmask, i: tl.constexpr, D, val, P: tl.constexpr, EVEN: tl.constexpr):
    """Piece i of a tile (see `_load`) into ptr's dtype."""
    cols, cm = _cols(i, D, P, EVEN)
    tl.store(ptr + base[:, None] + cols[None, :], val.to(ptr.dtype.element_ty), mask=rmask[:, None] & cm[None, :])


@triton.jit
def _load_vec(ptr, D, P: tl.constexpr, NP: tl.constexpr, EVEN: tl.constexpr):
    """A (D,) fp32 vector as NP (P,) pieces (zeros past D)."""
    pieces = ()
    for i in tl.static_range(NP):
        cols, cm = _cols(i, D, P, EVEN)
        pieces = pieces + (tl.load(ptr + cols, mask=cm, other=0.).to(tl.float32),)
    return pieces


@triton.jit
def _stats(h, rmask, D, eps, P: tl.constexpr, NP: tl.constexpr, EVEN: tl.constexpr):
    """Mean and rstd of each token of the tile h (pieces from `_load`) over its D channels: the pieces are added
    elementwise first, so that each statistic takes one reduction across threads. eps is cast: inductor launches a
    kernel with a Python float as fp64, which would make the result fp64."""
    total = h[0]
    for i in tl.static_range(1, NP):
        total += h[i]
    mean = tl.sum(total, axis=1) / D
    squares = tl.zeros_like(h[0])
    for i in tl.static_range(NP):
        _, cm = _cols(i, D, P, EVEN)
        hc = tl.where(rmask[:, None] & cm[None, :], h[i] - mean[:, None], 0.)
        squares += hc * hc
    return mean, 1. / tl.sqrt((tl.sum(squares, axis=1) / D + eps).to(tl.float32))


@triton.jit
def norm_gate_fwd_kernel(h_ptr, x_ptr, w_ptr, b_ptr, y_ptr, M, N, D, s_hb, s_hn, s_xb, s_xn, g_off, eps, n_tiles,
                          P: tl.constexpr, NP: tl.constexpr, ROWS: tl.constexpr, FLAT: tl.constexpr,
                          EVEN: tl.constexpr):
    """Tiles pid, pid + programs, ...: w and b loaded once, the next tile's h and g issued before this tile's
    reductions and store. A token's D channels are NP pieces of P (`_launch_pieces`)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    w = _load_vec(w_ptr, D, P, NP, EVEN)
    b = _load_vec(b_ptr, D, P, NP, EVEN)
    oh, m = _rows(pid, M, N, s_hb, s_hn, ROWS, FLAT)
    ox, _ = _rows(pid, M, N, s_xb, s_xn, ROWS, FLAT)
    h, g = _load(h_ptr, oh, m, D, P, NP, EVEN), _load(x_ptr + g_off, ox, m, D, P, NP, EVEN)
    for tile in range(pid, n_tiles, step):
        noh, nm = _rows(tile + step, M, N, s_hb, s_hn, ROWS, FLAT)
        nox, _ = _rows(tile + step, M, N, s_xb, s_xn, ROWS, FLAT)
        nh, ng = _load(h_ptr, noh, nm, D, P, NP, EVEN), _load(x_ptr + g_off, nox, nm, D, P, NP, EVEN)
        mean, rstd = _stats(h, m, D, eps, P, NP, EVEN)
        for i in tl.static_range(NP):
            xhat = (h[i] - mean[:, None]) * rstd[:, None]
            y = (xhat * w[i][None, :] + b[i][None, :]) * g[i] * sigmoid(g[i])
            _store(y_ptr, oh, m, i, D, y, P, EVEN)
        h, g, oh, m = nh, ng, noh, nm


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def norm_gate_bwd_kernel(dy_ptr, h_ptr, x_ptr, w_ptr, b_ptr, dh_ptr, dx_ptr, part_ptr, y_ptr, M, N, D, s_hb, s_hn,
                          s_xb, s_xn, s_dyb, s_dyn, s_dxb, s_dxn, g_off, eps, n_tiles, P: tl.constexpr,
                          NP: tl.constexpr, ROWS: tl.constexpr, WRITE_Y: tl.constexpr, FLAT: tl.constexpr,
                          EVEN: tl.constexpr):
    """Tiles pid, pid + programs, ...; the next tile's loads are issued before this tile's reductions. Sums the
    weight and bias gradients and dg over the program's tokens. WRITE_Y: also writes the forward's output y again
    (strides of h) for the output projection's weight gradient. FLAT: as in `_rows`, for every tensor."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    w = _load_vec(w_ptr, D, P, NP, EVEN)
    b = _load_vec(b_ptr, D, P, NP, EVEN)
    dw, db, dgs = (), (), ()
    for i in tl.static_range(NP):  # (ROWS, P) sums, reduced over their rows once at the end
        zero = tl.zeros([ROWS, P], tl.float32)
        dw, db, dgs = dw + (zero,), db + (zero,), dgs + (zero,)
    oh, m = _rows(pid, M, N, s_hb, s_hn, ROWS, FLAT)
    ox, _ = _rows(pid, M, N, s_xb, s_xn, ROWS, FLAT)
    ody, _ = _rows(pid, M, N, s_dyb, s_dyn, ROWS, FLAT)
    h, g = _load(h_ptr, oh, m, D, P, NP, EVEN), _load(x_ptr + g_off, ox, m, D, P, NP, EVEN)
    dy = _load(dy_ptr, ody, m, D, P, NP, EVEN)
    for tile in range(pid, n_tiles, step):
        noh, nm = _rows(tile + step, M, N, s_hb, s_hn, ROWS, FLAT)
        nox, _ = _rows(tile + step, M, N, s_xb, s_xn, ROWS, FLAT)
        nody, _ = _rows(tile + step, M, N, s_dyb, s_dyn, ROWS, FLAT)
        nh, ng = _load(h_ptr, noh, nm, D, P, NP, EVEN), _load(x_ptr + g_off, nox, nm, D, P, NP, EVEN)
        ndy = _load(dy_ptr, nody, nm, D, P, NP, EVEN)
        odx, _ = _rows(tile, M, N, s_dxb, s_dxn, ROWS, FLAT)
        mean, rstd = _stats(h, m, D, eps, P, NP, EVEN)
        xhats, dxhats, ndw, ndb, ndgs = (), (), (), (), ()
        for i in tl.static_range(NP):
            xhat = (h[i] - mean[:, None]) * rstd[:, None]
            sg = sigmoid(g[i])
            dn = dy[i] * g[i] * sg  # gradient of the normalized, scaled and shifted h
            yn = xhat * w[i][None, :] + b[i][None, :]
            dg = dy[i] * yn * sg * (1. + g[i] * (1. - sg))
            if WRITE_Y:
                _store(y_ptr, oh, m, i, D, yn * g[i] * sg, P, EVEN)
            _store(dx_ptr + g_off, odx, m, i, D, dg, P, EVEN)
            ndw, ndb, ndgs = ndw + (dw[i] + dn * xhat,), ndb + (db[i] + dn,), ndgs + (dgs[i] + dg,)
            xhats, dxhats = xhats + (xhat,), dxhats + (dn * w[i][None, :],)
        a1, a2 = dxhats[0] * xhats[0], dxhats[0]
        for i in tl.static_range(1, NP):
            a1, a2 = a1 + dxhats[i] * xhats[i], a2 + dxhats[i]
        c1, c2 = tl.reduce((a1, a2), 1, _add2)  # the pieces added elementwise: one reduction across threads
        for i in tl.static_range(NP):
            dh = (dxhats[i] - xhats[i] * (c1 / D)[:, None] - (c2 / D)[:, None]) * rstd[:, None]
            _store(dh_ptr, oh, m, i, D, dh, P, EVEN)
        dw, db, dgs = ndw, ndb, ndgs
        h, g, dy, oh, m = nh, ng, ndy, noh, nm
    for i in tl.static_range(NP):
        cols, cm = _cols(i, D, P, EVEN)
        tl.store(part_ptr + pid * 3 * D + cols, tl.sum(dw[i], axis=0), mask=cm)
        tl.store(part_ptr + pid * 3 * D + D + cols, tl.sum(db[i], axis=0), mask=cm)
        tl.store(part_ptr + pid * 3 * D + 2 * D + cols, tl.sum(dgs[i], axis=0), mask=cm)


def _launch_pieces(D: int) -> dict:
    """How the row kernels hold a token's D channels: NP pieces of P (a power of two), three where that wastes fewer
    lanes than one (2C = 768 is 3 x 256 instead of a quarter of 1024 idle; the models' widths are all 3 x 2^k), and
    EVEN when the pieces cover D exactly (no column masks)."""
    one, three = triton.next_power_of_2(D), triton.next_power_of_2(triton.cdiv(D, 3))
    P, NP = (three, 3) if 3 * three < one else (one, 1)
    return dict(P=P, NP=NP, EVEN=P * NP == D)


def _config(configs: dict, D: int) -> RowConfig:
    """A row kernel's config for tokens of D channels from `configs` (FWD_CONFIGS, BWD_CONFIGS): D takes the nearest
    width at or above it, else the widest (so a one-entry table holds for every width)."""
    return configs[min((w for w in configs if w >= D), default=max(configs))]


def launch_meta(D: int, backward: bool) -> Tuple[int, int, dict]:
    """Tokens per tile, programs per SM and the launch meta (num_warps, pieces) of the forward or backward row kernel
    for tokens of D channels: the config from FWD_CONFIGS / BWD_CONFIGS (`_config`), its warps raised for wide tokens
    (`row_warps`), the pieces from `_launch_pieces`."""
    configs, channels_per_warp = (BWD_CONFIGS, BWD_CHANNELS_PER_WARP) if backward else \
        (FWD_CONFIGS, FWD_CHANNELS_PER_WARP)
    cfg = _config(configs, D)
    pieces = _launch_pieces(D)
    num_warps = row_warps(cfg.num_warps, pieces['P'] * pieces['NP'], channels_per_warp)
    return cfg.rows, cfg.programs_per_sm, dict(num_warps=num_warps, **pieces)


def _flat(N: int, *tensors: torch.Tensor) -> bool:
    """Whether token r = b N + n of every (B, N, .) tensor sits at r * stride(1) (batch rows back to back, or one
    batch row): the row kernels' FLAT."""
    return all(t.shape[0] == 1 or t.stride(0) == N * t.stride(1) for t in tensors)


def norm_gate_fwd(h, x, weight, bias, eps):
    """`LayerNorm(h) * silu(g)` of h (B, N, 2C) and g = x[..., 3C:] (x (B, N, 5C)), in the dtype of h."""
    B, N, D = h.shape
    y = torch.empty_like(h)
    rows, programs_per_sm, meta = launch_meta(D, backward=False)
    n_tiles = triton.cdiv(B * N, rows)
    grid = max(1, min(n_tiles, programs_per_sm * num_sms(h.device)))
    wrap_triton(norm_gate_fwd_kernel)[(grid,)](
        h, x, weight, bias, y, B * N, N, D, h.stride(0), h.stride(1), x.stride(0), x.stride(1), x.shape[-1] - D,
        eps, n_tiles, ROWS=rows, FLAT=_flat(N, h, x), **meta)
    return y


def norm_gate_bwd(dy, h, x, weight, bias, eps, dx, y=None):
    """Backward of `norm_gate_fwd`: writes dg into dx[..., 3C:] (and the forward's output into `y`, a tensor like h,
    if given), returns dh, the weight and bias gradients and the sum of dg over batch and tokens (fp32)."""
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    B, N, D = h.shape
    dh = torch.empty_like(h)
    rows, programs_per_sm, meta = launch_meta(D, backward=True)
    n_tiles = triton.cdiv(B * N, rows)
    grid = min(n_tiles, programs_per_sm * num_sms(h.device))
    part = torch.empty(grid, 3, D, device=h.device, dtype=torch.float32)
    wrap_triton(norm_gate_bwd_kernel)[(grid,)](
        dy, h, x, weight, bias, dh, dx, part, y, B * N, N, D, h.stride(0), h.stride(1), x.stride(0), x.stride(1),
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), x.shape[-1] - D, eps, n_tiles,
        ROWS=rows, WRITE_Y=y is not None, FLAT=_flat(N, h, x, dy, dx), **meta)
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

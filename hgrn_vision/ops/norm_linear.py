"""A LayerNorm and the projection after it as one op: `F.linear(LayerNorm(x), weight, bias)`, the block's `norm1` +
the mixer's `in_proj` and `norm2` + the MLP's `fc1`.

Why one op: autograd keeps the LayerNorm's output (C per token) for the projection's weight gradient, beside x,
which the LayerNorm's own backward needs. Here the backward's row kernel, which reads x and the token's mean and rstd
for the LayerNorm backward anyway, writes the LayerNorm's output again for that gradient, so only x (and two fp32
per token) is kept: C fewer elements per token held for the backward, C more written in it. torch.compile's
partitioner does not make that trade itself: it keeps what a backward matmul reads. The forward is plain PyTorch
(torch.compile fuses the LayerNorm with the residual add before it), in fp32 for 16-bit x as autocast runs a LayerNorm,
its output cast to the projection's dtype.
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

from .bihgru import default_impl
from .triton_utils import (
    BWD_CHANNELS_PER_WARP,
    RowConfig,
    check_triton_device,
    kernel_op,
    linear_param_grads,
    num_sms,
    row_warps,
)

__all__ = ['layer_norm_linear']

# Tuned on an H200 at (65536, 384), bf16 (the small model's norm1 at 224); re-tune:
# `python scripts/gpu_block_ops.py tune`. Issuing the next tile's loads first (as the GLU kernel does) gained nothing.
BWD_CONFIG = RowConfig(2, 2, 16)


@triton.jit
def layer_norm_bwd_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, dx_ptr, y_ptr, part_ptr, M, D, n_tiles,
                           BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """LayerNorm backward over row tiles pid, pid + programs, ... of contiguous x, dy (M, D) with the forward's mean
    and rstd (M,): writes dx and the forward's output y again, and sums the weight and bias gradients over the
    program's rows (fp32)."""
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        m = rmask[:, None] & cmask[None, :]
        off = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=m, other=0.).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.)
        tl.store(y_ptr + off, (xhat * w[None, :] + b[None, :]).to(y_ptr.dtype.element_ty), mask=m)
        dxhat = dy * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / D
        c2 = tl.sum(dxhat, axis=1) / D
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    pp = part_ptr + tl.program_id(0) * 2 * D + cols
    tl.store(pp, dw, mask=cmask)
    tl.store(pp + D, db, mask=cmask)


def layer_norm_bwd(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """x's gradient, the forward's output again (in the dtype of dy) and the LayerNorm's weight and bias gradients,
    for x (..., D), its output's gradient dy and the forward's fp32 mean and rstd (one per row)."""
    x, dy = x.contiguous(), dy.contiguous()
    D = x.shape[-1]
    M = x.numel() // max(D, 1)
    dx, y = torch.empty_like(x), torch.empty_like(dy)
    rows, warps, programs_per_sm = BWD_CONFIG
    block_d = triton.next_power_of_2(D)
    n_tiles = triton.cdiv(M, rows)
    grid = max(1, min(n_tiles, programs_per_sm * num_sms(x.device)))
    part = torch.empty(grid, 2, D, device=x.device, dtype=torch.float32)
    wrap_triton(layer_norm_bwd_kernel)[(grid,)](
        x, dy, mean, rstd, weight, bias, dx, y, part, M, D, n_tiles, BLOCK_D=block_d, ROWS=rows,
        num_warps=row_warps(warps, block_d, BWD_CHANNELS_PER_WARP))
    dw, db = part.sum(0).unbind(0)
    return dx, y, dw.to(weight.dtype, copy=True), db.to(bias.dtype, copy=True)


# ---- the op: registered with torch.library so torch.compile traces through it, forward and backward ----

def _stats_dtype(x: Tensor) -> torch.dtype:
    """The LayerNorm's compute dtype: fp32 for 16-bit x, as autocast runs it."""
    return torch.promote_types(x.dtype, torch.float32)


def _fwd_fake(x, norm_weight, norm_bias, eps, weight, bias):
    stats = x.new_empty(x.shape[:-1], dtype=_stats_dtype(x))
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=weight.dtype), stats, torch.empty_like(stats)


@kernel_op('hgrn_vision::layer_norm_linear', _fwd_fake)
def _fwd_op(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float, weight: Tensor, bias: Optional[Tensor]
            ) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, mean, rstd): the projection's output and the LayerNorm's fp32 statistics, which the backward needs."""
    dt = _stats_dtype(x)
    xf = x.to(dt)
    mean = xf.mean(-1)
    rstd = torch.rsqrt((xf - mean[..., None]).square().mean(-1) + eps)
    y = (xf - mean[..., None]) * rstd[..., None] * norm_weight.to(dt) + norm_bias.to(dt)
    return F.linear(y.to(weight.dtype), weight, bias), mean, rstd


def _bwd_fake(dy, x, mean, rstd, norm_weight, norm_bias):
    return torch.empty_like(x), torch.empty_like(dy), torch.empty_like(norm_weight), torch.empty_like(norm_bias)


@kernel_op('hgrn_vision::layer_norm_bwd', _bwd_fake)
def _bwd_op(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, norm_weight: Tensor, norm_bias: Tensor
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_bwd(dy, x, mean, rstd, norm_weight, norm_bias)


def _setup_context(ctx, inputs, output):
    x, norm_weight, norm_bias, eps, weight, bias = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, output[1], output[2], norm_weight, norm_bias, weight)


def _backward(ctx, dout, _mean, _rstd):
    x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
    dx, y, dnw, dnb = _bwd_op(dout @ weight, x, mean, rstd, norm_weight, norm_bias)
    dweight, dbias = linear_param_grads(dout, y, ctx.needs_input_grad[5])
    return dx, dnw, dnb, None, dweight, dbias


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.hgrn_vision.layer_norm_linear)
def _flops(x_shape, norm_weight_shape, norm_bias_shape, eps, weight_shape, *args, **kwargs) -> int:
    """The projection's matmul, for FlopCounterMode (which cannot see into the op)."""
    return 2 * math.prod(x_shape[:-1]) * weight_shape[1] * weight_shape[0]


def layer_norm_linear(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float, weight: Tensor,
                      bias: Optional[Tensor] = None, *, impl: Optional[str] = None) -> Tensor:
    """`F.linear(F.layer_norm(x, (D,), norm_weight, norm_bias, eps), weight, bias)`, the LayerNorm in fp32 (or
    float64) whatever the dtype of x.

    Args:
        x: (..., D).
        norm_weight, norm_bias: the LayerNorm's affine parameters (D,).
        eps: the LayerNorm's epsilon.
        weight, bias: the projection's (out, D) and (out,) or None, in the dtype the projection runs in (cast them
            under autocast); the result has that dtype.
        impl: 'triton' runs one op whose backward writes the LayerNorm's output again instead of keeping it; 'torch'
            (or any other `bihgru_scan` impl) composes PyTorch's; None picks by the device, as `bihgru_scan` does.
    """
    D = x.shape[-1]
    if tuple(norm_weight.shape) != (D,) or tuple(norm_bias.shape) != (D,) or weight.ndim != 2 \
            or weight.shape[1] != D:
        raise ValueError(f'layer_norm_linear expects x (..., D), norm_weight and norm_bias (D,) and weight (out, D), '
                         f'got x {tuple(x.shape)}, norm_weight {tuple(norm_weight.shape)}, norm_bias '
                         f'{tuple(norm_bias.shape)} and weight {tuple(weight.shape)}.')
    if (default_impl(x) if impl is None else impl) == 'triton':
        check_triton_device(x)
        return _fwd_op(x, norm_weight, norm_bias, eps, weight, bias)[0]
    dt = _stats_dtype(x)
    y = F.layer_norm(x.to(dt), (D,), norm_weight.to(dt), norm_bias.to(dt), eps)
    return F.linear(y.to(weight.dtype), weight, bias)

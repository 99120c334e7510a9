"""The HGRN block's MLP after its first projection as one op: `fc2(silu(a) * b)` for fc1's output x = [a | b].

Why one op: autograd keeps fc2's input, the GLU product p = silu(a) * b (H = half of fc1's width, per token), for
fc2's weight gradient, beside x (2H), which the GLU's own backward needs. Here the backward rewrites p from x in the
kernel that computes x's gradient (it reads a and b anyway), so only x is kept: H fewer elements per token to hold
for the backward, for H more written in it. torch.compile cannot make that trade itself: its partitioner keeps what a
backward matmul reads. The same kernel sums x's gradient over the tokens, the gradient of fc1's bias, which the MLP
adds detached in fc1 and passes here as `in_bias` (as the mixer does with in_proj's), sparing a pass over that
gradient. The forward is plain PyTorch (torch.compile fuses the GLU into one kernel).

    SiLU GLU:  p = silu(a) * b;   da = dp * b * s (1 + a (1 - s)),  db = dp * silu(a),  s = sigmoid(a)
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton
from torch.utils.flop_counter import register_flop_formula

from .bihgru import default_impl
from .triton_utils import check_triton_device, kernel_op, linear_param_grads, num_sms, sigmoid

__all__ = ['silu_glu_linear']


class GluConfig(NamedTuple):
    """Launch config of the GLU backward: programs own channel blocks of both halves and loop over row tiles."""
    rows: int  # tokens per tile
    block_h: int  # channels per program, of each half
    num_warps: int
    programs_per_sm: int  # programs launched per SM, over all channel blocks


# Tuned on an H200 at (65536, 2 x 768), bf16 (the small model's MLP at 224); re-tune:
# `python scripts/gpu_block_ops.py tune`. Tiles of 8 to 16 elements a thread all run within a few percent.
BWD_CONFIG = GluConfig(8, 128, 2, 16)


@triton.jit
def _offsets(rows, cols, cmask, M, H):
    """Offsets of the row tile `rows` x `cols` into x (M, 2H) and into dp and p (M, H), and its mask. No pointers
    in: torch.compile's mutation analysis takes a pointer passed to a helper as written when a store address
    derives from the helper's result."""
    r = rows.to(tl.int64)[:, None]
    return r * (2 * H) + cols[None, :], r * H + cols[None, :], (rows < M)[:, None] & cmask[None, :]


@triton.jit
def _load_tile(x_ptr, dp_ptr, ox, op, m, H):
    """Both halves of x and dp at a tile's offsets, as stored (zeros outside the mask)."""
    return (tl.load(x_ptr + ox, mask=m, other=0.), tl.load(x_ptr + ox + H, mask=m, other=0.),
            tl.load(dp_ptr + op, mask=m, other=0.))


@triton.jit
def silu_glu_bwd_kernel(x_ptr, dp_ptr, dx_ptr, p_ptr, part_ptr, M, H, n_tiles,
                         ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    """Channels [pid0 BLOCK_H, +BLOCK_H) of both halves over row tiles pid1, pid1 + programs, ... of contiguous
    x (M, 2H), dp (M, H); writes dx (M, 2H) and p (M, H), and the program's sums of dx over its rows (fp32).
    The next tile's loads are issued before this tile's stores (a load after a store that may alias it waits for
    it), and the sums stay per element until the end (no reduction across threads in the loop)."""
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    step = tl.num_programs(1) * ROWS
    sa = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
    sb = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    ox, op, m = _offsets(rows, cols, cmask, M, H)
    a, b, dp = _load_tile(x_ptr, dp_ptr, ox, op, m, H)
    for _ in range(tl.program_id(1), n_tiles, tl.num_programs(1)):
        nox, nop, nm = _offsets(rows + step, cols, cmask, M, H)  # the next tile (all masked after the last)
        nxt = _load_tile(x_ptr, dp_ptr, nox, nop, nm, H)
        af, bf, dpf = a.to(tl.float32), b.to(tl.float32), dp.to(tl.float32)
        s = sigmoid(af)
        silu = af * s
        da = dpf * bf * s * (1. + af * (1. - s))
        db = dpf * silu
        tl.store(dx_ptr + ox, da.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(dx_ptr + ox + H, db.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(p_ptr + op, (silu * bf).to(p_ptr.dtype.element_ty), mask=m)
        sa += da  # masked elements are 0
        sb += db
        a, b, dp = nxt
        rows, ox, op, m = rows + step, nox, nop, nm
    pp = part_ptr + tl.program_id(1) * 2 * H + cols
    tl.store(pp, tl.sum(sa, axis=0), mask=cmask)
    tl.store(pp + H, tl.sum(sb, axis=0), mask=cmask)


def silu_glu_bwd(dp: Tensor, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """x's gradient (the shape of x), the GLU product p (the shape of dp) and x's gradient summed over all but the
    last dim (fp32 (2H,)), for x (..., 2H) and p's gradient dp (..., H)."""
    x, dp = x.contiguous(), dp.contiguous()
    H = dp.shape[-1]
    M = dp.numel() // max(H, 1)
    dx, p = torch.empty_like(x), torch.empty_like(dp)
    rows, block_h, warps, programs_per_sm = BWD_CONFIG
    n_hblocks, n_tiles = triton.cdiv(H, block_h), triton.cdiv(M, rows)
    n_prog = max(1, min(n_tiles, triton.cdiv(programs_per_sm * num_sms(x.device), n_hblocks)))
    part = torch.empty(n_prog, 2 * H, device=x.device, dtype=torch.float32)
    wrap_triton(silu_glu_bwd_kernel)[(n_hblocks, n_prog)](
        x, dp, dx, p, part, M, H, n_tiles, ROWS=rows, BLOCK_H=block_h, num_warps=warps)
    return dx, p, part.sum(0)


def _glu(x: Tensor) -> Tensor:
    """silu(a) * b for x = [a | b]."""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


# ---- the op: registered with torch.library so torch.compile traces through it, forward and backward ----

def _fwd_fake(x, weight, bias, in_bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@kernel_op('hgrn_vision::silu_glu_linear', _fwd_fake)
def _fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_bias: Optional[Tensor]) -> Tensor:
    """`F.linear(silu(a) * b, weight, bias)`; `in_bias` is only differentiated."""
    return F.linear(_glu(x), weight, bias)


def _bwd_fake(dp, x):
    return torch.empty_like(x), torch.empty_like(dp), x.new_empty(x.shape[-1], dtype=torch.float32)


@kernel_op('hgrn_vision::silu_glu_bwd', _bwd_fake)
def _bwd_op(dp: Tensor, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return silu_glu_bwd(dp, x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.in_bias_dtype = None if in_bias is None else in_bias.dtype


def _backward(ctx, dout):
    x, weight = ctx.saved_tensors
    dx, p, dx_sum = _bwd_op(dout @ weight, x)
    dweight, dbias = linear_param_grads(dout, p, ctx.needs_input_grad[2])
    return dx, dweight, dbias, None if ctx.in_bias_dtype is None else dx_sum.to(ctx.in_bias_dtype)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.hgrn_vision.silu_glu_linear)
def _flops(x_shape, weight_shape, *args, **kwargs) -> int:
    """fc2's matmul, for FlopCounterMode (which cannot see into the op)."""
    return 2 * math.prod(x_shape[:-1]) * weight_shape[1] * weight_shape[0]


def silu_glu_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, in_bias: Optional[Tensor] = None,
                    impl: Optional[str] = None) -> Tensor:
    """`F.linear(silu(a) * b, weight, bias)` for x = [a | b] (..., 2H): a SiLU GLU and the projection after it.

    Args:
        x: the first projection's output (..., 2H), gate half first.
        weight, bias: the second projection's (out, H) and (out,), in the dtype of x (cast them under autocast).
        in_bias: a bias (2H,) already added into x but detached there: its gradient, x's summed over all but the
            last dim, then comes through this op (the Triton kernel sums it as it writes x's gradient).
        impl: 'triton' runs one op whose backward rewrites the GLU product instead of keeping it; 'torch' (or any
            other `bihgru_scan` impl) composes PyTorch's; None picks by the device, as `bihgru_scan` does.
    """
    if x.shape[-1] % 2 or weight.ndim != 2 or weight.shape[1] != x.shape[-1] // 2:
        raise ValueError(f'silu_glu_linear expects x (..., 2H) and weight (out, H), got x {tuple(x.shape)} and weight '
                         f'{tuple(weight.shape)}.')
    if in_bias is not None and tuple(in_bias.shape) != (x.shape[-1],):
        raise ValueError(f'silu_glu_linear expects in_bias of shape (2H,) = ({x.shape[-1]},), got '
                         f'{tuple(in_bias.shape)}.')
    if (default_impl(x) if impl is None else impl) == 'triton':
        check_triton_device(x)
        return _fwd_op(x, weight, bias, in_bias)
    if in_bias is not None:  # the same value, with in_bias's gradient the sum of x's
        x = x + (in_bias - in_bias.detach())
    return F.linear(_glu(x), weight, bias)

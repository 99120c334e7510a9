"""The scan's fused Triton op, forward and backward: the kernels of `fwd.py` (two-sweep), `fwd_onchip.py` (one-read)
and `bwd.py`, registered with torch.library so that torch.compile traces through them, with autograd."""
from typing import Tuple

import torch

from ..triton_utils import check_triton_device, kernel_op
from .bwd import bihgru_bwd
from .fwd import two_sweep_fwd
from .fwd_onchip import onchip_fits, onchip_fwd

__all__ = ['bihgru_fwd', 'bihgru_bwd', 'bihgru_scan_triton']


def bihgru_fwd(u: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor,
               theta_r: torch.Tensor) -> torch.Tensor:
    """Forward of the fused kernels; returns (B, N, 2C) in the dtype of u. Short sequences in small batches
    (`onchip_fits`) take the one-read kernel, everything else the two-sweep one."""
    u, z = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, z))
    B, N, C = z.shape
    out = torch.empty(B, N, 2 * C, device=u.device, dtype=u.dtype)
    if onchip_fits(B, N, C, u.device):
        onchip_fwd(u, z, gamma, theta_f, theta_r, out)
    else:
        two_sweep_fwd(u, z, gamma, theta_f, theta_r, out)
    return out


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


def bihgru_scan_triton(u, z, gamma, theta_f, theta_r) -> torch.Tensor:
    """The fused Triton op (see `hgrn_vision.ops.bihgru_scan` for the math)."""
    check_triton_device(u)
    return _fwd_op(u, z, gamma, theta_f, theta_r)

"""The input projection of the mixer (`in_proj`) and of the MLP (`fc1`), with the block's LayerNorm before it, as the
fused ops after them want it."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hgrn_vision.ops import layer_norm_linear

# a LayerNorm's (weight, bias, eps), passed to a mixer or MLP to run before its input projection
NormArgs = Tuple[torch.Tensor, torch.Tensor, float]


def norm_args(norm: nn.Module) -> Optional[NormArgs]:
    """A plain affine `nn.LayerNorm`'s (weight, bias, eps), else None (a norm to call as it is)."""
    if type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None:
        return norm.weight, norm.bias, norm.eps
    return None


def layer_norm(x: torch.Tensor, norm: NormArgs) -> torch.Tensor:
    """x normalized over its last dim by a LayerNorm's (weight, bias, eps); TorchScript-able."""
    return F.layer_norm(x, [x.shape[-1]], norm[0], norm[1], norm[2])


def linear_params(proj: nn.Linear, dtype: torch.dtype, detach_bias: bool = False
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A plain Linear's weight and bias (None without one) cast to `dtype`, as autocast casts them for it: for a fused
    op that runs the projection itself. `detach_bias`: the bias's gradient comes from the op after it."""
    bias = proj.bias
    if bias is not None:
        bias = (bias.detach() if detach_bias else bias).to(dtype)
    return proj.weight.to(dtype), bias


def project_in(x: torch.Tensor, proj: nn.Module, norm: Optional[NormArgs] = None, fused: bool = False
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`proj(LayerNorm(x))` (`proj(x)` without `norm`), and the bias the fused op after it must differentiate.

    With `fused` (that op runs on Triton) and a plain Linear `proj`, the projection's bias is added detached and
    returned: its gradient comes through the op's kernels; a LayerNorm then runs with the projection as one op
    (`layer_norm_linear`, whose backward does not keep the LayerNorm's output), in the dtype autocast would run the
    projection in. Otherwise (adapters, other impls) the LayerNorm and `proj` are called as they are.
    """
    if not (fused and type(proj) is nn.Linear):
        return proj(x if norm is None else layer_norm(x, norm)), None
    bias = proj.bias
    if norm is None:
        return F.linear(x, proj.weight, None if bias is None else bias.detach()), bias
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return layer_norm_linear(x, *norm, *linear_params(proj, dtype, detach_bias=True), impl='triton'), bias

"""How a Linear meets the fused op after it: its parameters in the op's dtype, and its bias's gradient taken by the
op (the op's kernels sum it as they write the Linear's output gradient, sparing a pass over it)."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hgrn_vision.ops import default_impl


def uses_triton(impl: Optional[str], x: torch.Tensor) -> bool:
    """Whether an op with `impl` (None: by the device, as `bihgru_scan` picks) runs on Triton for x."""
    return (default_impl(x) if impl is None else impl) == 'triton'


def bias_through_op(linear: nn.Module, impl: Optional[str], x: torch.Tensor) -> bool:
    """Whether `linear`'s bias (if any) is added detached, its gradient coming from the Triton op after it: for a
    plain Linear, on the Triton path. The module that runs the Linear and the one after it both ask this."""
    return type(linear) is nn.Linear and uses_triton(impl, x)


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a projection of x in."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def linear_params(linear: nn.Linear, dtype: torch.dtype, detach_bias: bool = False
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A plain Linear's weight and bias (None without one) cast to `dtype`, as autocast casts them, for a fused op
    that runs the projection itself; `detach_bias`: the bias's gradient comes from the op after it."""
    bias = linear.bias
    if bias is not None:
        bias = (bias.detach() if detach_bias else bias).to(dtype)
    return linear.weight.to(dtype), bias


def project(x: torch.Tensor, linear: nn.Module, bias_to_op: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`linear(x)` and the bias the op after it must differentiate: with `bias_to_op` (see `bias_through_op`) the
    bias is added detached and returned, else None."""
    if not bias_to_op:
        return linear(x), None
    bias = linear.bias
    return F.linear(x, linear.weight, None if bias is None else bias.detach()), bias

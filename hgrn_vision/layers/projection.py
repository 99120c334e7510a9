"""The input projection of the mixer (`in_proj`) and of the MLP (`fc1`), with the block's LayerNorm before it, as the
fused ops after them want it."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hgrn_vision.ops import layer_norm_linear


def project_in(x: torch.Tensor, proj: nn.Module, norm: Optional[nn.Module] = None, fused: bool = False
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`proj(norm(x))` (or `proj(x)` without a norm), and the bias the fused op after it must differentiate.

    With `fused` (that op runs on Triton) and a plain Linear `proj`, the projection's bias is added detached and
    returned: its gradient comes through the op's kernels. A plain affine LayerNorm `norm` then runs with the
    projection as one op (`layer_norm_linear`, whose backward does not keep the LayerNorm's output), in the dtype
    autocast would run the projection in. Anything else (other norms, adapters, other impls) is called as it is.
    """
    if not (fused and type(proj) is nn.Linear):
        return proj(x if norm is None else norm(x)), None
    bias = proj.bias
    if norm is not None and not (type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None):
        x, norm = norm(x), None
    if norm is None:
        return F.linear(x, proj.weight, None if bias is None else bias.detach()), bias
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    out = layer_norm_linear(x, norm.weight, norm.bias, norm.eps, proj.weight.to(dtype),
                            None if bias is None else bias.detach().to(dtype), impl='triton')
    return out, bias

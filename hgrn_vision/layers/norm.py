"""A LayerNorm that runs the Linear after it, for the blocks' `low_memory` mode."""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from hgrn_vision.ops import is_exporting, layer_norm_linear

from .linear import autocast_dtype, bias_through_op, linear_params


@register_notrace_module
class LayerNormLinear(nn.LayerNorm):
    """`linear(LayerNorm(x))`: an `nn.LayerNorm` (same parameters and state dict) built with the Linear that follows
    it, which stays registered where it is (e.g. `mixer.in_proj`) and is not called by its owner.

    On the Triton path both run as one op (`layer_norm_linear`) whose backward writes the norm's output again instead
    of keeping it, and the Linear's bias is added detached: its gradient comes from the fused op its output feeds
    (`bias_through_op`). Elsewhere the norm and the Linear run one after the other. Under TorchScript and
    torch.export it is a plain LayerNorm and the owner runs its Linear.
    """

    def __init__(self, dim: int, linear: nn.Module, impl: Optional[str] = None, eps: float = 1e-5, device=None,
                 dtype=None):
        """
        Args:
            dim: channels normalized.
            linear: the projection after the norm, registered in another module.
            impl: the implementation of the op after the Linear (a `bihgru_scan` impl, None by the device).
            eps: the LayerNorm's epsilon.
        """
        super().__init__(dim, eps=eps, device=device, dtype=dtype)
        self.impl = impl
        self._linear = (linear,)  # a tuple: not a submodule, so the state dict is nn.LayerNorm's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if is_exporting():  # a branch of its own: TorchScript would compile it in an `or`
            return super().forward(x)
        return self._norm_linear(x)

    @torch.jit.unused
    def _norm_linear(self, x: torch.Tensor) -> torch.Tensor:
        linear = self._linear[0]
        if not bias_through_op(linear, self.impl, x):
            return linear(super().forward(x))
        return layer_norm_linear(x, self.weight, self.bias, self.eps,
                                 *linear_params(linear, autocast_dtype(x), detach_bias=True), impl='triton')

"""The HGRN block's MLP: timm's GluMlp as a SiLU GLU (gate first), run through one op on the Triton path."""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, register_notrace_module
from torch import nn

from hgrn_vision.ops import default_impl, silu_glu_linear

from .projection import NormArgs, layer_norm, linear_params, project_in


@register_notrace_module
class SiluGluMlp(GluMlp):
    """`fc2(silu(a) * b)` for `fc1(x) = [a | b]`: timm's `GluMlp(act_layer=nn.SiLU, gate_last=False)`, same modules
    and state dict. Where `impl` resolves to 'triton' and fc1, fc2 are plain Linears with nothing between them (no
    norm, no dropout while training) everything after fc1 is `silu_glu_linear`, whose backward rewrites the GLU
    product instead of keeping it, and fc1's bias is added detached with its gradient from that op's kernel."""

    def __init__(self, in_features: int, hidden_features: int, impl: Optional[str] = None, **kwargs):
        """
        Args:
            in_features: channels C.
            hidden_features: fc1's width (twice the GLU's).
            impl: a `bihgru_scan` implementation name; 'triton' (or None on CUDA) takes the fused op, 'torch'
                GluMlp's modules one after another.
            **kwargs: the rest of GluMlp's arguments (not act_layer, gate_last).
        """
        super().__init__(in_features, hidden_features, act_layer=nn.SiLU, gate_last=False, **kwargs)
        self.impl = impl

    def forward(self, x: torch.Tensor, norm: Optional[NormArgs] = None) -> torch.Tensor:
        """x (..., C); `norm`: a LayerNorm's (weight, bias, eps) to apply to x first (the block's norm2 with
        `low_memory`), on the Triton path as one op with fc1 whose backward does not keep its output."""
        if torch.jit.is_scripting():  # GluMlp's forward, written out (TorchScript has no super())
            if norm is not None:
                x = layer_norm(x, norm)
            a, b = self.fc1(x).chunk(2, dim=-1)
            return self.drop2(self.fc2(self.norm(self.drop1(F.silu(a) * b))))
        fc2 = self.fc2
        fused = type(fc2) is nn.Linear and type(self.norm) is nn.Identity and \
            (self.drop1.p == 0. or not self.training) and (self.impl or default_impl(x)) == 'triton'
        x, in_bias = project_in(x, self.fc1, norm, fused)
        if fused:
            return self.drop2(silu_glu_linear(x, *linear_params(fc2, x.dtype), in_bias=in_bias, impl='triton'))
        a, b = x.chunk(2, dim=-1)  # GluMlp's forward after fc1
        return self.drop2(fc2(self.norm(self.drop1(F.silu(a) * b))))

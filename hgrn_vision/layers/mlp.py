"""The HGRN block's MLP: timm's GluMlp as a SiLU GLU (gate first), run through one op on the Triton path."""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, register_notrace_module
from torch import nn

from hgrn_vision.ops import is_exporting, silu_glu_linear

from .linear import bias_through_op, linear_params, project, uses_triton


@register_notrace_module
class SiluGluMlp(GluMlp):
    """`fc2(silu(a) * b)` for `fc1(x) = [a | b]`: timm's `GluMlp(act_layer=nn.SiLU, gate_last=False)`, same modules
    and state dict. Where `impl` resolves to 'triton' and fc1, fc2 are plain Linears with nothing between them (no
    norm, no dropout while training) everything after fc1 is `silu_glu_linear`, whose backward rewrites the GLU
    product instead of keeping it, and fc1's bias is added detached with its gradient from that op's kernel."""

    def __init__(self, in_features: int, hidden_features: int, impl: Optional[str] = None, low_memory: bool = False,
                 **kwargs):
        """
        Args:
            in_features: channels C.
            hidden_features: fc1's width (twice the GLU's).
            impl: a `bihgru_scan` implementation name; 'triton' (or None on CUDA) takes the fused op, 'torch'
                GluMlp's modules one after another.
            low_memory: the input is fc1's output, computed by the `LayerNormLinear` before the MLP.
            **kwargs: the rest of GluMlp's arguments (not act_layer, gate_last).
        """
        super().__init__(in_features, hidden_features, act_layer=nn.SiLU, gate_last=False, **kwargs)
        self.impl = impl
        self.low_memory = low_memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C), or with `low_memory` fc1's output (..., hidden)."""
        if torch.jit.is_scripting():
            return self._forward_unfused(x)
        if is_exporting():  # a branch of its own: TorchScript would compile it in an `or`
            return self._forward_unfused(x)
        fc2 = self.fc2
        fused = type(fc2) is nn.Linear and type(self.norm) is nn.Identity and \
            (self.drop1.p == 0. or not self.training) and uses_triton(self.impl, x)
        if self.low_memory:  # fc1's bias was added detached where bias_through_op says so
            in_bias = self.fc1.bias if bias_through_op(self.fc1, self.impl, x) else None
        else:
            x, in_bias = project(x, self.fc1, fused and bias_through_op(self.fc1, self.impl, x))
        if fused:
            return self.drop2(silu_glu_linear(x, *linear_params(fc2, x.dtype), in_bias=in_bias, impl='triton'))
        if in_bias is not None:  # the same value, with the bias's gradient the sum of x's
            x = x + (in_bias - in_bias.detach())
        a, b = x.chunk(2, dim=-1)  # GluMlp's forward after fc1
        return self.drop2(fc2(self.norm(self.drop1(F.silu(a) * b))))

    def _forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """GluMlp's forward written out (TorchScript has no super()), from the tokens (the norm before runs no fc1
        here), for TorchScript and torch.export: fc1 runs as its two halves, which onnxruntime writes apart where it
        would copy one output apart."""
        wa, wb = self.fc1.weight.chunk(2)
        bias = self.fc1.bias
        ba, bb = (None, None) if bias is None else bias.chunk(2)
        a, b = F.linear(x, wa, ba), F.linear(x, wb, bb)
        return self.drop2(self.fc2(self.norm(self.drop1(F.silu(a) * b))))

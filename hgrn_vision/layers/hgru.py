"""HGRU token mixer: the bidirectional complex gated linear recurrence of HGRN (Qin et al., NeurIPS 2023)."""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from hgrn_vision.ops import bihgru_scan, bihgru_scan_norm_gate, bihgru_scan_reference, is_exporting

from .linear import bias_through_op, linear_params, project, uses_triton


def hgru_theta_init(dim: int, device=None, dtype=None) -> torch.Tensor:
    """The authors' rotation-angle init, `10000 ** (-2 i / C)` for channel i."""
    return 10000 ** (-2 * torch.arange(dim, device=device, dtype=torch.float32) / dim).to(dtype)


@register_notrace_module
class HgruMixer(nn.Module):
    """Bidirectional HGRU token mixer on (B, N, C) tokens scanned in order along N.

    The authors' `input_proj` (C -> 2C), `lambda_proj` (C -> C) and `gate` (C -> 2C) all read the same input,
    so they are one fused `in_proj` (C -> 5C) whose output splits into `[u | z | g]`; `checkpoint_filter_fn`
    concatenates the authors' weights in that order. `out = out_proj(norm(scan(u, z)) * silu(g))`, where everything
    after `in_proj` is one op (`bihgru_scan_norm_gate`), so that on the Triton path in_proj's bias is added detached
    and its gradient comes from the op's kernels (`bias_through_op`).
    """

    def __init__(
            self,
            dim: int,
            scan_impl: Optional[str] = None,
            low_memory: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: channels C.
            scan_impl: `bihgru_scan` implementation; None picks the best for the device at run time.
            low_memory: the input is in_proj's output, computed by the `LayerNormLinear` before the mixer, and on
                the Triton path out_proj runs inside the op, whose backward writes out_proj's input again instead of
                keeping it (2 C fewer elements per token kept).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.scan_impl = scan_impl
        self.low_memory = low_memory
        self.in_proj = nn.Linear(dim, 5 * dim, **dd)
        self.norm = nn.LayerNorm(2 * dim, **dd)
        self.out_proj = nn.Linear(2 * dim, dim, **dd)
        self.theta_forward = nn.Parameter(hgru_theta_init(dim, **dd))
        self.theta_reverse = nn.Parameter(hgru_theta_init(dim, **dd))

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: tokens (B, N, C), or with `low_memory` in_proj's output (B, N, 5C).
            lower_bound: the forget gate's lower bound gamma (C,).
        """
        if torch.jit.is_scripting():
            return self._forward_unfused(x, lower_bound)
        if is_exporting():  # a branch of its own: TorchScript would compile it in an `or`
            return self._forward_unfused(x, lower_bound)
        bias_to_op = bias_through_op(self.in_proj, self.scan_impl, x)
        if self.low_memory:
            in_bias = self.in_proj.bias if bias_to_op else None
        else:
            x, in_bias = project(x, self.in_proj, bias_to_op)
        args = (x, lower_bound, self.theta_forward, self.theta_reverse, self.norm.weight, self.norm.bias, self.norm.eps)
        out_proj = self.out_proj
        if self.low_memory and type(out_proj) is nn.Linear and uses_triton(self.scan_impl, x):
            weight, bias = linear_params(out_proj, x.dtype)
            return bihgru_scan_norm_gate(*args, in_bias=in_bias, out_weight=weight, out_bias=bias,
                                         impl=self.scan_impl)
        return out_proj(bihgru_scan_norm_gate(*args, in_bias=in_bias, impl=self.scan_impl))

    def _forward_unfused(self, x: torch.Tensor, lower_bound: torch.Tensor) -> torch.Tensor:
        """The mixer op by op, from the tokens (the norm before runs no in_proj here), for TorchScript (the reference
        scan) and torch.export: in_proj runs as its three projections, which onnxruntime writes apart where it
        would copy one output apart."""
        sizes = [2 * self.dim, self.dim, 2 * self.dim]
        weights, biases = self.in_proj.weight.split(sizes), self.in_proj.bias.split(sizes)
        u, z, g = [F.linear(x, w, b) for w, b in zip(weights, biases)]
        if torch.jit.is_scripting():
            h = bihgru_scan_reference(u, z, lower_bound, self.theta_forward, self.theta_reverse)
        else:
            h = bihgru_scan(u, z, lower_bound, self.theta_forward, self.theta_reverse, impl=self.scan_impl)
        return self.out_proj(self.norm(h) * F.silu(g))

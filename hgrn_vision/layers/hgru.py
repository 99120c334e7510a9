"""HGRU token mixer: the bidirectional complex gated linear recurrence of HGRN (Qin et al., NeurIPS 2023)."""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from hgrn_vision.ops import bihgru_scan_norm_gate, bihgru_scan_reference, default_impl


def hgru_theta_init(dim: int, device=None, dtype=None) -> torch.Tensor:
    """The authors' rotation-angle init, `10000 ** (-2 i / C)` for channel i."""
    return 10000 ** (-2 * torch.arange(dim, device=device, dtype=torch.float32) / dim).to(dtype)


@register_notrace_module
class HgruMixer(nn.Module):
    """Bidirectional HGRU token mixer on (B, N, C) tokens scanned in order along N.

    The authors' `input_proj` (C -> 2C), `lambda_proj` (C -> C) and `gate` (C -> 2C) all read the same input,
    so they are one fused `in_proj` (C -> 5C) whose output splits into `[u | z | g]`; `checkpoint_filter_fn`
    concatenates the authors' weights in that order. `out = out_proj(norm(scan(u, z)) * silu(g))`, where everything
    between the two projections is one op (`bihgru_scan_norm_gate`) so that the Triton path can hand `in_proj` its
    gradient in one buffer; there `in_proj`'s bias is added detached and its gradient comes from the op's kernels.
    """

    def __init__(
            self,
            dim: int,
            scan_impl: Optional[str] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: channels C.
            scan_impl: `bihgru_scan` implementation; None picks the best for the device at run time.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.scan_impl = scan_impl
        self.in_proj = nn.Linear(dim, 5 * dim, **dd)
        self.norm = nn.LayerNorm(2 * dim, **dd)
        self.out_proj = nn.Linear(2 * dim, dim, **dd)
        self.theta_forward = nn.Parameter(hgru_theta_init(dim, **dd))
        self.theta_reverse = nn.Parameter(hgru_theta_init(dim, **dd))

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # the scriptable reference scan, composed as bihgru_scan_norm_gate does
            u, z, g = self.in_proj(x).split([2 * self.dim, self.dim, 2 * self.dim], dim=-1)
            h = bihgru_scan_reference(u, z, lower_bound, self.theta_forward, self.theta_reverse)
            return self.out_proj(self.norm(h) * F.silu(g))
        in_bias = None
        if type(self.in_proj) is nn.Linear and (self.scan_impl or default_impl(x)) == 'triton':
            # the bias added detached: its gradient comes through the fused op, summed by its kernels
            in_bias = self.in_proj.bias
            x = F.linear(x, self.in_proj.weight, None if in_bias is None else in_bias.detach())
        else:  # other scans, or an in_proj replaced or wrapped (e.g. by an adapter): called as it is
            x = self.in_proj(x)
        return self.out_proj(bihgru_scan_norm_gate(
            x, lower_bound, self.theta_forward, self.theta_reverse, self.norm.weight, self.norm.bias, self.norm.eps,
            in_bias=in_bias, impl=self.scan_impl))

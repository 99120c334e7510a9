"""HGRU token mixer: the bidirectional complex gated linear recurrence of HGRN (Qin et al., NeurIPS 2023)."""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from hgrn_vision.ops import bihgru_scan_norm_gate, bihgru_scan_reference


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
    gradient in one buffer.
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
        x = self.in_proj(x)
        if torch.jit.is_scripting():  # the scriptable reference scan, composed as bihgru_scan_norm_gate does
            u, z, g = x.split([2 * self.dim, self.dim, 2 * self.dim], dim=-1)
            h = bihgru_scan_reference(u, z, lower_bound, self.theta_forward, self.theta_reverse)
            return self.out_proj(self.norm(h) * F.silu(g))
        return self.out_proj(bihgru_scan_norm_gate(
            x, lower_bound, self.theta_forward, self.theta_reverse, self.norm.weight, self.norm.bias, self.norm.eps,
            impl=self.scan_impl))

"""Reference bidirectional HGRU scan: plain PyTorch, one step at a time, float64-capable, TorchScript-able.

This is the ground truth the fast paths are tested against. It materialises everything and loops over the
sequence in Python, so it is slow; use it for tests, for scripting and for debugging.
"""
from typing import List

import torch
import torch.nn.functional as F


def bihgru_scan_reference(
        u: torch.Tensor,
        z: torch.Tensor,
        gamma: torch.Tensor,
        theta_f: torch.Tensor,
        theta_r: torch.Tensor,
) -> torch.Tensor:
    """Bidirectional complex HGRU scan, computed step by step (see `hgrn_vision.ops.bihgru_scan` for the math).

    Computes in float64 for float64 inputs and in float32 otherwise; returns the dtype of `u`.
    """
    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    c = F.silu(u.to(compute_dtype))
    c_re, c_im = c[..., 0::2], c[..., 1::2]
    g = gamma.to(compute_dtype)
    lam = g + (1. - g) * torch.sigmoid(z.to(compute_dtype))
    v_re, v_im = (1. - lam) * c_re, (1. - lam) * c_im
    cf, sf = torch.cos(theta_f.to(compute_dtype)), torch.sin(theta_f.to(compute_dtype))
    cr, sr = torch.cos(theta_r.to(compute_dtype)), torch.sin(theta_r.to(compute_dtype))

    B, N, C = z.shape
    if N == 0:  # no tokens to scan: an empty output, still part of the inputs' graph
        return torch.cat([v_re, v_im], -1).to(u.dtype)
    # forward direction: hf_t = lam_t e^{i theta_f} hf_{t-1} + v_t
    h_re = torch.zeros(B, C, dtype=compute_dtype, device=u.device)
    h_im = torch.zeros(B, C, dtype=compute_dtype, device=u.device)
    fwd_re: List[torch.Tensor] = []
    fwd_im: List[torch.Tensor] = []
    for t in range(N):
        a_re, a_im = lam[:, t] * cf, lam[:, t] * sf
        h_re, h_im = a_re * h_re - a_im * h_im + v_re[:, t], a_re * h_im + a_im * h_re + v_im[:, t]
        fwd_re.append(h_re)
        fwd_im.append(h_im)
    # reverse direction: hr_t = lam_t e^{i theta_r} hr_{t+1} + v_t
    h_re = torch.zeros(B, C, dtype=compute_dtype, device=u.device)
    h_im = torch.zeros(B, C, dtype=compute_dtype, device=u.device)
    rev_re: List[torch.Tensor] = []
    rev_im: List[torch.Tensor] = []
    for t in range(N - 1, -1, -1):
        a_re, a_im = lam[:, t] * cr, lam[:, t] * sr
        h_re, h_im = a_re * h_re - a_im * h_im + v_re[:, t], a_re * h_im + a_im * h_re + v_im[:, t]
        rev_re.append(h_re)
        rev_im.append(h_im)
    out_re = torch.stack(fwd_re, 1) + torch.stack(rev_re, 1).flip(1)
    out_im = torch.stack(fwd_im, 1) + torch.stack(rev_im, 1).flip(1)
    return torch.cat([out_re, out_im], -1).to(u.dtype)

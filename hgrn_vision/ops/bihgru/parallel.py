"""Fast PyTorch path of the bidirectional HGRU scan for the CPU (and any device without the Triton kernel).

Each direction is a first-order complex linear recurrence `h_t = a_t h_{t-1} + v_t`, solved with a
Hillis-Steele parallel scan: ceil(log2 N) vectorised steps over the whole (B, N, C) tensor instead of N
Python-level steps. Each step composes the affine maps of neighbouring windows,
`(a_t, b_t) <- (a_t a_{t-d}, b_t + a_t b_{t-d})`. No division by gates, so it is stable for gates near 0.
Autograd differentiates it directly.
"""
import torch
import torch.nn.functional as F


def _linear_scan(a: torch.Tensor, b: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Inclusive scan `h_t = a_t h_{t-1} + b_t` along dim 1 (or `h_t = a_t h_{t+1} + b_t` if reverse)."""
    n = a.shape[1]
    d = 1
    while d < n:
        if reverse:
            b = torch.cat([b[:, :-d] + a[:, :-d] * b[:, d:], b[:, -d:]], 1)
            if 2 * d < n:
                a = torch.cat([a[:, :-d] * a[:, d:], a[:, -d:]], 1)
        else:
            b = torch.cat([b[:, :d], b[:, d:] + a[:, d:] * b[:, :-d]], 1)
            if 2 * d < n:
                a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], 1)
        d *= 2
    return b


def bihgru_scan_parallel(
        u: torch.Tensor,
        z: torch.Tensor,
        gamma: torch.Tensor,
        theta_f: torch.Tensor,
        theta_r: torch.Tensor,
) -> torch.Tensor:
    """Bidirectional complex HGRU scan as two parallel scans (see `hgrn_vision.ops.bihgru_scan` for the math).

    Computes in float32 (float64 for float64 inputs) and returns the dtype of `u`.
    """
    real_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    c = F.silu(u.to(real_dtype))
    g = gamma.to(real_dtype)
    lam = g + (1. - g) * torch.sigmoid(z.to(real_dtype))
    v = torch.complex(c[..., 0::2], c[..., 1::2]) * (1. - lam)
    a_f = lam * torch.polar(torch.ones_like(theta_f, dtype=real_dtype), theta_f.to(real_dtype))
    a_r = lam * torch.polar(torch.ones_like(theta_r, dtype=real_dtype), theta_r.to(real_dtype))
    h = _linear_scan(a_f, v, reverse=False) + _linear_scan(a_r, v, reverse=True)
    return torch.cat([h.real, h.imag], -1).to(u.dtype)

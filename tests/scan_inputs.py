"""Random inputs for the scan tests: gates that reach near 0 and near 1, and large angles."""
import torch


def make_scan_inputs(B, N, C, dtype=torch.float64, device='cpu', seed=0, requires_grad=False):
    """u (B, N, 2C), z (B, N, C), gamma, theta_f, theta_r (C,) with extreme values mixed in."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, N, 2 * C, generator=g, dtype=torch.float64) * 2
    z = torch.randn(B, N, C, generator=g, dtype=torch.float64) * 3
    # sigmoid(z) near 0 and near 1 on some positions
    z.view(-1)[::7] = -12.
    z.view(-1)[3::7] = 12.
    gamma = torch.rand(C, generator=g, dtype=torch.float64) * 0.9
    gamma[0] = 0.
    theta_f = torch.randn(C, generator=g, dtype=torch.float64) * 20  # large angles wrap around
    theta_r = torch.randn(C, generator=g, dtype=torch.float64)
    out = [t.to(device=device, dtype=dtype) for t in (u, z, gamma, theta_f, theta_r)]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return out


def rel_err(a, b):
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()

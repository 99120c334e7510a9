"""Random inputs for the scan tests: the benchmark's generator (gates near 0 and near 1, large angles), cast."""
import torch

from hgrn_vision.benchmark import make_scan_inputs as _benchmark_inputs
from hgrn_vision.benchmark import rel_err  # noqa: F401  (re-exported for the tests)


def make_scan_inputs(B, N, C, dtype=torch.float64, device='cpu', seed=0, requires_grad=False):
    """u (B, N, 2C), z (B, N, C), gamma, theta_f, theta_r (C,) in `dtype` on `device`, drawn on the CPU."""
    out = [t.to(device=device, dtype=dtype) for t in _benchmark_inputs(B, N, C, torch.device('cpu'), seed=seed)]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return out

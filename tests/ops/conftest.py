"""Fixtures of the ops tests: the scan's random inputs and the relative error."""
import pytest
import torch

from hgrn_vision.benchmark import make_scan_inputs as benchmark_scan_inputs
from hgrn_vision.benchmark import rel_err as benchmark_rel_err


@pytest.fixture(scope='session')
def make_scan_inputs():
    """`make_scan_inputs(B, N, C, dtype=torch.float64, device='cpu', seed=0, requires_grad=False)`: u (B, N, 2C),
    z (B, N, C), gamma, theta_f, theta_r (C,) in `dtype`, drawn on the CPU by the benchmark's generator (gates near 0
    and near 1, large angles)."""
    def make(B, N, C, dtype=torch.float64, device='cpu', seed=0, requires_grad=False):
        out = [t.to(device=device, dtype=dtype) for t in benchmark_scan_inputs(B, N, C, torch.device('cpu'), seed=seed)]
        return [t.requires_grad_(requires_grad) for t in out]
    return make


@pytest.fixture(scope='session')
def rel_err():
    """`rel_err(a, b)`: ||a - b|| / ||b|| in float64."""
    return benchmark_rel_err

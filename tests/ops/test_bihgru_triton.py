"""The fused Triton scan in Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py) against float64.

Every tuned config runs: each entry of the two-sweep forward's and the backward's tables (by input element size) with
the sequence whole and split into chunks, with and without masks (EVEN), and the one-read forward's.

Tolerances (relative error ||a - b|| / ||b|| against the float64 reference fed the same rounded inputs):
- float32 inputs: 1e-5 for the output and all five gradients (fp32 state and accumulation throughout).
- bf16 / fp16 inputs: the kernel computes in fp32 and rounds once on output, so the error is that one rounding.
  Triton's interpreter converts by truncation (relative error below 2 ulp) where the GPU rounds to nearest
  (below 1/2 ulp), so the bound is 2 ulp: 2^-7 = 7.8e-3 for bf16 and 2^-10 = 9.8e-4 for fp16.
"""
import pytest
import torch

import hgrn_vision.ops.bihgru.common as common
import hgrn_vision.ops.bihgru.fused as fused
from hgrn_vision.ops import bihgru_scan, bihgru_scan_reference
from hgrn_vision.ops.bihgru.bwd import BWD_CONFIGS
from hgrn_vision.ops.bihgru.fwd import FWD_CONFIGS
from hgrn_vision.ops.bihgru.fwd_onchip import ONCHIP_CONFIG, ONCHIP_MAX_N, onchip_fits

NAMES = ('out', 'du', 'dz', 'dgamma', 'dtheta_f', 'dtheta_r')
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
DTYPE = {4: torch.float32, 2: torch.bfloat16}  # the tables' keys: input element size


@pytest.fixture
def errors(rel_err):
    """`errors(inputs)`: relative errors of the Triton op's output and five gradients against the float64 reference
    on the same (rounded) inputs, leaves that require grad."""
    def run(inputs):
        gen = torch.Generator().manual_seed(0)
        ref_in = [t.detach().double().requires_grad_(True) for t in inputs]
        ref = bihgru_scan_reference(*ref_in)
        out = bihgru_scan(*inputs, impl='triton')
        assert out.dtype == inputs[0].dtype and out.shape == ref.shape
        dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        grads = torch.autograd.grad(out, inputs, dout)
        ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
        for g, t in zip(grads, inputs):
            assert g.dtype == t.dtype and g.shape == t.shape
        return dict(zip(NAMES, [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]))
    return run


@pytest.fixture(params=['two_sweep', 'onchip'])
def fwd_kernel(request, monkeypatch):
    """Run a test with each forward kernel: the two-sweep one or the one-read one, whatever the shape."""
    monkeypatch.setattr(fused, 'onchip_fits', lambda *args: request.param == 'onchip')
    return request.param


def _half_inputs(make_scan_inputs, B, N, C, dtype, seed):
    """u and z in `dtype`, the per-channel vectors fp32 (as under autocast), leaves that require grad."""
    u, z, gamma, tf, tr = make_scan_inputs(B, N, C, dtype=torch.float32, seed=seed)
    return [t.requires_grad_(True) for t in (u.to(dtype), z.to(dtype), gamma, tf, tr)]


@pytest.mark.parametrize('size', sorted(set(FWD_CONFIGS) | set(BWD_CONFIGS)))
@pytest.mark.parametrize('split', [False, True])
@pytest.mark.parametrize('even', [False, True])
def test_two_sweep_configs(size, split, even, monkeypatch, make_scan_inputs, errors):
    """Each tuned config of the two-sweep forward and the backward, the sequence whole or split into chunks (made
    shorter here, to split short sequences), with masks or without (C a whole number of channel blocks, N of groups:
    EVEN), the forward forced to the two-sweep kernel."""
    monkeypatch.setattr(fused, 'onchip_fits', lambda *args: False)
    monkeypatch.setattr(common, 'MIN_CHUNK', 8)
    fwd, bwd = FWD_CONFIGS[size], BWD_CONFIGS[size]
    C = fwd.block_c if even else 5
    N = (24 if split else 8) if even else (27 if split else 7)
    assert fwd.block_c == bwd.block_c  # one C makes both EVEN
    for cfg in (fwd, bwd):
        assert common.even(N, C, cfg.block_c) == even
        assert (common.chunks(1, N, C, torch.device('cpu'), cfg)[1] > 2) == split
    errs = errors(_half_inputs(make_scan_inputs, 1, N, C, DTYPE[size], seed=N + C))
    assert all(e < BOUND[DTYPE[size]] for e in errs.values()), errs


@pytest.mark.parametrize('B,N,C', [(1, 1, 5), (2, 37, 19), (1, 5, 40)])
def test_onchip_config(B, N, C, make_scan_inputs, errors):
    """The one-read forward at its tuned config: one row, W chunks of T rows with the last ones partly or wholly
    past N, channel blocks with a masked tail; fp32."""
    assert onchip_fits(B, N, C, torch.device('cpu'))
    errs = errors(make_scan_inputs(B, N, C, dtype=torch.float32, seed=N + C, requires_grad=True))
    assert all(e < 1e-5 for e in errs.values()), errs


def test_forward_kernel_choice():
    """The one-read forward only for short sequences with at most 1.5 of its programs per SM (4 'SMs' on the CPU)."""
    cpu = torch.device('cpu')
    block_c = ONCHIP_CONFIG.block_c
    assert onchip_fits(1, ONCHIP_MAX_N, 6 * block_c, cpu)
    assert onchip_fits(3, 7, 2 * block_c, cpu)
    assert not onchip_fits(1, ONCHIP_MAX_N + 1, block_c, cpu)
    assert not onchip_fits(1, 7, 6 * block_c + 1, cpu)


@pytest.mark.parametrize('B,N,C', [(1, 1, 5), (2, 7, 5), (1, 5, 130)])
def test_fp32_matches_float64(B, N, C, fwd_kernel, make_scan_inputs, errors):
    errs = errors(make_scan_inputs(B, N, C, dtype=torch.float32, seed=N + C, requires_grad=True))
    assert all(e < 1e-5 for e in errs.values()), errs


def test_fp16_inputs(make_scan_inputs, errors):
    errs = errors(_half_inputs(make_scan_inputs, 2, 9, 5, torch.float16, seed=5))
    assert all(e < BOUND[torch.float16] for e in errs.values()), errs


def test_bf16_pairs_and_halves_agree(fwd_kernel, make_scan_inputs):
    """bf16 u is read as int32 (Re, Im) pairs where every stride is even, else as two 16-bit loads (u a view with an
    odd row stride): the very same bits, forward and backward."""
    u, z, gamma, tf, tr = make_scan_inputs(2, 9, 5, dtype=torch.float32, seed=6)
    u, z = u.bfloat16(), z.bfloat16()
    wide = torch.zeros(2, 9, 11, dtype=torch.bfloat16)
    wide[..., :10] = u
    dout = torch.randn(u.shape).bfloat16()
    runs = []
    for uu in (u, wide[..., :10]):
        uu = uu.detach().requires_grad_(True)
        out = bihgru_scan(uu, z, gamma, tf, tr, impl='triton')
        runs.append([out, *torch.autograd.grad(out, uu, dout)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_noncontiguous_views(fwd_kernel, make_scan_inputs, rel_err):
    """u and z as views into one fused projection output, as the mixer passes them; dout non-contiguous too."""
    B, N, C = 2, 6, 5
    fused_proj = torch.randn(B, N, 5 * C, dtype=torch.float32).mul_(2).requires_grad_(True)
    u, z, _ = fused_proj.split([2 * C, C, 2 * C], -1)
    _, _, gamma, tf, tr = make_scan_inputs(B, N, C, dtype=torch.float32)
    out = bihgru_scan(u, z, gamma, tf, tr, impl='triton')
    dout = torch.randn(B, N, 4 * C)[..., ::2]  # strided gradient
    (g_fused,) = torch.autograd.grad(out, fused_proj, dout)
    ref_proj = fused_proj.detach().double().requires_grad_(True)
    ur, zr, _ = ref_proj.split([2 * C, C, 2 * C], -1)
    ref = bihgru_scan_reference(ur, zr, gamma.double(), tf.double(), tr.double())
    (g_ref,) = torch.autograd.grad(ref, ref_proj, dout.double())
    assert rel_err(out, ref) < 1e-5 and rel_err(g_fused, g_ref) < 1e-5


def test_needs_cuda_outside_interpreter(monkeypatch, make_scan_inputs):
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    inputs = make_scan_inputs(1, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        bihgru_scan(*inputs, impl='triton')

"""`silu_glu_linear` (the MLP's SiLU GLU + fc2 as one op, the product rewritten in the backward) in Triton's
interpreter against float64. Tolerances: 1e-5 in fp32, 2 ulp per 16-bit rounding (see test_bihgru_triton.py)."""
import pytest
import torch

import hgrn_vision.ops.glu as glu
from hgrn_vision.ops import silu_glu_linear


def _errors(rel_err, lead, H, out, dtype=torch.float32, bias=True, in_bias=True, seed=0):
    """Relative errors of the Triton op's output and gradients (x, weight, [bias], [in_bias]) against the PyTorch
    composition in float64 on the same rounded inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 2 * H, generator=gen) * 2
    leaves = {'x': x, 'weight': torch.randn(out, H, generator=gen)}
    if bias:
        leaves['bias'] = torch.randn(out, generator=gen)
    if in_bias:
        leaves['in_bias'] = torch.randn(2 * H, generator=gen)
    dout = torch.randn(*lead, out, generator=gen).to(dtype)
    runs = {}
    for impl, dt in (('triton', dtype), ('torch', torch.float64)):
        ins = {k: v.to(dt if k != 'in_bias' else torch.float32).requires_grad_(True) for k, v in leaves.items()}
        y = silu_glu_linear(ins['x'], ins['weight'], ins.get('bias'), in_bias=ins.get('in_bias'), impl=impl)
        if impl == 'triton':
            assert y.dtype == dtype and y.shape == (*lead, out)
        runs[impl] = [y, *torch.autograd.grad(y, list(ins.values()), dout.to(dt))]
    return dict(zip(['out', *leaves], [rel_err(a, b) for a, b in zip(*runs.values())]))


@pytest.mark.parametrize('lead,H,out', [((1, 1), 1, 1), ((2, 7), 5, 3), ((3,), 130, 4), ((2, 3, 5), 7, 2)])
def test_silu_glu_linear_matches_float64(lead, H, out, rel_err):
    """At the tuned config: one and several channel blocks (H = 130: the last masked), several tiles."""
    errs = _errors(rel_err, lead, H, out, seed=H)
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize('biases', [False, True])
def test_silu_glu_linear_tiles(monkeypatch, biases, rel_err):
    """Several channel blocks and row tiles per program, a partial last tile; with and without the biases (in_bias's
    gradient is the kernel's sums over all tiles)."""
    monkeypatch.setattr(glu, 'BWD_CONFIG', glu.GluConfig(4, 32, 1, 1))
    errs = _errors(rel_err, (2, 19), 70, 3, bias=biases, in_bias=biases)
    names = {'out', 'x', 'weight'} | ({'bias', 'in_bias'} if biases else set())
    assert set(errs) == names and all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize('dtype,bound', [(torch.bfloat16, 2 * 2 ** -7), (torch.float16, 2 * 2 ** -10)])
def test_silu_glu_linear_half_inputs(dtype, bound, rel_err):
    errs = _errors(rel_err, (2, 9), 6, 5, dtype=dtype, seed=1)
    assert all(e < bound for e in errs.values()), errs


def test_silu_glu_linear_input_errors():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r'x \(\.\.\., 2H\) and weight \(out, H\)'):
        silu_glu_linear(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match=r'in_bias of shape \(2H,\) = \(6,\)'):
        silu_glu_linear(x, torch.randn(4, 3), in_bias=torch.randn(3))

"""`layer_norm_linear` (a LayerNorm + the projection after it as one op, the LayerNorm's output rewritten in the
backward) in Triton's interpreter against float64. Tolerances: 1e-5 in fp32, 2 ulp per 16-bit rounding (see
test_bihgru_triton.py)."""
import pytest
import torch

import hgrn_vision.ops.norm_linear as nl
from hgrn_vision.ops import layer_norm_linear
from hgrn_vision.ops.triton_utils import RowConfig


def _errors(rel_err, lead, D, out, dtype=torch.float32, seed=0):
    """Relative errors of the Triton op's output and gradients (x, norm weight, norm bias, weight, bias) against the
    PyTorch composition in float64 on the same rounded inputs; the LayerNorm's parameters fp32."""
    gen = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(*lead, D, generator=gen) * 2 + 1, torch.randn(D, generator=gen),
              torch.randn(D, generator=gen), torch.randn(out, D, generator=gen), torch.randn(out, generator=gen)]
    dout = torch.randn(*lead, out, generator=gen).to(dtype)
    runs = []
    for impl, dt in (('triton', dtype), ('torch', torch.float64)):
        ins = [t.to(dt if i in (0, 3, 4) or impl == 'torch' else torch.float32).requires_grad_(True)
               for i, t in enumerate(leaves)]
        y = layer_norm_linear(ins[0], ins[1], ins[2], 1e-5, ins[3], ins[4], impl=impl)
        assert y.dtype == dt and y.shape == (*lead, out)
        runs.append([y, *torch.autograd.grad(y, ins, dout.to(dt))])
    return dict(zip(['out', 'x', 'norm_weight', 'norm_bias', 'weight', 'bias'],
                    [rel_err(a, b) for a, b in zip(*runs)]))


@pytest.mark.parametrize('lead,D,out', [((1, 1), 3, 1), ((2, 7), 5, 3), ((3,), 130, 4), ((2, 3, 5), 7, 2)])
def test_layer_norm_linear_matches_float64(lead, D, out, rel_err):
    """At the tuned config: one token to several tiles, D = 130 padded to 256."""
    errs = _errors(rel_err, lead, D, out, seed=D)
    assert all(e < 1e-5 for e in errs.values()), errs


def test_layer_norm_linear_tiles(monkeypatch, rel_err):
    """Several row tiles per program and a partial last tile: the weight and bias sums span the program's tiles."""
    monkeypatch.setattr(nl, 'BWD_CONFIG', RowConfig(4, 1, 1))
    errs = _errors(rel_err, (2, 19), 70, 3, seed=2)
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize('dtype,bound', [(torch.bfloat16, 3 * 2 ** -7), (torch.float16, 3 * 2 ** -10)])
def test_layer_norm_linear_half_inputs(dtype, bound, rel_err):
    """16-bit x and projection: x, the LayerNorm's output (forward and again in the backward) and dx each rounded."""
    errs = _errors(rel_err, (2, 9), 6, 5, dtype=dtype, seed=1)
    assert all(e < bound for e in errs.values()), errs


def test_layer_norm_linear_input_errors():
    x, v = torch.randn(2, 6), torch.randn(6)
    with pytest.raises(ValueError, match=r'norm_weight and norm_bias \(D,\) and weight \(out, D\)'):
        layer_norm_linear(x, v, v, 1e-5, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r'norm_weight \(5,\)'):
        layer_norm_linear(x, v[:5], v, 1e-5, torch.randn(3, 6))

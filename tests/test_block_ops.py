"""The block's fused ops besides the mixer's, in Triton's interpreter against float64: `silu_glu_linear` (the MLP's
SiLU GLU + fc2, the product rewritten in the backward) and `layer_norm_linear` (a LayerNorm + the projection after it,
the LayerNorm's output rewritten in the backward); the MLP module against timm's GluMlp, the block against its
composition. Tolerances as in test_scan_triton.py: 1e-5 in fp32, 2 ulp per 16-bit rounding."""
import pytest
import torch
from timm.layers import GluMlp
from torch import nn

import hgrn_vision.ops.glu as glu
import hgrn_vision.ops.norm_linear as nl
from hgrn_vision.layers import SiluGluMlp
from hgrn_vision.ops import layer_norm_linear, silu_glu_linear

from scan_inputs import rel_err


def _errors(lead, H, out, dtype=torch.float32, bias=True, in_bias=True, seed=0):
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
def test_silu_glu_linear_matches_float64(lead, H, out):
    errs = _errors(lead, H, out, seed=H)
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize('biases', [False, True])
def test_silu_glu_linear_tiles(monkeypatch, biases):
    """Several channel blocks and row tiles per program, a partial last tile; with and without the biases (in_bias's
    gradient is the kernel's sums over all tiles)."""
    monkeypatch.setattr(glu, 'BWD_CFG', (4, 32, 1, 1))
    errs = _errors((2, 19), 70, 3, bias=biases, in_bias=biases)
    names = {'out', 'x', 'weight'} | ({'bias', 'in_bias'} if biases else set())
    assert set(errs) == names and all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize('dtype,bound', [(torch.bfloat16, 2 * 2 ** -7), (torch.float16, 2 * 2 ** -10)])
def test_silu_glu_linear_half_inputs(dtype, bound):
    errs = _errors((2, 9), 6, 5, dtype=dtype, seed=1)
    assert all(e < bound for e in errs.values()), errs


def test_silu_glu_linear_input_errors():
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r'x \(\.\.\., 2H\) and weight \(out, H\)'):
        silu_glu_linear(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match=r'in_bias of shape \(2H,\) = \(6,\)'):
        silu_glu_linear(x, torch.randn(4, 3), in_bias=torch.randn(3))


def test_silu_glu_mlp_matches_timm_glu_mlp():
    """The MLP on the fused op gives timm's GluMlp(act_layer=SiLU, gate_last=False) outputs and parameter
    gradients from the same state dict (fc1's bias gradient through the op's sums)."""
    torch.manual_seed(0)
    ours = SiluGluMlp(6, 10, impl='triton')
    ref = GluMlp(6, 10, act_layer=nn.SiLU, gate_last=False)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 6)
    outs = []
    for m in (ours, ref):
        y = m(x)
        y.square().sum().backward()
        outs.append((y, {n: p.grad for n, p in m.named_parameters()}))
    assert rel_err(outs[0][0], outs[1][0]) < 1e-6
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, g in outs[1][1].items():
        assert rel_err(outs[0][1][name], g) < 1e-5, name


def _ln_errors(lead, D, out, dtype=torch.float32, seed=0):
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
def test_layer_norm_linear_matches_float64(lead, D, out):
    errs = _ln_errors(lead, D, out, seed=D)
    assert all(e < 1e-5 for e in errs.values()), errs


def test_layer_norm_linear_tiles(monkeypatch):
    """Several row tiles per program and a partial last tile: the weight and bias sums span the program's tiles."""
    monkeypatch.setattr(nl, 'BWD_CFG', (4, 1, 1))
    errs = _ln_errors((2, 19), 70, 3, seed=2)
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize('dtype,bound', [(torch.bfloat16, 3 * 2 ** -7), (torch.float16, 3 * 2 ** -10)])
def test_layer_norm_linear_half_inputs(dtype, bound):
    """16-bit x and projection: x, the LayerNorm's output (forward and again in the backward) and dx each rounded."""
    errs = _ln_errors((2, 9), 6, 5, dtype=dtype, seed=1)
    assert all(e < bound for e in errs.values()), errs


def test_layer_norm_linear_input_errors():
    x, v = torch.randn(2, 6), torch.randn(6)
    with pytest.raises(ValueError, match=r'norm_weight and norm_bias \(D,\) and weight \(out, D\)'):
        layer_norm_linear(x, v, v, 1e-5, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r'norm_weight \(5,\)'):
        layer_norm_linear(x, v[:5], v, 1e-5, torch.randn(3, 6))

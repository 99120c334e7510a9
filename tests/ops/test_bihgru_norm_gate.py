"""The mixer op (`bihgru_scan_norm_gate`: the scan, LayerNorm and gate as one op) in Triton's interpreter against
float64, and its row kernels at every tuned config.

Tolerances as in test_bihgru_triton.py: 1e-5 in fp32; in 16 bits the op rounds twice (the scan's h, then y; in the
backward dh, then du and dz), so its bound there is 2 ulp twice.
"""
import pytest
import torch
import torch.nn.functional as F

import hgrn_vision.ops.bihgru.norm_gate as norm_gate
from hgrn_vision.ops import bihgru_scan_norm_gate
from hgrn_vision.ops.triton_utils import RowConfig

BOUND = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.fixture
def norm_gate_inputs(make_scan_inputs):
    """`norm_gate_inputs(B, N, C, dtype, seed=0)`: x = [u | z | g] (B, N, 5C) in `dtype`; the scan's per-channel
    vectors, a LayerNorm's weight and bias: fp32."""
    def make(B, N, C, dtype, seed=0):
        u, z, gamma, tf, tr = make_scan_inputs(B, N, C, dtype=torch.float32, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(B, N, 2 * C, generator=gen) * 2
        weight, bias = torch.randn(2, 2 * C, generator=gen) * torch.tensor([[0.5], [0.3]]) + torch.tensor([[1.], [0.]])
        return [torch.cat([u, z, g], -1).to(dtype), gamma, tf, tr, weight, bias]
    return make


@pytest.fixture
def errors(rel_err):
    """`errors(inputs, dy_view=False, in_bias=True, out_proj=())`: relative errors of the fused op's output and
    gradients against float64 composed from the reference scan. With `in_bias` an fp32 bias (5C,) is passed as the
    mixer passes in_proj's (added detached in x): its gradient must be x's summed over batch and tokens. `out_proj`:
    'weight' or 'weight', 'bias' of an output projection to 3 channels, in x's dtype, taken into the op (their
    gradients come last)."""
    def run(inputs, dy_view=False, in_bias=True, out_proj=()):
        x = inputs[0]
        gen = torch.Generator().manual_seed(2)
        extra = {'in_bias': torch.randn(x.shape[-1], generator=gen)} if in_bias else {}
        sizes = {'weight': (3, x.shape[-1] // 5 * 2), 'bias': (3,)}
        extra.update({f'out_{k}': torch.randn(sizes[k], generator=gen).to(x.dtype) for k in out_proj})
        inputs = [t.detach().requires_grad_(True) for t in [*inputs, *extra.values()]]
        shape = (*x.shape[:-1], 3 if out_proj else x.shape[-1] // 5 * 2)
        gen = torch.Generator().manual_seed(1)
        dy = torch.randn(shape, generator=gen).to(x.dtype)
        if dy_view:  # a non-contiguous gradient
            dy = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(x.dtype)[..., ::2]
        names = ('out', 'dx', 'dgamma', 'dtheta_f', 'dtheta_r', 'dweight', 'dbias', *(f'd{k}' for k in extra))
        runs = []
        for impl, dt in (('triton', None), ('reference', torch.float64)):
            ins = [t.detach().to(dt).requires_grad_(True) for t in inputs] if dt else inputs
            out = bihgru_scan_norm_gate(*ins[:6], eps=1e-5, impl=impl, **dict(zip(extra, ins[6:])))
            grads = torch.autograd.grad(out, ins, dy.to(out.dtype))
            if impl == 'triton':
                assert out.dtype == x.dtype and all(g.dtype == t.dtype and g.shape == t.shape
                                                    for g, t in zip(grads, ins))
            runs.append([out, *grads])
        return dict(zip(names, [rel_err(a, b) for a, b in zip(*runs)]))
    return run


@pytest.mark.parametrize('B,N,C', [(1, 1, 5), (2, 7, 5), (1, 37, 3), (2, 5, 130), (2, 6, 4), (1, 5, 7)])
def test_matches_float64(B, N, C, norm_gate_inputs, errors):
    """Output and all seven gradients (x's in one buffer, in_bias's from the kernels' sums) in fp32. The row kernels
    hold a token's 2C channels as pieces of a power of two: 2C = 6 three whole pieces of 2, 10 and 260 three with a
    masked tail, 8 one whole piece, 14 one with a masked tail."""
    errs = errors(norm_gate_inputs(B, N, C, torch.float32, seed=N + C))
    assert all(e < 1e-5 for e in errs.values()), errs


def _row_widths():
    """Every tuned width of the row kernels' tables, whole (three whole pieces) and 2 narrower (a masked tail, the
    same entry), and two narrow widths held in one piece (whole and masked)."""
    tuned = sorted(set(norm_gate.FWD_CONFIGS) | set(norm_gate.BWD_CONFIGS))
    return [8, 14, *(w - d for w in tuned for d in (0, 2))]


@pytest.mark.parametrize('D', _row_widths())
def test_row_kernel_configs(D, rel_err):
    """The LayerNorm + gate row kernels alone at each tuned config, picked by the token's width D = 2C, forward and
    backward (dh, dg into x's gradient buffer, the weight, bias and dg sums, y written again) against float64."""
    B, N, C = 1, 5, D // 2
    gen = torch.Generator().manual_seed(D)
    h, x, dy = torch.randn(B, N, D, generator=gen), torch.randn(B, N, 5 * C, generator=gen) * 2, \
        torch.randn(B, N, D, generator=gen)
    w, b = torch.randn(D, generator=gen) * 0.5 + 1, torch.randn(D, generator=gen) * 0.3
    dx, y_again = torch.zeros_like(x), torch.empty_like(h)
    y = norm_gate.norm_gate_fwd(h, x, w, b, 1e-5)
    dh, dw, db, dgs = norm_gate.norm_gate_bwd(dy, h, x, w, b, 1e-5, dx, y_again)
    ref_in = [t.double().requires_grad_(True) for t in (h, x[..., 3 * C:], w, b)]
    ref = F.layer_norm(ref_in[0], (D,), ref_in[2], ref_in[3], 1e-5) * F.silu(ref_in[1])
    ref_grads = torch.autograd.grad(ref, ref_in, dy.double())
    got = [y, y_again, dh, dx[..., 3 * C:], dw, db, dgs]
    want = [ref, ref, ref_grads[0], ref_grads[1], ref_grads[2], ref_grads[3], ref_grads[1].sum((0, 1))]
    errs = [rel_err(a, r) for a, r in zip(got, want)]
    assert all(e < 1e-5 for e in errs), errs
    assert not dx[..., :3 * C].any()  # the columns of du and dz are the scan kernel's


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_inputs(dtype, norm_gate_inputs, errors):
    """16-bit x, and no in_bias (the op as called when in_proj is not a plain Linear)."""
    errs = errors(norm_gate_inputs(2, 9, 5, dtype, seed=5), in_bias=False)
    assert set(errs) == {'out', 'dx', 'dgamma', 'dtheta_f', 'dtheta_r', 'dweight', 'dbias'}
    assert all(e < 2 * BOUND[dtype] for e in errs.values()), errs


@pytest.mark.parametrize('dtype,out_proj', [(torch.float32, ('weight', 'bias')), (torch.bfloat16, ('weight',))])
def test_out_proj(dtype, out_proj, norm_gate_inputs, errors):
    """The op with the output projection inside (its backward writes y again for the projection's weight
    gradient), with and without the projection's bias."""
    errs = errors(norm_gate_inputs(2, 7, 5, dtype, seed=3), out_proj=out_proj)
    assert set(errs) >= {f'dout_{k}' for k in out_proj}
    assert all(e < (1e-5 if dtype == torch.float32 else 2 * BOUND[dtype]) for e in errs.values()), errs


@pytest.mark.parametrize('more_tokens', [0, 3])
def test_views_and_tiles(monkeypatch, more_tokens, norm_gate_inputs, errors):
    """x as a strided view (rows of a wider tensor; with `more_tokens` also the first N tokens of a longer sequence,
    so that its batch stride is not N times its token stride and the row kernels index by batch and token), dy
    non-contiguous, and several tiles per forward and backward program, the last partial."""
    monkeypatch.setattr(norm_gate, 'FWD_CONFIGS', {6: RowConfig(2, 1, 1)})
    monkeypatch.setattr(norm_gate, 'BWD_CONFIGS', {6: RowConfig(2, 1, 1)})  # 2 rows a tile: 19 tiles over 4 programs
    x, *rest = norm_gate_inputs(2, 19, 3, torch.float32, seed=2)
    wide = torch.cat([x, torch.randn(2, 19, 4)], -1)
    wide = torch.cat([wide, torch.randn(2, more_tokens, 19)], 1)[:, :19, :15]
    assert (wide.stride(0) == 19 * wide.stride(1)) == (more_tokens == 0)
    errs = errors([wide, *rest], dy_view=True)
    assert all(e < 1e-5 for e in errs.values()), errs


def test_in_bias_composed(norm_gate_inputs):
    """The PyTorch paths take in_bias as the Triton op does: x's value as it is, in_bias's gradient the sum of x's."""
    x, *rest = [t.double() for t in norm_gate_inputs(2, 5, 3, torch.float64)]
    x.requires_grad_(True)
    in_bias = torch.randn(15, dtype=torch.float64, requires_grad=True)
    out = bihgru_scan_norm_gate(x, *rest, in_bias=in_bias, impl='torch')
    assert torch.equal(out, bihgru_scan_norm_gate(x, *rest, impl='torch'))
    dx, db = torch.autograd.grad(out.square().sum(), (x, in_bias))
    assert torch.allclose(db, dx.sum((0, 1)))


def test_input_errors(norm_gate_inputs):
    x, gamma, tf, tr, weight, bias = norm_gate_inputs(1, 3, 2, torch.float32)
    with pytest.raises(ValueError, match=r'x of shape \(B, N, 5C\)'):
        bihgru_scan_norm_gate(x[..., :-1], gamma, tf, tr, weight, bias)
    with pytest.raises(ValueError, match=r'norm_weight of shape \(2C,\) = \(4,\)'):
        bihgru_scan_norm_gate(x, gamma, tf, tr, weight[:3], bias)
    with pytest.raises(ValueError, match=r'in_bias of shape \(5C,\) = \(10,\)'):
        bihgru_scan_norm_gate(x, gamma, tf, tr, weight, bias, in_bias=weight)
    with pytest.raises(ValueError, match=r'out_weight of shape \(C_out, 2C\) = \(C_out, 4\)'):
        bihgru_scan_norm_gate(x, gamma, tf, tr, weight, bias, out_weight=torch.ones(3, 5))
    with pytest.raises(ValueError, match='out_bias without out_weight'):
        bihgru_scan_norm_gate(x, gamma, tf, tr, weight, bias, out_bias=bias)

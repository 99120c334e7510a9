"""The fused Triton scan in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) against float64.

Tolerances (relative error ||a - b|| / ||b|| against the float64 reference fed the same rounded inputs):
- float32 inputs: 1e-5 for the output and all five gradients (fp32 state and accumulation throughout).
- bf16 / fp16 inputs: the kernel computes in fp32 and rounds once on output, so the error is that one rounding.
  Triton's interpreter converts by truncation (relative error below 2 ulp) where the GPU rounds to nearest
  (below 1/2 ulp), so the bound is 2 ulp: 2^-7 = 7.8e-3 for bf16 and 2^-10 = 9.8e-4 for fp16. Measured on an H100
  (scripts/gpu_scan_tune.py check): 1.4e-3 to 2.4e-3 for bf16 at the benchmark shapes, 1.1e-7 to 6.1e-7 for fp32.
- The fused scan + LayerNorm + gate op (`bihgru_scan_norm_gate`) rounds twice in 16 bits (the scan's h, then y; in
  the backward dh, then du and dz), so its bound there is 2 ulp twice.
"""
import pytest
import torch

import hgrn_vision.ops.bihgru.fused as fused
import hgrn_vision.ops.bihgru.norm_gate as norm_gate
from hgrn_vision.ops import bihgru_scan, bihgru_scan_norm_gate, bihgru_scan_reference

from scan_inputs import make_scan_inputs, rel_err

NAMES = ('out', 'du', 'dz', 'dgamma', 'dtheta_f', 'dtheta_r')
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _grad_errors(fn, ref_fn, inputs, dout, names):
    """Relative errors of fn's output and gradients (inputs: leaves that require grad; dout: the output gradient,
    in the output's dtype) against ref_fn's on the same inputs in float64 (dout rounded the same for both)."""
    ref_in = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = ref_fn(*ref_in)
    out = fn(*inputs)
    assert out.dtype == inputs[0].dtype and out.shape == ref.shape
    grads = torch.autograd.grad(out, inputs, dout)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    for g, t in zip(grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape
    return dict(zip(names, [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]))


def _errors(inputs):
    """Relative errors of the triton output and gradients against float64 on the same inputs."""
    gen = torch.Generator().manual_seed(0)
    dout = torch.randn(inputs[0].shape, generator=gen, dtype=torch.float64).to(inputs[0].dtype)
    return _grad_errors(lambda *a: bihgru_scan(*a, impl='triton'), bihgru_scan_reference, inputs, dout, NAMES)


def _use_onchip(monkeypatch):
    """Every shape takes the one-read forward: its length limit lifted, the device pretending to have many SMs."""
    monkeypatch.setattr(fused, 'ONCHIP_MAX_N', 10 ** 9)
    monkeypatch.setattr(fused, '_num_sms', lambda device: 10 ** 9)


@pytest.fixture(params=['two_sweep', 'onchip'])
def fwd_kernel(request, monkeypatch):
    """Run a test with each forward kernel: the two-sweep one or the one-read one."""
    if request.param == 'two_sweep':
        monkeypatch.setattr(fused, 'ONCHIP_MAX_N', 0)
    else:
        _use_onchip(monkeypatch)
    return request.param


@pytest.mark.parametrize('B,N,C', [(1, 1, 5), (2, 7, 5), (1, 37, 5), (1, 5, 130)])
def test_triton_fp32_matches_float64(B, N, C, fwd_kernel):
    errs = _errors(make_scan_inputs(B, N, C, dtype=torch.float32, seed=N + C, requires_grad=True))
    assert all(e < 1e-5 for e in errs.values()), errs


def test_triton_forward_kernel_choice():
    """The one-read forward only for short sequences with at most 1.5 of its programs per SM (4 'SMs' on the CPU)."""
    cpu = torch.device('cpu')
    block_c = fused.ONCHIP_CFG[0]
    assert fused._onchip_fits(1, fused.ONCHIP_MAX_N, 6 * block_c, cpu)
    assert fused._onchip_fits(3, 7, 2 * block_c, cpu)
    assert not fused._onchip_fits(1, fused.ONCHIP_MAX_N + 1, block_c, cpu)
    assert not fused._onchip_fits(1, 7, 6 * block_c + 1, cpu)


@pytest.mark.parametrize('cfg', [(16, 4), (8, 2), (32, 16)])
def test_triton_onchip_chunks(cfg, monkeypatch):
    """The one-read forward with W chunks of T rows per program (W > 1, the last chunks partly or wholly past N, C
    not a multiple of the block): its chunk maps combined across chunks in both directions."""
    _use_onchip(monkeypatch)
    monkeypatch.setattr(fused, 'ONCHIP_CFG', cfg)
    inputs = make_scan_inputs(2, 37, 19, dtype=torch.float32, seed=7)
    ref = bihgru_scan_reference(*[t.double() for t in inputs])
    assert rel_err(fused.bihgru_fwd(*inputs), ref) < 1e-5


@pytest.mark.parametrize('ahead', [False, True])
def test_triton_chunked_two_level_scan(ahead, monkeypatch):
    """Sequences longer than a chunk: chunk summaries, then carries folded in; forced here with tiny chunks. The
    forward with and without its loads a group ahead (FWD_AHEAD, by default only for 16-bit inputs), in fp32."""
    monkeypatch.setattr(fused, 'FWD_AHEAD', {4: ahead})
    monkeypatch.setattr(fused, 'MIN_CHUNK', 4)
    monkeypatch.setattr(fused, 'ONCHIP_MAX_N', 0)  # the two-sweep forward (the backward always is)
    B, N, C = 2, 19, 3
    n_cblocks, n_chunks, chunk_len = fused._chunks(B, N, C, torch.device('cpu'), fused.FWD_CFG[4])
    assert n_chunks > 2 and chunk_len < N
    errs = _errors(make_scan_inputs(B, N, C, dtype=torch.float32, seed=3, requires_grad=True))
    assert all(e < 1e-5 for e in errs.values()), errs


@pytest.mark.parametrize('dtype,N,min_chunk',
                         [(torch.float32, 8, 64), (torch.float32, 16, 4), (torch.bfloat16, 12, 64)])
def test_triton_even_launches(dtype, N, min_chunk, monkeypatch):
    """Whole channel blocks and whole groups of rows: both two-sweep kernels run without masks (EVEN), also with the
    sequence split into chunks; the same results as the masked kernels' bound."""
    monkeypatch.setattr(fused, 'MIN_CHUNK', min_chunk)
    monkeypatch.setattr(fused, 'ONCHIP_MAX_N', 0)
    size = 4 if dtype == torch.float32 else 2
    B, C = 2, 2 * fused.FWD_CFG[size][0]
    assert fused._even(N, C, fused.FWD_CFG[size][0]) and fused._even(N, C, fused.BWD_CFG[size][0])
    assert not fused._even(N + 2, C, fused.FWD_CFG[size][0]) and not fused._even(N, C + 1, fused.FWD_CFG[size][0])
    n_chunks = fused._chunks(B, N, C, torch.device('cpu'), fused.BWD_CFG[size])[1]
    assert (n_chunks > 1) == (min_chunk == 4)
    errs = _errors(make_scan_inputs(B, N, C, dtype=dtype, seed=N, requires_grad=True))
    assert all(e < BOUND[dtype] for e in errs.values()), errs


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_triton_half_inputs(dtype, fwd_kernel):
    u, z, gamma, tf, tr = make_scan_inputs(2, 9, 5, dtype=torch.float32, seed=5)
    inputs = [t.requires_grad_(True) for t in (u.to(dtype), z.to(dtype), gamma, tf, tr)]
    errs = _errors(inputs)
    assert all(e < BOUND[dtype] for e in errs.values()), errs


def test_triton_bf16_pairs(fwd_kernel, monkeypatch):
    """bf16 u read as int32 (Re, Im) pairs (`_as_pairs`, where every stride is even) gives the very bits of the two
    16-bit loads; an odd row stride keeps the 16-bit loads."""
    u, z, gamma, tf, tr = make_scan_inputs(2, 9, 5, dtype=torch.float32, seed=6)
    u, z = u.bfloat16(), z.bfloat16()
    assert fused._as_pairs(u).dtype == torch.int32
    assert fused._as_pairs(torch.zeros(2, 9, 11, dtype=torch.bfloat16)[..., :10]).dtype == torch.bfloat16
    assert fused._as_pairs(u.float()).dtype == torch.float32
    dout = torch.randn(u.shape).bfloat16()
    runs = []
    for pairs in (True, False):
        if not pairs:
            monkeypatch.setattr(fused, '_as_pairs', lambda t: t)
        runs.append([fused.bihgru_fwd(u, z, gamma, tf, tr), *fused.bihgru_bwd(dout, u, z, gamma, tf, tr)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_triton_noncontiguous_views(fwd_kernel):
    """u and z as views into one fused projection output, as the mixer passes them; dout non-contiguous too."""
    B, N, C = 2, 6, 5
    fused_proj = torch.randn(B, N, 5 * C, dtype=torch.float32).mul_(2).requires_grad_(True)
    u, z, _ = fused_proj.split([2 * C, C, 2 * C], -1)
    _, _, gamma, tf, tr = make_scan_inputs(B, N, C, dtype=torch.float32)
    out = bihgru_scan(u, z, gamma, tf, tr, impl='triton')
    dout = torch.randn(B, N, 4 * C).transpose(1, 1)[..., ::2]  # strided gradient
    (g_fused,) = torch.autograd.grad(out, fused_proj, dout)
    ref_proj = fused_proj.detach().double().requires_grad_(True)
    ur, zr, _ = ref_proj.split([2 * C, C, 2 * C], -1)
    ref = bihgru_scan_reference(ur, zr, gamma.double(), tf.double(), tr.double())
    (g_ref,) = torch.autograd.grad(ref, ref_proj, dout.double())
    assert rel_err(out, ref) < 1e-5 and rel_err(g_fused, g_ref) < 1e-5


def test_triton_needs_cuda_outside_interpreter(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    inputs = make_scan_inputs(1, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        bihgru_scan(*inputs, impl='triton')


def test_triton_op_compiles_fullgraph_in_a_model(fwd_kernel):
    """torch.compile(fullgraph=True) traces a model through the custom op (fake impl + autograd), forward and
    backward, without a graph break, and gives eager's output and gradients. backend='aot_eager' builds the forward
    and backward graphs as inductor does, then runs them eagerly (inductor would emit GPU code the CPU cannot run)."""
    import timm

    import hgrn_vision  # noqa: F401  (registers the models)
    torch._dynamo.reset()
    model = timm.create_model(
        'hgrn_deit_tiny', depth=2, patch_size=7, num_classes=3, in_chans=1, scan_impl='triton')
    x = torch.randn(2, 1, 28, 28)
    ref = model(x)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True, backend='aot_eager')(x)
    out.square().sum().backward()
    assert rel_err(out, ref) < 1e-5
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        assert rel_err(p.grad, g) < 1e-4, name


def _norm_gate_inputs(B, N, C, dtype, seed=0):
    """x = [u | z | g] (B, N, 5C) in `dtype`; the scan's per-channel vectors, a LayerNorm's weight and bias: fp32."""
    u, z, gamma, tf, tr = make_scan_inputs(B, N, C, dtype=torch.float32, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(B, N, 2 * C, generator=gen) * 2
    weight, bias = torch.randn(2, 2 * C, generator=gen) * torch.tensor([[0.5], [0.3]]) + torch.tensor([[1.], [0.]])
    return [torch.cat([u, z, g], -1).to(dtype), gamma, tf, tr, weight, bias]


def _norm_gate_errors(inputs, dy_view=False, in_bias=True, out_proj=()):
    """Relative errors of the fused op's output and gradients against float64 composed from the reference scan. With
    `in_bias` an fp32 bias (5C,) is passed as the mixer passes in_proj's (added detached in x): its gradient must be
    x's summed over batch and tokens. `out_proj`: 'weight' or 'weight', 'bias' of an output projection to 3 channels,
    in x's dtype, taken into the op (their gradients come last)."""
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

    def op(impl):
        return lambda *a: bihgru_scan_norm_gate(*a[:6], eps=1e-5, impl=impl, **dict(zip(extra, a[6:])))
    return _grad_errors(op('triton'), op('reference'), inputs, dy, names)


@pytest.mark.parametrize('B,N,C', [(1, 1, 5), (2, 7, 5), (1, 37, 3), (2, 5, 130), (2, 6, 4), (1, 5, 7)])
def test_triton_norm_gate_matches_float64(B, N, C, fwd_kernel):
    """The mixer's scan + LayerNorm + gate op: output and all seven gradients (x's in one buffer, in_bias's from the
    kernels' sums) in fp32. The row kernels hold a token's 2C channels as pieces (`_launch_pieces`): 2C = 6 three
    whole pieces of 2, 10 and 260 three with a masked tail, 8 one whole piece, 14 one with a masked tail."""
    pieces = norm_gate._launch_pieces(2 * C)
    assert (pieces['NP'], pieces['EVEN']) == {3: (3, True), 5: (3, False), 130: (3, False), 4: (1, True),
                                              7: (1, False)}[C]
    errs = _norm_gate_errors(_norm_gate_inputs(B, N, C, torch.float32, seed=N + C))
    assert all(e < 1e-5 for e in errs.values()), errs


def test_norm_gate_pieces_of_the_models_widths():
    """The models' 2C (tiny, small, base) are three whole pieces; a power of two stays one."""
    assert [norm_gate._launch_pieces(d) for d in (384, 768, 1536, 1024)] == [
        dict(P=128, NP=3, EVEN=True), dict(P=256, NP=3, EVEN=True), dict(P=512, NP=3, EVEN=True),
        dict(P=1024, NP=1, EVEN=True)]


def test_norm_gate_configs_by_width():
    """The row kernels' configs are tuned per model width; another width takes the nearest tuned width at or above
    it, a wider one the widest's, and a one-entry table (as the sweeps and tests set) holds for every width."""
    table = {384: (2, 2, 16), 768: (1, 1, 16), 1536: (1, 2, 12)}
    assert [norm_gate._cfg(table, d) for d in (6, 384, 385, 768, 1000, 4096)] == [
        table[384], table[384], table[768], table[768], table[1536], table[1536]]
    assert [norm_gate._cfg({384: (2, 1, 1)}, d) for d in (6, 768, 4096)] == [(2, 1, 1)] * 3
    for cfgs in (norm_gate.FWD_CFG, norm_gate.BWD_CFG):
        assert set(cfgs) == {384, 768, 1536}  # 2C of hgrn_deit_tiny, _small, _base


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_triton_norm_gate_half_inputs(dtype):
    """16-bit x, and no in_bias (the op as called when in_proj is not a plain Linear)."""
    errs = _norm_gate_errors(_norm_gate_inputs(2, 9, 5, dtype, seed=5), in_bias=False)
    assert set(errs) == {'out', 'dx', 'dgamma', 'dtheta_f', 'dtheta_r', 'dweight', 'dbias'}
    assert all(e < 2 * BOUND[dtype] for e in errs.values()), errs


@pytest.mark.parametrize('dtype,out_proj', [(torch.float32, ('weight', 'bias')), (torch.bfloat16, ('weight',))])
def test_triton_norm_gate_out_proj(dtype, out_proj):
    """The op with the output projection inside (its backward writes y again for the projection's weight
    gradient), with and without the projection's bias."""
    errs = _norm_gate_errors(_norm_gate_inputs(2, 7, 5, dtype, seed=3), out_proj=out_proj)
    assert set(errs) >= {f'dout_{k}' for k in out_proj}
    assert all(e < (1e-5 if dtype == torch.float32 else 2 * BOUND[dtype]) for e in errs.values()), errs


@pytest.mark.parametrize('more_tokens', [0, 3])
def test_triton_norm_gate_views_and_tiles(monkeypatch, more_tokens):
    """x as a strided view (rows of a wider tensor; with `more_tokens` also the first N tokens of a longer sequence,
    so that its batch stride is not N times its token stride and the row kernels index by batch and token), dy
    non-contiguous, and several tiles per forward and backward program, the last partial."""
    monkeypatch.setattr(norm_gate, 'FWD_CFG', {6: (2, 1, 1)})
    monkeypatch.setattr(norm_gate, 'BWD_CFG', {6: (2, 1, 1)})  # 2 rows a tile: 19 tiles over 4 programs
    x, *rest = _norm_gate_inputs(2, 19, 3, torch.float32, seed=2)
    wide = torch.cat([x, torch.randn(2, 19, 4)], -1)
    wide = torch.cat([wide, torch.randn(2, more_tokens, 19)], 1)[:, :19, :15]
    assert norm_gate._flat(19, wide) == (more_tokens == 0)
    errs = _norm_gate_errors([wide, *rest], dy_view=True)
    assert all(e < 1e-5 for e in errs.values()), errs


def test_norm_gate_in_bias_composed():
    """The PyTorch paths take in_bias as the Triton op does: x's value as it is, in_bias's gradient the sum of x's."""
    x, *rest = [t.double() for t in _norm_gate_inputs(2, 5, 3, torch.float64)]
    x.requires_grad_(True)
    in_bias = torch.randn(15, dtype=torch.float64, requires_grad=True)
    out = bihgru_scan_norm_gate(x, *rest, in_bias=in_bias, impl='torch')
    assert torch.equal(out, bihgru_scan_norm_gate(x, *rest, impl='torch'))
    dx, db = torch.autograd.grad(out.square().sum(), (x, in_bias))
    assert torch.allclose(db, dx.sum((0, 1)))


def test_norm_gate_input_errors():
    x, gamma, tf, tr, weight, bias = _norm_gate_inputs(1, 3, 2, torch.float32)
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

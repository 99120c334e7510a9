"""The scan op's CPU paths: the reference against a naive complex loop, the 'torch' path and the C kernel ('cpu')
against both; the dispatch, the kernel's build and fallback, and the input checks."""
import cmath
import math
import platform

import pytest
import torch

from hgrn_vision.ops import (
    available_impls,
    bihgru_scan,
    bihgru_scan_chunked,
    bihgru_scan_reference,
    default_impl,
    is_exporting,
)
from hgrn_vision.ops.bihgru import cpu

CPU_IMPLS = ('torch', 'cpu')  # the two fast CPU paths, tested alike


def scan_fn(impl):
    return lambda *inputs: bihgru_scan(*inputs, impl=impl)


def naive_directions(u, z, gamma, theta_f, theta_r):
    """Per-element Python complex arithmetic; returns hf, hr as nested lists [b][t][c] of complex."""
    B, N, C = z.shape
    silu = lambda x: x / (1 + math.exp(-x))
    sig = lambda x: 1 / (1 + math.exp(-x))
    hf = [[[0j] * C for _ in range(N)] for _ in range(B)]
    hr = [[[0j] * C for _ in range(N)] for _ in range(B)]
    for b in range(B):
        for c in range(C):
            lam = [gamma[c].item() + (1 - gamma[c].item()) * sig(z[b, t, c].item()) for t in range(N)]
            v = [(1 - lam[t]) * complex(silu(u[b, t, 2 * c].item()), silu(u[b, t, 2 * c + 1].item())) for t in range(N)]
            h = 0j
            for t in range(N):
                h = lam[t] * cmath.exp(1j * theta_f[c].item()) * h + v[t]
                hf[b][t][c] = h
            h = 0j
            for t in reversed(range(N)):
                h = lam[t] * cmath.exp(1j * theta_r[c].item()) * h + v[t]
                hr[b][t][c] = h
    return hf, hr


def naive_output(u, z, gamma, theta_f, theta_r):
    """`[Re h | Im h]` of h = hf + hr from `naive_directions`, float64."""
    hf, hr = naive_directions(u, z, gamma, theta_f, theta_r)
    h = torch.tensor(hf, dtype=torch.complex128) + torch.tensor(hr, dtype=torch.complex128)
    return torch.cat([h.real, h.imag], -1)


@pytest.mark.parametrize('B,N,C', [(1, 1, 1), (2, 7, 3), (1, 19, 5)])
def test_reference_matches_naive_loop(B, N, C, make_scan_inputs):
    inputs = make_scan_inputs(B, N, C)
    out = bihgru_scan_reference(*inputs)
    assert out.dtype == torch.float64 and out.shape == (B, N, 2 * C)
    torch.testing.assert_close(out, naive_output(*inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('impl', CPU_IMPLS)
@pytest.mark.parametrize('N', [1, 2, 5, 16, 37, 50])
def test_scan_matches_naive_loop(impl, N, make_scan_inputs):
    """Lengths around the chunks (whole chunks, a padded last chunk, one chunk), float64."""
    inputs = make_scan_inputs(2, N, 3, seed=N)
    torch.testing.assert_close(bihgru_scan(*inputs, impl=impl), naive_output(*inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('impl', CPU_IMPLS)
@pytest.mark.parametrize('N', [1, 3, 10, 17])
def test_scan_gradcheck(impl, N, make_scan_inputs):
    """The hand-written backward (the adjoint scan) against finite differences, float64."""
    inputs = make_scan_inputs(2, N, 3, seed=N, requires_grad=True)
    assert torch.autograd.gradcheck(scan_fn(impl), inputs)


@pytest.mark.parametrize('impl', CPU_IMPLS)
def test_scan_extreme_gates(impl, make_scan_inputs):
    """gamma up to 0.9999 (gates near 1, long memory) and gates near 0: exact forward and backward, no NaN."""
    u, z, gamma, tf, tr = make_scan_inputs(2, 41, 4, seed=3)
    gamma = torch.tensor([0.9999, 0.999, 0., 0.], dtype=torch.float64)
    z = z.clone()
    z[..., 2:] = -60.  # lam = sigmoid(-60) ~ 1e-26
    inputs = [t.requires_grad_(True) for t in (u, z, gamma, tf, tr)]
    out, ref = bihgru_scan(*inputs, impl=impl), bihgru_scan_reference(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('N', [1, 16, 41, 150])
def test_chunked_scan_traced(N, make_scan_inputs):
    """Under torch.compile the scan is traced in real arithmetic (`_bihgru_traced`): one graph, forward and grads
    against the reference in float64."""
    inputs = make_scan_inputs(2, N, 3, seed=N, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(bihgru_scan_chunked, fullgraph=True, backend='aot_eager')(*inputs)
    ref = bihgru_scan_reference(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, dout, materialize_grads=True)
    for g, r in zip(grads, torch.autograd.grad(ref, inputs, dout)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('impl', CPU_IMPLS)
@pytest.mark.parametrize('B,N,C', [(1, 1, 4), (2, 37, 5), (3, 64, 130), (1, 300, 8)])
def test_float32_matches_reference_with_grads(impl, B, N, C, make_scan_inputs, rel_err):
    """float32 against float64; C = 130, not a multiple of the C kernel's vector width."""
    f32_in = make_scan_inputs(B, N, C, dtype=torch.float32, seed=B * N + C, requires_grad=True)
    ref_in = [t.detach().double().requires_grad_(True) for t in f32_in]  # the same (rounded) inputs in float64
    ref = bihgru_scan_reference(*ref_in)
    out = bihgru_scan(*f32_in, impl=impl)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    dout = torch.randn_like(ref)
    # N = 1 uses no gate: the torch path then leaves the angles out of the graph, a zero gradient
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    out_grads = torch.autograd.grad(out, f32_in, dout.float(), materialize_grads=True)
    for name, g, r in zip(('u', 'z', 'gamma', 'theta_f', 'theta_r'), out_grads, ref_grads):
        assert rel_err(g, r) < 1e-5, name


def test_reference_gradcheck(make_scan_inputs):
    inputs = make_scan_inputs(1, 6, 2, requires_grad=True)
    assert torch.autograd.gradcheck(bihgru_scan_reference, inputs)


def test_reference_is_scriptable(make_scan_inputs):
    scripted = torch.jit.script(bihgru_scan_reference)
    inputs = make_scan_inputs(2, 9, 3)
    torch.testing.assert_close(scripted(*inputs), bihgru_scan_reference(*inputs))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
def test_dispatch_keeps_dtype(dtype, make_scan_inputs, rel_err):
    inputs = make_scan_inputs(2, 10, 4, dtype=dtype)
    for impl in ('reference', *CPU_IMPLS, None):
        out = bihgru_scan(*inputs, impl=impl)
        assert out.dtype == dtype and out.shape == (2, 10, 8)
        assert rel_err(out, bihgru_scan_reference(*[t.double() for t in inputs])) < 2e-2


def test_default_impl_keeps_float64_exact():
    """impl=None: the Triton kernels for CUDA tensors, but not for float64 ones, which they would compute in float32
    (1e-7 off the reference in the interpreter, where the PyTorch scan is exact to 1e-16); the C kernel for CPU
    tensors of any dtype; 'torch' elsewhere."""
    from types import SimpleNamespace

    on_cuda = 'triton' if 'triton' in available_impls() else 'torch'
    assert default_impl(SimpleNamespace(is_cuda=True, device=torch.device('cuda'), dtype=torch.float32)) == on_cuda
    assert default_impl(SimpleNamespace(is_cuda=True, device=torch.device('cuda'), dtype=torch.bfloat16)) == on_cuda
    assert default_impl(SimpleNamespace(is_cuda=True, device=torch.device('cuda'), dtype=torch.float64)) == 'torch'
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        assert default_impl(torch.zeros(1, dtype=dtype)) == 'cpu'
    assert default_impl(torch.zeros(1, device='meta')) == 'torch'


def test_impls():
    """The op's implementations; 'triton' where Triton is installed."""
    assert available_impls() in (('reference', 'torch', 'cpu'), ('reference', 'torch', 'cpu', 'triton'))


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """The C kernel built afresh into an empty cache, and forgotten again after the test."""
    monkeypatch.setenv('HGRN_VISION_CACHE', str(tmp_path))
    cpu._library.cache_clear()
    yield tmp_path
    cpu._library.cache_clear()


def test_kernel_builds_into_cache(fresh_kernel, make_scan_inputs):
    inputs = make_scan_inputs(2, 9, 3)
    out = bihgru_scan(*inputs, impl='cpu')
    assert len(list(fresh_kernel.glob('*.so'))) == 1  # the float64 build
    torch.testing.assert_close(out, bihgru_scan_reference(*inputs), rtol=1e-12, atol=1e-12)


def test_kernel_fallback_without_compiler(fresh_kernel, monkeypatch, make_scan_inputs):
    """No C compiler: one warning saying so, impl=None runs the PyTorch scan, impl='cpu' fails with a message."""
    monkeypatch.setenv('CC', str(fresh_kernel / 'no-such-compiler'))
    inputs = make_scan_inputs(2, 9, 3, dtype=torch.float32)
    with pytest.warns(UserWarning, match='could not be built'):
        assert default_impl(inputs[0]) == 'torch'
    torch.testing.assert_close(bihgru_scan(*inputs), bihgru_scan(*inputs, impl='torch'))
    with pytest.raises(RuntimeError, match="impl='torch'"):
        bihgru_scan(*inputs, impl='cpu')


def test_kernel_cuts_wide_rows(make_scan_inputs):
    """Rows wider than the C kernel's 512 channels are scanned in blocks: float64, forward and grads as the PyTorch
    scan's."""
    inputs = make_scan_inputs(2, 23, 530, requires_grad=True)
    out, ref = bihgru_scan(*inputs, impl='cpu'), bihgru_scan(*inputs, impl='torch')
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason="glibc's malloc thresholds")
def test_kernel_keeps_freed_memory():
    """With the C kernel loaded, glibc's malloc hands out 12 MB tensors from its heap and keeps them there once freed
    (48 MB free in the heap, `mallinfo2().fordblks`) for the next ones, instead of giving the pages back to the
    system and faulting them in again."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    assert cpu.kernel_available()
    tensors = [torch.empty(3 << 20).fill_(1.) for _ in range(4)]  # 4 x 12 MB, written
    del tensors
    assert libc.mallinfo2().fordblks >= 40 << 20


def test_kernel_can_be_turned_off(fresh_kernel, monkeypatch):
    monkeypatch.setenv('HGRN_VISION_CPU_KERNEL', '0')
    assert default_impl(torch.zeros(1)) == 'torch'
    assert not list(fresh_kernel.iterdir())


@pytest.mark.parametrize('impl', ('reference', *CPU_IMPLS))
@pytest.mark.parametrize('B,N', [(0, 5), (2, 0)])
def test_empty_inputs(impl, B, N, make_scan_inputs):
    u, z, gamma, tf, tr = make_scan_inputs(2, 5, 3, requires_grad=True)
    u_e, z_e = u[:B, :N], z[:B, :N]
    out = bihgru_scan(u_e, z_e, gamma, tf, tr, impl=impl)
    assert out.shape == (B, N, 6)
    grads = torch.autograd.grad(out.sum(), (u, z, gamma, tf, tr), allow_unused=True, materialize_grads=True)
    assert all(not g.any() for g in grads)


@pytest.mark.parametrize('impl', CPU_IMPLS)
def test_noncontiguous_inputs(impl, make_scan_inputs):
    u, z, gamma, tf, tr = make_scan_inputs(3, 11, 6, dtype=torch.float32)
    # views into a larger fused projection, as the mixer passes them
    fused = torch.cat([u, z, torch.randn(3, 11, 12)], -1)
    u_view, z_view = fused.split([12, 6, 12], -1)[:2]
    assert not u_view.is_contiguous()
    torch.testing.assert_close(bihgru_scan(u_view, z_view, gamma, tf, tr, impl=impl),
                               bihgru_scan(u, z, gamma, tf, tr, impl='reference'), rtol=1e-5, atol=1e-5)


def test_meta_device(make_scan_inputs):
    inputs = make_scan_inputs(2, 10, 4, dtype=torch.float32, device='meta')
    assert bihgru_scan(*inputs).shape == (2, 10, 8)


def test_bad_inputs(make_scan_inputs):
    u, z, gamma, tf, tr = make_scan_inputs(2, 5, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r'u of shape \(B, N, 2C\)'):
        bihgru_scan(u[..., :-1], z, gamma, tf, tr)
    with pytest.raises(ValueError, match='z'):
        bihgru_scan(u, z[:, :4], gamma, tf, tr)
    with pytest.raises(ValueError, match='theta_f'):
        bihgru_scan(u, z, gamma, tf[:3], tr)
    with pytest.raises(ValueError, match=r'\(B, N, 2C\)'):
        bihgru_scan(u[0], z[0], gamma, tf, tr)
    with pytest.raises(TypeError, match='one dtype'):
        bihgru_scan(u, z.double(), gamma, tf, tr)
    with pytest.raises(ValueError, match='Unknown bihgru_scan impl'):
        bihgru_scan(u, z, gamma, tf, tr, impl='cuda')


class _ExportProbe(torch.nn.Module):
    def forward(self, x):
        return x + 1 if is_exporting() else x - 1


def test_is_exporting_under_export_not_compile():
    """True under torch.export, False under torch.compile (where torch 2.11's `torch.compiler.is_exporting()` is True
    too): the export-only paths (the chunks' `scan` op, in_proj apart) must not run in a compiled model."""
    x = torch.zeros(2)
    assert torch.export.export(_ExportProbe(), (x,), strict=False).module()(x).tolist() == [1., 1.]
    assert torch.compile(_ExportProbe(), backend='eager', fullgraph=True)(x).tolist() == [-1., -1.]
    assert _ExportProbe()(x).tolist() == [-1., -1.]

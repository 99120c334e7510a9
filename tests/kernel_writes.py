"""How torch.compile sees the Triton kernels, without a GPU: which tensor arguments each kernel writes, by its mutation
analysis (a TTIR walk, `identify_accessed_tensors`), printed one kernel a line; then the copies left in the fused
op's compiled graphs after inductor's reinplacing pass. torch.compile clones whatever a kernel launched through
`wrap_triton` writes unless that pass can write in place, and refuses to write into a leaf that requires grad: the
kernels must be seen writing their output buffers only, and no buffer may be cloned. Needs Triton's compiler, not a
GPU: a stand-in driver names sm_90 as the target and the kernels are never launched. Run without TRITON_INTERPRET
(`tests/test_kernel_writes.py` runs it in a subprocess)."""
import inspect
import sys

import torch
import triton.runtime.driver  # noqa: F401  (the module; `triton.runtime.driver` the attribute is its DriverConfig)
from triton.backends.compiler import GPUTarget

_DRIVER = sys.modules['triton.runtime.driver'].driver


class _Sm90:
    def get_current_target(self):
        return GPUTarget('cuda', 90, 32)

    def get_current_device(self):
        return 0


_DRIVER._default = _DRIVER._active = _Sm90()

import torch._higher_order_ops.triton_kernel_wrap as tkw  # noqa: E402

import hgrn_vision.ops.bihgru.fused as fz  # noqa: E402
import hgrn_vision.ops.bihgru.norm_gate as ng  # noqa: E402
import hgrn_vision.ops.glu as glu  # noqa: E402
import hgrn_vision.ops.norm_linear as nl  # noqa: E402


def writes(kernel, args, constexprs):
    kwargs = dict(zip(inspect.signature(kernel.fn).parameters, args), **constexprs)
    accesses = tkw.identify_accessed_tensors(kernel, kwargs, {})
    return sorted(d.name for d in accesses.read_writes.writes if isinstance(kwargs.get(d.name), torch.Tensor))


def main():
    B, N, C = 2, 64, 40
    x = torch.randn(B, N, 5 * C, dtype=torch.bfloat16)
    u, z = x[..., :2 * C], x[..., 2 * C:3 * C]
    vec = [torch.rand(C) for _ in range(3)]
    h, y, dy, h2 = (torch.randn(B, N, 2 * C, dtype=torch.bfloat16) for _ in range(4))
    w, b = torch.ones(2 * C), torch.zeros(2 * C)
    du, dz, dx = torch.empty_like(u), torch.empty_like(z), torch.empty_like(x)
    summ, stash, part = torch.empty(B, 2, 16, C), torch.empty(B, N // 4, 4 * C), torch.empty(B, 2, 6, C)
    ones = (1,) * 18
    bwd_rest = (part, summ, stash, N, C, 2, 32, *ones)  # after dz: buffers, sizes, strides
    cases = {
        '_bihgru_fwd_kernel': (fz._bihgru_fwd_kernel, (u, z, *vec, y, summ, stash, N, C, 2, 32, *ones[:11]),
                               dict(BLOCK_C=32, UNROLL=4, SUMMARY=False, EVEN=False, AHEAD=True)),
        '_bihgru_fwd_kernel not AHEAD': (fz._bihgru_fwd_kernel, (u, z, *vec, y, summ, stash, N, C, 2, 32, *ones[:11]),
                                         dict(BLOCK_C=32, UNROLL=4, SUMMARY=False, EVEN=False, AHEAD=False)),
        '_bihgru_fwd_kernel EVEN': (fz._bihgru_fwd_kernel, (u, z, *vec, y, summ, stash, N, C, 2, 32, *ones[:11]),
                                    dict(BLOCK_C=32, UNROLL=4, SUMMARY=False, EVEN=True, AHEAD=True)),
        '_bihgru_fwd_kernel SUMMARY': (fz._bihgru_fwd_kernel, (u, z, *vec, y, summ, stash, N, C, 2, 32, *ones[:11]),
                                       dict(BLOCK_C=32, UNROLL=4, SUMMARY=True, EVEN=False, AHEAD=False)),
        '_bihgru_fwd_onchip_kernel': (fz._bihgru_fwd_onchip_kernel, (u, z, *vec, y, N, C, *ones[:6]),
                                      dict(BLOCK_C=16, T=8, W=8)),
        '_bihgru_bwd_kernel': (fz._bihgru_bwd_kernel, (u, z, *vec, dy, du, dz, *bwd_rest),
                               dict(BLOCK_C=32, UNROLL=4, SUMMARY=False, DZ_IN_DU=False, EVEN=False)),
        '_bihgru_bwd_kernel SUMMARY': (fz._bihgru_bwd_kernel, (u, z, *vec, dy, du, dz, *bwd_rest),
                                       dict(BLOCK_C=32, UNROLL=4, SUMMARY=True, DZ_IN_DU=False, EVEN=False)),
        '_bihgru_bwd_kernel DZ_IN_DU': (fz._bihgru_bwd_kernel, (u, z, *vec, dy, dx, None, *bwd_rest),
                                        dict(BLOCK_C=32, UNROLL=4, SUMMARY=False, DZ_IN_DU=True, EVEN=False)),
        '_bihgru_bwd_kernel DZ_IN_DU EVEN': (fz._bihgru_bwd_kernel, (u, z, *vec, dy, dx, None, *bwd_rest),
                                             dict(BLOCK_C=32, UNROLL=4, SUMMARY=False, DZ_IN_DU=True, EVEN=True)),
        '_norm_gate_fwd_kernel': (ng._norm_gate_fwd_kernel, (h, x, w, b, y, B * N, N, 2 * C, *ones[:4], 3 * C, 1e-5,
                                                            8),
                                  dict(P=32, NP=3, ROWS=1, FLAT=True, EVEN=False)),
        '_norm_gate_bwd_kernel': (ng._norm_gate_bwd_kernel,
                                  (dy, h, x, w, b, y, dx, part, None, B * N, N, 2 * C, *ones[:8], 3 * C, 1e-5, 8),
                                  dict(P=128, NP=1, ROWS=2, WRITE_Y=False, FLAT=False, EVEN=False)),
        '_norm_gate_bwd_kernel WRITE_Y': (ng._norm_gate_bwd_kernel,
                                          (dy, h, x, w, b, y, dx, part, h2, B * N, N, 2 * C, *ones[:8], 3 * C, 1e-5,
                                           8), dict(P=32, NP=3, ROWS=2, WRITE_Y=True, FLAT=True, EVEN=False)),
        '_silu_glu_bwd_kernel': (glu._silu_glu_bwd_kernel, (h, dy[..., :C], h2, y[..., :C], part, B * N, C, 8),
                                 dict(ROWS=8, BLOCK_H=64)),
        '_layer_norm_bwd_kernel': (nl._layer_norm_bwd_kernel,
                                   (h, dy, vec[0], vec[1], w, b, h2, y, part, B * N, 2 * C, 8),
                                   dict(BLOCK_D=128, ROWS=2)),
    }
    for name, (kernel, args, constexprs) in cases.items():
        print(f"{name}: {' '.join(writes(kernel, args, constexprs))}")


def compiled_copies():
    """Traces the fused op forward and backward through AOT autograd (kernels not launched), runs inductor's
    reinplacing pass on each graph and prints, per graph, the buffers its kernels still clone and its scatters back
    into views."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._inductor.fx_utils import FakeTensorUpdater
    from torch._inductor.virtualized import V

    triton.runtime.jit.JITFunction.run = lambda self, *args, **kwargs: None  # graphs only: nothing to run them on
    fz._num_sms = ng._num_sms = lambda device: 132

    def report(name):
        def compiler(gm, example_inputs):
            fake_mode = next(n.meta['val'].fake_mode for n in gm.graph.nodes
                             if isinstance(n.meta.get('val'), torch.Tensor))
            with V.set_fake_mode(fake_mode):
                reinplace_inplaceable_ops(FakeTensorUpdater(gm), gm.graph)
            copies = [a for n in gm.graph.nodes if n.target is tkw.triton_kernel_wrapper_functional
                      for a in n.kwargs['tensors_to_clone']]
            copies += [str(n.target) for n in gm.graph.nodes if 'scatter' in str(n.target)]
            print(f"{name} graph copies: {' '.join(copies) or '-'}")
            return make_boxed_func(gm.forward)
        return compiler

    B, N, C = 4, 64, 32
    args = [torch.randn(B, N, 5 * C, dtype=torch.bfloat16), *(torch.rand(C) for _ in range(3)), torch.ones(2 * C),
            torch.zeros(2 * C), torch.zeros(5 * C)]
    args = [a.requires_grad_() for a in args]
    fn = torch.compile(lambda x, *rest: ng._fwd_op(x, *rest[:5], 1e-5, rest[5], None, None)[0], fullgraph=True,
                       backend=aot_autograd(fw_compiler=report('forward'), bw_compiler=report('backward')))
    fn(*args).float().sum().backward()


if __name__ == '__main__':
    main()
    compiled_copies()

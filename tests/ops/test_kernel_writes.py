"""How torch.compile sees the Triton kernels: each writes its output buffers and nothing else, and the mixer op's
compiled forward and backward copy no buffer after inductor's reinplacing.

On the GPU the ops are triton_ops whose kernels torch.compile launches itself: a kernel seen writing an input would
make it clone that input, or refuse a parameter; a kernel writing views of a buffer made it clone the views and
scatter them back into the buffer. The analysis (a TTIR walk, `identify_accessed_tensors`) compiles the kernels for
sm_90 outside the interpreter, never launching them, so this file runs itself in a subprocess.
"""
import inspect
import os
import subprocess
import sys

EXPECTED = {
    'bihgru_fwd_kernel': 'out_ptr scr_ptr',
    'bihgru_fwd_kernel not AHEAD': 'out_ptr scr_ptr',
    'bihgru_fwd_kernel EVEN': 'out_ptr scr_ptr',
    'bihgru_fwd_kernel SUMMARY': 'sum_ptr',
    'bihgru_fwd_onchip_kernel': 'out_ptr',
    'bihgru_bwd_kernel': 'du_ptr dz_ptr part_ptr scr_ptr',
    'bihgru_bwd_kernel SUMMARY': 'sum_ptr',
    'bihgru_bwd_kernel DZ_IN_DU': 'du_ptr part_ptr scr_ptr',
    'bihgru_bwd_kernel DZ_IN_DU EVEN': 'du_ptr part_ptr scr_ptr',
    'norm_gate_fwd_kernel': 'y_ptr',
    'norm_gate_bwd_kernel': 'dh_ptr dx_ptr part_ptr',
    'norm_gate_bwd_kernel WRITE_Y': 'dh_ptr dx_ptr part_ptr y_ptr',
    'silu_glu_bwd_kernel': 'dx_ptr p_ptr part_ptr',
    'layer_norm_bwd_kernel': 'dx_ptr part_ptr y_ptr',
    'forward graph copies': '-',
    'backward graph copies': '-',
}


def test_kernels_write_only_their_outputs_and_nothing_is_copied():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, 'TRITON_INTERPRET': '0', 'PYTHONPATH': root}  # this tree's hgrn_vision, not an installed one
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = dict(line.split(': ', 1) for line in out.stdout.splitlines())
    assert seen == EXPECTED, (seen, out.stderr[-3000:])


def _writes(kernel, args, constexprs):
    """The tensor arguments that torch.compile's mutation analysis sees `kernel` write."""
    import torch
    import torch._higher_order_ops.triton_kernel_wrap as tkw
    kwargs = dict(zip(inspect.signature(kernel.fn).parameters, args), **constexprs)
    accesses = tkw.identify_accessed_tensors(kernel, kwargs, {})
    return sorted(d.name for d in accesses.read_writes.writes if isinstance(kwargs.get(d.name), torch.Tensor))


def _print_writes():
    """Each kernel's written arguments, one kernel (and launch variant) a line."""
    import torch

    from hgrn_vision.ops.bihgru.bwd import bihgru_bwd_kernel
    from hgrn_vision.ops.bihgru.fwd import bihgru_fwd_kernel
    from hgrn_vision.ops.bihgru.fwd_onchip import bihgru_fwd_onchip_kernel
    from hgrn_vision.ops.bihgru.norm_gate import norm_gate_bwd_kernel, norm_gate_fwd_kernel
    from hgrn_vision.ops.glu import silu_glu_bwd_kernel
    from hgrn_vision.ops.norm_linear import layer_norm_bwd_kernel

    B, N, C = 2, 64, 40
    x = torch.randn(B, N, 5 * C, dtype=torch.bfloat16)
    u, z = x[..., :2 * C], x[..., 2 * C:3 * C]
    vec = [torch.rand(C) for _ in range(3)]
    h, y, dy, h2 = (torch.randn(B, N, 2 * C, dtype=torch.bfloat16) for _ in range(4))
    w, b = torch.ones(2 * C), torch.zeros(2 * C)
    du, dz, dx = torch.empty_like(u), torch.empty_like(z), torch.empty_like(x)
    summ, stash, part = torch.empty(B, 2, 16, C), torch.empty(B, N // 4, 4 * C), torch.empty(B, 2, 6, C)
    ones = (1,) * 18
    fwd_args = (u, z, *vec, y, summ, stash, N, C, 2, 32, *ones[:11])
    bwd_rest = (part, summ, stash, N, C, 2, 32, *ones)  # after dz: buffers, sizes, strides
    fwd_meta = dict(BLOCK_C=32, UNROLL=4, SUMMARY=False, EVEN=False, AHEAD=True)
    bwd_meta = dict(BLOCK_C=32, UNROLL=4, SUMMARY=False, DZ_IN_DU=False, EVEN=False)
    cases = {
        'bihgru_fwd_kernel': (bihgru_fwd_kernel, fwd_args, fwd_meta),
        'bihgru_fwd_kernel not AHEAD': (bihgru_fwd_kernel, fwd_args, dict(fwd_meta, AHEAD=False)),
        'bihgru_fwd_kernel EVEN': (bihgru_fwd_kernel, fwd_args, dict(fwd_meta, EVEN=True)),
        'bihgru_fwd_kernel SUMMARY': (bihgru_fwd_kernel, fwd_args, dict(fwd_meta, SUMMARY=True, AHEAD=False)),
        'bihgru_fwd_onchip_kernel': (bihgru_fwd_onchip_kernel, (u, z, *vec, y, N, C, *ones[:6]),
                                     dict(BLOCK_C=16, T=8, W=8)),
        'bihgru_bwd_kernel': (bihgru_bwd_kernel, (u, z, *vec, dy, du, dz, *bwd_rest), bwd_meta),
        'bihgru_bwd_kernel SUMMARY': (bihgru_bwd_kernel, (u, z, *vec, dy, du, dz, *bwd_rest),
                                      dict(bwd_meta, SUMMARY=True)),
        'bihgru_bwd_kernel DZ_IN_DU': (bihgru_bwd_kernel, (u, z, *vec, dy, dx, None, *bwd_rest),
                                       dict(bwd_meta, DZ_IN_DU=True)),
        'bihgru_bwd_kernel DZ_IN_DU EVEN': (bihgru_bwd_kernel, (u, z, *vec, dy, dx, None, *bwd_rest),
                                            dict(bwd_meta, DZ_IN_DU=True, EVEN=True)),
        'norm_gate_fwd_kernel': (norm_gate_fwd_kernel, (h, x, w, b, y, B * N, N, 2 * C, *ones[:4], 3 * C, 1e-5, 8),
                                 dict(P=32, NP=3, ROWS=1, FLAT=True, EVEN=False)),
        'norm_gate_bwd_kernel': (norm_gate_bwd_kernel,
                                 (dy, h, x, w, b, y, dx, part, None, B * N, N, 2 * C, *ones[:8], 3 * C, 1e-5, 8),
                                 dict(P=128, NP=1, ROWS=2, WRITE_Y=False, FLAT=False, EVEN=False)),
        'norm_gate_bwd_kernel WRITE_Y': (norm_gate_bwd_kernel,
                                         (dy, h, x, w, b, y, dx, part, h2, B * N, N, 2 * C, *ones[:8], 3 * C, 1e-5,
                                          8), dict(P=32, NP=3, ROWS=2, WRITE_Y=True, FLAT=True, EVEN=False)),
        'silu_glu_bwd_kernel': (silu_glu_bwd_kernel, (h, dy[..., :C], h2, y[..., :C], part, B * N, C, 8),
                                dict(ROWS=8, BLOCK_H=64)),
        'layer_norm_bwd_kernel': (layer_norm_bwd_kernel, (h, dy, vec[0], vec[1], w, b, h2, y, part, B * N, 2 * C, 8),
                                  dict(BLOCK_D=128, ROWS=2)),
    }
    for name, (kernel, args, constexprs) in cases.items():
        print(f"{name}: {' '.join(_writes(kernel, args, constexprs))}")


def _print_compiled_copies():
    """Traces the mixer op forward and backward through AOT autograd (kernels not launched), runs inductor's
    reinplacing pass on each graph and prints, per graph, the buffers its kernels still clone and its scatters back
    into views."""
    import torch
    import torch._higher_order_ops.triton_kernel_wrap as tkw
    import triton
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._inductor.fx_utils import FakeTensorUpdater
    from torch._inductor.virtualized import V

    triton.runtime.jit.JITFunction.run = lambda self, *args, **kwargs: None  # graphs only: nothing to run them on

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
    op = torch.ops.hgrn_vision.bihgru_norm_gate_fwd  # the op itself: its Python entry wants CUDA tensors here
    fn = torch.compile(lambda x, *rest: op(x, *rest[:5], 1e-5, rest[5], None, None)[0], fullgraph=True,
                       backend=aot_autograd(fw_compiler=report('forward'), bw_compiler=report('backward')))
    fn(*args).float().sum().backward()


if __name__ == '__main__':
    from hgrn_vision.ops.triton_utils import use_sm90_target
    use_sm90_target()
    _print_writes()
    _print_compiled_copies()

"""GPU checks and re-tuning of the `low_memory` block ops (`silu_glu_linear`, `layer_norm_linear`, the mixer op with
out_proj inside): run on a GPU as `PYTHONPATH=. python scripts/gpu_block_ops.py [WHAT ...]` with WHAT among

  check    the two ops against float64 at the small model's shapes (bf16 and fp32), and a depth-2 hgrn_deit_small
           with low_memory=True (every fused op) against its PyTorch paths in fp32; prints relative errors
  tune     the two backward kernels' launch configs (`glu.BWD_CONFIG`, `norm_linear.BWD_CONFIG`) at the small model's
           shapes at 224 (B=256): GPU time of the op's backward function replayed from a CUDA graph, and GB/s over
           the bytes each kernel must move
  profile  compiled hgrn_deit_small training at 224 (B=256), default against low_memory=True: torch.profiler's
           kernel time per kernel name, side by side, one process

(default: all three). Nothing is timed in tests.
"""
import itertools
import sys

import timm
import torch
import triton
import triton.testing
from torch.profiler import ProfilerActivity, profile

import hgrn_vision  # noqa: F401
import hgrn_vision.ops.glu as glu
import hgrn_vision.ops.norm_linear as nl
from hgrn_vision.benchmark import rel_err, train_step
from hgrn_vision.ops import layer_norm_linear, silu_glu_linear
from hgrn_vision.ops.glu import GluConfig
from hgrn_vision.ops.triton_utils import RowConfig

dev = 'cuda'


def check():
    """The ops against float64 at the small model's shapes; a depth-2 low_memory model against its PyTorch paths."""
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(256, 256, 1536, device=dev, dtype=torch.float64) * 2
        w = torch.randn(384, 768, device=dev, dtype=torch.float64) / 30
        b, ib = torch.randn(384, device=dev, dtype=torch.float64), torch.randn(1536, device=dev)
        dout = torch.randn(256, 256, 384, device=dev).to(dtype)
        res = []
        for impl, dt in (('triton', dtype), ('torch', torch.float64)):
            ins = [t.to(dt).requires_grad_() for t in (x, w, b)] + [ib.clone().requires_grad_()]
            y = silu_glu_linear(*ins[:3], in_bias=ins[3], impl=impl)
            res.append([y, *torch.autograd.grad(y, ins, dout.to(dt))])
        print(f'silu_glu_linear (256, 256, 1536)->384 {dtype}: out, dx, dw, db, din_bias',
              ' '.join(f'{rel_err(a, r):.1e}' for a, r in zip(*res)), flush=True)
        x = torch.randn(256, 256, 384, device=dev, dtype=torch.float64) + 0.5
        nw, nb = torch.randn(384, device=dev) * 0.3 + 1, torch.randn(384, device=dev) * 0.3
        w = torch.randn(1920, 384, device=dev, dtype=torch.float64) / 20
        b = torch.randn(1920, device=dev, dtype=torch.float64)
        dout = torch.randn(256, 256, 1920, device=dev).to(dtype)
        res = []
        for impl, dt in (('triton', dtype), ('torch', torch.float64)):
            ndt = dt if impl == 'torch' else torch.float32  # the LayerNorm's parameters stay fp32, as in the model
            ins = [x.to(dt), nw.to(ndt), nb.to(ndt), w.to(dt), b.to(dt)]
            ins = [t.requires_grad_() for t in ins]
            y = layer_norm_linear(ins[0], ins[1], ins[2], 1e-5, ins[3], ins[4], impl=impl)
            res.append([y, *torch.autograd.grad(y, ins, dout.to(dt))])
        print(f'layer_norm_linear (256, 256, 384)->1920 {dtype}: out, dx, dnw, dnb, dw, db',
              ' '.join(f'{rel_err(a, r):.1e}' for a, r in zip(*res)), flush=True)

    x = torch.randn(8, 3, 224, 224, device=dev)
    runs, state = [], None
    for impl in ('triton', 'torch'):  # the fused ops are chosen at construction: one model each, one state dict
        model = timm.create_model('hgrn_deit_small', depth=2, low_memory=True, scan_impl=impl).to(dev)
        state = state or model.state_dict()
        model.load_state_dict(state)
        y = model(x)
        y.square().sum().backward()
        runs.append((y.detach(), {n: p.grad for n, p in model.named_parameters()}))
    missing = [(impl, n) for impl, (_, grads) in zip(('triton', 'torch'), runs) for n, g in grads.items() if g is None]
    errs = {n: rel_err(runs[0][1][n], g) for n, g in runs[1][1].items() if g is not None and runs[0][1][n] is not None}
    worst = max(errs, key=errs.get)
    print(f'hgrn_deit_small depth 2 fp32, fused ops vs PyTorch paths: logits {rel_err(runs[0][0], runs[1][0]):.1e}, '
          f'parameter grads max {errs[worst]:.1e} ({worst}); without a gradient: {missing or "none"}', flush=True)


def _time(fn, nbytes):
    """GPU time of fn's calls replayed from a CUDA graph (the Python path out) and GB/s over `nbytes`."""
    ms = triton.testing.do_bench_cudagraph(fn, rep=200)
    return f'{ms * 1e3:8.1f} us {nbytes / ms / 1e6:7.0f} GB/s'


def tune():
    """Each backward kernel at its configs; the first row of each is the current one."""
    M, H, C = 256 * 256, 768, 384
    x, dp = torch.randn(M, 2 * H, device=dev, dtype=torch.bfloat16), torch.randn(M, H, device=dev, dtype=torch.bfloat16)
    current = glu.BWD_CONFIG
    print(f'== silu_glu_bwd_kernel ({M}, 2 x {H}) bf16, (rows, channels, warps, programs per SM); moves 6 M H x 2 B')
    for cfg in [current, *itertools.product((8, 16, 32), (64, 128, 256), (2, 4), (8, 16))]:
        glu.BWD_CONFIG = GluConfig(*cfg)
        print(f'  {str(tuple(cfg)):>20} {_time(lambda: glu.silu_glu_bwd(dp, x), 12 * M * H)}', flush=True)
    glu.BWD_CONFIG = current
    xs, dy = torch.randn(M, C, device=dev, dtype=torch.bfloat16), torch.randn(M, C, device=dev, dtype=torch.bfloat16)
    mean, rstd = torch.randn(M, device=dev), torch.rand(M, device=dev) + 0.5
    w, b = torch.randn(C, device=dev), torch.randn(C, device=dev)
    current = nl.BWD_CONFIG
    print(f'== layer_norm_bwd_kernel ({M}, {C}) bf16, (rows, warps, programs per SM); moves 4 M C x 2 B')
    for cfg in [current, *itertools.product((1, 2, 4, 8), (1, 2, 4, 8), (8, 16))]:
        nl.BWD_CONFIG = RowConfig(*cfg)
        print(f'  {str(tuple(cfg)):>20} {_time(lambda: nl.layer_norm_bwd(dy, xs, mean, rstd, w, b), 8 * M * C)}',
              flush=True)
    nl.BWD_CONFIG = current


def _kernel_times(low_memory, steps=5):
    """ms a step per kernel name of compiled hgrn_deit_small training at 224, B=256, bf16 autocast."""
    step = train_step('hgrn_deit_small', low_memory=low_memory)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / steps / 1e3 for e in prof.key_averages() if e.self_device_time_total > 0}


def profile_step():
    """Kernel time per name, default against low_memory, largest differences first."""
    base, low = _kernel_times(False), _kernel_times(True)
    print(f'== compiled hgrn_deit_small training, 224, B=256: kernels {sum(base.values()):.2f} ms a step default, '
          f'{sum(low.values()):.2f} low_memory')
    for k in sorted(set(base) | set(low), key=lambda k: -abs(low.get(k, 0) - base.get(k, 0)))[:30]:
        print(f'  {base.get(k, 0):7.3f} {low.get(k, 0):7.3f} ms  {k[:110]}')


if __name__ == '__main__':
    if {'-h', '--help'} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit()
    print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, flush=True)
    for what in sys.argv[1:] or ['check', 'tune', 'profile']:
        {'check': check, 'tune': tune, 'profile': profile_step}[what]()

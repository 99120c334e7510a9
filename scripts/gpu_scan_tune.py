"""GPU session script for the fused scan: correctness at the benchmark shapes, then block-size tuning.

Run on the lent GPU: `PYTHONPATH=. python scripts/gpu_scan_tune.py`. Prints tables; nothing is timed in tests.
"""
import itertools
import sys
import time

import torch
import triton
import triton.testing

import hgrn_vision.ops.bihgru.fused as fz
from hgrn_vision.benchmark import make_scan_inputs, measure_copy_bandwidth, rel_err
from hgrn_vision.ops import bihgru_scan

SHAPES = [(256, 256, 192), (256, 256, 384), (64, 1024, 384), (16, 5329, 384), (1, 256, 192)]


def inputs(B, N, C, dtype, seed=0):
    """The benchmark's scan inputs on the GPU, u and z in `dtype`."""
    x = make_scan_inputs(B, N, C, torch.device('cuda'), seed=seed)
    return [t.to(dtype) for t in x[:2]] + x[2:]


def check():
    print('== correctness vs float64 (torch path in float64, same rounded inputs) ==')
    print(f'{"shape":>20} {"dtype":>9} {"impl":>10} {"out":>9} {"du":>9} {"dz":>9} {"dgamma":>9} {"dtf":>9} {"dtr":>9}')
    for (B, N, C), dtype in itertools.product(SHAPES, (torch.float32, torch.bfloat16)):
        if B * N * C > 16 * 5329 * 384:
            B = max(1, (16 * 5329 * 384) // (N * C))
        x = [t.requires_grad_() for t in inputs(B, N, C, dtype)]
        xr = [t.detach().double().requires_grad_() for t in x]
        ref = bihgru_scan(*xr, impl='torch')
        do = torch.randn_like(ref)
        gref = torch.autograd.grad(ref, xr, do)
        for impl in ('triton',):
            out = bihgru_scan(*x, impl=impl)
            gs = torch.autograd.grad(out, x, do.to(dtype))
            errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(gs, gref)]
            print(f'{str((B, N, C)):>20} {str(dtype)[6:]:>9} {impl:>10} ' + ' '.join(f'{e:9.2e}' for e in errs))
        del x, xr, ref, gref
        torch.cuda.empty_cache()


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode='median')


def _time_cfgs(label, shapes, cfgs, run, floor_elems, unroll_name):
    for shape in shapes:
        x = inputs(*shape, torch.bfloat16)
        do = torch.randn(shape[0], shape[1], 2 * shape[2], device='cuda', dtype=torch.bfloat16)
        floor = floor_elems * shape[0] * shape[1] * shape[2] * 2
        for cfg in cfgs:
            fz.BLOCK_C, fz.WARPS = cfg[:2]
            setattr(fz, unroll_name, cfg[2])
            try:
                ms = bench(lambda: run(x, do), rep=100)
            except Exception as e:  # noqa: BLE001  (a config that does not compile is reported, not fatal)
                print(label, shape, cfg, 'failed', type(e).__name__, str(e)[:200])
                continue
            print(f'{label} {str(shape):>18} BC={cfg[0]:<4} w={cfg[1]} U={cfg[2]:<3} {ms * 1e3:9.1f} us '
                  f'{floor / ms / 1e6:8.0f} GB/s {100 * floor / ms / 1e6 / BW[0]:5.1f}%')
            sys.stdout.flush()


BW = [1.]
CFGS = [(128, 4, 16), (128, 4, 8), (64, 2, 16), (64, 2, 8)]


def tune(bw):
    BW[0] = bw
    print(f'== copy bandwidth {bw:.0f} GB/s; forward GB/s over 5 elements, backward over 8 ==')
    shapes = [(256, 256, 384), (16, 5329, 384), (1, 256, 192)]
    defaults = fz.BLOCK_C, fz.WARPS, fz.FWD_UNROLL, fz.BWD_UNROLL
    _time_cfgs('fwd', shapes, CFGS, lambda x, do: fz.bihgru_fwd(*x), 5, 'FWD_UNROLL')
    _time_cfgs('bwd', shapes, CFGS, lambda x, do: fz.bihgru_bwd(do, *x), 8, 'BWD_UNROLL')
    fz.BLOCK_C, fz.WARPS, fz.FWD_UNROLL, fz.BWD_UNROLL = defaults


def compile_model():
    import timm

    import hgrn_vision  # noqa: F401
    model = timm.create_model('hgrn_deit_tiny').cuda()
    cmodel = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 3, 224, 224, device='cuda')
    t0 = time.time()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = cmodel(x)
        out.float().mean().backward()
        ref = model(x)
    print(f'== torch.compile(fullgraph=True) hgrn_deit_tiny fwd+bwd OK in {time.time() - t0:.0f}s; '
          f'max |compiled - eager| = {(out.float() - ref.float()).abs().max().item():.3e}')


if __name__ == '__main__':
    print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)
    what = sys.argv[1:] or ['check', 'tune', 'compile']
    if 'check' in what:
        check()
    if 'compile' in what:
        compile_model()
    if 'tune' in what:
        tune(measure_copy_bandwidth(torch.device('cuda'))['copy_gbps'])

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
from hgrn_vision.ops import bihgru_scan

SHAPES = [(256, 256, 192), (256, 256, 384), (64, 1024, 384), (16, 5329, 384), (1, 256, 192)]


def inputs(B, N, C, dtype, seed=0):
    g = torch.Generator(device='cuda').manual_seed(seed)
    u = torch.randn(B, N, 2 * C, device='cuda', generator=g).mul_(2).to(dtype)
    z = torch.randn(B, N, C, device='cuda', generator=g).mul_(3).to(dtype)
    gamma = torch.rand(C, device='cuda', generator=g) * 0.9
    tf = torch.randn(C, device='cuda', generator=g) * 3
    tr = torch.randn(C, device='cuda', generator=g)
    return [u, z, gamma, tf, tr]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


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
        for impl in ('triton', 'triton_seq'):
            out = bihgru_scan(*x, impl=impl)
            gs = torch.autograd.grad(out, x, do.to(dtype))
            errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(gs, gref)]
            print(f'{str((B, N, C)):>20} {str(dtype)[6:]:>9} {impl:>10} ' + ' '.join(f'{e:9.2e}' for e in errs))
        del x, xr, ref, gref
        torch.cuda.empty_cache()


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode='median')


def copy_bw():
    x = torch.empty(2 ** 30 // 2, dtype=torch.bfloat16, device='cuda').normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / ms / 1e6  # GB/s


def tune(bw):
    print(f'== copy bandwidth {bw:.0f} GB/s ==')
    print('== forward tuning (bf16); GB/s over the 5-element floor ==')
    cfgs = list(itertools.product((64, 128, 256), (8, 16, 32), (4, 8)))
    res = {}
    for shape in [(256, 256, 384), (16, 5329, 384), (1, 256, 192)]:
        x = inputs(*shape, torch.bfloat16)
        floor = 5 * shape[0] * shape[1] * shape[2] * 2
        for t, bc, w in cfgs:
            fz.FWD_MAX_T, fz.FWD_BLOCK_C, fz.FWD_WARPS = t, bc, w
            try:
                ms = bench(lambda: fz.bihgru_fwd(*x))
            except Exception as e:  # noqa: BLE001  (a config that does not compile is reported, not fatal)
                print(shape, t, bc, w, 'failed', type(e).__name__, str(e)[:100])
                continue
            res[(shape, t, bc, w)] = ms
            print(f'fwd {str(shape):>18} T={t:<4} BC={bc:<3} w={w} {ms * 1e3:9.1f} us {floor / ms / 1e6:8.0f} GB/s '
                  f'{100 * floor / ms / 1e6 / bw:5.1f}%')
        sys.stdout.flush()
    print('== backward tuning (bf16); GB/s over the 8-element floor ==')
    for shape in [(256, 256, 384), (16, 5329, 384)]:
        x = inputs(*shape, torch.bfloat16)
        do = torch.randn(shape[0], shape[1], 2 * shape[2], device='cuda', dtype=torch.bfloat16)
        floor = 8 * shape[0] * shape[1] * shape[2] * 2
        for t, bc, w in itertools.product((32, 64, 128), (8, 16), (4, 8)):
            fz.BWD_MAX_T, fz.BWD_BLOCK_C, fz.BWD_WARPS = t, bc, w
            try:
                ms = bench(lambda: fz.bihgru_bwd(do, *x), rep=100)
            except Exception as e:  # noqa: BLE001
                print(shape, t, bc, w, 'failed', type(e).__name__, str(e)[:100])
                continue
            print(f'bwd {str(shape):>18} T={t:<4} BC={bc:<3} w={w} {ms * 1e3:9.1f} us {floor / ms / 1e6:8.0f} GB/s '
                  f'{100 * floor / ms / 1e6 / bw:5.1f}%')
            sys.stdout.flush()


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
        tune(copy_bw())

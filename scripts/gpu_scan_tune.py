"""GPU checks and re-tuning of the scan kernels: repeated runs on poisoned memory, correctness at the benchmark
shapes, torch.compile of a model, the config tables' sweeps, host overhead, the mixer's scan + LayerNorm + gate op.

Run on a GPU: `PYTHONPATH=. python scripts/gpu_scan_tune.py [WHAT ...]` with WHAT among stress, check, compile, tune
(the default: these four), compile_lm (compile with low_memory=True), host (the host-side cost of the op's Python
paths), onchip (the one-read forward against the two-sweep one, at its configs), chunks (forced sequence splits),
normgate (the fused scan + LayerNorm + gate op against the scan op composed with them), normgate_tune (that op's row
kernels' configs); or `... compare TREE [TREE ...]` (forward and backward against the ops of other checkouts, e.g.
`git worktree add /tmp/old REV`, side by side in alternated rounds). Prints tables; nothing is timed in tests.
`tune` sweeps `fwd.FWD_CONFIGS` and `bwd.BWD_CONFIGS`, `onchip` `fwd_onchip.ONCHIP_CONFIG`, `normgate_tune`
`norm_gate.FWD_CONFIGS` and `BWD_CONFIGS`: copy the best into the table with the GPU and shapes it was tuned on.
"""
import importlib
import itertools
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from hgrn_vision.benchmark import cast_scan_inputs, float64_reference, make_scan_inputs, measure_copy_bandwidth, rel_err
from hgrn_vision.benchmark.utils import host_and_wall
from hgrn_vision.ops import bihgru_scan, bihgru_scan_norm_gate
from hgrn_vision.ops.bihgru import bwd, common, fused, fwd, fwd_onchip, norm_gate
from hgrn_vision.ops.bihgru.bwd import BwdConfig
from hgrn_vision.ops.bihgru.fwd import FwdConfig
from hgrn_vision.ops.bihgru.fwd_onchip import OnchipConfig
from hgrn_vision.ops.triton_utils import RowConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(256, 256, 192), (256, 256, 384), (64, 1024, 384), (16, 5329, 384), (1, 256, 192)]


def inputs(B, N, C, dtype, seed=0):
    """The benchmark's scan inputs on the GPU, u and z in `dtype`."""
    return cast_scan_inputs(make_scan_inputs(B, N, C, torch.device('cuda'), seed=seed), dtype)


def poison():
    """Fill the allocator's free memory with NaN, so that an element a kernel fails to write (or reads before it
    is written) shows up as NaN instead of matching leftover values."""
    free = torch.cuda.mem_get_info()[0]
    torch.empty(int(free * 0.8) // 4, device='cuda').fill_(float('nan'))


def worst(a, b):
    """Where |a - b| is largest: (index, a, b) and the count of elements off by more than 1e-2 of max |b|."""
    d = (a.double() - b).abs()
    i = int(d.argmax())
    idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), d.shape))
    bad = int((d > 1e-2 * b.abs().max()).sum())
    return f'worst at {idx}: {a.flatten()[i].item():.4g} vs {b.flatten()[i].item():.4g}, {bad} elements off'


def check(shapes=SHAPES, repeat_first=True):
    print('== correctness vs float64 (torch path in float64, same rounded inputs; free memory NaN-poisoned) ==')
    print(f'{"shape":>20} {"dtype":>9} {"impl":>10} {"out":>9} {"du":>9} {"dz":>9} {"dgamma":>9} {"dtf":>9} {"dtr":>9}')
    cases = list(itertools.product(shapes, (torch.float32, torch.bfloat16)))
    for (B, N, C), dtype in cases + cases[:1] * repeat_first:
        if B * N * C > 16 * 5329 * 384:
            B = max(1, (16 * 5329 * 384) // (N * C))
        x = [t.requires_grad_() for t in inputs(B, N, C, dtype)]
        do = torch.randn(x[0].shape, device='cuda', dtype=torch.float64)
        ref = float64_reference(x, do)
        poison()
        out = bihgru_scan(*x, impl='triton')
        got = [out, *torch.autograd.grad(out, x, do.to(dtype))]
        errs = [rel_err(a, b) for a, b in zip(got, ref)]
        print(f'{str((B, N, C)):>20} {str(dtype)[6:]:>9} {"triton":>10} ' + ' '.join(f'{e:9.2e}' for e in errs))
        for name, a, b, e in zip(('out', 'du', 'dz', 'dgamma', 'dtf', 'dtr'), got, ref, errs):
            if not e < 1e-2:
                print(f'    {name}: {worst(a, b)}')
        del x, do, ref, out, got
        torch.cuda.empty_cache()


def _load_ops(tree, name, edit=lambda src: src):
    """The scan op module (`bihgru/fused.py`, with `bihgru_fwd` and `bihgru_bwd`) of another checkout's ops package,
    imported as the package `name`: its files copied to a temporary folder (Triton reads the source of what it
    compiles) with `edit` applied to each and 'hgrn_vision' renamed, so that its ops register under their own
    namespace beside this tree's."""
    dst = os.path.join(tempfile.mkdtemp(), name)
    shutil.copytree(os.path.join(tree, 'hgrn_vision', 'ops'), dst)
    for folder, _, files in os.walk(dst):
        for file in files:
            if file.endswith('.py'):
                path = os.path.join(folder, file)
                with open(path) as f:
                    src = edit(f.read()).replace('hgrn_vision', name)
                with open(path, 'w') as f:
                    f.write(src)
    sys.path.insert(0, os.path.dirname(dst))
    return importlib.import_module(f'{name}.bihgru.fused')


def _without_barriers():
    """This tree's scan kernels with every `tl.debug_barrier()` removed, to show that the barriers are needed."""
    return _load_ops(ROOT, 'ops_nobarrier', lambda src: src.replace('tl.debug_barrier()', 'pass'))


def _directions(x, do, ref):
    """(name, floor elements per (B, N, C) element, run(module) -> outputs, their float64 references) of the forward
    and the backward at inputs x and output gradient do, ref from `float64_reference(x, do)`; module: a scan op module
    (`fused` or one from `_load_ops`)."""
    return (('fwd', 5, lambda m: [m.bihgru_fwd(*x)], ref[:1]),
            ('bwd', 8, lambda m: m.bihgru_bwd(do, *x)[:5], ref[1:]))


def compare(paths, shapes=((256, 256, 384), (64, 1024, 384), (16, 5329, 384), (256, 256, 192), (1, 256, 192)),
            rounds=2):
    """Forward and backward of the current kernels against those of other checkouts (e.g. an earlier commit's, or
    variants), side by side in one run, bf16 and fp32: each version's max rel. error against float64, then `rounds`
    alternated rounds of CUDA-graph timings, the better round reported; x = current / version (> 1: the version is
    faster)."""
    others = {}
    for path in paths:
        others[os.path.basename(os.path.normpath(path))] = _load_ops(path, f'ops_other{len(others)}')
    mods = {'current': fused, **others}
    bw = measure_copy_bandwidth(torch.device('cuda'))['copy_gbps']
    print(f'== current vs {", ".join(paths)}; copy bandwidth {bw:.0f} GB/s; % of it over 5 (forward) or 8 (backward) '
          'elements; x = current time / version time (> 1: the version is faster) ==')
    for shape, dtype in itertools.product(shapes, (torch.bfloat16, torch.float32)):
        x = inputs(*shape, dtype)
        do = torch.randn(shape[0], shape[1], 2 * shape[2], device='cuda', dtype=dtype)
        ref = float64_reference(x, do)
        for name, elems, run, want in _directions(x, do, ref):
            floor = elems * shape[0] * shape[1] * shape[2] * x[0].element_size()
            errs = {k: max(rel_err(a, b) for a, b in zip(run(m), want)) for k, m in mods.items()}
            ms = {k: [] for k in mods}
            for _ in range(rounds):
                for k, m in mods.items():
                    ms[k].append(bench(lambda m=m: run(m), rep=100))
            best = {k: min(v) for k, v in ms.items()}
            print(f'{name} {str(shape):>18} {str(dtype)[6:]:>9}')
            for k in mods:
                print(f'    {k:>24} {best[k] * 1e3:8.1f} us {100 * floor / best[k] / 1e6 / bw:5.1f}%'
                      f'   x {best["current"] / best[k]:5.3f}   err {errs[k]:.1e}   rounds '
                      + ' '.join(f'{t * 1e3:.1f}' for t in ms[k]))
            sys.stdout.flush()
        del x, do, ref
        torch.cuda.empty_cache()


def stress(reps=8):
    """Forward then backward `reps` times on fresh, NaN-poisoned memory: how many runs give a wrong du / dz / dgamma
    (rel. error > 1e-2 or NaN against float64): through autograd (the op as models call it), and the kernels called
    directly, with and without their barriers."""
    print(f'== forward + backward {reps} times on poisoned memory: runs with a wrong du / dz / dgamma ==')
    nobar = _without_barriers()

    def autograd(x, do):
        x = [t.detach().requires_grad_() for t in x]
        return torch.autograd.grad(bihgru_scan(*x, impl='triton'), x, do)

    def direct(mod):
        return lambda x, do: (mod.bihgru_fwd(*x), mod.bihgru_bwd(do, *x))[1]

    variants = [('autograd', autograd), ('direct', direct(fused)), ('direct, no barrier', direct(nobar))]
    for (B, N, C), dtype in itertools.product(SHAPES[:3], (torch.float32, torch.bfloat16)):
        x = inputs(B, N, C, dtype)
        do = torch.randn(x[0].shape, device='cuda', dtype=torch.float64)
        gref = float64_reference(x, do)[1:4]
        do = do.to(dtype)
        line = f'{str((B, N, C)):>18} {str(dtype)[6:]:>9}'
        for name, run in variants:
            bad = 0
            for _ in range(reps):
                poison()
                gs = run(x, do)[:3]
                bad += not all(rel_err(a, b) < 1e-2 for a, b in zip(gs, gref))
                del gs
            line += f'   {name}: {bad}/{reps}'
        print(line)
        del x, do, gref
        torch.cuda.empty_cache()


def bench(fn, rep=200):
    """Median ms of fn's calls replayed from a CUDA graph: the kernels' GPU time without the host's launch path, which
    `do_bench` counts (its timings of one kernel swing by several times). No L2 flush between replays: shapes that
    fit in L2 read faster than from memory."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode='median')


def _time_cfgs(module, table, key, cfgs, shape, dtype, run, floor_elems, bw):
    """Time `run` at `shape` in `dtype` with each config of `cfgs` as entry `key` of `module.table`, then restore
    it."""
    x = inputs(*shape, dtype)
    do = torch.randn(shape[0], shape[1], 2 * shape[2], device='cuda', dtype=dtype)
    floor = floor_elems * shape[0] * shape[1] * shape[2] * x[0].element_size()
    configs = getattr(module, table)
    default = configs[key]
    for cfg in cfgs:
        configs[key] = cfg
        try:
            ms = bench(lambda: run(x, do), rep=100)
        except Exception as e:  # noqa: BLE001  (a config that does not compile is reported, not fatal)
            print(table, shape, cfg, 'failed', type(e).__name__, str(e)[:200])
            continue
        print(f'{table} {str(shape):>18} {str(dtype)[6:]:>8} {cfg} {ms * 1e3:9.1f} us {floor / ms / 1e6:8.0f} GB/s '
              f'{100 * floor / ms / 1e6 / bw:5.1f}%')
        sys.stdout.flush()
    configs[key] = default


# (block_c, num_warps, programs_per_sm) to sweep; each with the table's load_ahead / max_registers, then the table's
# entry with load_ahead flipped and with max_registers uncapped. Rows per group are fixed (`common.GROUP`).
BLOCKS = [(64, 2, 8), (64, 2, 16), (64, 2, 32), (32, 1, 16), (32, 1, 8), (32, 1, 32), (128, 4, 8)]


def tune(bw, shapes=((256, 256, 384), (16, 5329, 384), (1, 256, 192)), dtypes=(torch.bfloat16, torch.float32)):
    """The two-sweep forward's and the backward's configs (`fwd.FWD_CONFIGS`, `bwd.BWD_CONFIGS`) at each shape and
    dtype, the forward forced to the two-sweep kernel."""
    print(f'== copy bandwidth {bw:.0f} GB/s; forward GB/s over 5 elements, backward over 8 ==')
    onchip_fits = fused.onchip_fits
    fused.onchip_fits = lambda *args: False
    for shape, dtype in itertools.product(shapes, dtypes):
        key = torch.empty((), dtype=dtype).element_size()
        f, b = fwd.FWD_CONFIGS[key], bwd.BWD_CONFIGS[key]
        fcfgs = [FwdConfig(*blk, f.load_ahead) for blk in BLOCKS] + [f._replace(load_ahead=not f.load_ahead)]
        bcfgs = [BwdConfig(*blk, b.max_registers) for blk in BLOCKS] + [b._replace(max_registers=None)]
        _time_cfgs(fwd, 'FWD_CONFIGS', key, fcfgs, shape, dtype, lambda x, do: fused.bihgru_fwd(*x), 5, bw)
        _time_cfgs(bwd, 'BWD_CONFIGS', key, bcfgs, shape, dtype, lambda x, do: fused.bihgru_bwd(do, *x), 8, bw)
    fused.onchip_fits = onchip_fits


def chunks(shapes=((256, 256, 384), (256, 256, 192)), splits=(1, 2, 4, 8)):
    """The two-sweep kernels with the sequence split into `splits` chunks where `_chunks` would not split it (bf16),
    against float64: a chunk's second read of u, z comes back after chunk_len rows instead of N, so it may hit L2,
    at the price of the summary pass's extra read. Times each split beside the unsplit one."""
    print('== forced splits of the sequence (chunks, rows a chunk), bf16 ==')
    pick = common.chunks
    for shape in shapes:
        x = inputs(*shape, torch.bfloat16)
        do = torch.randn(shape[0], shape[1], 2 * shape[2], device='cuda', dtype=torch.bfloat16)
        ref = float64_reference(x, do)
        base = {}
        for n in splits:
            rows = triton.cdiv(triton.cdiv(shape[1], n), common.GROUP) * common.GROUP
            fwd.chunks = bwd.chunks = lambda B, N, C, device, cfg, rows=rows: (
                triton.cdiv(C, cfg.block_c), triton.cdiv(N, rows), rows)
            for name, _, run, want in _directions(x, do, ref):
                err = max(rel_err(a, b) for a, b in zip(run(fused), want))
                t = bench(lambda: run(fused), rep=100)
                base.setdefault(name, t)
                print(f'{name} {str(shape):>16} {n} x {rows:>3} rows {t * 1e3:8.1f} us  speed-up {base[name] / t:5.2f}x'
                      f'  err {err:.1e}', flush=True)
        fwd.chunks = bwd.chunks = pick
        del x, do, ref
        torch.cuda.empty_cache()


def host_overhead(shapes=((1, 256, 192), (256, 256, 384))):
    """What the op's Python paths cost the host per call (bf16): pieces of `bihgru_fwd` / `bihgru_bwd`, the kernels'
    wrappers, the custom ops and a backward through autograd. Where host > the GPU's time, the host bounds it."""
    print('== host time per call (no syncs in the loop) and wall time with a sync at the end, bf16 ==')
    for shape in shapes:
        x = inputs(*shape, torch.bfloat16)
        xg = [t.detach().clone().requires_grad_() for t in x]
        do = torch.randn(x[0].shape, device='cuda', dtype=torch.bfloat16)
        out = bihgru_scan(*xg, impl='triton')
        cases = {
            'chunks': lambda: common.chunks(shape[0], shape[1], shape[2], x[0].device, bwd.BWD_CONFIGS[2]),
            'get_device_properties': lambda: torch.cuda.get_device_properties(x[0].device),
            'torch.empty x3': lambda: [torch.empty(shape[0], shape[1], 2 * shape[2], device='cuda') for _ in range(3)],
            'bihgru_fwd': lambda: fused.bihgru_fwd(*x),
            'bihgru_bwd': lambda: fused.bihgru_bwd(do, *x),
            'bwd op': lambda: torch.ops.hgrn_vision.bihgru_scan_bwd(do, *x),
            'fwd op no_grad': lambda: bihgru_scan(*x, impl='triton'),
            'autograd.grad': lambda: torch.autograd.grad(out, xg, do, retain_graph=True),
        }
        for name, fn in cases.items():
            h, w = (1e6 * t for t in host_and_wall(fn, 200))
            print(f'{str(shape):>16} {name:>22}: host {h:8.1f} us/call, synced wall {w:8.1f} us/call')


ONCHIP_CFGS = [(16, 8), (16, 4), (16, 16), (32, 8), (8, 8)]  # (block_c, rows) to sweep


def onchip(shapes=((1, 256, 192), (1, 256, 384), (4, 256, 384), (5, 256, 384), (8, 256, 384), (16, 256, 192),
                   (1, 197, 384), (256, 256, 384))):
    """The one-read forward at each config of ONCHIP_CFGS against the two-sweep one (each forced), bf16 and fp32, with
    the kernel that `bihgru_fwd` picks (`fwd_onchip.onchip_fits`) and each one-read output's rel. error against
    float64."""
    print('== forward: one-read at each (block_c, rows) vs two-sweep (us); pick = what bihgru_fwd runs ==')
    fits, default = fused.onchip_fits, fwd_onchip.ONCHIP_CONFIG
    for shape, dtype in itertools.product(shapes, (torch.bfloat16, torch.float32)):
        x = inputs(*shape, dtype)
        ref = float64_reference(x, torch.zeros(shape[0], shape[1], 2 * shape[2], device='cuda', dtype=torch.float64))
        pick = 'one-read' if fits(*shape, x[0].device) else 'two-sweep'
        fused.onchip_fits = lambda *args: False
        two = bench(lambda: fused.bihgru_fwd(*x), rep=100)
        fused.onchip_fits = lambda *args: True
        line = f'{str(shape):>16} {str(dtype)[6:]:>9}  two-sweep {two * 1e3:8.1f} us  pick {pick:>9}  one-read:'
        for cfg in ONCHIP_CFGS:
            fwd_onchip.ONCHIP_CONFIG = OnchipConfig(*cfg)
            err = rel_err(fused.bihgru_fwd(*x), ref[0])
            one = bench(lambda: fused.bihgru_fwd(*x), rep=100)
            line += f'  {cfg} {one * 1e3:.1f} us ({two / one:.2f}x, err {err:.0e})'
        fused.onchip_fits, fwd_onchip.ONCHIP_CONFIG = fits, default
        print(line)
        sys.stdout.flush()


def _composed(x, gamma, theta_f, theta_r, weight, bias):
    """The mixer before the fused op: the scan op, then PyTorch's LayerNorm and gate."""
    C = x.shape[-1] // 5
    u, z, g = x.split([2 * C, C, 2 * C], -1)
    return F.layer_norm(bihgru_scan(u, z, gamma, theta_f, theta_r, impl='triton'), (2 * C,), weight, bias) * F.silu(g)


def normgate(shapes=((256, 256, 384), (64, 1024, 384), (12, 5329, 384)), check_batch=16):
    """The fused scan + LayerNorm + gate op: max rel. error of y and its seven gradients (the last: in_bias's, from
    the kernels' sums) against the 'torch' scan composed in float64 (first `check_batch` sequences), then time
    (do_bench, bf16) against `_composed` (in_bias's gradient as a sum of x's), both under torch.compile: forward
    alone and forward + backward."""
    print('== bihgru_scan_norm_gate: fused op vs scan op + LayerNorm + gate, both compiled ==')
    fused = torch.compile(lambda *a: bihgru_scan_norm_gate(*a[:-1], in_bias=a[-1], impl='triton'))
    composed = torch.compile(_composed)
    for (B, N, C), dtype in itertools.product(shapes, (torch.bfloat16, torch.float32)):
        u, z, *vec = inputs(B, N, C, dtype)
        g = torch.randn(B, N, 2 * C, device='cuda', dtype=dtype) * 2
        wb = [torch.randn(2 * C, device='cuda') * 0.5 + 1, torch.randn(2 * C, device='cuda') * 0.3]
        args = [torch.cat([u, z, g], -1), *vec, *wb, torch.randn(5 * C, device='cuda')]
        args = [t.requires_grad_() for t in args]
        dy = torch.randn(B, N, 2 * C, device='cuda', dtype=dtype)
        ref_in = [a.detach()[:check_batch].double().requires_grad_() if i == 0 else a.detach().double().requires_grad_()
                  for i, a in enumerate(args[:-1])]
        ref = bihgru_scan_norm_gate(*ref_in, impl='torch')
        ref = [ref, *torch.autograd.grad(ref, ref_in, dy[:check_batch].double())]
        ref.append(ref[1].sum((0, 1)))
        small = [args[0].detach()[:check_batch].requires_grad_(), *args[1:]]
        y = bihgru_scan_norm_gate(*small[:-1], in_bias=small[-1], impl='triton')
        got = [y, *torch.autograd.grad(y, small, dy[:check_batch])]
        errs = ' '.join(f'{rel_err(a, b):.1e}' for a, b in zip(got, ref))
        del ref_in, ref, small, y, got
        line = f'{str((B, N, C)):>16} {str(dtype)[6:]:>9}  err y, dx, dgamma, dtf, dtr, dw, db, din_bias: {errs}'
        if dtype == torch.bfloat16:
            runs = {'fused': (lambda: fused(*args), lambda: torch.autograd.grad(fused(*args), args, dy)),
                    'composed': (lambda: composed(*args[:-1]), lambda: torch.autograd.grad(
                        composed(*args[:-1]), args[:-1], dy)[0].sum((0, 1)))}
            t = {}
            for name, (fwd, fwd_bwd) in runs.items():
                with torch.no_grad():
                    t[name, 'fwd'] = bench(fwd, rep=100)
                t[name, 'fwd+bwd'] = bench(fwd_bwd, rep=100)
            line += ''.join(f'  {k}: fused {t["fused", k] * 1e3:7.1f} us composed {t["composed", k] * 1e3:7.1f} us '
                            f'({t["composed", k] / t["fused", k]:.2f}x)' for k in ('fwd', 'fwd+bwd'))
        print(line)
        sys.stdout.flush()


NG_FWD_CFGS = [RowConfig(*c) for c in [(1, 2, 8), (1, 2, 16), (1, 4, 8), (2, 2, 8), (2, 2, 16), (2, 4, 8), (1, 1, 16)]]
# the backward at (1, 2, .) holds 168 registers a thread (Triton 3.6), so 6 programs fit an SM: 6 and 12 programs an SM
# run whole waves of persistent programs
NG_BWD_CFGS = [RowConfig(*c) for c in [(1, 2, 16), (1, 2, 6), (1, 2, 12), (1, 2, 8), (2, 4, 8), (2, 2, 16), (2, 4, 4),
                                       (1, 1, 32), (4, 4, 4)]]


def normgate_tune(shapes=((256, 256, 384), (12, 5329, 384), (256, 256, 192), (256, 256, 768))):
    """The row kernels of the fused op alone (bf16) at each (rows, warps, programs per SM) config, in GB/s over
    what they must move (forward h, g, y: 6 elements per token and C; backward dy, h, g, dh, dg: 10), against the
    same LayerNorm + gate compiled by inductor (`F.layer_norm(h) * silu(g)`, forward and its backward). The shapes
    are the small model's at 224 and 1024, the tiny and base models' at 224; wide tokens raise a config's warps
    (`row_warps`), so at 2C = 1536 a 1-warp config runs with 2 (forward) or 4 (backward)."""
    bw = measure_copy_bandwidth(torch.device('cuda'))['copy_gbps']
    defaults = norm_gate.FWD_CONFIGS, norm_gate.BWD_CONFIGS
    print(f'== norm-gate row kernels, bf16; copy bandwidth {bw:.0f} GB/s ==')
    ind = torch.compile(lambda h, g, w, b: F.layer_norm(h, (h.shape[-1],), w, b) * F.silu(g))
    for B, N, C in shapes:
        D = 2 * C
        x = torch.randn(B, N, 5 * C, device='cuda', dtype=torch.bfloat16)
        h, dy = (torch.randn(B, N, D, device='cuda', dtype=torch.bfloat16) for _ in range(2))
        w, b = torch.randn(D, device='cuda') + 1, torch.randn(D, device='cuda')
        dx = torch.empty_like(x)
        nbytes = B * N * C * 2
        rows = []
        for cfg in NG_FWD_CFGS:
            norm_gate.FWD_CONFIGS = {D: cfg}
            rows.append((f'fwd {tuple(cfg)}', bench(lambda: norm_gate.norm_gate_fwd(h, x, w, b, 1e-5), rep=100), 6))
        for cfg in NG_BWD_CFGS:
            norm_gate.BWD_CONFIGS = {D: cfg}
            rows.append((f'bwd {tuple(cfg)}', bench(lambda: norm_gate.norm_gate_bwd(dy, h, x, w, b, 1e-5, dx), rep=100),
                         10))
        g = x[..., 3 * C:]
        rows.append(('inductor fwd', bench(lambda: ind(h, g, w, b), rep=100), 6))
        hg, gg = h.clone().requires_grad_(), g.clone().requires_grad_()
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        rows.append(('inductor fwd+bwd', bench(lambda: torch.autograd.grad(ind(hg, gg, wg, bg), (hg, gg, wg, bg), dy),
                                               rep=100), 16))
        for name, ms, elems in rows:
            gbps = elems * nbytes / ms / 1e6
            print(f'{str((B, N, C)):>16} {name:>18} {ms * 1e3:8.1f} us {gbps:7.0f} GB/s {100 * gbps / bw:5.1f}%')
        sys.stdout.flush()
    norm_gate.FWD_CONFIGS, norm_gate.BWD_CONFIGS = defaults


def compile_model(low_memory: bool = False):
    """torch.compile(fullgraph=True) of hgrn_deit_tiny (with `low_memory`) against eager, bf16 autocast: the logits and
    every parameter's gradient (relative to its largest element), and the graph breaks."""
    import timm
    from torch._dynamo.utils import counters

    import hgrn_vision  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model('hgrn_deit_tiny', low_memory=low_memory).cuda()
    x = torch.randn(8, 3, 224, 224, device='cuda')
    t0 = time.time()
    outs, grads = [], []
    for fn in (torch.compile(model, fullgraph=True), model):
        model.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = fn(x)
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append({n: p.grad.float().clone() for n, p in model.named_parameters()})
    errs = {n: ((grads[0][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in grads[1].items()}
    worst = max(errs, key=errs.get)
    err = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
    print(f'== torch.compile(fullgraph=True) hgrn_deit_tiny low_memory={low_memory} fwd+bwd in '
          f'{time.time() - t0:.0f}s: logits max rel. err {err:.2e}, parameter grads max rel. err {errs[worst]:.2e} '
          f'({worst}); graph breaks '
          f'{dict(counters["graph_break"])}')


if __name__ == '__main__':
    if {'-h', '--help'} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit()
    print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)
    what = sys.argv[1:] or ['stress', 'check', 'compile', 'tune']
    if what[0] == 'compare':
        compare(what[1:])
        sys.exit()
    commands = {  # run in this order, whatever the order asked
        'stress': stress, 'check': check, 'compile': compile_model, 'compile_lm': lambda: compile_model(True),
        'host': host_overhead, 'onchip': onchip, 'chunks': chunks,
        'normgate_tune': normgate_tune, 'normgate': normgate,
        'tune': lambda: tune(measure_copy_bandwidth(torch.device('cuda'))['copy_gbps'])}
    for name, command in commands.items():
        if name in what:
            command()

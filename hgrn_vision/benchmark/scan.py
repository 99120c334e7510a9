"""Scan micro-benchmark: every `bihgru_scan` implementation against the device's copy bandwidth.

First the device copy bandwidth is measured (one large device-to-device copy, bytes read + written over its median
time). Then for each shape (B, N, C), dtype and implementation in `available_impls()` (except 'reference'):
forward (under `no_grad`), backward alone (`torch.autograd.grad` on a retained graph) and forward + backward are
timed with CUDA events after warm-up, L2 flushed before each call, median of many. The byte floor per (B, N, C)
element is `FWD_ELEMS` = 5 elements forward (reads u 2 + z 1, writes the output 2) and `BWD_ELEMS` = 8 backward
(reads u, z, dout 5, writes du, dz 3), times the dtype's size; achieved GB/s is that floor over the time, and
'% copy' is that over the measured copy bandwidth. `u`, `z` have the benchmark dtype, the per-channel `gamma`,
`theta_f`, `theta_r` are float32 (as in the models under autocast); every implementation gets the same inputs.

`check=True` also compares each implementation against the 'torch' implementation run in float64 on the same
(rounded) inputs, in batch chunks to bound its memory: relative error ||a - b|| / ||b|| of the output and the five
gradients.
"""
import os
import statistics
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from hgrn_vision.ops import available_impls, bihgru_scan

from .utils import (
    OOM_ERRORS,
    Column,
    environment,
    format_table,
    free_memory,
    measure_copy_bandwidth,
    release_memory,
    time_fn,
    write_csv,
    write_json,
)

__all__ = ['SCAN_SHAPES', 'FWD_ELEMS', 'BWD_ELEMS', 'make_scan_inputs', 'cast_scan_inputs', 'float64_reference',
           'rel_err', 'benchmark_scan', 'check_scan']

SCAN_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (256, 256, 192), (256, 256, 384), (64, 1024, 384), (16, 5329, 384), (1, 256, 192))
CPU_SHAPES: Tuple[Tuple[int, int, int], ...] = ((2, 64, 32), (1, 37, 5))
FWD_ELEMS = 5
BWD_ELEMS = 8
GPU_TIMING = dict(warmup=3, min_iters=10, max_iters=200, max_time=0.25, flush_l2=True)
CPU_TIMING = dict(warmup=1, min_iters=2, max_iters=3, max_time=0.1)
_GRAD_NAMES = ('du', 'dz', 'dgamma', 'dtheta_f', 'dtheta_r')

SCAN_COLUMNS: List[Column] = [
    ('impl', 'impl', ''),
    ('B', 'B', ''), ('N', 'N', ''), ('C', 'C', ''),
    ('dtype', 'dtype', ''),
    ('fwd_ms', 'fwd ms', '.4f'),
    ('fwd_gbps', 'fwd GB/s', '.1f'),
    ('fwd_pct_copy', 'fwd %copy', '.1f'),
    ('bwd_ms', 'bwd ms', '.4f'),
    ('bwd_gbps', 'bwd GB/s', '.1f'),
    ('bwd_pct_copy', 'bwd %copy', '.1f'),
    ('fwdbwd_ms', 'f+b ms', '.4f'),
    ('fwdbwd_gbps', 'f+b GB/s', '.1f'),
    ('fwdbwd_pct_copy', 'f+b %copy', '.1f'),
    ('status', 'status', ''),
]
CHECK_COLUMNS: List[Column] = [
    ('impl', 'impl', ''),
    ('B', 'B', ''), ('N', 'N', ''), ('C', 'C', ''),
    ('dtype', 'dtype', ''),
    ('out', 'out', '.1e'),
] + [(n, n, '.1e') for n in _GRAD_NAMES] + [('status', 'status', '')]


def make_scan_inputs(B: int, N: int, C: int, device: torch.device, seed: int = 0) -> List[torch.Tensor]:
    """float32 u (B, N, 2C), z (B, N, C), gamma, theta_f, theta_r (C,): random, never zero, gates spread from
    near 0 to near 1 (every 7th z at -12, every 7th at +12), lower bounds in [0, 0.9), large angles."""
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(B, N, 2 * C, generator=g, device=device) * 2
    z = torch.randn(B, N, C, generator=g, device=device) * 3
    z.view(-1)[::7] = -12.
    z.view(-1)[3::7] = 12.
    gamma = torch.rand(C, generator=g, device=device) * 0.9
    gamma[0] = 0.
    theta_f = torch.randn(C, generator=g, device=device) * 20
    theta_r = torch.randn(C, generator=g, device=device)
    return [u, z, gamma, theta_f, theta_r]


def cast_scan_inputs(inputs: Sequence[torch.Tensor], dtype: torch.dtype,
                     requires_grad: bool = False) -> List[torch.Tensor]:
    """u, z in `dtype`, the per-channel vectors float32 (float64 when `dtype` is float64), as fresh leaves."""
    vec_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = [t.to(dtype if i < 2 else vec_dtype).detach().clone() for i, t in enumerate(inputs)]
    return [t.requires_grad_(requires_grad) for t in out]


def _time_bwd(impl: str, xg: Sequence[torch.Tensor], dout: torch.Tensor, device: torch.device,
              timing: Dict[str, Any]) -> float:
    out = bihgru_scan(*xg, impl=impl)  # freed, with its graph, on return
    return statistics.median(time_fn(
        lambda: torch.autograd.grad(out, xg, dout, retain_graph=True), device, **timing))


def _time_impl(impl: str, inputs: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device,
               timing: Dict[str, Any], row: Dict[str, Any]) -> None:
    """Puts the median ms of the forward, the backward alone and forward + backward of `impl` in `dtype` into
    `row`, one after the other (an impl whose backward fails keeps its forward time)."""
    x = cast_scan_inputs(inputs, dtype)
    with torch.no_grad():
        row['fwd_ms'] = statistics.median(time_fn(lambda: bihgru_scan(*x, impl=impl), device, **timing))
    xg = cast_scan_inputs(inputs, dtype, requires_grad=True)
    dout = torch.randn(x[0].shape, device=device, dtype=dtype)
    row['bwd_ms'] = _time_bwd(impl, xg, dout, device, timing)

    def fwdbwd():
        torch.autograd.grad(bihgru_scan(*xg, impl=impl), xg, dout)

    row['fwdbwd_ms'] = statistics.median(time_fn(fwdbwd, device, **timing))


def float64_reference(inputs: Sequence[torch.Tensor], dout: torch.Tensor,
                      max_elems: int = 1 << 22) -> List[torch.Tensor]:
    """Output and five gradients of the 'torch' implementation in float64, over batch chunks of at most about
    `max_elems` (B, N, C) elements (the per-channel gradients are summed over the chunks)."""
    u, z, gamma, theta_f, theta_r = cast_scan_inputs(inputs, torch.float64)
    dout = dout.double()
    B, N, C = z.shape
    step = max(1, max_elems // (N * C))
    outs, dus, dzs = [], [], []
    dvec = [torch.zeros_like(gamma) for _ in range(3)]
    vec = [t.requires_grad_(True) for t in (gamma, theta_f, theta_r)]
    for b in range(0, B, step):
        uc = u[b:b + step].detach().requires_grad_(True)
        zc = z[b:b + step].detach().requires_grad_(True)
        out = bihgru_scan(uc, zc, *vec, impl='torch')
        grads = torch.autograd.grad(out, [uc, zc, *vec], dout[b:b + step])
        outs.append(out.detach())
        dus.append(grads[0])
        dzs.append(grads[1])
        for acc, g in zip(dvec, grads[2:]):
            acc += g
        del out, grads
    return [torch.cat(outs), torch.cat(dus), torch.cat(dzs), *dvec]


def _error(e: Exception) -> str:
    first = str(e).splitlines()[0][:100] if str(e) else ''
    return f'error: {type(e).__name__}: {first}'


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_scan(
        impl: str,
        inputs: Sequence[torch.Tensor],
        dtype: torch.dtype,
        ref: Sequence[torch.Tensor],
        dout: torch.Tensor,
        row: Dict[str, Any],
) -> None:
    """Puts the relative errors of `impl` in `dtype` against the float64 reference `ref` into `row`: 'out', then
    the five gradients (the output's error stays when the backward fails)."""
    x = cast_scan_inputs(inputs, dtype, requires_grad=True)
    out = bihgru_scan(*x, impl=impl)
    row['out'] = rel_err(out, ref[0])
    grads = torch.autograd.grad(out, x, dout.to(out.dtype))
    row.update({n: rel_err(a, b) for n, a, b in zip(_GRAD_NAMES, grads, ref[1:])})


def benchmark_scan(
        device: str = 'cuda',
        shapes: Optional[Sequence[Tuple[int, int, int]]] = None,
        dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float32),
        impls: Optional[Sequence[str]] = None,
        check: bool = False,
        timing: Optional[Dict[str, Any]] = None,
        output_dir: str = 'output/benchmark',
        name: str = 'scan',
        seed: int = 0,
) -> Dict[str, Any]:
    """Runs the scan benchmark (and with `check` the float64 comparison), prints the tables, writes
    `<name>.csv` (and `<name>_check.csv`) and `<name>.json` into `output_dir`.

    `shapes` default to `SCAN_SHAPES` on CUDA (`CPU_SHAPES` on the CPU), `impls` to every available one but
    'reference'; `timing` (`time_fn` arguments) overrides `GPU_TIMING` / `CPU_TIMING`. An implementation that
    fails or runs out of memory at a shape gives a row with its status.
    """
    dev = torch.device(device)
    shapes = [tuple(s) for s in (shapes or (SCAN_SHAPES if dev.type == 'cuda' else CPU_SHAPES))]
    impls = list(impls or [i for i in available_impls() if i != 'reference'])
    unknown = [i for i in impls if i not in available_impls()]
    if unknown:
        raise ValueError(f'Unknown scan impl(s) {unknown}; available: {available_impls()}.')
    timing = {**(GPU_TIMING if dev.type == 'cuda' else CPU_TIMING), **(timing or {})}

    meta = environment(dev)
    meta.update(measure_copy_bandwidth(dev, warmup=timing['warmup'], max_time=timing['max_time']))
    meta.update(shapes=[list(s) for s in shapes], dtypes=[str(d).replace('torch.', '') for d in dtypes],
                impls=impls, fwd_elems=FWD_ELEMS, bwd_elems=BWD_ELEMS, timing=timing)
    copy = meta['copy_gbps']
    print(f'{meta["device"]}: torch {meta["torch"]}, triton {meta["triton"]}; copy bandwidth {copy:.0f} GB/s '
          f'({meta["copy_bytes"] / 1e9:.2f} GB read + written in {meta["copy_ms"]:.3f} ms); impls {impls}',
          flush=True)

    rows: List[Dict[str, Any]] = []
    check_rows: List[Dict[str, Any]] = []
    for B, N, C in shapes:
        need = 4 * (3 + 2 + 2 + 3) * B * N * C  # float32 u, z, out, dout, du, dz
        if need > free_memory(dev):
            print(f'  skipped (B, N, C) = {(B, N, C)}: its float32 inputs, outputs and gradients need '
                  f'{need / 1e9:.1f} GB, {free_memory(dev) / 1e9:.1f} GB free', flush=True)
            continue
        inputs = make_scan_inputs(B, N, C, dev, seed=seed)
        for dtype in dtypes:
            floor_elem = B * N * C * torch.empty((), dtype=dtype).element_size()
            ref = dout = None
            if check:
                dout = torch.randn(B, N, 2 * C, device=dev, dtype=dtype)
                try:
                    ref = float64_reference(cast_scan_inputs(inputs, dtype), dout)
                except OOM_ERRORS:
                    print(f'  no float64 reference at {(B, N, C)} {dtype}: out of memory', flush=True)
                release_memory(dev)
            for impl in impls:
                row: Dict[str, Any] = dict(impl=impl, B=B, N=N, C=C, dtype=str(dtype).replace('torch.', ''),
                                           status='ok')
                try:
                    _time_impl(impl, inputs, dtype, dev, timing, row)
                except OOM_ERRORS:
                    row['status'] = 'oom'
                except Exception as e:  # e.g. a CUDA-only impl on the CPU: a row with the reason, not the end
                    row['status'] = _error(e)
                    if dev.type == 'cuda':
                        traceback.print_exc()
                release_memory(dev)
                for key, elems in (('fwd', FWD_ELEMS), ('bwd', BWD_ELEMS), ('fwdbwd', FWD_ELEMS + BWD_ELEMS)):
                    if f'{key}_ms' in row:
                        row[f'{key}_gbps'] = elems * floor_elem / row[f'{key}_ms'] / 1e6
                        row[f'{key}_pct_copy'] = 100 * row[f'{key}_gbps'] / copy
                rows.append(row)
                times = ', '.join(f'{k} {row[k + "_ms"]:.4f} ms' for k in ('fwd', 'bwd', 'fwdbwd') if k + '_ms' in row)
                print(f'  {impl} {(B, N, C)} {row["dtype"]}: {times} {row["status"]}', flush=True)
                if check:
                    crow = {k: row[k] for k in ('impl', 'B', 'N', 'C', 'dtype')}
                    crow['status'] = 'ok' if ref is not None else 'no reference'
                    if 'fwd_ms' not in row:
                        crow['status'] = 'not run: the timing failed'
                    elif ref is not None:
                        try:
                            check_scan(impl, inputs, dtype, ref, dout, crow)
                        except OOM_ERRORS:
                            crow['status'] = 'oom'
                        except Exception as e:
                            crow['status'] = _error(e)
                    release_memory(dev)
                    check_rows.append(crow)
            del ref, dout
        del inputs
        release_memory(dev)

    print()
    print(format_table(rows, SCAN_COLUMNS))
    print(f'GB/s over the byte floor: forward {FWD_ELEMS}, backward {BWD_ELEMS}, forward + backward '
          f'{FWD_ELEMS + BWD_ELEMS} elements of the dtype per (B, N, C) element; %copy: of {copy:.0f} GB/s measured.')
    if check:
        print()
        print(format_table(check_rows, CHECK_COLUMNS))
        print("relative error ||a - b|| / ||b|| against the 'torch' implementation in float64 on the same inputs.")

    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(output_dir, name)
    write_csv(base + '.csv', rows)
    files = [base + '.csv', base + '.json']
    if check:
        write_csv(base + '_check.csv', check_rows)
        files.insert(1, base + '_check.csv')
    write_json(base + '.json', meta, rows, check=check_rows)
    print('wrote ' + ', '.join(files))
    return {'meta': meta, 'rows': rows, 'check': check_rows}

"""Scan micro-benchmark: every `bihgru_scan` implementation, and the whole mixer op between the two projections
(`bihgru_scan_norm_gate`), against the device's copy bandwidth.

First the device copy bandwidth is measured (one large device-to-device copy, bytes read + written over its median
time). Then for each op, shape (B, N, C), dtype and implementation in `scan_impls()` (except 'reference': the op's
implementations and the baselines of `baselines.py`, which run the scan alone):
forward (under `no_grad`), backward alone (`torch.autograd.grad` on a retained graph) and forward + backward are
timed after warm-up, L2 flushed before each call, median of many. On CUDA each is captured once in a CUDA graph and
its replays are timed: the kernels' GPU time (`*_ms`), which the GB/s columns use; the plain calls between CUDA
events, whose time includes the host's launch path whenever the host is slower than the kernels, are reported
beside them (`*_host_ms`). On the CPU the wall clock of plain calls.

Byte floors per (B, N, C) element, in elements of the dtype: the scan (`op='scan'`) reads u 2 + z 1 and writes the
output 2 forward (`FWD_ELEMS` = 5), reads u, z, dout 5 and writes du, dz 3 backward (`BWD_ELEMS` = 8); the mixer op
(`op='mixer'`: LayerNorm(scan) * silu(g) of x = [u | z | g] with in_proj's bias gradient, as the model calls it) reads
x 5 and writes y 2 forward (`MIXER_FWD_ELEMS` = 7), reads x 5 and dy 2 and writes dx 5 backward
(`MIXER_BWD_ELEMS` = 12). Achieved GB/s is that floor over the time, '% copy' that over the measured copy bandwidth.
`u`, `z`, `g` have the benchmark dtype, the per-channel vectors are float32 (as in the models under autocast); every
implementation gets the same inputs.

`check=True` also compares each scan implementation against the 'torch' implementation run in float64 on the same
(rounded) inputs, in batch chunks to bound its memory: relative error ||a - b|| / ||b|| of the output and the five
gradients.
"""
import os
import statistics
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from hgrn_vision.ops import available_impls, bihgru_scan, bihgru_scan_norm_gate

from .utils import (
    OOM_ERRORS,
    Column,
    environment,
    format_table,
    free_memory,
    measure_copy_bandwidth,
    on_graph_stream,
    release_memory,
    time_fn,
    write_csv,
    write_json,
)

try:  # the baselines are Triton kernels: none where Triton is absent
    from .baselines import BASELINES
except ImportError:
    BASELINES = {}

__all__ = ['SCAN_SHAPES', 'FWD_ELEMS', 'BWD_ELEMS', 'MIXER_FWD_ELEMS', 'MIXER_BWD_ELEMS', 'OPS', 'make_scan_inputs',
           'cast_scan_inputs', 'float64_reference', 'rel_err', 'scan_impls', 'benchmark_scan', 'check_scan']

SCAN_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (256, 256, 192), (256, 256, 384), (64, 1024, 384), (16, 5329, 384), (1, 256, 192))
CPU_SHAPES: Tuple[Tuple[int, int, int], ...] = ((2, 64, 32), (1, 37, 5))
FWD_ELEMS = 5
BWD_ELEMS = 8
MIXER_FWD_ELEMS = 7
MIXER_BWD_ELEMS = 12
OPS = {'scan': (FWD_ELEMS, BWD_ELEMS), 'mixer': (MIXER_FWD_ELEMS, MIXER_BWD_ELEMS)}  # op -> byte floor (fwd, bwd)
GPU_TIMING = dict(warmup=3, min_iters=10, max_iters=200, max_time=0.25, flush_l2=True)
CPU_TIMING = dict(warmup=1, min_iters=2, max_iters=3, max_time=0.1)
_GRAD_NAMES = ('du', 'dz', 'dgamma', 'dtheta_f', 'dtheta_r')

SCAN_COLUMNS: List[Column] = [
    ('op', 'op', ''),
    ('impl', 'impl', ''),
    ('B', 'B', ''), ('N', 'N', ''), ('C', 'C', ''),
    ('dtype', 'dtype', ''),
    ('fwd_ms', 'fwd ms', '.4f'),
    ('fwd_gbps', 'fwd GB/s', '.1f'),
    ('fwd_pct_copy', 'fwd %copy', '.1f'),
    ('fwd_host_ms', 'fwd host ms', '.4f'),
    ('bwd_ms', 'bwd ms', '.4f'),
    ('bwd_gbps', 'bwd GB/s', '.1f'),
    ('bwd_pct_copy', 'bwd %copy', '.1f'),
    ('bwd_host_ms', 'bwd host ms', '.4f'),
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


def _op_inputs(op: str, inputs: Sequence[torch.Tensor], dtype: torch.dtype, requires_grad: bool = False
               ) -> List[torch.Tensor]:
    """Fresh leaves for `op`: the scan's u, z, gamma, theta_f, theta_r (`cast_scan_inputs`); the mixer op's
    x = [u | z | g], gamma, theta_f, theta_r, the LayerNorm's weight and bias (2C,) and in_proj's bias (5C,)."""
    x = cast_scan_inputs(inputs, dtype)
    if op == 'mixer':
        u, z, gamma, theta_f, theta_r = x
        C = z.shape[-1]
        gen = torch.Generator(device=u.device).manual_seed(1)
        vec = dict(device=u.device, dtype=gamma.dtype)
        gate = torch.randn(u.shape, generator=gen, device=u.device).to(dtype)
        x = [torch.cat([u, z, gate], -1), gamma, theta_f, theta_r, 1 + 0.5 * torch.randn(2 * C, generator=gen, **vec),
             0.3 * torch.randn(2 * C, generator=gen, **vec), torch.randn(5 * C, generator=gen, **vec)]
    return [t.requires_grad_(requires_grad) for t in x]


def scan_impls() -> Tuple[str, ...]:
    """What the scan benchmark runs: `bihgru_scan`'s implementations, then the baselines (the scan alone)."""
    return available_impls() + tuple(BASELINES)


def _scan(impl: str, x: Sequence[torch.Tensor]) -> torch.Tensor:
    return BASELINES[impl](*x) if impl in BASELINES else bihgru_scan(*x, impl=impl)


def _call(op: str, impl: str, x: Sequence[torch.Tensor]) -> torch.Tensor:
    if op == 'mixer':
        return bihgru_scan_norm_gate(*x[:-1], in_bias=x[-1], impl=impl)
    return _scan(impl, x)


def _time_into(row: Dict[str, Any], key: str, fn, device: torch.device, timing: Dict[str, Any],
               host: bool = True) -> None:
    """row[key_ms]: median GPU time of `fn` by CUDA-graph replay (the CPU: wall clock); on CUDA with `host` also
    row[key_host_ms], the plain calls between CUDA events."""
    cuda = device.type == 'cuda'
    if cuda and host:
        row[f'{key}_host_ms'] = statistics.median(time_fn(fn, device, **timing))
    row[f'{key}_ms'] = statistics.median(time_fn(fn, device, cuda_graph=cuda, **timing))


def _time_impl(op: str, impl: str, inputs: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device,
               timing: Dict[str, Any], row: Dict[str, Any]) -> None:
    """Puts the median ms of the forward, the backward alone and forward + backward of `op` by `impl` in `dtype`
    into `row`, one after the other (an impl whose backward fails keeps its forward time)."""
    x = _op_inputs(op, inputs, dtype)
    with torch.no_grad():
        _time_into(row, 'fwd', lambda: _call(op, impl, x), device, timing)
    xg = _op_inputs(op, inputs, dtype, requires_grad=True)
    out = on_graph_stream(lambda: _call(op, impl, xg), device)  # where autograd will run its backward
    dout = torch.randn(out.shape, device=device, dtype=out.dtype)
    _time_into(row, 'bwd', lambda o=out: torch.autograd.grad(o, xg, dout, retain_graph=True), device, timing)
    del out  # and its graph
    _time_into(row, 'fwdbwd', lambda: torch.autograd.grad(_call(op, impl, xg), xg, dout), device, timing, host=False)


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
    out = _scan(impl, x)
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
        ops: Sequence[str] = ('scan', 'mixer'),
) -> Dict[str, Any]:
    """Runs the scan benchmark (and with `check` the float64 comparison), prints the tables, writes
    `<name>.csv` (and `<name>_check.csv`) and `<name>.json` into `output_dir`.

    `shapes` default to `SCAN_SHAPES` on CUDA (`CPU_SHAPES` on the CPU), `impls` to every one of `scan_impls()` but
    'reference' (and the C kernel 'cpu' off the CPU), `ops` to both ('scan', 'mixer'; the float64 check covers the
    scan; baselines run the scan only); `timing` (`time_fn` arguments) overrides `GPU_TIMING` / `CPU_TIMING`. An
    implementation that fails or runs out of memory at a shape gives a row with its status.
    """
    dev = torch.device(device)
    shapes = [tuple(s) for s in (shapes or (SCAN_SHAPES if dev.type == 'cuda' else CPU_SHAPES))]
    impls = list(impls or [i for i in scan_impls() if i != 'reference' and (i != 'cpu' or dev.type == 'cpu')])
    unknown = [i for i in impls if i not in scan_impls()]
    if unknown:
        raise ValueError(f'Unknown scan impl(s) {unknown}; available: {scan_impls()}.')
    timing = {**(GPU_TIMING if dev.type == 'cuda' else CPU_TIMING), **(timing or {})}

    meta = environment(dev)
    meta.update(measure_copy_bandwidth(dev, warmup=timing['warmup'], max_time=timing['max_time']))
    meta.update(shapes=[list(s) for s in shapes], dtypes=[str(d).replace('torch.', '') for d in dtypes],
                impls=impls, ops=list(ops), floor_elems=OPS, timing=timing)
    copy = meta['copy_gbps']
    print(f'{meta["device"]}: torch {meta["torch"]}, triton {meta["triton"]}; copy bandwidth {copy:.0f} GB/s '
          f'({meta["copy_bytes"] / 1e9:.2f} GB read + written in {meta["copy_ms"]:.3f} ms); impls {impls}',
          flush=True)

    rows: List[Dict[str, Any]] = []
    check_rows: List[Dict[str, Any]] = []
    for B, N, C in shapes:
        need = 4 * (5 + 2 + 2 + 5 + 2) * B * N * C  # float32 x, y, dy, dx, and the scan's h
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
            for impl, op in ((i, o) for i in impls for o in ops if o == 'scan' or i not in BASELINES):
                row: Dict[str, Any] = dict(op=op, impl=impl, B=B, N=N, C=C, dtype=str(dtype).replace('torch.', ''),
                                           status='ok')
                try:
                    _time_impl(op, impl, inputs, dtype, dev, timing, row)
                except OOM_ERRORS:
                    row['status'] = 'oom'
                except Exception as e:  # e.g. a CUDA-only impl on the CPU: a row with the reason, not the end
                    row['status'] = _error(e)
                    if dev.type == 'cuda':
                        traceback.print_exc()
                release_memory(dev)
                fwd_elems, bwd_elems = OPS[op]
                for key, elems in (('fwd', fwd_elems), ('bwd', bwd_elems), ('fwdbwd', fwd_elems + bwd_elems)):
                    if f'{key}_ms' in row:
                        row[f'{key}_gbps'] = elems * floor_elem / row[f'{key}_ms'] / 1e6
                        row[f'{key}_pct_copy'] = 100 * row[f'{key}_gbps'] / copy
                rows.append(row)
                times = ', '.join(f'{k} {row[k + "_ms"]:.4f} ms' for k in ('fwd', 'bwd', 'fwdbwd') if k + '_ms' in row)
                print(f'  {op} {impl} {(B, N, C)} {row["dtype"]}: {times} {row["status"]}', flush=True)
                if check and op == 'scan':
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
    timed = 'CUDA-graph replays (the kernels), host ms: plain calls' if dev.type == 'cuda' else 'wall clock'
    print(f'ms: {timed}. GB/s over the byte floor in elements of the dtype per (B, N, C) element, forward / backward: '
          f'scan {FWD_ELEMS} / {BWD_ELEMS}, mixer {MIXER_FWD_ELEMS} / {MIXER_BWD_ELEMS}; %copy: of {copy:.0f} GB/s '
          f'measured.')
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

"""Shared pieces of the benchmarks: timing, device peaks, environment, and table / CSV / JSON output."""
import csv
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    'Column', 'OOM_ERRORS', 'host_and_wall', 'time_fn', 'measure_copy_bandwidth', 'measure_matmul_peak', 'environment',
    'free_memory', 'release_memory', 'format_table', 'write_csv', 'write_json', 'parse_dtype',
]

# (key, header, format) of one table column
Column = Tuple[str, str, str]

OOM_ERRORS = (torch.OutOfMemoryError,) if hasattr(torch, 'OutOfMemoryError') else (torch.cuda.OutOfMemoryError,)

_DTYPES = {
    'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16,
    'fp16': torch.float16, 'float16': torch.float16, 'half': torch.float16,
    'fp32': torch.float32, 'float32': torch.float32, 'float': torch.float32,
    'fp64': torch.float64, 'float64': torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    """'bf16' / 'fp16' / 'fp32' / 'fp64' (or the torch names) to a dtype."""
    if name not in _DTYPES:
        raise ValueError(f'Unknown dtype {name!r}; use one of {sorted(_DTYPES)}.')
    return _DTYPES[name]


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


_L2_FLUSH: Dict[torch.device, torch.Tensor] = {}


_GRAPH_STREAMS: Dict[torch.device, 'torch.cuda.Stream'] = {}


def _graph_stream(device: torch.device) -> 'torch.cuda.Stream':
    """The side stream `time_fn(cuda_graph=True)` captures on."""
    if device not in _GRAPH_STREAMS:
        _GRAPH_STREAMS[device] = torch.cuda.Stream(device)
    return _GRAPH_STREAMS[device]


def on_graph_stream(fn: Callable[[], Any], device: torch.device) -> Any:
    """`fn()` run on the stream `time_fn(cuda_graph=True)` captures on (on the CPU, just `fn()`). A capture wants
    warmed-up calls there; and a forward run there can have its backward alone captured: autograd runs a backward on
    its forward's stream, and a capture may not depend on the default stream."""
    if device.type != 'cuda':
        return fn()
    side = _graph_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return out


def host_and_wall(fn: Callable[[], Any], n: int, warmup: int = 5) -> Tuple[float, float]:
    """Seconds per call of `fn` (CUDA) over `n` calls issued back to back after `warmup` and a sync: the host's time
    to enqueue them (no sync between), and the wall time of the same calls to one sync at the end. Equal when the
    host bounds the calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t) / n


def time_fn(
        fn: Callable[[], Any],
        device: torch.device,
        warmup: int = 3,
        min_iters: int = 5,
        max_iters: int = 100,
        max_time: float = 1.0,
        flush_l2: bool = False,
        cuda_graph: bool = False,
) -> List[float]:
    """Times `fn` after `warmup` calls; returns the per-call times in ms (take the median).

    On CUDA each call sits between its own pair of CUDA events; with `flush_l2` a 256 MB buffer is zeroed
    before each call (outside the events) so no call reads the previous call's data from L2, as
    `triton.testing.do_bench` does. With `cuda_graph` the call is captured once in a CUDA graph and its replays
    are timed: the GPU time of its kernels, without the host's launch path (which the plain calls include whenever
    the host is slower than the kernels). On the CPU the wall clock after each call. Stops after `max_iters` calls,
    or once `max_time` seconds have passed and at least `min_iters` calls were timed (`min_iters` wins over a
    smaller `max_iters`).
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    cuda = device.type == 'cuda'
    if cuda and cuda_graph:
        graph = torch.cuda.CUDAGraph()
        on_graph_stream(fn, device)
        with torch.cuda.graph(graph, stream=_graph_stream(device)):
            fn()
        fn = graph.replay
    flush = None
    if cuda and flush_l2:
        if device not in _L2_FLUSH:
            _L2_FLUSH[device] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
        flush = _L2_FLUSH[device]
    events = []
    times = []
    t_start = time.perf_counter()
    for i in range(max(max_iters, min_iters)):
        if cuda:
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= min_iters and time.perf_counter() - t_start > max_time:
            break
    _sync(device)
    if cuda:
        times = [s.elapsed_time(e) for s, e in events]
    return times


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, **timing) -> Dict[str, float]:
    """Device-to-device copy bandwidth: bytes read + written by `dst.copy_(src)` over its median time."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == 'cuda' else 1 << 25
        if device.type == 'cuda':
            nbytes = min(nbytes, free_memory(device) // 4)
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = statistics.median(time_fn(lambda: dst.copy_(src), device, **timing))
    moved = 2 * src.numel() * src.element_size()
    return {'copy_bytes': moved, 'copy_ms': ms, 'copy_gbps': moved / ms / 1e6}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: Optional[int] = None, **timing) -> Dict:
    """Achieved matmul TFLOP/s of one square `size`^3 product in `dtype` (the peak the models are held against)."""
    if size is None:
        size = 8192 if device.type == 'cuda' else 512
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    ms = statistics.median(time_fn(lambda: torch.mm(a, b), device, **timing))
    return {'matmul_size': size, 'matmul_dtype': str(dtype).replace('torch.', ''), 'matmul_ms': ms,
            'matmul_tflops': 2 * size ** 3 / ms / 1e9}


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (available physical memory for the CPU)."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def release_memory(device: torch.device) -> None:
    """Frees cached blocks after a run so the next one starts from the same state."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else `platform.processor()`) and its core count."""
    name = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), name)
    except OSError:
        pass
    return f'{name or "cpu"}, {os.cpu_count()} cores'


def _commit() -> Optional[str]:
    """The git commit of the tree this package runs from, '-dirty' with uncommitted changes; None outside git."""
    try:
        out = subprocess.run(['git', 'describe', '--always', '--dirty', '--abbrev=12'], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def environment(device: torch.device) -> Dict[str, Any]:
    """Device name and library versions, stored beside every result."""
    import timm
    env = {
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else _cpu_name(),
        'device_type': device.type,
        'torch': torch.__version__,
        'timm': timm.__version__,
        'python': platform.python_version(),
        'cuda': torch.version.cuda,
        'command': ' '.join(sys.argv),
        'commit': _commit(),
        'date': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    try:
        import triton
        env['triton'] = triton.__version__
    except ImportError:
        env['triton'] = None
    if device.type == 'cpu':
        env['threads'] = torch.get_num_threads()
    return env


def _fmt(value: Any, fmt: str) -> str:
    if value is None or value == '':
        return '-'
    if isinstance(value, float) and fmt:
        return format(value, fmt)
    text = str(value)
    return text if len(text) <= 48 else text[:45] + '...'  # long error messages stay whole in the CSV / JSON


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Column]) -> str:
    """A right-aligned plain-text table (the first column left-aligned) of `rows` in `columns`."""
    cells = [[header for _, header, _ in columns]]
    cells += [[_fmt(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        lines.append('  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append('  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    """All keys of all rows as columns, in first-seen order."""
    keys: List[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: str, meta: Dict[str, Any], rows: Sequence[Dict[str, Any]], **extra: Any) -> None:
    """`{'meta': ..., 'rows': [...], **extra}`."""
    with open(path, 'w') as f:
        json.dump({'meta': meta, 'rows': list(rows), **extra}, f, indent=2)

"""The bidirectional scan's C kernel for the CPU (`cpu_scan.c`): each direction's recurrence one loop over the
tokens, vectorised over the channels, forward and backward.

The kernel is built at first use by the system's C compiler (`$CC`, else `cc`) into a cache folder
(`$HGRN_VISION_CACHE`, else `~/.cache/hgrn_vision`) and loaded with ctypes; it needs nothing from pip. Where it
cannot be built, `kernel_available()` is False (with one warning saying why) and `impl=None` runs the PyTorch scan
(`chunked.py`) instead. `HGRN_VISION_CPU_KERNEL=0` turns the kernel off.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .chunked import bihgru_scan_chunked, gates

__all__ = ['bihgru_scan_cpu', 'kernel_available']

_SOURCE = Path(__file__).with_name('cpu_scan.c')
_FLAGS = ('-O3', '-shared', '-fPIC')
_REALS = {torch.float32: 'float', torch.float64: 'double'}
_MIN_PER_THREAD = 1 << 17  # scan elements (B N C) per thread: below it, waking a thread costs more than it saves


def _cpu_id() -> str:
    """The CPU's model and features, so that a cache shared between machines keeps one build per kind of CPU
    (the build targets the CPU it runs on)."""
    info = ''
    try:
        with open('/proc/cpuinfo') as f:
            info = ''.join(sorted({line for line in f if line.startswith(('model name', 'flags', 'Features'))}))
    except OSError:
        pass
    return f'{platform.machine()} {platform.processor()} {info}'


def _build(real: str) -> Path:
    """The shared library of the kernel for `real` ('float' or 'double'), compiled unless cached."""
    compiler = shlex.split(os.environ.get('CC') or sysconfig.get_config_var('CC') or 'cc')
    key = hashlib.sha256('\0'.join([_SOURCE.read_text(), *compiler, *_FLAGS, real, _cpu_id()]).encode())
    cache = Path(os.environ.get('HGRN_VISION_CACHE') or Path.home() / '.cache' / 'hgrn_vision')
    lib = cache / f'bihgru_cpu_{real}_{key.hexdigest()[:16]}.so'
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=cache)
    os.close(fd)
    try:
        errors = []
        for arch in (['-march=native'], []):  # some compilers or CPUs take no -march=native
            cmd = [*compiler, *_FLAGS, *arch, f'-DREAL={real}', '-o', tmp, str(_SOURCE)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, lib)  # atomic: processes building at once each leave a whole library
                return lib
            errors.append(f'{shlex.join(cmd)}: {done.stderr.strip()}')
        raise RuntimeError('\n'.join(errors))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=None)
def _library(real: str) -> Optional[ctypes.CDLL]:
    if os.environ.get('HGRN_VISION_CPU_KERNEL', '1') == '0':
        return None
    try:
        lib = ctypes.CDLL(str(_build(real)))
    except (OSError, RuntimeError) as e:
        warnings.warn(f'hgrn_vision: the CPU scan kernel could not be built ({e}); the slower PyTorch scan runs '
                      'instead. Install a C compiler (or set CC) for the fast path, or set HGRN_VISION_CPU_KERNEL=0 '
                      'to silence this.', stacklevel=3)
        return None
    ptr, size, csr = ctypes.c_void_p, ctypes.c_long, ctypes.c_uint
    lib.bihgru_forward.argtypes = [size] * 3 + [ptr] * 6 + [size, size, csr]
    lib.bihgru_backward.argtypes = [size] * 3 + [ptr] * 8 + [size, size, csr]
    lib.bihgru_forward.restype = lib.bihgru_backward.restype = None
    lib.bihgru_items.argtypes, lib.bihgru_items.restype = [size, size], size
    lib.bihgru_csr.argtypes, lib.bihgru_csr.restype = [], csr
    return lib


@functools.lru_cache(maxsize=None)
def _workers(pid: int) -> ThreadPoolExecutor:
    """The threads that share the kernel's work with the caller: one pool per process (a forked child makes its
    own). ctypes lets go of the GIL during the calls."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix='hgrn_vision_scan')


def _launch(lib: ctypes.CDLL, kernel, B: int, N: int, C: int, *ptrs) -> None:
    """`kernel(B, N, C, *ptrs, begin, end, csr)` over all its work items, shared among up to
    `torch.get_num_threads()` threads with the caller's floating-point control word (its denormal flushing)."""
    items = lib.bihgru_items(B, C)
    threads = max(1, min(torch.get_num_threads(), items, B * N * C // _MIN_PER_THREAD))
    bounds = [items * k // threads for k in range(threads + 1)]
    csr = lib.bihgru_csr()
    pool = _workers(os.getpid()) if threads > 1 else None
    futures = [pool.submit(kernel, B, N, C, *ptrs, bounds[k], bounds[k + 1], csr) for k in range(1, threads)]
    kernel(B, N, C, *ptrs, 0, bounds[1], csr)
    for f in futures:
        f.result()


def kernel_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the C kernel runs for CPU tensors computed in `dtype` (building it at the first call)."""
    return dtype in _REALS and _library(_REALS[dtype]) is not None


class _CpuScan(torch.autograd.Function):
    """`[Re h | Im h]` (B, N, 2C) from the gates' magnitude `lam` and the input `v_re`, `v_im` (B, N, C, contiguous)
    and the angles `theta_f`, `theta_r` (C,). `keep`: keep both directions' states for the backward."""

    @staticmethod
    def forward(ctx, lam, v_re, v_im, theta_f, theta_r, keep):
        lib = _library(_REALS[lam.dtype])
        B, N, C = lam.shape
        lam, v_re, v_im = lam.contiguous(), v_re.contiguous(), v_im.contiguous()
        rot = torch.stack([theta_f.cos(), theta_f.sin(), theta_r.cos(), theta_r.sin()])
        out = lam.new_empty(B, N, 2 * C)
        h = lam.new_empty(4, B, N, C) if keep else None
        _launch(lib, lib.bihgru_forward, B, N, C, lam.data_ptr(), v_re.data_ptr(), v_im.data_ptr(), rot.data_ptr(),
                out.data_ptr(), None if h is None else h.data_ptr())
        ctx.save_for_backward(lam, rot, h)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        lam, rot, h = ctx.saved_tensors
        lib = _library(_REALS[lam.dtype])
        B, N, C = lam.shape
        grad = grad.contiguous()
        dlam, dv_re, dv_im = (torch.empty_like(lam) for _ in range(3))
        dtheta = lam.new_empty(2, B, C)
        _launch(lib, lib.bihgru_backward, B, N, C, lam.data_ptr(), rot.data_ptr(), h.data_ptr(), grad.data_ptr(),
                dlam.data_ptr(), dv_re.data_ptr(), dv_im.data_ptr(), dtheta.data_ptr())
        dtheta = dtheta.sum(1)
        return dlam, dv_re, dv_im, dtheta[0], dtheta[1], None


def bihgru_scan_cpu(u: Tensor, z: Tensor, gamma: Tensor, theta_f: Tensor, theta_r: Tensor) -> Tensor:
    """Bidirectional complex HGRU scan by the C kernel on CPU tensors (see `hgrn_vision.ops.bihgru_scan`), in float32
    (float64 for float64 inputs); returns the dtype of `u`."""
    if u.device.type != 'cpu':
        raise ValueError(f"bihgru_scan impl='cpu' runs on CPU tensors, got {u.device}; use impl=None.")
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return bihgru_scan_chunked(u, z, gamma, theta_f, theta_r)  # traced: ctypes calls do not trace
    lam, c, w = gates(u, z, gamma)
    if not kernel_available(lam.dtype):
        raise RuntimeError("bihgru_scan impl='cpu': the C kernel could not be built on this machine (see the warning "
                           "above); use impl='torch' or impl=None.")
    theta_f, theta_r = theta_f.to(lam.dtype), theta_r.to(lam.dtype)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (u, z, gamma, theta_f, theta_r))
    out = _CpuScan.apply(lam, c[..., 0] * w, c[..., 1] * w, theta_f, theta_r, keep)
    return out.to(u.dtype)

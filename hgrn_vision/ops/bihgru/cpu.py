"""The bidirectional scan's C kernel for the CPU (`cpu_scan.c`): each direction's recurrence one loop over the
tokens, vectorised over the channels, forward and backward.

The kernel is built at first use by the system's C compiler (`$CC`, else `cc`) into a cache folder
(`$HGRN_VISION_CACHE`, else `~/.cache/hgrn_vision`) and loaded with ctypes; it needs nothing from pip. Where it
cannot be built, `kernel_available()` is False (with one warning saying why) and `impl=None` runs the PyTorch scan
(`chunked.py`) instead. `HGRN_VISION_CPU_KERNEL=0` turns the kernel off. The kernel is a `torch.library` op, forward
and backward, so torch.compile calls it inside one graph; the ONNX export writes the chunked scan instead.
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
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import bihgru_scan_chunked, is_exporting, real_dtype

__all__ = ['bihgru_scan_cpu', 'kernel_available']

_SOURCE = Path(__file__).with_name('cpu_scan.c')
_FLAGS = ('-O3', '-shared', '-fPIC')
_REALS = {torch.float32: 'float', torch.float64: 'double'}


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


def _keep_freed_memory() -> None:
    """Fix glibc malloc's thresholds: blocks up to 32 MB (its most) from the heap, and free space at the heap's top
    given back to the system past 256 MB. Left dynamic, both follow the largest block mapped so far, and the mixer's
    tensors (12 MB at most for hgrn_deit_tiny at 448 px, batch 4; 40 MB to 150 MB freed per block) pass the giving-back
    threshold in every block: each block's new tensors fault their pages in again, a sixth of the time or more. Left
    alone where the user set malloc's thresholds (MALLOC_*_ or GLIBC_TUNABLES); no effect but on glibc."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return
    if 'GLIBC_TUNABLES' in os.environ or any(k.startswith('MALLOC_') and k.endswith('_') for k in os.environ):
        return
    mallopt = ctypes.CDLL(None).mallopt
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 256 << 20)


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
    _keep_freed_memory()
    ptr, size = ctypes.c_void_p, ctypes.c_int64
    lib.bihgru_forward.argtypes = [size] * 3 + [ptr] * 5
    lib.bihgru_backward.argtypes = [size] * 3 + [ptr] * 8
    lib.bihgru_forward.restype = lib.bihgru_backward.restype = None
    return lib


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing rather than tracing the build
def kernel_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the C kernel runs for CPU tensors computed in `dtype` (building it at the first call)."""
    return dtype in _REALS and _library(_REALS[dtype]) is not None


def _kernel_args(sig: Tensor, gamma: Tensor, theta_f: Tensor, theta_r: Tensor):
    """B, N, C, the library for sig's dtype and the kernel's per-channel parameters (5, C)."""
    par = torch.stack([theta_f.cos(), theta_f.sin(), theta_r.cos(), theta_r.sin(), gamma])
    return (*sig.shape, _library(_REALS[sig.dtype]), par)


@torch.library.custom_op('hgrn_vision::bihgru_scan_cpu', mutates_args=())
def _scan_op(sig: Tensor, c: Tensor, gamma: Tensor, theta_f: Tensor, theta_r: Tensor, keep: bool
             ) -> Tuple[Tensor, Tensor]:
    """`[Re h | Im h]` (B, N, 2C) from `sig = sigmoid(z)` (B, N, C), `c = silu(u)` (B, N, 2C) as (re, im) pairs, and
    `gamma`, `theta_f`, `theta_r` (C,); and with `keep` both directions' states (4, B, N, C) for the backward (else an
    empty tensor). An op of its own, so that torch.compile calls the kernel rather than tracing it."""
    B, N, C, lib, par = _kernel_args(sig, gamma, theta_f, theta_r)
    sig, c = sig.contiguous(), c.contiguous()
    out, h = sig.new_empty(B, N, 2 * C), sig.new_empty((4, B, N, C) if keep else (0,))
    lib.bihgru_forward(B, N, C, sig.data_ptr(), c.data_ptr(), par.data_ptr(), out.data_ptr(),
                       h.data_ptr() if keep else None)
    return out, h


@_scan_op.register_fake
def _(sig, c, gamma, theta_f, theta_r, keep):
    B, N, C = sig.shape
    return sig.new_empty(B, N, 2 * C), sig.new_empty((4, B, N, C) if keep else (0,))


@torch.library.custom_op('hgrn_vision::bihgru_scan_cpu_backward', mutates_args=())
def _scan_backward_op(sig: Tensor, c: Tensor, gamma: Tensor, theta_f: Tensor, theta_r: Tensor, h: Tensor,
                      grad: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of `sig`, `c` and, summed over the batch, of (theta_f, theta_r, gamma) as one (3, C) tensor."""
    B, N, C, lib, par = _kernel_args(sig, gamma, theta_f, theta_r)
    sig, c, grad = sig.contiguous(), c.contiguous(), grad.contiguous()
    dsig, dc, dpar = torch.empty_like(sig), torch.empty_like(c), sig.new_empty(3, B, C)
    lib.bihgru_backward(B, N, C, sig.data_ptr(), c.data_ptr(), par.data_ptr(), h.data_ptr(), grad.data_ptr(),
                        dsig.data_ptr(), dc.data_ptr(), dpar.data_ptr())
    return dsig, dc, dpar.sum(1)


@_scan_backward_op.register_fake
def _(sig, c, gamma, theta_f, theta_r, h, grad):
    return torch.empty_like(sig), torch.empty_like(c), sig.new_empty(3, sig.shape[-1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], output[1])


def _backward(ctx, grad, _):
    dsig, dc, dpar = _scan_backward_op(*ctx.saved_tensors, grad)
    return dsig, dc, dpar[2], dpar[0], dpar[1], None


_scan_op.register_autograd(_backward, setup_context=_setup_context)


def bihgru_scan_cpu(u: Tensor, z: Tensor, gamma: Tensor, theta_f: Tensor, theta_r: Tensor) -> Tensor:
    """Bidirectional complex HGRU scan by the C kernel on CPU tensors (see `hgrn_vision.ops.bihgru_scan`), in float32
    (float64 for float64 inputs); returns the dtype of `u`. Exported (ONNX), it is the 'torch' scan's traced form."""
    if u.device.type != 'cpu':
        raise ValueError(f"bihgru_scan impl='cpu' runs on CPU tensors, got {u.device}; use impl=None.")
    if is_exporting():
        return bihgru_scan_chunked(u, z, gamma, theta_f, theta_r)
    real = real_dtype(u.dtype)
    if not kernel_available(real):
        raise RuntimeError("bihgru_scan impl='cpu': the C kernel could not be built on this machine (see the warning "
                           "above); use impl='torch' or impl=None.")
    params = [t.to(real) for t in (gamma, theta_f, theta_r)]
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (u, z, *params))
    out, _ = _scan_op(torch.sigmoid(z.to(real)), F.silu(u.to(real)), *params, keep)
    return out.to(u.dtype)

"""What the ops' Triton kernels and launchers share: the interpreter flag, the SM count, a fast sigmoid, the row
kernels' config and warps, the op registration and the projection gradients of the ops that end in a Linear."""
import functools
import os
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ['INTERPRET', 'num_sms', 'sigmoid', 'RowConfig', 'FWD_CHANNELS_PER_WARP', 'BWD_CHANNELS_PER_WARP',
           'row_warps', 'kernel_op', 'linear_param_grads', 'check_triton_device', 'use_sm90_target']

# Triton's interpreter (TRITON_INTERPRET=1, read once at import as Triton does) runs kernels on the CPU, but no PTX
INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'
_PTX_SIGMOID = tl.constexpr(not INTERPRET)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """SMs of the device (4 on the CPU, for the interpreter); cached: every forward and backward call asks."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 4


@triton.jit
def sigmoid(x):
    """1 / (1 + 2^(-x log2 e)) in fp32 (relative error a few ulp; 0 and 1 at the extremes, NaN stays NaN): 4
    instructions (ex2 and rcp, both flushing denormals) instead of tl.sigmoid's ~11. tl.sigmoid in the interpreter,
    which cannot run PTX; `scripts/gpu_scan_tune.py check` covers the PTX on the GPU."""
    if _PTX_SIGMOID:
        return tl.inline_asm_elementwise(
            '{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; '
            'rcp.approx.ftz.f32 $0, t; }', '=r,r', [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.sigmoid(x)


class RowConfig(NamedTuple):
    """Launch config of a row kernel (whole tokens per program, fp32, programs looping over tiles of tokens)."""
    rows: int  # tokens per tile
    num_warps: int  # warps per program, raised for wide tokens (`row_warps`)
    programs_per_sm: int  # programs launched per SM (persistent: each loops over tiles)


# a row kernel takes at least a warp per this many of a token's channels, so that wide tokens do not spill
FWD_CHANNELS_PER_WARP = 768
BWD_CHANNELS_PER_WARP = 512


def row_warps(num_warps: int, width: int, channels_per_warp: int) -> int:
    """A row kernel config's warps, raised to a power of two with at least one warp per `channels_per_warp` of a
    token's `width` channels as its tile holds them (padded)."""
    return max(num_warps, triton.next_power_of_2(triton.cdiv(width, channels_per_warp)))


def kernel_op(name: str, fake: Callable):
    """Registers the decorated function, whose kernels it launches through `wrap_triton`, as the operator `name`.

    On the GPU a `torch.library.triton_op`: torch.compile traces into it and launches its kernels from its own
    generated code, without the function's Python, the custom op's dispatch and Triton's launcher on every call.
    Triton's interpreter runs kernels that cannot be traced: there a `torch.library.custom_op` with the fake `fake`."""
    def register(fn):
        if INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, fn, mutates_args=())
    return register


def linear_param_grads(dout: torch.Tensor, inp: torch.Tensor, bias_grad: bool
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The gradients of `F.linear(inp, weight, bias)`'s weight and (with `bias_grad`, else None) bias for its output's
    gradient dout: the backward of an op that runs a projection and writes its input `inp` again instead of keeping
    it."""
    dout2 = dout.reshape(-1, dout.shape[-1])
    return dout2.t() @ inp.reshape(-1, inp.shape[-1]), dout2.sum(0) if bias_grad else None


def check_triton_device(x: torch.Tensor) -> None:
    """The Triton kernels run on CUDA tensors, or on any with TRITON_INTERPRET=1 set before import."""
    if not x.is_cuda and os.environ.get('TRITON_INTERPRET', '0') != '1':
        raise ValueError(
            f"impl='triton' needs CUDA tensors, got tensors on {x.device}; use impl='torch' (or None) there, or "
            f'set TRITON_INTERPRET=1 before importing hgrn_vision to run the kernel in the Triton interpreter.')


def use_sm90_target() -> None:
    """Makes Triton compile for sm_90 (H100 / H200) on a machine without a GPU, outside the interpreter: a stand-in
    driver names the target, so kernels can be compiled and inspected (never launched) on the CPU."""
    import sys

    import triton.runtime.driver  # noqa: F401  (the module; `triton.runtime.driver` the attribute is its DriverConfig)
    from triton.backends.compiler import GPUTarget

    class _Sm90:
        def get_current_target(self):
            return GPUTarget('cuda', 90, 32)

        def get_current_device(self):
            return 0

    driver = sys.modules['triton.runtime.driver'].driver
    driver._default = driver._active = _Sm90()

r"""The bidirectional complex HGRU scan, the token mixer's recurrence.

Given the raw projections of a token sequence, `u` (B, N, 2C) from `input_proj` and `z` (B, N, C) from
`lambda_proj`, a lower bound `gamma` (C,) and two angle vectors `theta_f`, `theta_r` (C,):

    c_t   = silu(u_t),  read interleaved as complex numbers  c_t = c_t[0::2] + i c_t[1::2]       (B, N, C)
    lam_t = gamma + (1 - gamma) sigmoid(z_t)                                                    in (gamma, 1)
    v_t   = (1 - lam_t) c_t
    hf_t  = lam_t e^{i theta_f} hf_{t-1} + v_t,   hf_{-1} = 0        (forward, t = 0 .. N-1)
    hr_t  = lam_t e^{i theta_r} hr_{t+1} + v_t,   hr_N   = 0         (reverse, t = N-1 .. 0)
    h_t   = hf_t + hr_t
    out   = cat([Re h, Im h], -1)                                                               (B, N, 2C)

Both directions use the gate of position t. The state is kept in float32 whatever the input dtype, but for
float64 inputs in the PyTorch implementations, which compute in float64 (`impl=None` picks them for float64); the
output has the dtype of `u`.

Implementations (`impl=`):
  'reference'  step-by-step loop (`naive.py`): the ground truth, float64-capable, TorchScript-able, slow.
  'torch'      chunked scan (`chunked.py`): any device; traced by torch.compile, and by the ONNX export.
  'cpu'        C kernel (`cpu.py`, `cpu_scan.c`) built at first use by the system's C compiler: the CPU path, an
               op of its own under torch.compile; exported, the 'torch' scan.
  'triton'     the fused Triton op (`fused.py`; kernels in `fwd.py`, `fwd_onchip.py`, `bwd.py`), forward and
               backward, for CUDA (CPU under TRITON_INTERPRET=1).
`impl=None` picks the best one available for the inputs' device.

`bihgru_scan_norm_gate(x, ...)` is the HGRU mixer between its projections, `LayerNorm(scan(u, z)) * silu(g)` for the
input projection's output x = [u | z | g] (B, N, 5C): with impl='triton' one op (`norm_gate.py`) whose backward
writes du, dz and dg into one gradient of x; with the other impls the scan composed with PyTorch's LayerNorm.
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .chunked import bihgru_scan_chunked, is_exporting, real_dtype
from .cpu import bihgru_scan_cpu, kernel_available
from .naive import bihgru_scan_reference

__all__ = ['bihgru_scan', 'bihgru_scan_norm_gate', 'bihgru_scan_reference', 'bihgru_scan_chunked', 'available_impls',
           'default_impl', 'is_exporting']

_IMPLS: Dict[str, Callable[..., torch.Tensor]] = {
    'reference': bihgru_scan_reference,
    'torch': bihgru_scan_chunked,
    'cpu': bihgru_scan_cpu,
}
try:  # triton is absent on some platforms (macOS, Windows): the PyTorch paths still work there
    from .fused import bihgru_scan_triton
    from .norm_gate import bihgru_scan_norm_gate_triton
    _IMPLS['triton'] = bihgru_scan_triton
except ImportError:
    pass


def available_impls():
    """Names accepted by `bihgru_scan(..., impl=)`."""
    return tuple(_IMPLS)


def default_impl(x: torch.Tensor) -> str:
    """The implementation `impl=None` picks for a tensor: 'triton' on CUDA, but not for float64 (the Triton kernels
    compute in float32 whatever the input dtype); the C kernel 'cpu' on the CPU where it can be built; else 'torch'."""
    if x.is_cuda and x.dtype != torch.float64 and 'triton' in _IMPLS:
        return 'triton'
    if x.device.type == 'cpu' and kernel_available(real_dtype(x.dtype)):
        return 'cpu'
    return 'torch'


def _check_impl(impl: Optional[str], x: torch.Tensor) -> str:
    impl = default_impl(x) if impl is None else impl
    if impl not in _IMPLS:
        raise ValueError(f'Unknown bihgru_scan impl {impl!r}; available: {available_impls()} or None.')
    return impl


def _check_vector(op: str, name: str, t: torch.Tensor, size_name: str, size: int) -> None:
    if tuple(t.shape) != (size,):
        raise ValueError(f'{op} expects {name} of shape ({size_name},) = ({size},), got {tuple(t.shape)}.')


def _check_inputs(u, z, gamma, theta_f, theta_r) -> None:
    if u.ndim != 3 or z.ndim != 3:
        raise ValueError(
            f'bihgru_scan expects u of shape (B, N, 2C) and z of shape (B, N, C), got u {tuple(u.shape)} '
            f'and z {tuple(z.shape)}.')
    B, N, C = z.shape
    if tuple(u.shape) != (B, N, 2 * C):
        raise ValueError(
            f'bihgru_scan expects u of shape (B, N, 2C) = {(B, N, 2 * C)} to match z {tuple(z.shape)}, '
            f'got u {tuple(u.shape)}: u holds C complex numbers interleaved as (re, im) pairs.')
    for name, t in (('gamma', gamma), ('theta_f', theta_f), ('theta_r', theta_r)):
        _check_vector('bihgru_scan', name, t, 'C', C)
    for name, t in (('z', z), ('gamma', gamma), ('theta_f', theta_f), ('theta_r', theta_r)):
        if t.device != u.device:
            raise ValueError(f'bihgru_scan expects all inputs on one device: u is on {u.device}, {name} on {t.device}.')
        if not t.is_floating_point():
            raise TypeError(f'bihgru_scan expects floating-point inputs, got {name} of dtype {t.dtype}.')
    if u.dtype != z.dtype:
        raise TypeError(f'bihgru_scan expects u and z of one dtype, got u {u.dtype} and z {z.dtype}.')


@register_notrace_function
def bihgru_scan(
        u: torch.Tensor,
        z: torch.Tensor,
        gamma: torch.Tensor,
        theta_f: torch.Tensor,
        theta_r: torch.Tensor,
        *,
        impl: Optional[str] = None,
) -> torch.Tensor:
    """Bidirectional complex HGRU scan; see the module docstring for the math.

    Args:
        u: input-projection pre-activation (B, N, 2C), interleaved (re, im) pairs.
        z: lambda-projection pre-activation (B, N, C).
        gamma: lower bound of the forget gate (C,), in [0, 1).
        theta_f: forward rotation angles (C,).
        theta_r: reverse rotation angles (C,).
        impl: 'reference', 'torch', 'triton', or None for the best available.

    Returns:
        (B, N, 2C) tensor `[Re h | Im h]` in the dtype of `u`.
    """
    _check_inputs(u, z, gamma, theta_f, theta_r)
    return _IMPLS[_check_impl(impl, u)](u, z, gamma, theta_f, theta_r)


@register_notrace_function
def bihgru_scan_norm_gate(
        x: torch.Tensor,
        gamma: torch.Tensor,
        theta_f: torch.Tensor,
        theta_r: torch.Tensor,
        norm_weight: torch.Tensor,
        norm_bias: torch.Tensor,
        eps: float = 1e-5,
        *,
        in_bias: Optional[torch.Tensor] = None,
        out_weight: Optional[torch.Tensor] = None,
        out_bias: Optional[torch.Tensor] = None,
        impl: Optional[str] = None,
) -> torch.Tensor:
    """`LayerNorm(bihgru_scan(u, z, ...)) * silu(g)` for x = [u | z | g]: the HGRU mixer between its projections,
    and with `out_weight` the output projection too.

    Args:
        x: the input projection's output (B, N, 5C): u (2C, interleaved (re, im) pairs), z (C), g (2C).
        gamma, theta_f, theta_r: as for `bihgru_scan`.
        norm_weight, norm_bias: the LayerNorm's affine parameters (2C,).
        eps: the LayerNorm's epsilon.
        in_bias: a bias (5C,) already added into x but detached there (`F.linear(inp, w, in_bias.detach())`): its
            gradient, x's gradient summed over batch and tokens, then comes through this op (the Triton kernels
            sum it as they write x's gradient, sparing a pass over it). x's value is taken as it is.
        out_weight, out_bias: the output projection's weight (C_out, 2C) and bias (C_out,) or None, in the dtype of
            x (cast them under autocast): returns `F.linear(y, out_weight, out_bias)`. The Triton op's backward then
            writes y again for out_weight's gradient instead of keeping it (2C fewer elements per token kept).
        impl: as for `bihgru_scan`; 'triton' runs one fused op.

    Returns:
        (B, N, 2C) tensor in the dtype of x, or (B, N, C_out) with `out_weight`.
    """
    if x.ndim != 3 or x.shape[-1] % 5:
        raise ValueError(
            f'bihgru_scan_norm_gate expects x of shape (B, N, 5C) = [u (2C) | z (C) | g (2C)], got {tuple(x.shape)}.')
    C = x.shape[-1] // 5
    u, z, g = x.split([2 * C, C, 2 * C], dim=-1)
    _check_inputs(u, z, gamma, theta_f, theta_r)
    for name, t in (('norm_weight', norm_weight), ('norm_bias', norm_bias)):
        _check_vector('bihgru_scan_norm_gate', name, t, '2C', 2 * C)
    if in_bias is not None:
        _check_vector('bihgru_scan_norm_gate', 'in_bias', in_bias, '5C', 5 * C)
    if out_weight is not None and (out_weight.ndim != 2 or out_weight.shape[1] != 2 * C):
        raise ValueError(f'bihgru_scan_norm_gate expects out_weight of shape (C_out, 2C) = (C_out, {2 * C}), got '
                         f'{tuple(out_weight.shape)}.')
    if out_weight is None and out_bias is not None:
        raise ValueError('bihgru_scan_norm_gate got out_bias without out_weight.')
    impl = _check_impl(impl, x)
    if impl == 'triton':
        return bihgru_scan_norm_gate_triton(x, gamma, theta_f, theta_r, norm_weight, norm_bias, eps, in_bias,
                                            out_weight, out_bias)
    if in_bias is not None:  # the same value, with in_bias's gradient the sum of x's
        u, z, g = (x + (in_bias - in_bias.detach())).split([2 * C, C, 2 * C], dim=-1)
    h = _IMPLS[impl](u, z, gamma, theta_f, theta_r)
    y = F.layer_norm(h, (2 * C,), norm_weight, norm_bias, eps) * F.silu(g)
    return y if out_weight is None else F.linear(y, out_weight, out_bias)

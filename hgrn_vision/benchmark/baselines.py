"""Scan baselines the benchmark times beside the op's implementations (`benchmark.py scan --impls triton triton_seq`).

'triton_seq': the design the fused kernel replaces, shaped like the authors' CUDA kernel. The gates `a = lam e^{i
theta}` and inputs `v` are materialised in PyTorch (in the input dtype), each direction is a separate call of a
per-channel sequential Triton loop over the tokens, the reverse direction works on `torch.flip` copies, and the
backward saves the hidden states. CUDA only. Imported where Triton is (`benchmark/scan.py`).
"""
from typing import Callable, Dict

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ['BASELINES', 'bihgru_scan_sequential']

BLOCK_C = 64


@triton.jit
def seq_scan_kernel(a_re_ptr, a_im_ptr, v_re_ptr, v_im_ptr, h_re_ptr, h_im_ptr, N, C, BLOCK_C: tl.constexpr):
    """h_t = a_t h_{t-1} + v_t, one step at a time, for BLOCK_C channels of one batch row; (B, N, C) contiguous."""
    b = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cs < C
    h_re = tl.zeros([BLOCK_C], dtype=tl.float32)
    h_im = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(N):
        off = (b * N + t) * C + cs
        a_re = tl.load(a_re_ptr + off, mask=mask, other=0.).to(tl.float32)
        a_im = tl.load(a_im_ptr + off, mask=mask, other=0.).to(tl.float32)
        v_re = tl.load(v_re_ptr + off, mask=mask, other=0.).to(tl.float32)
        v_im = tl.load(v_im_ptr + off, mask=mask, other=0.).to(tl.float32)
        h_re, h_im = a_re * h_re - a_im * h_im + v_re, a_re * h_im + a_im * h_re + v_im
        tl.store(h_re_ptr + off, h_re.to(h_re_ptr.dtype.element_ty), mask=mask)
        tl.store(h_im_ptr + off, h_im.to(h_im_ptr.dtype.element_ty), mask=mask)


def _seq_scan(a_re, a_im, v_re, v_im):
    a_re, a_im, v_re, v_im = (t.contiguous() for t in (a_re, a_im, v_re, v_im))
    B, N, C = a_re.shape
    h_re, h_im = torch.empty_like(v_re), torch.empty_like(v_im)
    seq_scan_kernel[(triton.cdiv(C, BLOCK_C), B)](a_re, a_im, v_re, v_im, h_re, h_im, N, C, BLOCK_C=BLOCK_C)
    return h_re, h_im


class _SequentialScan(torch.autograd.Function):
    """One direction; the backward runs the same loop on flipped copies of the shifted, conjugated gates."""

    @staticmethod
    def forward(ctx, a_re, a_im, v_re, v_im):
        h_re, h_im = _seq_scan(a_re, a_im, v_re, v_im)
        ctx.save_for_backward(a_re, a_im, h_re, h_im)
        return h_re, h_im

    @staticmethod
    def backward(ctx, dh_re, dh_im):
        a_re, a_im, h_re, h_im = ctx.saved_tensors
        # d_t = dh_t + conj(a_{t+1}) d_{t+1}: a reverse scan, run forward on flipped copies
        an_re, an_im = F.pad(a_re[:, 1:], (0, 0, 0, 1)), F.pad(a_im[:, 1:], (0, 0, 0, 1))
        d_re, d_im = _seq_scan(an_re.flip(1), -an_im.flip(1), dh_re.flip(1), dh_im.flip(1))
        d_re, d_im = d_re.flip(1), d_im.flip(1)
        hp_re, hp_im = F.pad(h_re[:, :-1], (0, 0, 1, 0)), F.pad(h_im[:, :-1], (0, 0, 1, 0))
        return d_re * hp_re + d_im * hp_im, d_im * hp_re - d_re * hp_im, d_re, d_im


def bihgru_scan_sequential(u, z, gamma, theta_f, theta_r) -> torch.Tensor:
    """Bidirectional scan the authors' way (see the module docstring), `bihgru_scan`'s arguments; CUDA only."""
    if not u.is_cuda:
        raise ValueError(f"impl='triton_seq' is a CUDA benchmark baseline, got tensors on {u.device}.")
    c = F.silu(u)
    lam = gamma + (1 - gamma) * torch.sigmoid(z)
    v_re, v_im = (1 - lam) * c[..., 0::2], (1 - lam) * c[..., 1::2]
    hf_re, hf_im = _SequentialScan.apply(lam * torch.cos(theta_f), lam * torch.sin(theta_f), v_re, v_im)
    hr_re, hr_im = _SequentialScan.apply(
        (lam * torch.cos(theta_r)).flip(1), (lam * torch.sin(theta_r)).flip(1), v_re.flip(1), v_im.flip(1))
    return torch.cat([hf_re + hr_re.flip(1), hf_im + hr_im.flip(1)], -1).to(u.dtype)


# name -> scan function with `bihgru_scan`'s arguments
BASELINES: Dict[str, Callable[..., torch.Tensor]] = {'triton_seq': bihgru_scan_sequential}

"""Baseline for benchmarks: the design the fused kernel replaces, shaped like the authors' CUDA kernel.

The gates `a = lam e^{i theta}` and inputs `v` are materialised in PyTorch (in the input dtype), each direction is
a separate call of a per-channel sequential Triton loop over the tokens, the reverse direction works on
`torch.flip` copies, and the backward saves the hidden states. Kept only to be timed against (`impl='triton_seq'`).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_C = 64


@triton.jit
def _seq_scan_kernel(ar_ptr, ai_ptr, vr_ptr, vi_ptr, hr_ptr, hi_ptr, N, C, BLOCK_C: tl.constexpr):
    """h_t = a_t h_{t-1} + v_t, one step at a time, for BLOCK_C channels of one batch row; (B, N, C) contiguous."""
    b = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cs < C
    hr = tl.zeros([BLOCK_C], dtype=tl.float32)
    hi = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(N):
        off = (b * N + t) * C + cs
        ar = tl.load(ar_ptr + off, mask=mask, other=0.).to(tl.float32)
        ai = tl.load(ai_ptr + off, mask=mask, other=0.).to(tl.float32)
        vr = tl.load(vr_ptr + off, mask=mask, other=0.).to(tl.float32)
        vi = tl.load(vi_ptr + off, mask=mask, other=0.).to(tl.float32)
        hr, hi = ar * hr - ai * hi + vr, ar * hi + ai * hr + vi
        tl.store(hr_ptr + off, hr.to(hr_ptr.dtype.element_ty), mask=mask)
        tl.store(hi_ptr + off, hi.to(hi_ptr.dtype.element_ty), mask=mask)


def _seq_scan(ar, ai, vr, vi):
    ar, ai, vr, vi = (t.contiguous() for t in (ar, ai, vr, vi))
    B, N, C = ar.shape
    hr, hi = torch.empty_like(vr), torch.empty_like(vi)
    _seq_scan_kernel[(triton.cdiv(C, BLOCK_C), B)](ar, ai, vr, vi, hr, hi, N, C, BLOCK_C=BLOCK_C)
    return hr, hi


class _SequentialScan(torch.autograd.Function):
    """One direction; the backward runs the same loop on flipped copies of the shifted, conjugated gates."""

    @staticmethod
    def forward(ctx, ar, ai, vr, vi):
        hr, hi = _seq_scan(ar, ai, vr, vi)
        ctx.save_for_backward(ar, ai, hr, hi)
        return hr, hi

    @staticmethod
    def backward(ctx, gr, gi):
        ar, ai, hr, hi = ctx.saved_tensors
        # dh_t = g_t + conj(a_{t+1}) dh_{t+1}: a reverse scan, run forward on flipped copies
        anr, ani = F.pad(ar[:, 1:], (0, 0, 0, 1)), F.pad(ai[:, 1:], (0, 0, 0, 1))
        dr, di = _seq_scan(anr.flip(1), -ani.flip(1), gr.flip(1), gi.flip(1))
        dr, di = dr.flip(1), di.flip(1)
        hpr, hpi = F.pad(hr[:, :-1], (0, 0, 1, 0)), F.pad(hi[:, :-1], (0, 0, 1, 0))
        return dr * hpr + di * hpi, di * hpr - dr * hpi, dr, di


def bihgru_scan_sequential(u, z, gamma, theta_f, theta_r) -> torch.Tensor:
    """Bidirectional scan the authors' way (see module docstring); CUDA only."""
    if not u.is_cuda:
        raise ValueError(f"impl='triton_seq' is a CUDA benchmark baseline, got tensors on {u.device}.")
    c = F.silu(u)
    lam = gamma + (1 - gamma) * torch.sigmoid(z)
    vr, vi = (1 - lam) * c[..., 0::2], (1 - lam) * c[..., 1::2]
    hfr, hfi = _SequentialScan.apply(lam * torch.cos(theta_f), lam * torch.sin(theta_f), vr, vi)
    hrr, hri = _SequentialScan.apply(
        (lam * torch.cos(theta_r)).flip(1), (lam * torch.sin(theta_r)).flip(1), vr.flip(1), vi.flip(1))
    return torch.cat([hfr + hrr.flip(1), hfi + hri.flip(1)], -1).to(u.dtype)

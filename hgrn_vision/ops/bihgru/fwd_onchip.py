"""The scan's one-read forward kernel, its config and its launcher; names as in `common.py`.

A program loads its whole sequence of BLOCK_C channels once, into registers, as W chunks of T rows (one thread per
chunk and channel), builds each chunk's maps of both recurrences, combines them across chunks with two small scans and
then runs hf forward and hr backward over the held rows. It reads u and z once but holds so much per program that few
programs fit on an SM: faster where the GPU is mostly idle anyway (short sequences in small batches), slower at large
batches, hence `onchip_fits`.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..triton_utils import num_sms
from .common import as_pairs, row_gates, state_maps, step


class OnchipConfig(NamedTuple):
    """Launch config of the one-read forward; its warps follow: one thread per chunk and channel."""
    block_c: int  # channels per program
    rows: int  # rows per chunk (T), at most; W = N / T chunks, rounded up to a power of two


# Tuned on an H100 (bf16 and fp32) from (1, 256, 192) to (256, 256, 384) against the two-sweep forward, with the limits
# of `onchip_fits`; re-tune: `python scripts/gpu_scan_tune.py onchip`.
ONCHIP_CONFIG = OnchipConfig(16, 8)
ONCHIP_MAX_N = 256


def onchip_fits(B: int, N: int, C: int, device: torch.device) -> bool:
    """Whether the forward takes the one-read kernel: a short sequence and at most 1.5 of its programs per SM."""
    return N <= ONCHIP_MAX_N and 2 * B * triton.cdiv(C, ONCHIP_CONFIG.block_c) <= 3 * num_sms(device)


@triton.jit
def _compose(a1_re, a1_im, b1_re, b1_im, a2_re, a2_im, b2_re, b2_im):
    """The map h -> a2 (a1 h + b1) + b2 (first (a1, b1), then (a2, b2)), complex a and b."""
    return (a2_re * a1_re - a2_im * a1_im, a2_re * a1_im + a2_im * a1_re, a2_re * b1_re - a2_im * b1_im + b2_re,
            a2_re * b1_im + a2_im * b1_re + b2_im)


@triton.jit
def _compose_excl(e1_re, e1_im, f1_re, f1_im, a1_re, a1_im, b1_re, b1_im, e2_re, e2_im, f2_re, f2_im, a2_re, a2_im,
                  b2_re, b2_im):
    """Scan combine of segments held as (all maps but the last, all maps): gives an exclusive scan of maps."""
    e_re, e_im, f_re, f_im = _compose(a1_re, a1_im, b1_re, b1_im, e2_re, e2_im, f2_re, f2_im)
    a_re, a_im, b_re, b_im = _compose(a1_re, a1_im, b1_re, b1_im, a2_re, a2_im, b2_re, b2_im)
    return e_re, e_im, f_re, f_im, a_re, a_im, b_re, b_im


@triton.jit
def _entering(A_re, A_im, B_re, B_im, REVERSE: tl.constexpr):
    """State entering each chunk (rows of the (W, BLOCK_C) chunk maps `h -> A h + B`) from the chunks before it
    (REVERSE: after it), starting from 0."""
    one = tl.full(A_re.shape, 1., tl.float32)
    zero = tl.zeros(A_re.shape, tl.float32)
    _, _, h_re, h_im, _, _, _, _ = tl.associative_scan(
        (one, zero, zero, zero, A_re, A_im, B_re, B_im), 0, _compose_excl, reverse=REVERSE)
    return h_re, h_im


@triton.jit
def bihgru_fwd_onchip_kernel(
        u_ptr, z_ptr, gamma_ptr, tf_ptr, tr_ptr, out_ptr, N, C, s_ub, s_un, s_zb, s_zn, s_ob, s_on,
        BLOCK_C: tl.constexpr, T: tl.constexpr, W: tl.constexpr,
):
    """The forward with one read of u and z: the program's sequence (W chunks of T rows, W x T >= N) is loaded once
    into registers as (W, BLOCK_C) tiles of row j of every chunk; the chunks' maps of both recurrences are combined
    across chunks by two small scans; then hf runs forward and hr backward over the held rows and hf + hr is
    written once."""
    b = tl.program_id(1).to(tl.int64)
    cs = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    cmask = cs < C
    gamma = tl.load(gamma_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tf = tl.load(tf_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tr = tl.load(tr_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    cos_f, sin_f, cos_r, sin_r = tl.cos(tf), tl.sin(tf), tl.cos(tr), tl.sin(tr)
    first = tl.arange(0, W)[:, None] * T  # each chunk's first row
    ub, zb, ob = u_ptr + b * s_ub, z_ptr + b * s_zb, out_ptr + b * s_ob
    one = tl.full([W, BLOCK_C], 1., tl.float32)
    zero = tl.zeros([W, BLOCK_C], tl.float32)
    # one read: every row's gates held, each chunk's maps of hf and hr (from a zero state) built on the way
    Ahf_re, Ahf_im, Bhf_re, Bhf_im, Ahr_re, Ahr_im, Bhr_re, Bhr_im = one, zero, zero, zero, one, zero, zero, zero
    lams, vs_re, vs_im = (), (), ()
    for j in tl.static_range(T):
        t = first + j
        m = cmask & (t < N)
        lam, v_re, v_im = row_gates(ub + t * s_un, zb + t * s_zn, cs, m, gamma)
        Ahf_re, Ahf_im, Bhf_re, Bhf_im, Ahr_re, Ahr_im, Bhr_re, Bhr_im = state_maps(
            m, lam, v_re, v_im, cos_f, sin_f, cos_r, sin_r, Ahf_re, Ahf_im, Bhf_re, Bhf_im, Ahr_re, Ahr_im, Bhr_re,
            Bhr_im)
        lams, vs_re, vs_im = lams + (lam,), vs_re + (v_re,), vs_im + (v_im,)
    hf_re, hf_im = _entering(Ahf_re, Ahf_im, Bhf_re, Bhf_im, False)
    hfs = ()
    for j in tl.static_range(T):
        hf_re, hf_im = step(hf_re, hf_im, lams[j], vs_re[j], vs_im[j], cos_f, sin_f)
        hfs = hfs + ((hf_re, hf_im),)
    hr_re, hr_im = _entering(Ahr_re, Ahr_im, Bhr_re, Bhr_im, True)
    for j in tl.static_range(T - 1, -1, -1):
        hr_re, hr_im = step(hr_re, hr_im, lams[j], vs_re[j], vs_im[j], cos_r, sin_r)
        t = first + j
        m = cmask & (t < N)
        o = ob + t * s_on + cs
        tl.store(o, (hfs[j][0] + hr_re).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(o + C, (hfs[j][1] + hr_im).to(out_ptr.dtype.element_ty), mask=m)


def onchip_fwd(u: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, theta_f: torch.Tensor, theta_r: torch.Tensor,
               out: torch.Tensor) -> None:
    """Writes the scan of u, z (unit channel stride, N <= ONCHIP_MAX_N) into out (B, N, 2C)."""
    B, N, C = z.shape
    up = as_pairs(u)
    block_c, T = ONCHIP_CONFIG
    T = min(T, triton.next_power_of_2(N))
    W = triton.next_power_of_2(triton.cdiv(N, T))
    wrap_triton(bihgru_fwd_onchip_kernel)[(triton.cdiv(C, block_c), B)](
        up, z, gamma, theta_f, theta_r, out, N, C, up.stride(0), up.stride(1), z.stride(0), z.stride(1),
        out.stride(0), out.stride(1), BLOCK_C=block_c, T=T, W=W, num_warps=max(1, W * block_c // 32))

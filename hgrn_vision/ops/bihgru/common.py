"""What the scan's Triton kernels share: row loads, the gates, one recurrence step, chunk maps, and the launch
helpers that split a sequence into chunks.

Naming, in every scan kernel. A complex value x is held in fp32 as `x_re`, `x_im`. The states are `hf` (the forward
recurrence) and `hr` (the reverse one); their adjoints, the gradients flowing into them, `dhf` and `dhr`. The gates
are `af = lam e^{i theta_f}` and `ar = lam e^{i theta_r}`, with `cos_f`, `sin_f`, `cos_r`, `sin_r` of the angles;
`v = (1 - lam) silu(u)` is the input of both recurrences, `do` the output's gradient (dL/dRe + i dL/dIm of out). A
chunk's map `h -> A h + B` of the recurrence of x is `Ax_re, Ax_im, Bx_re, Bx_im` (e.g. `Ahf_re`). `cs` are a
program's channels, `m` a mask, `t` a token row, `g` the first row of a group of GROUP rows, `t0 .. t1` a chunk.

A program owns BLOCK_C channels (one per thread) of one batch row and walks the tokens one at a time, in groups of
GROUP rows whose loads are issued together so that their latencies overlap (a group's stores come after all its
loads: a store before a load that may alias it makes the load wait). When B x C alone cannot fill the GPU (long
sequences, small batches) the sequence is split into chunks run by separate programs, a two-level scan: a first
launch writes each chunk's map per recurrence (from a zero state; the reverse kind composed in ascending order), the
main launch folds the maps of the chunks before (forward) or after (reverse) its own into its incoming states.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from ..triton_utils import num_sms, sigmoid

# rows per group (their loads issued together; one stashed state per group): fixed, the kernels' reverse sweeps are
# written out for 4 rows held as separate values
GROUP = 4
MIN_CHUNK = 64  # the shortest chunk when a sequence is split


@triton.jit
def channels(gamma_ptr, tf_ptr, tr_ptr, cs, cmask):
    """gamma and cos / sin of both angles (fp32) of the channels cs (masked by cmask). The kernels compute cs
    themselves: torch.compile's mutation analysis of a kernel takes every pointer passed to a helper as written
    when a store address derives from one of the helper's results."""
    gamma = tl.load(gamma_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tf = tl.load(tf_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    tr = tl.load(tr_ptr + cs, mask=cmask, other=0.).to(tl.float32)
    return gamma, tl.cos(tf), tl.sin(tf), tl.cos(tr), tl.sin(tr)


@triton.jit
def channel_mask(cs, C, EVEN: tl.constexpr):
    """cs < C; a constant where the launch guarantees it (EVEN), so that the masks built on it fold away."""
    if EVEN:
        return tl.full(cs.shape, True, tl.int1)
    else:
        return cs < C


@triton.jit
def before(t, t1, EVEN: tl.constexpr):
    """t < t1 (row t inside its chunk); True where the launch guarantees it (EVEN: every chunk a whole number of
    groups), so that full groups carry no row masks."""
    if EVEN:
        return True
    else:
        return t < t1


@triton.jit
def load_row(u_ptr, z_ptr, cs, m):
    """z, Re u, Im u of one token row of BLOCK_C channels (channel stride 1) in fp32; 0 outside the mask. An int32
    u holds bf16 (Re, Im) pairs (`as_pairs`): one 32-bit load a channel, each half widened by a shift or a mask
    (bf16 is the upper half of an fp32)."""
    z = tl.load(z_ptr + cs, mask=m, other=0.).to(tl.float32)
    if u_ptr.dtype.element_ty == tl.int32:
        w = tl.load(u_ptr + cs, mask=m, other=0)
        u_re = (w << 16).to(tl.float32, bitcast=True)
        u_im = (w & -65536).to(tl.float32, bitcast=True)
    else:
        u_re = tl.load(u_ptr + 2 * cs, mask=m, other=0.).to(tl.float32)
        u_im = tl.load(u_ptr + 2 * cs + 1, mask=m, other=0.).to(tl.float32)
    return z, u_re, u_im


@triton.jit
def load_group(ub, zb, s_un, s_zn, cs, m, g, t1, EVEN: tl.constexpr):
    """`load_row` of the 4 rows from g, as a tuple of 4 rows; rows at or past t1 (all where m is false) read as 0."""
    return (load_row(ub + g * s_un, zb + g * s_zn, cs, m & before(g, t1, EVEN)),
            load_row(ub + (g + 1) * s_un, zb + (g + 1) * s_zn, cs, m & before(g + 1, t1, EVEN)),
            load_row(ub + (g + 2) * s_un, zb + (g + 2) * s_zn, cs, m & before(g + 2, t1, EVEN)),
            load_row(ub + (g + 3) * s_un, zb + (g + 3) * s_zn, cs, m & before(g + 3, t1, EVEN)))


@triton.jit
def gates(row, m, gamma):
    """lam, Re v, Im v in fp32 of a row from `load_row`; 0 outside the mask m."""
    z, u_re, u_im = row
    lam = tl.where(m, gamma + (1. - gamma) * sigmoid(z), 0.)
    w = 1. - lam
    return lam, w * u_re * sigmoid(u_re), w * u_im * sigmoid(u_im)


@triton.jit
def row_gates(u_ptr, z_ptr, cs, m, gamma):
    """One token row of BLOCK_C channels (channel stride 1): lam, Re v, Im v in fp32; 0 outside the mask."""
    return gates(load_row(u_ptr, z_ptr, cs, m), m, gamma)


@triton.jit
def step(h_re, h_im, lam, v_re, v_im, cos, sin):
    """One step h <- lam e^{i theta} h + v of a complex recurrence (cos, sin of theta)."""
    a_re, a_im = lam * cos, lam * sin
    return a_re * h_re - a_im * h_im + v_re, a_re * h_im + a_im * h_re + v_im


@triton.jit
def cmul(a_re, a_im, b_re, b_im):
    return a_re * b_re - a_im * b_im, a_re * b_im + a_im * b_re


@triton.jit
def state_maps(m, lam, v_re, v_im, cos_f, sin_f, cos_r, sin_r, Ahf_re, Ahf_im, Bhf_re, Bhf_im, Ahr_re, Ahr_im, Bhr_re,
               Bhr_im):
    """Extend the chunk maps of hf (forward kind: (A, B) <- (af A, af B + v)) and of hr (reverse kind, composed in
    ascending order: B <- B + A v, A <- A ar) by one row; identity on masked rows."""
    a_re, a_im = tl.where(m, lam * cos_f, 1.), lam * sin_f
    Bhf_re, Bhf_im = a_re * Bhf_re - a_im * Bhf_im + v_re, a_re * Bhf_im + a_im * Bhf_re + v_im
    Ahf_re, Ahf_im = cmul(a_re, a_im, Ahf_re, Ahf_im)
    a_re, a_im = tl.where(m, lam * cos_r, 1.), lam * sin_r
    Bhr_re, Bhr_im = Bhr_re + Ahr_re * v_re - Ahr_im * v_im, Bhr_im + Ahr_re * v_im + Ahr_im * v_re
    Ahr_re, Ahr_im = cmul(Ahr_re, Ahr_im, a_re, a_im)
    return Ahf_re, Ahf_im, Bhf_re, Bhf_im, Ahr_re, Ahr_im, Bhr_re, Bhr_im


@triton.jit
def load_map(p, s_ss, SLOT: tl.constexpr, cmask):
    """The 4 fp32 values at slots SLOT..SLOT+3 (stride s_ss) from p, as `store_map` wrote them."""
    return (tl.load(p + SLOT * s_ss, mask=cmask, other=0.).to(tl.float32),
            tl.load(p + (SLOT + 1) * s_ss, mask=cmask, other=0.).to(tl.float32),
            tl.load(p + (SLOT + 2) * s_ss, mask=cmask, other=0.).to(tl.float32),
            tl.load(p + (SLOT + 3) * s_ss, mask=cmask, other=0.).to(tl.float32))


@triton.jit
def store_map(p, s_ss, SLOT: tl.constexpr, cmask, A_re, A_im, B_re, B_im):
    """A map (or any 4 fp32 values) at slots SLOT..SLOT+3 (stride s_ss) from p."""
    tl.store(p + SLOT * s_ss, A_re, mask=cmask)
    tl.store(p + (SLOT + 1) * s_ss, A_im, mask=cmask)
    tl.store(p + (SLOT + 2) * s_ss, B_re, mask=cmask)
    tl.store(p + (SLOT + 3) * s_ss, B_im, mask=cmask)


@triton.jit
def fold_carries(sum_ptr, s_sk, s_ss, cs, cmask, k, n_chunks, SLOT: tl.constexpr, FORWARD: tl.constexpr):
    """State entering chunk k from the maps at slots SLOT..SLOT+3 of the chunks before (FORWARD) or after it; zero
    for the first (last) chunk, and so whenever the sequence is not split."""
    h_re = tl.zeros(cs.shape, dtype=tl.float32)
    h_im = tl.zeros(cs.shape, dtype=tl.float32)
    if FORWARD:
        n = k
    else:
        n = n_chunks - 1 - k
    for j in range(0, n):
        if FORWARD:
            kk = j
        else:
            kk = n_chunks - 1 - j
        A_re, A_im, B_re, B_im = load_map(sum_ptr + kk * s_sk + cs, s_ss, SLOT, cmask)
        h_re, h_im = A_re * h_re - A_im * h_im + B_re, A_re * h_im + A_im * h_re + B_im
    return h_re, h_im


def chunks(B: int, N: int, C: int, device: torch.device, cfg) -> Tuple[int, int, int]:
    """Channel blocks, chunks and chunk length of a two-sweep launch with `cfg` (its block_c and programs_per_sm):
    split the sequence only when B x C alone cannot fill the GPU (the cfg's programs per SM), and then into enough
    chunks for twice that: the split costs a summary pass either way, and more, shorter chains hide more latency."""
    n_cblocks = triton.cdiv(C, cfg.block_c)
    target = cfg.programs_per_sm * num_sms(device)
    n_chunks = 1 if B * n_cblocks >= target else min(triton.cdiv(2 * target, B * n_cblocks), triton.cdiv(N, MIN_CHUNK))
    chunk_len = triton.cdiv(triton.cdiv(N, max(n_chunks, 1)), GROUP) * GROUP  # whole groups per chunk
    return n_cblocks, triton.cdiv(N, chunk_len), chunk_len


def as_pairs(u: torch.Tensor) -> torch.Tensor:
    """u as the kernels read it: bf16 as int32 (Re, Im) pairs where its layout allows (every stride and the storage
    offset even), else itself."""
    if u.dtype == torch.bfloat16 and u.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in u.stride()[:-1]):
        return u.view(torch.int32)
    return u


def even(N: int, C: int, block_c: int) -> bool:
    """Whether a two-sweep launch runs without masks (the kernels' EVEN): whole channel blocks, and whole groups in
    every chunk (chunk lengths are whole groups, so the sequence must be one too)."""
    return C % block_c == 0 and N % GROUP == 0


def sum_strides(summ: torch.Tensor, n_chunks: int) -> Tuple[int, int, int]:
    """Strides of the chunk maps' buffer (B, n_chunks, slots, C); zeros when the sequence is not split."""
    return (summ.stride(0), summ.stride(1), summ.stride(2)) if n_chunks > 1 else (0, 0, 0)

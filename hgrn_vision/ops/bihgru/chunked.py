"""PyTorch path of the bidirectional HGRU scan, for the CPU and any device without the Triton kernels.

Both directions run as one recurrence `h_t = a_t h_{t-1} + v_t` over 2B complex sequences, the reverse direction's
tokens flipped. The N tokens are cut into K chunks of L ~ sqrt(N) and each step is one vectorised op over every
chunk of every sequence: L steps run each chunk from a zero state to its end state and its gates' product, K small
steps carry the state from chunk to chunk, and L more steps run each chunk again from its carry, writing the states
into a preallocated buffer. About 2 sqrt(N) ops of B x C x sqrt(N) elements instead of N ops of B x C; nothing
divides by a product of gates, so gates near 0 are exact.

The backward is the same scan run on the adjoint, `dh_t = g_t + conj(a_{t+1}) dh_{t+1}`, a reverse recurrence with
the conjugate gates, then `dv_t = dh_t` and `da_t = dh_t conj(h_{t-1})`.

Traced by `torch.export` (the ONNX export) or `torch.compile`, the scan is written in real (re, im) arithmetic as
chunks of unrolled steps (`_bihgru_traced`): ONNX has no complex numbers, and inductor fuses each chunk's steps into
one loop. Exported, the chunks' carries are a `scan` higher-order op, so that one graph holds for any number of
tokens; compiled, a log-depth (Hillis-Steele) scan over the chunks, since inductor cannot lower `scan`.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ['bihgru_scan_chunked', 'is_exporting', 'real_dtype']

TRACED_CHUNK = 16  # chunk length of the traced scan: its steps are unrolled


def is_exporting() -> bool:
    """Whether torch.export is tracing the code (non-strict, as `torch.onnx.export` does), where torch.compile is not:
    torch 2.11's dynamo folds `torch.compiler.is_exporting()` to True while it compiles. A strict export, traced by
    dynamo, counts as compiling."""
    return torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()


def _scan(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`h_t = a_t h_{t-1} + v_t`, `h_{-1} = 0`, along each sequence of (M, K, L, C) tensors: M sequences of K chunks
    of L tokens. No autograd."""
    M, K, L, C = v.shape
    h = torch.empty_like(v)
    a_t, v_t, h_t = a.unbind(2), v.unbind(2), h.unbind(2)  # (M, K, C) views: one token of every chunk
    if K == 1:
        h_t[0].copy_(v_t[0])
    else:
        end, prod = v_t[0].clone(), a_t[0].clone()  # each chunk's end state from a zero state, its gates' product
        for t in range(1, L):
            torch.addcmul(v_t[t], a_t[t], end, out=end)
            prod.mul_(a_t[t])
        carry = torch.zeros_like(end)  # the state entering each chunk
        for k in range(1, K):
            torch.addcmul(end[:, k - 1], prod[:, k - 1], carry[:, k - 1], out=carry[:, k])
        torch.addcmul(v_t[0], a_t[0], carry, out=h_t[0])
    for t in range(1, L):
        torch.addcmul(v_t[t], a_t[t], h_t[t - 1], out=h_t[t])
    return h


class _BiScan(torch.autograd.Function):
    """Both directions' states summed, `hf_t + hr_t`, as `[Re | Im]` (B, N, 2C), from the gates' magnitude `lam`
    (B, N, C), the input `v` (B, N, C) complex and the unit rotations `rot_f`, `rot_r` (C,) complex.

    Both directions run as one scan of (2B, K, L, C): the forward sequences, then the reverse ones flipped. N tokens
    are padded at their end to K chunks of L: zero inputs there leave both directions' states at the real tokens
    as they are."""

    @staticmethod
    def forward(ctx, lam, v, rot_f, rot_r):
        B, N, C = lam.shape
        L = math.ceil(math.sqrt(N))  # balances the steps inside the chunks against those across them
        K = -(-N // L)
        if K * L != N:
            lam, v = F.pad(lam, (0, 0, 0, K * L - N)), F.pad(v, (0, 0, 0, K * L - N))
        lam4, v4 = lam.view(B, K, L, C), v.view(B, K, L, C)
        a, x = v.new_empty(2 * B, K, L, C), v.new_empty(2 * B, K, L, C)
        torch.mul(lam4, rot_f, out=a[:B])
        torch.mul(lam4.flip(1, 2), rot_r, out=a[B:])
        x[:B] = v4
        x[B:] = v4.flip(1, 2)
        h = _scan(a, x)
        ctx.save_for_backward(lam, rot_f, rot_r, h)
        ctx.n = N
        hf, hr = h[:B], h[B:].flip(1, 2)  # token order
        out = lam.new_empty(B, K, L, 2 * C)
        torch.add(hf.real, hr.real, out=out[..., :C])
        torch.add(hf.imag, hr.imag, out=out[..., C:])
        return out.view(B, K * L, 2 * C)[:, :N]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        lam, rot_f, rot_r, h = ctx.saved_tensors
        B, NP, C = lam.shape
        K, L, n = h.shape[1], h.shape[2], ctx.n
        g = torch.complex(g[..., :C], g[..., C:])
        if NP != n:
            g = F.pad(g, (0, 0, 0, NP - n))
        # Each direction's adjoint runs against its scan; flipped again, it is a forward scan over (2B, K, L, C):
        # the forward direction's adjoint in reverse token order, whose gate at a token is conj(a) of the token after
        # it, then the reverse direction's in token order, conj(a) of the token before it (none at the first).
        lam_after = F.pad(lam[:, 1:], (0, 0, 0, 1)).view(B, K, L, C)
        lam_before = F.pad(lam[:, :-1], (0, 0, 1, 0)).view(B, K, L, C)
        b = h.new_empty(h.shape)
        torch.mul(lam_after.flip(1, 2), rot_f.conj(), out=b[:B])
        torch.mul(lam_before, rot_r.conj(), out=b[B:])
        g4 = g.view(B, K, L, C)
        d = _scan(b, torch.cat([g4.flip(1, 2), g4]))
        dhf, dhr = d[:B].flip(1, 2).view(B, NP, C), d[B:].view(B, NP, C)  # token order
        hf, hr = h[:B].view(B, NP, C), h[B:].flip(1, 2).view(B, NP, C)
        # da_t = dh_t conj(the direction's state before t): hf_{t-1}, hr_{t+1}
        da_f = F.pad(dhf[:, 1:] * hf[:, :-1].conj(), (0, 0, 1, 0))
        da_r = F.pad(dhr[:, :-1] * hr[:, 1:].conj(), (0, 0, 0, 1))
        dlam = (da_f * rot_f.conj()).real + (da_r * rot_r.conj()).real
        return dlam[:, :n], (dhf + dhr)[:, :n], (da_f * lam).sum((0, 1)), (da_r * lam).sum((0, 1))


def _cmul(a, b):
    """The product of complex numbers held as (re, im) pairs of real tensors."""
    return a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0]


def _cmuladd(a, b, c):
    """a b + c, as `_cmul`."""
    re, im = _cmul(a, b)
    return re + c[0], im + c[1]


def _bihgru_traced(lam, v_re, v_im, theta):
    """`_BiScan`'s forward in real arithmetic for `torch.export` and `torch.compile`: chunks of `TRACED_CHUNK` tokens
    whose steps are unrolled; the chunks' carries a `scan` over the chunks when exporting (one graph for any N), a
    log-depth scan when compiling. `theta` (2, C): the forward and reverse angles. Returns (Re h, Im h)."""
    B, N, C = lam.shape
    L = TRACED_CHUNK
    pad = (L - N % L) % L
    K = (N + pad) // L

    def chunks(x):  # (B, N, C) -> (2, B, K, L, C): both directions, the reverse flipped, padded to K chunks of L
        return F.pad(torch.stack([x, x.flip(1)]), (0, 0, 0, pad)).view(2, B, K, L, C)

    lam, v_re, v_im = chunks(lam), chunks(v_re), chunks(v_im)
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    a = [(lam[..., t, :] * cos, lam[..., t, :] * sin) for t in range(L)]
    v = [(v_re[..., t, :], v_im[..., t, :]) for t in range(L)]
    end, prod = v[0], a[0]  # each chunk's end state from a zero state, its gates' product
    for t in range(1, L):
        end, prod = _cmuladd(a[t], end, v[t]), _cmul(a[t], prod)

    if is_exporting():
        from torch._higher_order_ops.scan import scan

        def carry_step(carry, x):  # the state entering a chunk -> the state entering the next, and the first
            e_re, e_im, p_re, p_im = x
            return _cmuladd((p_re, p_im), carry, (e_re, e_im)), (carry[0].clone(), carry[1].clone())

        init = (lam.new_zeros(2, B, C), lam.new_zeros(2, B, C))  # two tensors: `scan` refuses aliased carries
        _, carry = scan(carry_step, init, [x.movedim(2, 0) for x in (*end, *prod)])
        carry = tuple(c.movedim(0, 2) for c in carry)
    else:  # inductor cannot lower `scan`: the chunks' end states summed by log2(K) doubling steps
        d = 1
        while d < K:  # end, prod: over the 2d chunks up to each, from d chunks
            end_before = tuple(F.pad(x[:, :, :-d], (0, 0, d, 0)) for x in end)
            prod_before = (F.pad(prod[0][:, :, :-d], (0, 0, d, 0), value=1.), F.pad(prod[1][:, :, :-d], (0, 0, d, 0)))
            end, prod = _cmuladd(prod, end_before, end), _cmul(prod, prod_before)
            d *= 2
        carry = tuple(F.pad(x[:, :, :-1], (0, 0, 1, 0)) for x in end)  # the state entering each chunk
    h = [_cmuladd(a[0], carry, v[0])]
    for t in range(1, L):
        h.append(_cmuladd(a[t], h[-1], v[t]))
    out = []
    for part in zip(*h):
        x = torch.stack(part, 3).view(2, B, K * L, C)[:, :, :N]
        out.append(x[0] + x[1].flip(1))
    return out


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU scans compute in for inputs of `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bihgru_scan_chunked(
        u: torch.Tensor,
        z: torch.Tensor,
        gamma: torch.Tensor,
        theta_f: torch.Tensor,
        theta_r: torch.Tensor,
) -> torch.Tensor:
    """Bidirectional complex HGRU scan by chunks (see `hgrn_vision.ops.bihgru_scan` for the math).

    Computes in float32 (float64 for float64 inputs) and returns the dtype of `u`.
    """
    real = real_dtype(u.dtype)
    B, N, C = z.shape
    g = gamma.to(real)
    lam = g + (1. - g) * torch.sigmoid(z.to(real))
    c, w = F.silu(u.to(real)).view(B, N, C, 2), 1. - lam  # c: interleaved (re, im) pairs
    if N == 0:  # no tokens to scan
        return (c.flatten(2) * w.repeat_interleave(2, -1)).to(u.dtype)
    theta_f, theta_r = theta_f.to(real), theta_r.to(real)
    if torch.compiler.is_compiling():  # torch.compile and torch.export
        out = torch.cat(_bihgru_traced(lam, c[..., 0] * w, c[..., 1] * w, torch.stack([theta_f, theta_r])), -1)
    else:
        one = torch.ones_like(theta_f)
        out = _BiScan.apply(lam, torch.view_as_complex(c) * w, torch.polar(one, theta_f), torch.polar(one, theta_r))
    return out.to(u.dtype)

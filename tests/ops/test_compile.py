"""torch.compile(fullgraph=True) traces through the Triton ops (their fake impls and autograd), forward and backward,
without a graph break, and gives eager's output and gradients. backend='aot_eager' builds the forward and backward
graphs as inductor does, then runs them eagerly (inductor would emit GPU code the CPU cannot run)."""
import torch
import torch.nn.functional as F

from hgrn_vision.ops import bihgru_scan, bihgru_scan_norm_gate, layer_norm_linear, silu_glu_linear


def _block(x, p):
    """A block as the low_memory model runs it on the Triton path, every op once: LayerNorm + in_proj, the mixer op
    with out_proj inside, LayerNorm + fc1, the GLU + fc2; and the scan op on its own."""
    x5 = layer_norm_linear(x, p['n1w'], p['n1b'], 1e-5, p['in_w'], impl='triton')
    x5 = x5 + p['in_b'].detach()  # in_bias: added detached, its gradient from the op's sums
    y = x + bihgru_scan_norm_gate(x5, p['gamma'], p['tf'], p['tr'], p['nw'], p['nb'], in_bias=p['in_b'],
                                  out_weight=p['out_w'], out_bias=p['out_b'], impl='triton')
    h = F.linear(F.layer_norm(y, y.shape[-1:]), p['fc1_w'], p['fc1_b'].detach())
    y = y + silu_glu_linear(h, p['fc2_w'], p['fc2_b'], in_bias=p['fc1_b'], impl='triton')
    C = x.shape[-1]
    return y, bihgru_scan(x5[..., :2 * C], x5[..., 2 * C:3 * C], p['gamma'], p['tf'], p['tr'], impl='triton')


def test_ops_compile_fullgraph(rel_err):
    torch._dynamo.reset()
    B, N, C = 2, 7, 3
    gen = torch.Generator().manual_seed(0)
    shapes = dict(n1w=(C,), n1b=(C,), in_w=(5 * C, C), in_b=(5 * C,), gamma=(C,), tf=(C,), tr=(C,), nw=(2 * C,),
                  nb=(2 * C,), out_w=(C, 2 * C), out_b=(C,), fc1_w=(4 * C, C), fc1_b=(4 * C,), fc2_w=(C, 2 * C),
                  fc2_b=(C,))
    p = {k: (torch.randn(s, generator=gen) * 0.5).requires_grad_(True) for k, s in shapes.items()}
    with torch.no_grad():
        p['gamma'].uniform_(0, 0.9, generator=gen)
    x = torch.randn(B, N, C, generator=gen).requires_grad_(True)
    runs = []
    for fn in (_block, torch.compile(_block, fullgraph=True, backend='aot_eager')):
        y, h = fn(x, p)
        loss = y.square().sum() + h.square().sum()
        runs.append([y, h, *torch.autograd.grad(loss, [x, *p.values()])])
    for name, a, b in zip(['y', 'h', 'x', *p], *runs):
        assert rel_err(a, b) < 1e-5, name

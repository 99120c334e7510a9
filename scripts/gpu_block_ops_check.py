"""GPU check of the `low_memory` block ops: `silu_glu_linear` and `layer_norm_linear` against float64 at the small
model's shapes (bf16 and fp32), and a depth-2 hgrn_deit_small with low_memory=True (every fused op, out_proj inside
the mixer's) against its PyTorch paths in fp32. Prints relative errors; run on the lent GPU:

    PYTHONPATH=. python scripts/gpu_block_ops_check.py
"""
import timm
import torch

import hgrn_vision  # noqa: F401
from hgrn_vision.benchmark import rel_err
from hgrn_vision.ops import layer_norm_linear, silu_glu_linear

dev = 'cuda'
torch.manual_seed(0)
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
for dtype in (torch.bfloat16, torch.float32):
    x = torch.randn(256, 256, 1536, device=dev, dtype=torch.float64) * 2
    w = torch.randn(384, 768, device=dev, dtype=torch.float64) / 30
    b, ib = torch.randn(384, device=dev, dtype=torch.float64), torch.randn(1536, device=dev)
    dout = torch.randn(256, 256, 384, device=dev).to(dtype)
    res = []
    for impl, dt in (('triton', dtype), ('torch', torch.float64)):
        ins = [t.to(dt).requires_grad_() for t in (x, w, b)] + [ib.clone().requires_grad_()]
        y = silu_glu_linear(*ins[:3], in_bias=ins[3], impl=impl)
        res.append([y, *torch.autograd.grad(y, ins, dout.to(dt))])
    print(f'silu_glu_linear (256, 256, 1536)->384 {dtype}: out, dx, dw, db, din_bias',
          ' '.join(f'{rel_err(a, r):.1e}' for a, r in zip(*res)), flush=True)
    x = torch.randn(256, 256, 384, device=dev, dtype=torch.float64) + 0.5
    nw, nb = torch.randn(384, device=dev) * 0.3 + 1, torch.randn(384, device=dev) * 0.3
    w = torch.randn(1920, 384, device=dev, dtype=torch.float64) / 20
    b = torch.randn(1920, device=dev, dtype=torch.float64)
    dout = torch.randn(256, 256, 1920, device=dev).to(dtype)
    res = []
    for impl, dt in (('triton', dtype), ('torch', torch.float64)):
        ndt = dt if impl == 'torch' else torch.float32  # the LayerNorm's parameters stay fp32, as in the model
        ins = [x.to(dt), nw.to(ndt), nb.to(ndt), w.to(dt), b.to(dt)]
        ins = [t.requires_grad_() for t in ins]
        y = layer_norm_linear(ins[0], ins[1], ins[2], 1e-5, ins[3], ins[4], impl=impl)
        res.append([y, *torch.autograd.grad(y, ins, dout.to(dt))])
    print(f'layer_norm_linear (256, 256, 384)->1920 {dtype}: out, dx, dnw, dnb, dw, db',
          ' '.join(f'{rel_err(a, r):.1e}' for a, r in zip(*res)), flush=True)

model = timm.create_model('hgrn_deit_small', depth=2, low_memory=True).to(dev)
x = torch.randn(8, 3, 224, 224, device=dev)
runs = []
for impl in ('triton', 'torch'):
    for blk in model.blocks:
        blk.mixer.scan_impl = blk.mlp.impl = impl
    model.zero_grad()
    y = model(x)
    y.square().sum().backward()
    runs.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
errs = {n: rel_err(runs[0][1][n], g) for n, g in runs[1][1].items()}
worst = max(errs, key=errs.get)
print(f'hgrn_deit_small depth 2 fp32, fused ops vs PyTorch paths: logits {rel_err(runs[0][0], runs[1][0]):.1e}, '
      f'parameter grads max {errs[worst]:.1e} ({worst})', flush=True)

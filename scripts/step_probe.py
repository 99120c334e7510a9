"""A compiled training step on the GPU, looked at closer than `benchmark.py models` does: the spread of the step time
(each step between its own pair of CUDA events; median, p10, p90 of 60), the host's time to enqueue one step (wall
time of the step's Python call right after a sync; when it nears the GPU time, a slower host slows the step), and the
activation memory per image, optionally with every block under activation checkpointing: `full` (timm's
`set_grad_checkpointing`) or `selective` (the policy of `scripts/saved_activations.py --selective`: keep the outputs of
matmuls, attention and the HGRU mixer op, recompute the rest), and optionally compiled with another torch.compile
mode (`reduce-overhead`: CUDA graphs, so the host no longer enqueues each kernel; its activation memory then sits in
the graphs' pool, allocated before the measurement, and reads near 0). bf16 autocast, fused AdamW, batch 256 at 224
(at another resolution R, as `benchmark.py models`: 256 * 224^2 // R^2 images, 12 at 1024).

    PYTHONPATH=. python scripts/step_probe.py TAG hgrn_deit_small:none hgrn_deit_small:selective \\
        hgrn_deit_small:full deit_small_patch16_224:none deit_small_patch16_224:selective \\
        hgrn_deit_tiny:none:reduce-overhead hgrn_deit_small:none::1024:low_memory=True

A spec is NAME[:CKPT[:MODE[:RES[:KEY=VALUE,...]]]], an empty field taking its default (none, default, 224, no
keyword arguments for timm.create_model); MODE `eager` runs the step without torch.compile.
"""
import ast
import os
import statistics
import sys
import time

os.environ['TRITON_INTERPRET'] = '0'  # saved_activations (imported below) defaults it to 1 for its CPU trace

import torch  # noqa: E402
from saved_activations import _checkpoint_blocks  # noqa: E402  (scripts/ is on sys.path when run as a script)

import hgrn_vision  # noqa: E402,F401  (registers the models)
from hgrn_vision.benchmark.models import GPU_DEFAULTS, _make_step, batch_for, create_benchmark_model, prepare_step  # noqa: E402


def train_step(name: str, ckpt: str = 'none', mode: str = 'default', batch: int = 256, res: int = 224,
               **model_kwargs):
    """A compiled training step of timm model `name` (created with `model_kwargs`) on the GPU (bf16 autocast, fused
    AdamW), as a callable, with the blocks under `ckpt` checkpointing and torch.compile's `mode` ('eager': not
    compiled)."""
    torch._dynamo.reset()
    dev = torch.device('cuda')
    model = create_benchmark_model(name, res, **model_kwargs).to(dev)
    if ckpt == 'selective':
        _checkpoint_blocks(model)
    elif ckpt == 'full':
        model.set_grad_checkpointing(True)
    elif ckpt != 'none':
        raise SystemExit(f'unknown checkpointing {ckpt!r}: use none, selective or full (e.g. hgrn_deit_small:none)')
    opt, x, y = prepare_step(model, 'train', batch, res, dev, model_kwargs)
    run = model if mode == 'eager' else torch.compile(model, dynamic=False, mode=mode)
    return _make_step(run, x, y, 'train', dev, torch.bfloat16, opt, cudagraphs=mode == 'reduce-overhead')


def probe(name: str, ckpt: str, tag: str, mode: str = 'default', batch: int = 256, res: int = 224,
          steps: int = 60, **model_kwargs) -> None:
    step = train_step(name, ckpt, mode, batch, res, **model_kwargs)
    t = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    events = []
    for _ in range(steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in events)
    mem = (torch.cuda.max_memory_allocated() - base) / batch / 1e6
    host = []
    for _ in range(15):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        host.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    med = statistics.median(ms)
    kw = ''.join(f' {k}={v}' for k, v in model_kwargs.items())
    print(f'{tag:>10} {name:>24}{kw} res={res} batch={batch} ckpt={ckpt:<9} {mode:>15} step ms median {med:6.2f} '
          f'p10 {ms[len(ms) // 10]:6.2f} p90 {ms[9 * len(ms) // 10]:6.2f}  img/s {batch * 1e3 / med:7.1f}  '
          f'host enqueue ms median {statistics.median(host):6.2f}  act MB/img {mem:6.2f}  '
          f'first call {first:5.1f} s', flush=True)


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    print(torch.cuda.get_device_name(), 'torch', torch.__version__, flush=True)
    for spec in sys.argv[2:]:
        name, ckpt, mode, res, kwargs = (spec.split(':') + [''] * 4)[:5]
        res = int(res or 224)
        probe(name, ckpt or 'none', sys.argv[1], mode or 'default', batch=batch_for(res, GPU_DEFAULTS['batch_pixels']),
              res=res, **_parse_kwargs(kwargs))


def _parse_kwargs(text: str) -> dict:
    """`KEY=VALUE,...` as keyword arguments, each value a Python literal where it parses as one, else a string."""
    out = {}
    for item in filter(None, text.split(',')):
        key, sep, value = item.partition('=')
        if not sep:
            raise SystemExit(f'model keyword {item!r} is not KEY=VALUE (e.g. low_memory=True)')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


if __name__ == '__main__':
    main()

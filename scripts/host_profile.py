"""Where a compiled training step's host time goes: for each model, the host's time to enqueue 10 steps (no sync
between them) against their wall time, then torch.profiler's table of CPU time per op over 3 steps (our ops appear as
`hgrn_vision::...`). A step whose enqueue time reaches its wall time is bound by the host. bf16 autocast, fused
AdamW, batch 256 at 224, default torch.compile.

    PYTHONPATH=. python scripts/host_profile.py hgrn_deit_tiny deit_tiny_patch16_224
"""
import sys

import torch
from step_probe import train_step  # scripts/ is on sys.path when run as a script
from torch.profiler import ProfilerActivity, profile

from hgrn_vision.benchmark.utils import host_and_wall


def host_profile(name: str, steps: int = 10) -> None:
    step = train_step(name)
    enqueue, wall = host_and_wall(step, steps)
    print(f'{name}: enqueue {enqueue * 1e3:.2f} ms/step, wall {wall * 1e3:.2f} ms/step ({steps} steps, no sync '
          'between)')
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=30, max_name_column_width=70))


if __name__ == '__main__':
    for model_name in sys.argv[1:] or ['hgrn_deit_tiny', 'deit_tiny_patch16_224']:
        host_profile(model_name)

"""Where a model's step spends its time: `torch.profiler` over a few steps, time per kind of work.

Every kernel (on CUDA; on the CPU every operator's self time) is put in the first category of `CATEGORIES` whose
pattern matches its name: the scan kernels, attention, matmuls, LayerNorms, convolutions (the patch embedding), the
optimizer, copies and casts, the remaining elementwise / fused kernels, other. On the CPU the scan runs as the
'torch' path's PyTorch operators, counted as elementwise. The table gives ms per step and the share of the step's
total, one block of rows per model, mode and compile setting, so two models can be compared side by side in one run.
"""
import os
import re
import traceback
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from .models import compile_model, create_benchmark_model, make_step, prepare_step
from .utils import Column, environment, format_table, release_memory, write_csv, write_json

__all__ = ['CATEGORIES', 'categorize', 'profile_models']

CATEGORIES: Sequence[tuple] = (
    ('scan', r'bihgru|seq_scan'),
    ('attention', r'flash|fmha|attention|sdpa|softmax'),
    ('matmul', r'gemm|cutlass|nvjet|xmma|wgmma|cublas|^aten::(mm|addmm|bmm|matmul|linear|_addmm_activation)$'),
    ('layer_norm', r'layer_norm|layernorm|norm_gate'),  # norm_gate: the mixer's LayerNorm + gate kernels
    ('convolution', r'conv'),
    ('optimizer', r'adam|multi_tensor|foreach'),
    ('copy / cast', r'copy|cast|memcpy|memset|fill|^aten::to$|^aten::clone$|contiguous'),
    ('elementwise / fused', r'elementwise|vectorized|triton_|reduce|^aten::'),
)
PROFILE_COLUMNS: List[Column] = [
    ('model', 'model', ''), ('mode', 'mode', ''), ('compile', 'compile', ''), ('res', 'res', ''),
    ('batch', 'batch', ''), ('category', 'category', ''), ('ms_per_step', 'ms/step', '.3f'), ('pct', '%', '.1f'),
]


def categorize(name: str) -> str:
    """The first category of `CATEGORIES` whose pattern matches `name` (case-insensitive), else 'other'."""
    for category, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return category
    return 'other'


def _self_times(prof, device: torch.device) -> Dict[str, float]:
    """Total self time in ms by kernel (CUDA) or operator (CPU) name."""
    times: Dict[str, float] = {}
    for e in prof.key_averages():
        if device.type == 'cuda':
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, 'self_device_time_total', None)
            if us is None:
                us = e.self_cuda_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            times[e.key] = times.get(e.key, 0.) + us / 1e3
    return times


def profile_one(
        name: str,
        res: int,
        batch: int,
        mode: str,
        compile_mode: str,
        device: torch.device,
        amp_dtype: Optional[torch.dtype],
        model_kwargs: Dict[str, Any],
        steps: int = 5,
        warmup: int = 3,
        top: int = 3,
) -> List[Dict[str, Any]]:
    """Profile `steps` steps of one model after `warmup` (compiling first when `compile_mode == 'compiled'`):
    one row per category with ms per step, % of the step and its largest kernels."""
    release_memory(device)
    torch._dynamo.reset()
    model = create_benchmark_model(name, res, **model_kwargs).to(device)
    optimizer, x, y = prepare_step(model, mode, batch, res, device, model_kwargs)
    step = make_step(compile_model(model, compile_mode), x, y, mode, device, amp_dtype, optimizer)
    for _ in range(warmup + 1):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    times = _self_times(prof, device)
    total = sum(times.values())
    by_cat: Dict[str, Dict[str, float]] = {}
    for kernel, ms in times.items():
        by_cat.setdefault(categorize(kernel), {})[kernel] = ms / steps
    rows = []
    for category, kernels in sorted(by_cat.items(), key=lambda kv: -sum(kv[1].values())):
        ms = sum(kernels.values())
        largest = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
        rows.append(dict(
            model=name, mode=mode, compile=compile_mode, res=res, batch=batch, category=category, ms_per_step=ms,
            pct=100 * ms * steps / total, top='; '.join(f'{k[:60]} {v:.3f}' for k, v in largest)))
    rows.append(dict(model=name, mode=mode, compile=compile_mode, res=res, batch=batch, category='total',
                     ms_per_step=total / steps, pct=100., top=''))
    del model, optimizer, x, y, step
    torch._dynamo.reset()
    release_memory(device)
    return rows


def profile_models(
        models: Sequence[str],
        device: str = 'cuda',
        res: int = 224,
        batch: int = 256,
        modes: Sequence[str] = ('infer', 'train'),
        compile_modes: Sequence[str] = ('compiled',),
        amp_dtype: Optional[torch.dtype] = torch.bfloat16,
        model_kwargs: Optional[Dict[str, Any]] = None,
        steps: int = 5,
        output_dir: str = 'output/benchmark',
        name: str = 'profile',
) -> Dict[str, Any]:
    """Profile every model, mode and compile setting; print the table and write `name`.csv / .json."""
    dev = torch.device(device)
    rows: List[Dict[str, Any]] = []
    for model_name in models:
        for mode in modes:
            for compile_mode in compile_modes:
                try:
                    rows += profile_one(model_name, res, batch, mode, compile_mode, dev, amp_dtype,
                                        dict(model_kwargs or {}), steps=steps)
                except Exception as e:  # one failing model is a row, not the end of the run
                    traceback.print_exc()
                    rows.append(dict(model=model_name, mode=mode, compile=compile_mode, res=res, batch=batch,
                                     category=f'error: {type(e).__name__}', ms_per_step=float('nan'),
                                     pct=float('nan'), top=str(e).splitlines()[0][:120] if str(e) else ''))
    meta = environment(dev)
    print(f"{meta['device']}: torch {meta['torch']}, timm {meta['timm']}, triton {meta['triton']}")
    print(format_table(rows, PROFILE_COLUMNS))
    print('largest kernels per category (ms per step):')
    for row in rows:
        if row['top']:
            print(f"  {row['model']} {row['mode']} {row['compile']} {row['category']}: {row['top']}")
    os.makedirs(output_dir, exist_ok=True)
    write_csv(os.path.join(output_dir, f'{name}.csv'), rows)
    write_json(os.path.join(output_dir, f'{name}.json'), meta, rows)
    return dict(meta=meta, rows=rows)

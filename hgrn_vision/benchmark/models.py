"""Whole-model benchmark: images/s of timm models side by side, inference and training, eager and compiled.

Compile settings (`COMPILE_SETTINGS`): 'eager', 'compiled' (`torch.compile(dynamic=False)`) and 'cudagraphs' (the
same in mode 'reduce-overhead': the steps replay CUDA graphs, so the host no longer launches each kernel; CUDA only).

For every resolution, mode ('infer': forward under `no_grad`; 'train': forward, cross-entropy, backward and a fused
AdamW step), compile setting and model, in that loop order so the models being compared run next to each other,
one fresh model is created, warmed up and timed with CUDA events (median of many steps). Every model runs the
same batch at a resolution: `batch_pixels // res**2` images unless `batch_size` is given.

Reported per row: images/s, step time, peak memory (`torch.cuda.max_memory_allocated`, whole process) and the
activation memory per image (peak minus what was allocated before the timed steps - weights, optimizer state,
input - over the batch), parameters, FLOPs per image from `torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions, attention; elementwise work is not counted), the HGRU scan's elementwise work stated separately
(`SCAN_FWD_OPS` / `SCAN_BWD_OPS` per (B, N, C) element of every `HgruMixer` call), the achieved TFLOP/s of the
counted FLOPs and that as % of a bf16 matmul peak measured in the same run, and a reference model's images/s and
memory per image over this model's: the first model's, or with `pairs` (models given as (model, baseline) pairs,
e.g. hgrn_deit_tiny deit_tiny_patch16_224 hgrn_deit_small deit_small_patch16_224) the pair's first model's.

`compare_runs` puts runs of the same settings in several trees of this package side by side
(`scripts/compare_trees.py`: before and after a change, on one machine).
"""
import os
import statistics
import time
import traceback
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hgrn_vision.layers import HgruMixer

from .utils import (
    OOM_ERRORS,
    Column,
    environment,
    format_table,
    measure_matmul_peak,
    release_memory,
    time_fn,
    write_csv,
    write_json,
)

__all__ = ['SCAN_FWD_OPS', 'SCAN_BWD_OPS', 'COMPILE_SETTINGS', 'benchmark_models', 'batch_for',
           'check_compile_settings', 'compile_model', 'create_benchmark_model', 'count_flops', 'make_step',
           'prepare_step', 'train_step', 'compare_runs', 'plot_models', 'MODEL_COLUMNS', 'TREE_COLUMNS']

COMPILE_SETTINGS = ('eager', 'compiled', 'cudagraphs')

# Elementwise operations per (B, N, C) element of one bidirectional HGRU scan (the Triton kernel's work, which
# FlopCounterMode cannot see). Forward, 38: silu of the complex input (2 x 4), lam = gamma + (1 - gamma) sigmoid(z)
# (5), v = (1 - lam) c (3), per direction the gate lam e^{i theta} (2), the complex product with the state (6) and
# the add of v (2) (2 x 10), the sum of both directions (2).
SCAN_FWD_OPS = 38
# Backward, 100, recomputing the forward: activations and gates (16), both forward states (20), both adjoint
# recurrences (20), d a = dh conj(h_prev) per direction (12) and its projection onto dlam / dtheta (12), dv, dc and
# the v-path of dlam (8), dz through sigmoid and the lower bound (4), du through silu (8).
SCAN_BWD_OPS = 100

# device-dependent defaults; `--device cpu` runs tiny settings so the script itself is tested
GPU_DEFAULTS = dict(
    resolutions=(224, 384, 512, 768, 1024), batch_pixels=256 * 224 * 224, compile_modes=('eager', 'compiled'),
    compile_res_infer=(224, 1024), compile_res_train=(224,), amp_dtype=torch.bfloat16,
    warmup=5, min_iters=10, max_iters=50, max_time=2.0,
)
CPU_DEFAULTS = dict(
    resolutions=(56, 112), batch_pixels=2 * 56 * 56, compile_modes=('eager',),
    compile_res_infer=(), compile_res_train=(), amp_dtype=None,
    warmup=1, min_iters=2, max_iters=3, max_time=0.5,
)

MODEL_COLUMNS: List[Column] = [
    ('model', 'model', ''),
    ('mode', 'mode', ''),
    ('compile', 'compile', ''),
    ('res', 'res', ''),
    ('batch', 'batch', ''),
    ('img_s', 'img/s', '.1f'),
    ('step_ms', 'ms/step', '.2f'),
    ('ratio_img_s', 'ref/this img/s', '.2f'),
    ('peak_mem_gb', 'peak GB', '.2f'),
    ('mem_per_img_mb', 'act MB/img', '.2f'),
    ('ratio_mem', 'ref/this MB/img', '.2f'),
    ('params_m', 'params M', '.2f'),
    ('gflops_per_img', 'GFLOP/img', '.2f'),
    ('scan_gops_per_img', 'scan GOP/img', '.3f'),
    ('tflops', 'TFLOP/s', '.2f'),
    ('pct_peak', '% peak', '.1f'),
    ('first_call_s', 'first call s', '.1f'),
    ('status', 'status', ''),
]
# `compare_runs`' table: each round's images/s beside their median
TREE_COLUMNS: List[Column] = MODEL_COLUMNS[:6] + [('img_s_rounds', 'img/s by round', '')] + MODEL_COLUMNS[6:]


def batch_for(res: int, batch_pixels: int, batch_size: Optional[int] = None) -> int:
    """The batch at a resolution: `batch_size` if given, else as many images as fit `batch_pixels` (at least 1)."""
    if batch_size:
        return batch_size
    return max(1, batch_pixels // (res * res))


def create_benchmark_model(name: str, res: int, **kwargs) -> torch.nn.Module:
    """`timm.create_model(name, img_size=res, ...)`: ViT-like models get their position embedding at `res`;
    models that take no `img_size` (convnets) are created without it."""
    try:
        return timm.create_model(name, img_size=res, **kwargs)
    except TypeError as e:
        if 'img_size' not in str(e):
            raise
        return timm.create_model(name, **kwargs)


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def check_compile_settings(settings: Sequence[str], device: torch.device) -> None:
    """A ValueError that says what to use instead for an unknown setting, or 'cudagraphs' off CUDA."""
    unknown = [c for c in settings if c not in COMPILE_SETTINGS]
    if unknown:
        raise ValueError(f'unknown compile setting(s) {unknown}: use {", ".join(COMPILE_SETTINGS)}.')
    if 'cudagraphs' in settings and torch.device(device).type != 'cuda':
        raise ValueError(f"compile setting 'cudagraphs' needs a CUDA device (got {device}): use eager or compiled.")


def compile_model(model: torch.nn.Module, setting: str) -> torch.nn.Module:
    """`model` as compile `setting` runs it: itself ('eager'), `torch.compile(dynamic=False)` ('compiled') or that in
    mode 'reduce-overhead' ('cudagraphs'; its steps must come from `make_step(..., cudagraphs=True)`)."""
    if setting == 'eager':
        return model
    return torch.compile(model, dynamic=False, mode='reduce-overhead' if setting == 'cudagraphs' else None)


def make_step(model, x, y, mode: str, device: torch.device, amp_dtype, optimizer=None, cudagraphs: bool = False):
    """One benchmark step of `model` ('infer': forward under no_grad; 'train': forward, cross-entropy, backward and
    the optimizer's step). `cudagraphs`: each step starts a new generation of the CUDA graph trees (their outputs of
    the step before may be overwritten), as a training loop under mode 'reduce-overhead' must."""
    def forward_backward():
        if mode == 'infer':
            with torch.no_grad(), _autocast(device, amp_dtype):
                model(x)
            return
        with _autocast(device, amp_dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if not cudagraphs:
        return forward_backward

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        forward_backward()
    return step


def prepare_step(model, mode: str, batch: int, res: int, device: torch.device, model_kwargs: Dict[str, Any],
                 channels_last: bool = False):
    """Put `model` in `mode` and make what a timed step needs: the AdamW optimizer when training (fused on CUDA),
    a random input batch and labels. Returns (optimizer or None, x, y)."""
    model.train(mode == 'train')
    optimizer = None
    if mode == 'train':
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-4, weight_decay=0.05, **({'fused': True} if device.type == 'cuda' else {}))
    x = torch.randn(batch, model_kwargs.get('in_chans', 3), res, res, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, getattr(model, 'num_classes', 1000) or 1, (batch,), device=device)
    return optimizer, x, y


def train_step(
        name: str,
        res: int = 224,
        batch: Optional[int] = None,
        compile_mode: str = 'compiled',
        device: str = 'cuda',
        amp_dtype: Optional[torch.dtype] = torch.bfloat16,
        **model_kwargs,
) -> Callable[[], None]:
    """One training step of timm model `name` (created with `model_kwargs`) as `benchmark_models` times it, as a
    callable for probes and profilers: forward, cross-entropy, backward and a fused AdamW step on a random batch under
    `amp_dtype` autocast, compiled as `compile_mode` (a `COMPILE_SETTINGS` entry). `batch` defaults to the GPU
    benchmark's at `res` (`GPU_DEFAULTS['batch_pixels']`)."""
    torch._dynamo.reset()
    dev = torch.device(device)
    batch = batch_for(res, GPU_DEFAULTS['batch_pixels'], batch)
    model = create_benchmark_model(name, res, **model_kwargs).to(dev)
    optimizer, x, y = prepare_step(model, 'train', batch, res, dev, model_kwargs)
    return make_step(compile_model(model, compile_mode), x, y, 'train', dev, amp_dtype, optimizer,
                     cudagraphs=compile_mode == 'cudagraphs')


def count_flops(
        model: torch.nn.Module,
        res: int,
        mode: str,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        in_chans: int = 3,
) -> Dict[str, float]:
    """FLOPs per image of one eager step (forward, plus backward in 'train' mode) and the scan's elementwise ops.

    Counted on a batch of 2 (divided by 2). The scan's work is `SCAN_FWD_OPS` (+ `SCAN_BWD_OPS` when training)
    per element of the (B, N, C) input of every `HgruMixer` call.
    """
    scan_elems = [0]

    def hook(module, args):  # with low_memory a mixer's input is in_proj's output: count (B, N) x C
        scan_elems[0] += args[0].shape[:-1].numel() * module.dim

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, HgruMixer)]
    model.train(mode == 'train')
    x = torch.randn(2, in_chans, res, res, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    step = make_step(model, x, y, mode, device, amp_dtype)
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    ops = SCAN_FWD_OPS + (SCAN_BWD_OPS if mode == 'train' else 0)
    return {'flops_per_img': counter.get_total_flops() / 2, 'scan_ops_per_img': ops * scan_elems[0] / 2}


def _runs_at(compile_mode: str, mode: str, res: int, compile_res_infer, compile_res_train) -> bool:
    if compile_mode == 'eager':
        return True
    wanted = compile_res_infer if mode == 'infer' else compile_res_train
    return wanted is None or res in wanted


def _run_one(
        name: str,
        res: int,
        mode: str,
        compile_mode: str,
        batch: int,
        device: torch.device,
        amp_dtype: Optional[torch.dtype],
        model_kwargs: Dict[str, Any],
        flops_cache: Dict,
        timing: Dict[str, Any],
        channels_last: bool = False,
) -> Dict[str, Any]:
    row: Dict[str, Any] = dict(model=name, mode=mode, compile=compile_mode, res=res, batch=batch, status='ok')
    release_memory(device)
    if compile_mode != 'eager':
        torch._dynamo.reset()
    model = optimizer = x = y = fn = None
    try:
        model = create_benchmark_model(name, res, **model_kwargs).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        row['params_m'] = sum(p.numel() for p in model.parameters()) / 1e6
        key = (name, res, mode)
        if key not in flops_cache:
            flops_cache[key] = count_flops(model, res, mode, device, amp_dtype, model_kwargs.get('in_chans', 3))
        row['gflops_per_img'] = flops_cache[key]['flops_per_img'] / 1e9
        row['scan_gops_per_img'] = flops_cache[key]['scan_ops_per_img'] / 1e9
        optimizer, x, y = prepare_step(model, mode, batch, res, device, model_kwargs, channels_last)
        fn = compile_model(model, compile_mode)
        step = make_step(fn, x, y, mode, device, amp_dtype, optimizer, cudagraphs=compile_mode == 'cudagraphs')

        t0 = time.perf_counter()
        step()  # compiles when compiled; allocates the optimizer state
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        row['first_call_s'] = time.perf_counter() - t0
        for _ in range(timing['warmup']):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = time_fn(step, device, warmup=0, min_iters=timing['min_iters'], max_iters=timing['max_iters'],
                        max_time=timing['max_time'])
        ms = statistics.median(times)
        row.update(step_ms=ms, img_s=batch / ms * 1e3, iters=len(times))
        if device.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(device)
            row['peak_mem_gb'] = peak / 1e9
            if compile_mode != 'cudagraphs':  # the graphs' memory pool is allocated before the timed steps
                row['mem_per_img_mb'] = (peak - base) / batch / 1e6
        row['tflops'] = row['gflops_per_img'] * row['img_s'] / 1e3
    except OOM_ERRORS:
        row['status'] = 'oom'
    except Exception as e:  # keep the rest of the run: one failing model or compile is a row, not the end
        row['status'] = f'error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ""}'
        traceback.print_exc()
    finally:
        del model, optimizer, x, y, fn
        if compile_mode != 'eager':
            torch._dynamo.reset()
        release_memory(device)
    return row


def reference_models(models: Sequence[str], pairs: bool = False) -> Dict[str, str]:
    """Each compared model -> the model whose images/s and memory are put over it: the first model for all others,
    or with `pairs` the models taken as (model, baseline) pairs, each baseline compared with its pair's first."""
    if not pairs:
        return {m: models[0] for m in models[1:]}
    if len(models) % 2:
        raise ValueError(f'--pairs takes (model, baseline) pairs, got {len(models)} models: {" ".join(models)}.')
    return {models[i + 1]: models[i] for i in range(0, len(models), 2)}


def add_ratios(rows: List[Dict[str, Any]], refs: Dict[str, str]) -> None:
    """Puts the reference model's images/s and memory per image (`refs`: model -> its reference) over this model's
    into this model's row."""
    by_key = {(r['model'], r['mode'], r['compile'], r['res']): r for r in rows if r.get('img_s')}
    for r in rows:
        f = by_key.get((refs.get(r['model']), r['mode'], r['compile'], r['res']))
        if f is None:
            continue
        if r.get('img_s'):
            r['ratio_img_s'] = f['img_s'] / r['img_s']
        if r.get('mem_per_img_mb') and f.get('mem_per_img_mb'):
            r['ratio_mem'] = f['mem_per_img_mb'] / r['mem_per_img_mb']


# the numbers of a row that `compare_runs` takes the median of over rounds
_ROUND_MEDIANS = ('img_s', 'step_ms', 'peak_mem_gb', 'mem_per_img_mb', 'tflops', 'pct_peak', 'first_call_s')


def compare_runs(runs: Dict[str, Sequence[Sequence[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """Rows of `benchmark_models` runs of the same settings in several trees (`runs`: each tree's label -> one list of
    rows per round) as one table. A row per tree and setting, its model named 'model [label]', its numbers the medians
    over the rounds (each round's images/s in 'img_s_rounds', a failed round's status kept), and the first tree's
    images/s and memory per image over each other tree's as `add_ratios` puts them."""
    labels = list(runs)
    groups: Dict[tuple, Dict[str, List[Dict[str, Any]]]] = {}
    for label, rounds in runs.items():
        for rows in rounds:
            for r in rows:
                groups.setdefault((r['model'], r['mode'], r['compile'], r['res']), {}).setdefault(label, []).append(r)
    out, refs = [], {}
    for key, by_label in groups.items():
        for label in labels:
            rows = by_label.get(label)
            if not rows:
                continue
            row = {k: v for k, v in rows[0].items() if k not in ('ratio_img_s', 'ratio_mem')}
            for k in _ROUND_MEDIANS:
                values = [r[k] for r in rows if r.get(k) is not None]
                row[k] = statistics.median(values) if values else None
            row['status'] = next((r['status'] for r in rows if r.get('status', 'ok') != 'ok'), 'ok')
            row['img_s_rounds'] = ' '.join(f'{r["img_s"]:.1f}' if r.get('img_s') else '-' for r in rows)
            row['model'] = f'{key[0]} [{label}]'
            if label != labels[0]:
                refs[row['model']] = f'{key[0]} [{labels[0]}]'
            out.append(row)
    add_ratios(out, refs)
    return out


def plot_models(rows: Sequence[Dict[str, Any]], path: str, title: str = '') -> bool:
    """Images/s against resolution (log-log), one line per model and compile setting, one panel per mode.

    Returns False (and prints why) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'matplotlib is not installed: no plot written to {path}')
        return False
    modes = [m for m in ('infer', 'train') if any(r['mode'] == m for r in rows)]
    models = list(dict.fromkeys(r['model'] for r in rows))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(6.5 * max(1, len(modes)), 4.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for i, name in enumerate(models):
            for compile_mode, style in (('cudagraphs', ':'), ('compiled', '-'), ('eager', '--')):
                pts = sorted((r['res'], r['img_s']) for r in rows if r['model'] == name and r['mode'] == mode
                             and r['compile'] == compile_mode and r.get('img_s'))
                if pts:
                    ax.plot(*zip(*pts), style, marker='o', color=colors[i % len(colors)],
                            label=f'{name} ({compile_mode})')
        res = sorted({r['res'] for r in rows})
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xticks(res)
        ax.set_xticklabels([str(r) for r in res])
        ax.set_xlabel('resolution (px)')
        ax.set_ylabel('images / s')
        ax.set_title(f'{"inference" if mode == "infer" else "training"}{" - " + title if title else ""}')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def benchmark_models(
        models: Sequence[str],
        device: str = 'cuda',
        resolutions: Optional[Sequence[int]] = None,
        modes: Sequence[str] = ('infer', 'train'),
        compile_modes: Optional[Sequence[str]] = None,
        compile_res_infer: Optional[Sequence[int]] = None,
        compile_res_train: Optional[Sequence[int]] = None,
        compile_all: bool = False,
        batch_pixels: Optional[int] = None,
        batch_size: Optional[int] = None,
        amp_dtype: Optional[torch.dtype] = None,
        no_amp: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        warmup: Optional[int] = None,
        min_iters: Optional[int] = None,
        max_iters: Optional[int] = None,
        max_time: Optional[float] = None,
        channels_last: bool = False,
        output_dir: str = 'output/benchmark',
        name: str = 'models',
        pairs: bool = False,
) -> Dict[str, Any]:
    """Runs the model benchmark, prints the table, writes `<name>.csv`, `.json` and `.png` into `output_dir`.

    Every argument left None takes the device's default (`GPU_DEFAULTS` / `CPU_DEFAULTS`). `compile_modes` are
    `COMPILE_SETTINGS`; compiled runs ('compiled', 'cudagraphs') happen only at `compile_res_infer` /
    `compile_res_train` (every resolution with `compile_all`), with `dynamic=False`. Under 'cudagraphs' the activation
    memory is not reported (the graphs' pool is allocated before the timed steps).
    Returns `{'meta': ..., 'rows': [...]}` as written to the JSON file.
    """
    refs = reference_models(models, pairs)  # before any run: a bad pairing or setting fails at once
    dev = torch.device(device)
    d = GPU_DEFAULTS if dev.type == 'cuda' else CPU_DEFAULTS
    resolutions = list(resolutions or d['resolutions'])
    compile_modes = list(compile_modes or d['compile_modes'])
    check_compile_settings(compile_modes, dev)
    compile_res_infer = None if compile_all else (d['compile_res_infer'] if compile_res_infer is None
                                                  else compile_res_infer)
    compile_res_train = None if compile_all else (d['compile_res_train'] if compile_res_train is None
                                                  else compile_res_train)
    batch_pixels = batch_pixels or d['batch_pixels']
    amp_dtype = None if no_amp else (amp_dtype or d['amp_dtype'])
    timing = dict(
        warmup=d['warmup'] if warmup is None else warmup,
        min_iters=min_iters or d['min_iters'],
        max_iters=max_iters or d['max_iters'],
        max_time=d['max_time'] if max_time is None else max_time,
    )
    model_kwargs = dict(model_kwargs or {})
    if dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    meta = environment(dev)
    peak_dtype = amp_dtype or torch.float32
    meta.update(measure_matmul_peak(dev, peak_dtype, warmup=timing['warmup'], max_time=timing['max_time']))
    meta.update(
        models=list(models), resolutions=resolutions, modes=list(modes), compile_modes=compile_modes,
        compile_res_infer=None if compile_res_infer is None else list(compile_res_infer),
        compile_res_train=None if compile_res_train is None else list(compile_res_train),
        batch_pixels=batch_pixels, batch_size=batch_size, amp_dtype=str(amp_dtype).replace('torch.', ''),
        model_kwargs=model_kwargs, ratio_refs=refs, timing=timing, scan_fwd_ops=SCAN_FWD_OPS,
        scan_bwd_ops=SCAN_BWD_OPS,
    )
    print(f'{meta["device"]}: torch {meta["torch"]}, timm {meta["timm"]}, triton {meta["triton"]}; '
          f'{meta["matmul_dtype"]} matmul peak {meta["matmul_tflops"]:.2f} TFLOP/s (measured)', flush=True)

    rows: List[Dict[str, Any]] = []
    flops_cache: Dict = {}
    for res in resolutions:
        batch = batch_for(res, batch_pixels, batch_size)
        for mode in modes:
            for compile_mode in compile_modes:
                if not _runs_at(compile_mode, mode, res, compile_res_infer, compile_res_train):
                    continue
                for model_name in models:
                    t0 = time.perf_counter()
                    row = _run_one(model_name, res, mode, compile_mode, batch, dev, amp_dtype, model_kwargs,
                                   flops_cache, timing, channels_last)
                    if row.get('tflops') is not None:
                        row['pct_peak'] = 100 * row['tflops'] / meta['matmul_tflops']
                    rows.append(row)
                    img_s = f'{row["img_s"]:.1f} img/s' if row.get('img_s') else row['status']
                    print(f'  {model_name} {mode} {compile_mode} res {res} batch {batch}: {img_s} '
                          f'({time.perf_counter() - t0:.1f} s)', flush=True)

    add_ratios(rows, refs)
    order = {m: i for i, m in enumerate(models)}
    rows.sort(key=lambda r: (modes.index(r['mode']), compile_modes.index(r['compile']), r['res'], order[r['model']]))
    print()
    print(format_table(rows, MODEL_COLUMNS))
    ref_text = ', '.join(f'{r} / {m}' for m, r in refs.items())
    print(f'ref/this: {ref_text} (same mode, compile and resolution). act MB/img: '
          f'(peak - allocated before the timed steps) / batch. GFLOP/img: FlopCounterMode; scan GOP/img: '
          f'{SCAN_FWD_OPS} (+{SCAN_BWD_OPS} backward) ops per (B, N, C) scan element, not in TFLOP/s.')

    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(output_dir, name)
    write_csv(base + '.csv', rows)
    write_json(base + '.json', meta, rows)
    files = [base + '.csv', base + '.json']
    if plot_models(rows, base + '.png', title=meta['device']):
        files.append(base + '.png')
    print('wrote ' + ', '.join(files))
    return {'meta': meta, 'rows': rows}

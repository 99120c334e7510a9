"""ONNX benchmark: each model exported as `python -m hgrn_vision.export --onnx` writes it (random-init weights), then
onnxruntime on the CPU against PyTorch's CPU path on the same batches, rounds alternated, images/s side by side;
and onnxruntime's logits against PyTorch's at further image sizes (`check_sizes`), far past the exported one."""
import os
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch

from .utils import Column, environment, format_table, time_fn, write_csv, write_json

__all__ = ['benchmark_onnx', 'ONNX_COLUMNS']

ONNX_COLUMNS: List[Column] = [
    ('model', 'model', ''),
    ('res', 'res', ''),
    ('batch', 'batch', ''),
    ('torch_img_s', 'PyTorch img/s', '.2f'),
    ('ort_img_s', 'onnxruntime img/s', '.2f'),
    ('ratio', 'ort/torch', '.2f'),
    ('max_rel_diff', 'max |diff| / max |logit|', '.1e'),
]


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|; NaN anywhere gives NaN."""
    return ((out - ref).abs().max() / ref.abs().max()).item()


def benchmark_onnx(
        models: Sequence[str],
        model_kwargs: Optional[Dict[str, Any]] = None,
        res: int = 224,
        batch_sizes: Sequence[int] = (1, 16),
        check_sizes: Sequence[Tuple[int, int]] = ((2048, 2048),),
        rounds: int = 3,
        warmup: int = 2,
        min_iters: int = 3,
        max_iters: int = 50,
        max_time: float = 2.0,
        output_dir: str = 'output/benchmark',
        name: str = 'onnx',
) -> Dict[str, Any]:
    import onnx
    import onnxruntime
    import onnxscript

    from hgrn_vision.export import export_onnx

    dev = torch.device('cpu')
    threads = torch.get_num_threads()
    timing = dict(warmup=warmup, min_iters=min_iters, max_iters=max_iters, max_time=max_time)
    meta = environment(dev)
    meta.update(onnxruntime=onnxruntime.__version__, onnx=onnx.__version__, onnxscript=onnxscript.__version__,
                models=list(models), model_kwargs=dict(model_kwargs or {}), res=res, batch_sizes=list(batch_sizes),
                check_sizes=[list(s) for s in check_sizes], rounds=rounds, timing=timing)
    print(f'{meta["device"]}: torch {meta["torch"]}, onnxruntime {meta["onnxruntime"]}, {threads} threads', flush=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1  # as many threads as PyTorch's
    rows: List[Dict[str, Any]] = []
    checks: List[Dict[str, Any]] = []
    for model_name in models:
        torch.manual_seed(0)
        model = timm.create_model(model_name, img_size=res, **(model_kwargs or {})).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'model.onnx')
            t0 = time.perf_counter()
            export_onnx(model, path)
            export_s = time.perf_counter() - t0
            session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        print(f'  {model_name}: exported in {export_s:.0f} s', flush=True)
        for batch in batch_sizes:
            x = torch.randn(batch, 3, res, res)
            feed = {'input0': x.numpy()}
            with torch.inference_mode():
                ref = model(x)
                diff = _rel_diff(torch.from_numpy(session.run(None, feed)[0]), ref)
                best = {'torch': float('inf'), 'ort': float('inf')}
                for _ in range(rounds):  # alternated, the best round's median of each
                    for key, fn in (('torch', lambda: model(x)), ('ort', lambda: session.run(None, feed))):
                        times = sorted(time_fn(fn, dev, **timing))
                        best[key] = min(best[key], times[len(times) // 2])
            row = dict(model=model_name, res=res, batch=batch, torch_img_s=1e3 * batch / best['torch'],
                       ort_img_s=1e3 * batch / best['ort'], max_rel_diff=diff, export_s=export_s)
            row['ratio'] = row['ort_img_s'] / row['torch_img_s']
            rows.append(row)
            print(f'  {model_name} batch {batch}: PyTorch {row["torch_img_s"]:.2f}, onnxruntime '
                  f'{row["ort_img_s"]:.2f} img/s', flush=True)
        for h, w in check_sizes:
            x = torch.randn(1, 3, h, w)
            with torch.inference_mode():
                diff = _rel_diff(torch.from_numpy(session.run(None, {'input0': x.numpy()})[0]), model(x))
            checks.append(dict(model=model_name, height=h, width=w, max_rel_diff=diff))
            print(f'  {model_name} at {h} x {w}: max |diff| / max |logit| {diff:.1e}', flush=True)
    print()
    print(format_table(rows, ONNX_COLUMNS))
    if checks:
        print()
        print(format_table(checks, [('model', 'model', ''), ('height', 'height', ''), ('width', 'width', ''),
                                    ('max_rel_diff', 'max |diff| / max |logit|', '.1e')]))
    os.makedirs(output_dir, exist_ok=True)
    base = os.path.join(output_dir, name)
    write_csv(base + '.csv', rows)
    write_json(base + '.json', meta, rows, checks=checks)
    print(f'wrote {base}.csv, {base}.json')
    return {'meta': meta, 'rows': rows, 'checks': checks}

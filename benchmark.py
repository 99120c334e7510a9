#!/usr/bin/env python3
"""Benchmarks for hgrn_vision: whole timm models side by side, and the bidirectional HGRU scan kernels.

    python benchmark.py models --models hgrn_deit_small deit_small_patch16_224
    python benchmark.py scan --check
    python benchmark.py models --device cpu --models hgrn_deit_tiny deit_tiny_patch16_224 --model-kwargs depth=2
    python benchmark.py profile --models hgrn_deit_small deit_small_patch16_224
    python benchmark.py onnx --models hgrn_deit_tiny hgrn_deit_small --threads 2 --flush-denormal

Two trees of this package side by side (before and after a change, alternated in one run on one machine):
`PYTHONPATH=. python scripts/compare_trees.py BEFORE_TREE AFTER_TREE -- <benchmark.py models arguments>`.
The logic lives in `hgrn_vision.benchmark`; this script parses arguments and wires them through.
"""
import argparse
from typing import List, Optional, Tuple

import torch
from timm.utils import ParseKwargs

import hgrn_vision  # noqa: F401  (registers the hgrn_deit entries with timm)
from hgrn_vision.benchmark import benchmark_models, benchmark_onnx, benchmark_scan, parse_dtype, profile_models
from hgrn_vision.benchmark.models import COMPILE_SETTINGS, check_compile_settings, reference_models
from hgrn_vision.benchmark.scan import scan_impls


def _shape(text: str) -> Tuple[int, int, int]:
    try:
        B, N, C = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'shape {text!r} is not BxNxC, e.g. 256x256x384')
    return B, N, C


def _size(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'image size {text!r} is not HxW, e.g. 2048x2048')
    return h, w


def _add_cpu(p: argparse.ArgumentParser) -> None:
    p.add_argument('--threads', type=int, default=None, help="CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument('--flush-denormal', action='store_true',
                   help='denormal floats as zero on the CPU, as train.py sets there (the gates multiply down to '
                        'denormals, which slow some CPUs)')


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cuda, cuda:N or cpu (cpu: tiny defaults, eager only, few iterations)')
    _add_cpu(p)
    p.add_argument('--warmup', type=int, default=None, help='untimed calls before timing')
    p.add_argument('--min-iters', type=int, default=None, help='timed calls at least')
    p.add_argument('--max-iters', type=int, default=None, help='timed calls at most')
    p.add_argument('--max-time', type=float, default=None, help='stop timing after this many seconds (past min-iters)')
    p.add_argument('--output-dir', default='output/benchmark', help='where the CSV / JSON / PNG go')
    p.add_argument('--name', default=None, help='file name stem (default: the subcommand)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('models', help='images/s of timm models side by side (inference, training; eager, compiled)')
    p.add_argument('--models', nargs='+', default=['hgrn_deit_small', 'deit_small_patch16_224'],
                   help='timm model names; ratios are the first model over each other (see --pairs)')
    p.add_argument('--pairs', action='store_true',
                   help="--models are (model, baseline) pairs: ratios are each pair's first over its second")
    p.add_argument('--resolutions', nargs='+', type=int, default=None, help='default 224 384 512 768 1024')
    p.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'])
    p.add_argument('--compile', nargs='+', choices=COMPILE_SETTINGS, default=None, dest='compile_modes',
                   help="default eager and compiled on CUDA, eager on the CPU; cudagraphs: torch.compile's "
                        "mode='reduce-overhead' (CUDA graphs, CUDA only)")
    p.add_argument('--compile-res-infer', nargs='*', type=int, default=None,
                   help='resolutions at which compiled inference runs (default 224 1024)')
    p.add_argument('--compile-res-train', nargs='*', type=int, default=None,
                   help='resolutions at which compiled training runs (default 224)')
    p.add_argument('--compile-all', action='store_true', help='compiled runs at every resolution (slow)')
    p.add_argument('--batch-pixels', type=int, default=None,
                   help='batch = batch-pixels // res^2 (default 256 * 224^2: 256 images at 224, 12 at 1024)')
    p.add_argument('--batch-size', type=int, default=None, help='one fixed batch at every resolution')
    p.add_argument('--amp-dtype', choices=('bf16', 'fp16'), default=None, help='autocast dtype (default bf16 on CUDA)')
    p.add_argument('--no-amp', action='store_true', help='no autocast (float32)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='key=value passed to every timm.create_model, e.g. depth=2')
    p.add_argument('--channels-last', action='store_true')
    _add_common(p)

    p = sub.add_parser('scan', help='bihgru_scan implementations and the mixer op: kernel ms (CUDA graphs), host ms, '
                                    'GB/s over the byte floor, %% of copy bandwidth')
    p.add_argument('--shapes', nargs='+', type=_shape, default=None,
                   help='BxNxC (default 256x256x192 256x256x384 64x1024x384 16x5329x384 1x256x192)')
    p.add_argument('--dtypes', nargs='+', default=['bf16', 'fp32'], help='dtypes of u and z')
    p.add_argument('--impls', nargs='+', default=None,
                   help="default: every available impl but 'reference' (and 'cpu' off the CPU)")
    p.add_argument('--no-torch', action='store_true', help="leave out the 'torch' impl")
    p.add_argument('--check', action='store_true',
                   help="also compare every impl with the 'torch' impl in float64 (output and five gradients)")
    p.add_argument('--ops', nargs='+', choices=('scan', 'mixer'), default=['scan', 'mixer'],
                   help='the scan alone, and the whole mixer op between the projections (LayerNorm(scan) * silu(g))')
    p.add_argument('--seed', type=int, default=0)
    _add_common(p)

    p = sub.add_parser('profile', help='torch.profiler over a few steps: time per kind of work (matmul, scan, ...)')
    p.add_argument('--models', nargs='+', default=['hgrn_deit_small', 'deit_small_patch16_224'])
    p.add_argument('--res', type=int, default=None, help='resolution (default 224; cpu 32)')
    p.add_argument('--batch-size', type=int, default=None, help='default 256 (cpu 2)')
    p.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'])
    p.add_argument('--compile', nargs='+', choices=('eager', 'compiled'), default=None, dest='compile_modes',
                   help='default compiled on CUDA, eager on the CPU')
    p.add_argument('--amp-dtype', choices=('bf16', 'fp16'), default='bf16', help='autocast dtype on CUDA')
    p.add_argument('--no-amp', action='store_true', help='no autocast (float32; always so on the CPU)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='key=value passed to every timm.create_model, e.g. depth=2')
    p.add_argument('--steps', type=int, default=5, help='profiled steps (after 3 untimed ones)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--output-dir', default='output/benchmark', help='where the CSV / JSON go')
    p.add_argument('--name', default=None, help='file name stem (default: the subcommand)')
    _add_cpu(p)

    p = sub.add_parser('onnx', help='onnxruntime against PyTorch on the CPU: images/s side by side, and the logits at '
                                    'other image sizes')
    p.add_argument('--models', nargs='+', default=['hgrn_deit_tiny', 'hgrn_deit_small'])
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='key=value passed to every timm.create_model, e.g. depth=2')
    p.add_argument('--res', type=int, default=224, help='image size of the timed batches and of the export')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 16])
    p.add_argument('--check-sizes', nargs='*', type=_size, default=[(2048, 2048)],
                   help='further image sizes HxW at which the logits are compared (default 2048x2048)')
    p.add_argument('--rounds', type=int, default=3, help='alternated rounds of PyTorch and onnxruntime (best kept)')
    p.add_argument('--max-time', type=float, default=2.0, help='seconds per timing (past 3 calls)')
    p.add_argument('--output-dir', default='output/benchmark', help='where the CSV / JSON go')
    p.add_argument('--name', default=None, help='file name stem (default: the subcommand)')
    _add_cpu(p)
    return parser


def main(argv: Optional[List[str]] = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == 'models':
        try:
            reference_models(args.models, args.pairs)  # a bad pairing is a usage error, before anything runs
            check_compile_settings(args.compile_modes or (), args.device)
        except ValueError as e:
            parser.error(str(e))
    name = args.name or args.command
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if args.command == 'onnx':
        return benchmark_onnx(args.models, model_kwargs=args.model_kwargs, res=args.res, batch_sizes=args.batch_sizes,
                              check_sizes=args.check_sizes, rounds=args.rounds, max_time=args.max_time,
                              output_dir=args.output_dir, name=name)
    if args.command == 'models':
        return benchmark_models(
            args.models,
            device=args.device,
            resolutions=args.resolutions,
            modes=args.modes,
            compile_modes=args.compile_modes,
            compile_res_infer=args.compile_res_infer,
            compile_res_train=args.compile_res_train,
            compile_all=args.compile_all,
            batch_pixels=args.batch_pixels,
            batch_size=args.batch_size,
            amp_dtype=parse_dtype(args.amp_dtype) if args.amp_dtype else None,
            no_amp=args.no_amp,
            model_kwargs=args.model_kwargs,
            warmup=args.warmup,
            min_iters=args.min_iters,
            max_iters=args.max_iters,
            max_time=args.max_time,
            channels_last=args.channels_last,
            pairs=args.pairs,
            output_dir=args.output_dir,
            name=name,
        )
    if args.command == 'profile':
        cpu = args.device == 'cpu'
        return profile_models(
            args.models,
            device=args.device,
            res=args.res or (32 if cpu else 224),
            batch=args.batch_size or (2 if cpu else 256),
            modes=args.modes,
            compile_modes=args.compile_modes or (['eager'] if cpu else ['compiled']),
            amp_dtype=None if (cpu or args.no_amp) else parse_dtype(args.amp_dtype),
            model_kwargs=args.model_kwargs,
            steps=args.steps,
            output_dir=args.output_dir,
            name=name,
        )
    timing_keys = ('warmup', 'min_iters', 'max_iters', 'max_time')
    timing = {k: getattr(args, k) for k in timing_keys if getattr(args, k) is not None}
    impls = args.impls
    if args.no_torch:
        impls = [i for i in (impls or scan_impls()) if i not in ('torch', 'reference')]
    return benchmark_scan(
        device=args.device,
        shapes=args.shapes,
        dtypes=[parse_dtype(d) for d in args.dtypes],
        impls=impls,
        check=args.check,
        timing=timing,
        output_dir=args.output_dir,
        name=name,
        seed=args.seed,
        ops=args.ops,
    )


if __name__ == '__main__':
    main()

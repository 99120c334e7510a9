"""The evaluation behind `validate.py`: top-1 / top-5 / loss of a model or a `train.py` checkpoint, as timm's
`--result` JSON, which names the model and its kwargs. EMA weights are preferred when the checkpoint has them
(`--no-ema` for the raw ones); model name, kwargs, classes, channels and normalisation default to the values the
checkpoint was trained with, and a `--model` / `--model-kwargs` that names another model is refused.
"""
import argparse
import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import resolve_data_config

from .args import UserError, parse_args, validate_parser
from .checkpoint import EMA_KEYS, load_checkpoint_file, load_trained_weights, saved_train_args, trained_model_name
from .data import build_dataset, create_eval_loader, dataset_classes
from .engine import evaluate
from .trainer import compile_model, create_train_model, setup_device

__all__ = ['validate', 'main']

_logger = logging.getLogger('validate')

# flags a checkpoint's saved args fill in when not given on the command line
_FROM_CHECKPOINT = ('model', 'model_kwargs', 'num_classes', 'in_chans', 'mean', 'std', 'crop_pct', 'interpolation',
                    'img_size', 'input_size', 'dataset', 'input_img_mode')


def validate(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate as configured by `args` (the `validate.py` flags); returns timm's result dict."""
    device = setup_device(args)
    ckpt: Optional[Dict[str, Any]] = None
    if args.checkpoint:
        ckpt = load_checkpoint_file(args.checkpoint)
        saved = saved_train_args(ckpt)
        defaults = validate_parser().parse_args([])
        _check_model_agrees(args, defaults, trained_model_name(ckpt), saved.get('model_kwargs'))
        for key in _FROM_CHECKPOINT:
            if key in saved and getattr(args, key) == getattr(defaults, key):
                setattr(args, key, saved[key])
        if not args.model and isinstance(ckpt.get('arch'), str):
            args.model = ckpt['arch']
    if args.img_size is not None and args.input_size is not None:
        args.input_size = [args.input_size[0], args.img_size, args.img_size]  # test-time resolution override

    dataset = build_dataset(
        args.dataset, args.data_dir, args.split, is_training=False, download=args.dataset_download,
        batch_size=args.batch_size, input_img_mode=args.input_img_mode, input_key=args.input_key,
        target_key=args.target_key)
    num_classes = args.num_classes or dataset_classes(dataset) or 1000
    img_size = args.img_size
    args.img_size = None  # the model takes any size: build it as trained, evaluate at the requested size
    model = create_train_model(args, num_classes, pretrained=args.pretrained)
    args.img_size = img_size
    use_ema = False
    if ckpt is not None:
        key = load_trained_weights(model, ckpt, args.checkpoint, args.model, use_ema=args.use_ema is not False,
                                   ema_flag='--use-ema' if args.use_ema else None)  # e.g. the authors' layout
        use_ema = key in EMA_KEYS
        _logger.info(f'Loaded {"EMA" if use_ema else "raw"} weights ({key or "bare state dict"}) from '
                     f'{args.checkpoint}, epoch {ckpt.get("epoch", "?")}')
    param_count = sum(p.numel() for p in model.parameters())
    data_config = resolve_data_config(vars(args), model=model, use_test_size=True, verbose=True)
    model = model.to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    eval_model = compile_model(model, args)
    if args.grad_checkpointing:
        _logger.info('--grad-checkpointing has no effect in evaluation')
    loader = create_eval_loader(dataset, data_config, args, device)
    metrics = evaluate(
        eval_model, loader, nn.CrossEntropyLoss().to(device), device, amp=args.amp, amp_dtype=args.amp_dtype,
        log_interval=args.log_freq, num_batches=args.num_batches, channels_last=args.channels_last)
    top1, top5 = metrics['top1'], metrics['top5']
    results = OrderedDict(
        model=args.model,
        model_kwargs=dict(args.model_kwargs or {}),
        top1=round(top1, 4), top1_err=round(100 - top1, 4),
        top5=round(top5, 4), top5_err=round(100 - top5, 4),
        loss=round(metrics['loss'], 5),
        param_count=round(param_count / 1e6, 2),
        img_size=data_config['input_size'][-1],
        crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'],
        samples=int(metrics['samples']),
        samples_per_sec=round(metrics['img_per_sec'], 2),
        ema=use_ema,
        checkpoint=args.checkpoint or None,
        amp=args.amp_dtype if args.amp else None,
    )
    _logger.info(' * Acc@1 {:.3f} ({:.3f}) Acc@5 {:.3f} ({:.3f})'.format(
        results['top1'], results['top1_err'], results['top5'], results['top5_err']))
    return results


def _describe(name: str, kwargs: Optional[Dict[str, Any]]) -> str:
    if not kwargs:
        return name
    return f'{name} with model_kwargs {{' + ', '.join(f'{k}: {v}' for k, v in kwargs.items()) + '}'


def _check_model_agrees(
        args: argparse.Namespace,
        defaults: argparse.Namespace,
        trained: Any,
        trained_kwargs: Optional[Dict[str, Any]],
) -> None:
    """Refuse a `--model` / `--model-kwargs` (flag or config file) that names another model than the checkpoint's.

    `--model` alone means that model as registered, without kwargs; `--model-kwargs` alone, the checkpoint's model
    with those kwargs. Kwargs are compared where the checkpoint saved them.
    """
    name, kwargs = args.model or trained, dict(args.model_kwargs or {})
    given = {}
    if args.model != defaults.model:
        given['--model'] = args.model
    if kwargs != defaults.model_kwargs:
        given['--model-kwargs'] = ' '.join(f'{k}={v}' for k, v in kwargs.items())
    if not given or not isinstance(trained, str):
        return
    if name == trained and (trained_kwargs is None or kwargs == trained_kwargs):
        return
    raise UserError(
        ' '.join(f'{flag} {value}' for flag, value in given.items()) +
        f' disagrees with checkpoint {args.checkpoint!r}, trained as {_describe(trained, trained_kwargs)}: drop '
        f'{" and ".join(given)} to evaluate the checkpoint\'s own model, or pass a checkpoint of '
        f'{_describe(name, kwargs)}.')


def write_results(results: Dict[str, Any], results_file: str = '') -> None:
    """Print timm's `--result` block; also write the JSON to `results_file` (atomically) when given."""
    text = json.dumps(results, indent=4)
    print(f'--result\n{text}', flush=True)
    if results_file:
        os.makedirs(os.path.dirname(os.path.abspath(results_file)), exist_ok=True)
        tmp = results_file + '.tmp'
        with open(tmp, 'w') as f:
            f.write(text + '\n')
        os.replace(tmp, results_file)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from .cli import run_cli

    def _run():
        args = parse_args(validate_parser(), argv)
        results = validate(args)
        write_results(results, args.results_file)
        return results
    return run_cli(_run)

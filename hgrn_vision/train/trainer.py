"""The training run behind `train.py`: wiring of timm's data, optimizer, scheduler, EMA, AMP, DDP and checkpoints.

Order matters for two promises. Everything that can fail on bad input (config, data, model, checkpoints) is built
before the run folder is created, and a run that fails before its first checkpoint removes its folder again: a
folder either holds a loadable `last.pth.tar` or does not exist. And every piece of state that decides the next
epoch (weights, EMA, optimizer, loss scaler, scheduler, epoch, every rank's RNG) is saved after the evaluation, so
`--resume` continues exactly as if the run had not stopped.
"""
import argparse
import difflib
import logging
import os
import shutil
import time
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, distribute_bn, init_distributed_device, random_seed, update_summary
from torch.nn.parallel import DistributedDataParallel

from .args import UserError, args_to_yaml, parse_args, train_parser
from .checkpoint import (
    AtomicCheckpointSaver,
    get_rng_state,
    load_finetune_checkpoint,
    resume_training_state,
    set_rng_state,
)
from .data import build_dataset, create_eval_loader, dataset_classes
from .engine import evaluate, format_seconds, train_one_epoch
from .plot import plot_summary, trim_summary

__all__ = ['train', 'main', 'compile_model', 'create_train_model', 'setup_device']

_logger = logging.getLogger('train')


def setup_device(args: argparse.Namespace) -> torch.device:
    """timm's `init_distributed_device` (torchrun env: NCCL on GPUs, gloo on CPUs); cuda falls back to cpu."""
    if not args.device or (str(args.device).startswith('cuda') and not torch.cuda.is_available()):
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = init_distributed_device(args)
    if device.type == 'cpu':
        # The HGRU gates multiply to tiny numbers along the scan; denormal floats slow the CPU by 10x or more.
        torch.set_flush_denormal(True)
    return device


def check_model_name(name: Optional[str]) -> None:
    if not name:
        raise UserError('No model given: pass --model NAME (e.g. hgrn_deit_tiny) or --checkpoint of a train.py run.')
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else ''
        raise UserError(f'Unknown model {name!r}{hint}')


def create_train_model(args: argparse.Namespace, num_classes: int, pretrained: bool = False) -> nn.Module:
    """`timm.create_model` from the parsed flags, with errors that name the model and the bad kwarg."""
    check_model_name(args.model)
    kwargs: Dict[str, Any] = dict(args.model_kwargs or {})
    if args.in_chans is not None:
        kwargs.setdefault('in_chans', args.in_chans)
    img_size = args.input_size[-1] if args.input_size else args.img_size
    if img_size is not None:
        kwargs.setdefault('img_size', img_size)
    if getattr(args, 'drop_path', None) is not None:
        kwargs.setdefault('drop_path_rate', args.drop_path)
    if getattr(args, 'drop', 0.):
        kwargs.setdefault('drop_rate', args.drop)
    try:
        return timm.create_model(args.model, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise UserError(f'Cannot create model {args.model!r} with {kwargs}: {e}') from None


def compile_model(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """`torch.compile(model)` with --torchcompile's backend and --torchcompile-mode, or the model itself."""
    if not args.torchcompile:
        if args.torchcompile_mode:
            raise UserError(f'--torchcompile-mode {args.torchcompile_mode} needs --torchcompile.')
        return model
    return torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)


def _default_data_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(input_img_mode=args.input_img_mode, input_key=args.input_key, target_key=args.target_key)


def _run_dir(args: argparse.Namespace) -> str:
    if args.resume and not args.experiment and args.resume != 'auto':
        return os.path.dirname(os.path.abspath(args.resume))
    name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), args.model])
    return os.path.join(args.output, name)


def _gather_rng(args: argparse.Namespace) -> List[Dict[str, Any]]:
    state = get_rng_state()
    if not args.distributed:
        return [state]
    states: List[Any] = [None] * args.world_size
    dist.all_gather_object(states, state)
    return states


def _log_to_file(path: str) -> logging.Handler:
    root = logging.getLogger()
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    logging.getLogger().addHandler(handler)
    return handler


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run a training as configured by `args` (the `train.py` flags). Returns the best and last metrics."""
    device = setup_device(args)
    is_primary = args.rank == 0
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if args.distributed:
        _logger.info(f'Distributed: process {args.rank} of {args.world_size} on {device} '
                     f'({dist.get_backend()} backend)')
    if is_primary and args.resume and args.resume != 'auto' and not os.path.isfile(args.resume):
        raise UserError(f'Checkpoint {args.resume!r} given to --resume does not exist.')
    resume_path = args.resume
    if args.resume == 'auto':
        last = os.path.join(_run_dir(args), 'last.pth.tar')
        resume_path = last if os.path.isfile(last) else ''
        if not args.experiment:
            raise UserError('--resume auto needs --experiment NAME to find the run folder under --output.')

    # data first: it tells the number of classes, and a missing / empty dir fails before anything is written
    data_kwargs = _default_data_kwargs(args)
    dataset_train = build_dataset(
        args.dataset, args.data_dir, args.train_split, is_training=True, download=args.dataset_download,
        batch_size=args.batch_size, seed=args.seed, num_samples=args.train_num_samples, subset=args.train_subset,
        **data_kwargs)
    dataset_eval = build_dataset(
        args.dataset, args.data_dir, args.val_split, is_training=False, download=args.dataset_download,
        batch_size=args.batch_size, subset=args.val_subset, **data_kwargs)
    if args.num_classes is None:
        args.num_classes = dataset_classes(dataset_train) or 1000
        _logger.info(f'num_classes from the dataset: {args.num_classes}')

    random_seed(args.seed, 0)  # identical initial weights on every rank
    model = create_train_model(args, args.num_classes, pretrained=args.pretrained)
    if args.initial_checkpoint and not resume_path:
        load_finetune_checkpoint(model, args.initial_checkpoint, args.model)
    if is_primary:
        n_params = sum(p.numel() for p in model.parameters())
        _logger.info(f'Model {args.model} created, {n_params:,} parameters, {args.num_classes} classes')
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    data_config = resolve_data_config(vars(args), model=model, verbose=is_primary)
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    # DeiT: LR scaled linearly by the global batch / 512
    if args.lr is None:
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps
        ratio = global_batch / args.lr_base_size
        args.lr = args.lr_base * (ratio ** 0.5 if args.lr_base_scale == 'sqrt' else ratio)
        if is_primary:
            _logger.info(f'Learning rate {args.lr:.3g} = {args.lr_base:g} (lr_base) x {global_batch} (global batch) '
                         f'/ {args.lr_base_size} ({args.lr_base_scale})')
    opt_kwargs: Dict[str, Any] = {}
    if args.opt_eps is not None:
        opt_kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs['betas'] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        layer_decay=args.layer_decay, **opt_kwargs)

    loss_scaler = None
    if args.amp and args.amp_dtype == 'float16':
        loss_scaler = NativeScaler(device=device.type)
    if is_primary:
        _logger.info('AMP: ' + (f'torch.autocast {args.amp_dtype}' + (' + loss scaler' if loss_scaler else '')
                                if args.amp else 'off (float32)'))

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)

    train_model = compile_model(model, args)
    if args.distributed:
        train_model = DistributedDataParallel(
            train_model, device_ids=[device] if device.type == 'cuda' else None)

    pin_mem = args.pin_mem and device.type == 'cuda'
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats if args.distributed else 0,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=args.distributed, pin_memory=pin_mem, device=device,
        use_prefetcher=False, persistent_workers=False)
    loader_eval = create_eval_loader(dataset_eval, data_config, args, device, distributed=args.distributed)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
        train_loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    train_loss_fn, eval_loss_fn = train_loss_fn.to(device), nn.CrossEntropyLoss().to(device)

    if len(loader_train) == 0:
        raise UserError(f'The train split has {len(dataset_train)} samples per process, fewer than one batch of '
                        f'{args.batch_size} (training drops the last partial batch); lower --batch-size.')
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, warmup_prefix=args.warmup_prefix,
        cooldown_epochs=args.cooldown_epochs, step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch)

    start_epoch, rng_state, saver_state = 0, None, None
    if resume_path:
        ckpt = resume_training_state(
            resume_path, model, optimizer=None if args.no_resume_opt else optimizer, model_ema=model_ema,
            loss_scaler=loss_scaler, scheduler=lr_scheduler, model_name=args.model)
        start_epoch, rng_state, saver_state = ckpt['epoch'] + 1, ckpt.get('rng'), ckpt.get('saver')
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    # everything checked: the run folder may be made now
    run_dir, created, saver = _run_dir(args), False, None
    if is_primary:
        if os.path.isdir(run_dir) and os.listdir(run_dir) and not resume_path:
            raise UserError(f'Run folder {run_dir!r} exists and is not empty; pick another --experiment or '
                            f'continue it with --resume {os.path.join(run_dir, "last.pth.tar")}.')
        created = not os.path.isdir(run_dir)
        os.makedirs(run_dir, exist_ok=True)
    handler = None
    try:
        if is_primary:
            handler = _log_to_file(os.path.join(run_dir, 'log.txt'))
            with open(os.path.join(run_dir, 'args.yaml.tmp'), 'w') as f:
                f.write(args_to_yaml(args, train_parser()))
            os.replace(os.path.join(run_dir, 'args.yaml.tmp'), os.path.join(run_dir, 'args.yaml'))
            _logger.info(f'Run folder {run_dir} (resolved config in args.yaml)')
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, model_ema=model_ema, amp_scaler=loss_scaler,
            checkpoint_dir=run_dir, recovery_dir=run_dir, decreasing=args.eval_metric.endswith('loss'),
            max_history=args.checkpoint_hist, scheduler=lr_scheduler,
            extra_state_fn=lambda: {'rng': _gather_rng(args)})
        if saver_state and is_primary:
            saver.load_history(saver_state)
        summary_csv = os.path.join(run_dir, 'summary.csv')
        if is_primary:
            trim_summary(summary_csv, start_epoch)
        if rng_state is not None:
            set_rng_state(rng_state[args.rank] if len(rng_state) == args.world_size else rng_state[0])
        else:
            random_seed(args.seed, args.rank)
        if is_primary:
            _logger.info(f'Training {num_epochs - start_epoch} epochs ({start_epoch} -> {num_epochs}), '
                         f'{updates_per_epoch} updates of {args.batch_size} x {args.world_size} images each')
        result = _train_loop(
            args, train_model, model, model_ema, loader_train, loader_eval, optimizer, lr_scheduler,
            loss_scaler, mixup_fn, train_loss_fn, eval_loss_fn, device, start_epoch, num_epochs,
            updates_per_epoch, saver if is_primary else None, summary_csv, is_primary)
        if is_primary and not args.no_plot:
            plot_summary(summary_csv, os.path.join(run_dir, 'summary.png'))
        result.update(run_dir=run_dir, model=model, model_ema=model_ema)
        return result
    except BaseException:
        if is_primary and created and not os.path.exists(os.path.join(run_dir, 'last.pth.tar')):
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
                handler = None
            shutil.rmtree(run_dir, ignore_errors=True)
            _logger.error(f'Run failed before its first checkpoint: removed {run_dir}')
        raise
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _train_loop(
        args, train_model, model, model_ema, loader_train, loader_eval, optimizer, lr_scheduler, loss_scaler,
        mixup_fn, train_loss_fn, eval_loss_fn, device, start_epoch, num_epochs, updates_per_epoch, saver,
        summary_csv, is_primary,
) -> Dict[str, Any]:
    best_metric, best_epoch, eval_metrics = None, None, {}
    run_start = time.time()
    total_updates = (num_epochs - start_epoch) * updates_per_epoch
    eval_kw = dict(
        device=device, amp=args.amp, amp_dtype=args.amp_dtype, distributed=args.distributed,
        world_size=args.world_size, channels_last=args.channels_last)
    end_epoch = num_epochs if args.stop_epoch is None else min(num_epochs, args.stop_epoch)
    for epoch in range(start_epoch, end_epoch):
        if args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(
            epoch, train_model, loader_train, optimizer, train_loss_fn, args, device, lr_scheduler=lr_scheduler,
            loss_scaler=loss_scaler, model_ema=model_ema, mixup_fn=mixup_fn,
            num_updates_total=total_updates + start_epoch * updates_per_epoch, run_start=run_start, saver=saver,
            is_primary=is_primary)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = evaluate(train_model, loader_eval, eval_loss_fn, **eval_kw)
        eval_metrics.pop('samples')
        if model_ema is not None:
            ema_metrics = evaluate(model_ema, loader_eval, eval_loss_fn, **eval_kw)
            eval_metrics.update((f'ema_{k}', v) for k, v in ema_metrics.items() if k != 'samples')
        if is_primary:
            ema_str = (f'  EMA top-1 {eval_metrics["ema_top1"]:.2f}  loss {eval_metrics["ema_loss"]:.4f}'
                       if model_ema is not None else '')
            elapsed = time.time() - run_start
            eta = elapsed / (epoch + 1 - start_epoch) * (num_epochs - epoch - 1)
            _logger.info(
                f'Epoch {epoch}: train loss {train_metrics["loss"]:.4f}  eval top-1 {eval_metrics["top1"]:.2f}'
                f'  top-5 {eval_metrics["top5"]:.2f}  loss {eval_metrics["loss"]:.4f}{ema_str}'
                f'  ({train_metrics["img_per_sec"]:.0f} img/s train, elapsed {format_seconds(elapsed)},'
                f' ETA {format_seconds(eta)})')
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
        if is_primary:
            update_summary(
                epoch, train_metrics, eval_metrics, filename=summary_csv, lr=train_metrics['lr'],
                write_header=not os.path.exists(summary_csv) or os.path.getsize(summary_csv) == 0)
        metric = eval_metrics.get(args.eval_metric)
        if eval_metrics and metric is None:
            raise UserError(f'--eval-metric {args.eval_metric!r} is not one of {sorted(eval_metrics)}.')
        # every rank takes part in gathering the RNG states for the checkpoint
        if saver is not None:
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=metric)
        elif args.distributed:
            _gather_rng(args)
    if is_primary and best_metric is not None:
        _logger.info(f'*** Best {args.eval_metric}: {best_metric:.4f} (epoch {best_epoch})')
    return {'best_metric': best_metric, 'best_epoch': best_epoch, 'eval': dict(eval_metrics)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from .cli import run_cli
    return run_cli(lambda: train(parse_args(train_parser(), argv)))

"""One training epoch and one evaluation pass, with per-interval log lines or a progress bar."""
import logging
import math
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, reduce_tensor

__all__ = ['train_one_epoch', 'evaluate', 'autocast_context', 'format_seconds']

_logger = logging.getLogger(__name__)


def autocast_context(device: torch.device, amp: bool, amp_dtype: str):
    if not amp:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, amp_dtype))


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    return f'{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}'


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader: Any,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        args: Any,
        device: torch.device,
        lr_scheduler: Any = None,
        loss_scaler: Any = None,
        model_ema: Optional[nn.Module] = None,
        mixup_fn: Optional[Callable] = None,
        num_updates_total: Optional[int] = None,
        run_start: Optional[float] = None,
        saver: Any = None,
        is_primary: bool = True,
) -> Dict[str, float]:
    """Train for one epoch; returns {'loss', 'lr', 'img_per_sec'} (loss averaged over this rank's batches)."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch and mixup_fn is not None:
        mixup_fn.mixup_enabled = False
    second_order = getattr(optimizer, 'is_second_order', False)
    accum = args.grad_accum_steps
    batch_time_m, data_time_m, losses_m = AverageMeter(), AverageMeter(), AverageMeter()
    model.train()

    n_batches = len(loader)
    updates_per_epoch = (n_batches + accum - 1) // accum
    num_updates = epoch * updates_per_epoch
    last_idx = n_batches - 1
    bar = _progress_bar(n_batches, f'epoch {epoch}', is_primary and not args.no_progress)
    samples = 0
    epoch_start = end = time.time()
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_idx
        need_update = last_batch or (batch_idx + 1) % accum == 0
        input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        data_time_m.update(time.time() - end)

        sync = nullcontext() if need_update or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            if args.torchcompile_mode == 'reduce-overhead':
                torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs are done
            with autocast_context(device, args.amp, args.amp_dtype):
                output = model(input)
                loss = loss_fn(output, target)
            if accum > 1:
                loss = loss / accum
            if loss_scaler is not None:
                loss_scaler(
                    loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                    parameters=model.parameters(), create_graph=second_order, need_update=need_update)
            else:
                loss.backward(create_graph=second_order)
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        loss_value = loss.item() * accum
        if not math.isfinite(loss_value):
            raise FloatingPointError(f'Loss is {loss_value} at epoch {epoch} batch {batch_idx}; lower the LR, '
                                     f'enable --clip-grad or use --amp-dtype bfloat16.')
        losses_m.update(loss_value, input.size(0))
        samples += input.size(0)
        if not need_update:
            continue
        num_updates += 1
        optimizer.zero_grad()
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        if device.type == 'cuda' and (last_batch or (batch_idx + 1) % args.log_interval == 0):
            torch.cuda.synchronize()
        batch_time_m.update(time.time() - end)
        end = time.time()

        lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)
        if bar is not None:
            bar.update(batch_idx + 1 - bar.n)
            bar.set_postfix(loss=f'{losses_m.avg:.3f}', lr=f'{lr:.2e}', refresh=False)
        elif is_primary and (last_batch or batch_idx % args.log_interval == 0):
            world = getattr(args, 'world_size', 1)
            rate = input.size(0) * accum * world / max(batch_time_m.val, 1e-9)
            rate_avg = input.size(0) * accum * world / max(batch_time_m.avg, 1e-9)
            eta_epoch = (last_idx - batch_idx) * batch_time_m.avg / accum
            eta_run = ''
            if num_updates_total and run_start is not None:
                eta_run = f'  ETA run {format_seconds(batch_time_m.avg * (num_updates_total - num_updates))}'
            pct = 100. * batch_idx / last_idx if last_idx else 100.
            _logger.info(
                f'Train: {epoch} [{batch_idx:>4d}/{n_batches} ({pct:>3.0f}%)]'
                f'  Loss: {losses_m.val:#.3g} ({losses_m.avg:#.3g})'
                f'  LR: {lr:.3e}'
                f'  {rate:>7.1f} img/s ({rate_avg:>7.1f})'
                f'  Time: {batch_time_m.val:.3f}s  Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})'
                f'  ETA epoch {format_seconds(eta_epoch)}{eta_run}')
        if saver is not None and args.recovery_interval and (batch_idx + 1) % args.recovery_interval == 0:
            saver.save_recovery(epoch, batch_idx=batch_idx)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)
    if bar is not None:
        bar.close()
    elapsed = time.time() - epoch_start
    loss_avg = losses_m.avg
    if getattr(args, 'distributed', False):
        loss_avg = reduce_tensor(torch.tensor(loss_avg, device=device), args.world_size).item()
    lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)
    world = getattr(args, 'world_size', 1)
    return OrderedDict([('loss', loss_avg), ('lr', lr), ('img_per_sec', samples * world / max(elapsed, 1e-9))])


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Any,
        loss_fn: nn.Module,
        device: torch.device,
        amp: bool = False,
        amp_dtype: str = 'bfloat16',
        distributed: bool = False,
        world_size: int = 1,
        log_interval: int = 0,
        num_batches: Optional[int] = None,
        log_prefix: str = 'Test',
        channels_last: bool = False,
) -> Dict[str, float]:
    """Top-1 / top-5 (%) and loss over the loader (averaged across ranks when distributed), and img/s."""
    batch_time_m, losses_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter(), AverageMeter()
    model.eval()
    n = len(loader) if num_batches is None else min(num_batches, len(loader))
    start = end = time.time()
    samples = 0
    for batch_idx, (input, target) in enumerate(loader):
        if batch_idx >= n:
            break
        input, target = input.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp, amp_dtype):
            output = model(input)
            if isinstance(output, (tuple, list)):
                output = output[0]
            loss = loss_fn(output, target)
        acc1, acc5 = accuracy(output.float(), target, topk=(1, min(5, output.shape[-1])))
        if distributed:
            loss = reduce_tensor(loss.data, world_size)
            acc1 = reduce_tensor(acc1, world_size)
            acc5 = reduce_tensor(acc5, world_size)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        losses_m.update(loss.item(), input.size(0))
        top1_m.update(acc1.item(), input.size(0))
        top5_m.update(acc5.item(), input.size(0))
        samples += input.size(0) * (world_size if distributed else 1)
        batch_time_m.update(time.time() - end)
        end = time.time()
        if log_interval and (batch_idx == n - 1 or batch_idx % log_interval == 0):
            _logger.info(
                f'{log_prefix}: [{batch_idx:>4d}/{n}]  Time: {batch_time_m.val:.3f} ({batch_time_m.avg:.3f})'
                f'  Loss: {losses_m.val:>7.3f} ({losses_m.avg:>6.3f})'
                f'  Acc@1: {top1_m.val:>7.3f} ({top1_m.avg:>7.3f})  Acc@5: {top5_m.val:>7.3f} ({top5_m.avg:>7.3f})')
    elapsed = time.time() - start
    return OrderedDict([
        ('loss', losses_m.avg), ('top1', top1_m.avg), ('top5', top5_m.avg),
        ('img_per_sec', samples / max(elapsed, 1e-9)), ('samples', samples)])

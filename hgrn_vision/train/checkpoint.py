"""Checkpoints: atomic writes, the full training state for an exact `--resume`, and fine-tuning loads.

`AtomicCheckpointSaver` is timm's `CheckpointSaver` (last / best / top-k history / periodic recovery) whose files
are written to a temporary name, flushed to disk and renamed into place, so a kill during a write leaves the
previous checkpoint intact. Each file also holds the LR scheduler, the RNG states and the saver's history.
"""
import glob
import logging
import os
import random
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.layers import resample_patch_embed
from timm.models import adapt_input_conv
from timm.utils import CheckpointSaver, get_state_dict, unwrap_model

from .args import UserError

__all__ = ['AtomicCheckpointSaver', 'atomic_save', 'get_rng_state', 'set_rng_state', 'load_checkpoint_file',
           'resume_training_state', 'load_finetune_checkpoint', 'model_state_from_checkpoint', 'load_trained_weights',
           'saved_train_args', 'trained_model_name']

_logger = logging.getLogger(__name__)


def atomic_save(obj: Any, path: str) -> None:
    """`torch.save` to `path` so that readers only ever see the old or the new complete file."""
    tmp = f'{path}.partial-{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA RNG states, as tensors and plain types (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's `CheckpointSaver`, written atomically and holding the whole training state.

    Args (beyond timm's):
        scheduler: LR scheduler whose state is saved.
        extra_state_fn: returns more entries to save (e.g. the RNG states of this moment).
    """

    def __init__(self, *args, scheduler=None, extra_state_fn: Optional[Callable[[], Dict[str, Any]]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.scheduler = scheduler
        self.extra_state_fn = extra_state_fn
        for d in {self.checkpoint_dir, self.recovery_dir} - {''}:  # leftovers of a write that was killed
            for f in glob.glob(os.path.join(d, '*.partial-*')):
                os.remove(f)

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)  # atomic on POSIX: never a moment without `dst`

    def _duplicate(self, src: str, dst: str) -> None:
        tmp = f'{dst}.partial-{os.getpid()}'
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        args = self.args
        save_state = {
            'epoch': epoch,
            'arch': getattr(args, 'model', type(unwrap_model(self.model)).__name__.lower()),
            'args': {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()} if args else None,
            'state_dict': get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,  # timm: epoch is the last completed one
            'saver': {
                'checkpoint_files': [(os.path.basename(f), m) for f, m in self.checkpoint_files],
                'best_epoch': self.best_epoch, 'best_metric': self.best_metric,
            },
        }
        if self.model_ema is not None:
            save_state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            save_state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.scheduler is not None:
            save_state['scheduler'] = self.scheduler.state_dict()
        if self.extra_state_fn is not None:
            save_state.update(self.extra_state_fn())
        if metric is not None:
            save_state['metric'] = metric
        atomic_save(save_state, save_path)

    def load_history(self, saver_state: Dict[str, Any]) -> None:
        """Continue the ranked history of a resumed run in the same folder."""
        self.checkpoint_files = [
            (os.path.join(self.checkpoint_dir, f), m) for f, m in saver_state.get('checkpoint_files', [])
            if os.path.exists(os.path.join(self.checkpoint_dir, f))]
        self.best_epoch = saver_state.get('best_epoch')
        self.best_metric = saver_state.get('best_metric')


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a checkpoint to the CPU, with an error naming the file when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise UserError(f'Checkpoint {path!r} does not exist.')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:
        try:  # the authors' files and timm's own may hold pickled objects (argparse Namespace)
            ckpt = torch.load(path, map_location='cpu', weights_only=False)
        except Exception as e:
            raise UserError(f'Cannot read checkpoint {path!r} (truncated or not a torch file?): {e}') from None
    if not isinstance(ckpt, dict):
        raise UserError(f'Checkpoint {path!r} holds a {type(ckpt).__name__}, expected a dict / state dict.')
    return ckpt


EMA_KEYS = ('state_dict_ema', 'model_ema')  # where a checkpoint keeps EMA weights (ours, then timm's older name)


def saved_train_args(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """The train.py args a checkpoint saved; {} for a bare state dict."""
    return ckpt['args'] if isinstance(ckpt.get('args'), dict) else {}


def trained_model_name(ckpt: Dict[str, Any]) -> Any:
    """The model a checkpoint was trained as: its saved args' `model`, else timm's `arch` (None if neither)."""
    return saved_train_args(ckpt).get('model') or ckpt.get('arch')


def model_state_from_checkpoint(ckpt: Dict[str, Any], use_ema: bool = False) -> Tuple[Dict[str, Any], str]:
    """The model weights of a checkpoint: EMA ones when asked for and present. Returns (state dict, its key)."""
    keys = EMA_KEYS if use_ema else ()
    for key in keys + ('state_dict', 'model'):
        if isinstance(ckpt.get(key), dict):
            return {k.removeprefix('module.'): v for k, v in ckpt[key].items()}, key
    return {k.removeprefix('module.'): v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}, ''


def load_trained_weights(model: nn.Module, ckpt: Dict[str, Any], path: str, name: str, use_ema: bool = False,
                         ema_flag: Optional[str] = None) -> str:
    """Loads a checkpoint's model weights into `model` strictly, in its layout (`fit_state_dict`): the EMA ones when
    `use_ema` and present. With `ema_flag`, the flag that asked for EMA weights, a checkpoint without them is a
    `UserError` naming it. Returns the weights' key in the checkpoint ('' for a bare state dict)."""
    state_dict, key = model_state_from_checkpoint(ckpt, use_ema=use_ema)
    if ema_flag and key not in EMA_KEYS:
        raise UserError(f'{ema_flag}: checkpoint {path!r} holds no EMA weights.')
    _load_strict(model, fit_state_dict(state_dict, model, path, name), path, f'model {name}')
    return key


def _shorten_keys(line: str, keep: int = 3) -> str:
    """torch's `Missing key(s) in state_dict: "a", "b", ...` line with its first `keep` keys and a count."""
    head, _, keys = line.partition(': ')
    names = keys.rstrip('.').split(', ')
    if not head.endswith('key(s) in state_dict') or len(names) <= keep:
        return line
    return f'{head}: {", ".join(names[:keep])} and {len(names) - keep} more.'


def fit_state_dict(state_dict: Dict[str, Any], model: nn.Module, path: str, name: str) -> Dict[str, Any]:
    """`state_dict` in `model`'s layout: for an HGRN-DeiT through its `checkpoint_filter_fn` (the authors' layout
    converted; another width / depth named, and what is no HGRN-DeiT state dict at all called another architecture,
    as a `UserError`); other models' as it is."""
    from hgrn_vision.models.hgrn_deit import HgrnDeit, checkpoint_filter_fn
    if not isinstance(model, HgrnDeit):
        return state_dict
    try:
        return checkpoint_filter_fn(state_dict, model)
    except (ValueError, KeyError) as e:
        reason = str(e)
    own = model.state_dict()
    foreign = [k for k in state_dict if re.sub(r'^blocks\.\d+\.', 'blocks.0.', k) not in own]  # deeper is not foreign
    if foreign and 'to_patch_embedding.1.weight' not in state_dict:  # neither our layout nor the authors'
        reason = f'it holds tensors that {name} has not (e.g. {foreign[:3]}); was it written for another architecture?'
    raise UserError(f'Checkpoint {path!r} does not fit model {name}: {reason}')


def _load_strict(module: nn.Module, state_dict: Dict[str, Any], path: str, what: str) -> None:
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        lines = [_shorten_keys(ln.strip()) for ln in str(e).splitlines() if ln.strip()][1:5]
        raise UserError(
            f'Checkpoint {path!r} does not fit the {what} ({type(module).__name__}); was it written for another '
            f'architecture? ' + ' '.join(lines)) from None


def resume_training_state(
        path: str,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        model_ema: Optional[nn.Module] = None,
        loss_scaler: Any = None,
        scheduler: Any = None,
        model_name: Optional[str] = None,
) -> Dict[str, Any]:
    """Restore model, EMA, optimizer, loss scaler and scheduler from `path`; returns the checkpoint dict.

    The RNG states stay in the returned dict (`ckpt['rng']`) to be set right before training continues.
    """
    ckpt = load_checkpoint_file(path)
    if 'state_dict' not in ckpt or 'epoch' not in ckpt:
        raise UserError(f'Checkpoint {path!r} is not a training checkpoint (no state_dict / epoch); use '
                        f'--initial-checkpoint to fine-tune from weights.')
    arch = ckpt.get('arch')
    if model_name and arch and arch != model_name:
        raise UserError(f'Checkpoint {path!r} was written for model {arch!r}, not {model_name!r}.')
    _load_strict(unwrap_model(model), model_state_from_checkpoint(ckpt)[0], path, 'model')
    if model_ema is not None:
        if 'state_dict_ema' not in ckpt:
            raise UserError(f'Checkpoint {path!r} has no EMA weights but --model-ema is on.')
        _load_strict(unwrap_model(model_ema), ckpt['state_dict_ema'], path, 'EMA model')
    if optimizer is not None and 'optimizer' in ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
        loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])
    if scheduler is not None and 'scheduler' in ckpt:
        scheduler.load_state_dict(ckpt['scheduler'])
    _logger.info(f"Resumed from {path} (epoch {ckpt['epoch']} done)")
    return ckpt


def load_finetune_checkpoint(model: nn.Module, path: str, name: str) -> List[str]:
    """Load weights for fine-tuning into `model` (named `name` in errors): all that fit; a head of another size (new
    `num_classes`) stays freshly initialised; a patch embedding of another channel count or patch size is adapted.
    Foreign layouts (the authors' checkpoints) are converted by `fit_state_dict`. Returns the dropped keys.
    """
    ckpt = load_checkpoint_file(path)
    state_dict, _ = model_state_from_checkpoint(ckpt, use_ema=True)
    state_dict = fit_state_dict(state_dict, model, path, name)
    own = model.state_dict()
    unexpected = [k for k in state_dict if k not in own]
    missing = [k for k in own if k not in state_dict]
    if unexpected or missing:
        raise UserError(
            f'Checkpoint {path!r} is for another architecture: {len(missing)} tensors of the model missing '
            f'(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}).')
    dropped = []
    for k, v in list(state_dict.items()):
        target = own[k]
        if v.shape == target.shape:
            continue
        if k.endswith('patch_embed.proj.weight') and v.ndim == 4:
            if v.shape[1] != target.shape[1]:
                v = adapt_input_conv(target.shape[1], v)
            if v.shape[-2:] != target.shape[-2:]:
                v = resample_patch_embed(v, list(target.shape[-2:]), verbose=False)
            state_dict[k] = v
            _logger.info(f'Fine-tune: adapted {k} to shape {tuple(v.shape)}')
            continue
        dropped.append(f'{k} {tuple(v.shape)} -> {tuple(target.shape)}')
        del state_dict[k]
    model.load_state_dict(state_dict, strict=False)
    msg = ', '.join(dropped) if dropped else 'none'
    _logger.info(f'Fine-tune from {path}: loaded {len(state_dict)} tensors; dropped and re-initialised: {msg}')
    return [d.split(' ')[0] for d in dropped]


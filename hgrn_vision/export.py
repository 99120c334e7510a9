"""Export a `train.py` checkpoint (or a bare state dict) the timm way: Hugging Face Hub layout, model card, ONNX.

    python -m hgrn_vision.export output/train/RUN/model_best.pth.tar exported/hgrn_deit_small --ema
    python -m hgrn_vision.export RUN/last.pth.tar exported/run --onnx
    python -m hgrn_vision.export weights.pth exported/w --model hgrn_deit_tiny --model-kwargs depth=6 --num-classes 10
    python -m hgrn_vision.export RUN/last.pth.tar exported/run --push-to-hub USER/hgrn-deit-tiny-run

OUTPUT_DIR gets timm's hub layout, written by timm's `save_for_hf`: `config.json` (architecture, num_classes, the
create_model kwargs as `model_args`, and the pretrained cfg with the preprocessing the model was trained with) and
`model.safetensors`; plus a `README.md` model card (timm's `generate_readme`) with the parameter count, the recipe
from the checkpoint's saved args and the top-1 from the run's `summary.csv`. Load it back with

    import timm, hgrn_vision
    model = timm.create_model('local-dir:exported/run', pretrained=True)

`--onnx` also writes `model.onnx` (the PyTorch scan path through `torch.onnx.export(dynamo=True)`, dynamic batch,
height and width: one graph for any number of tokens), checked against PyTorch with onnxruntime. `--push-to-hub`
uploads through timm's `push_to_hf_hub` (needs network and a Hugging Face token; untested offline).
"""
import argparse
import copy
import csv
import logging
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.models import push_to_hf_hub, save_for_hf
from timm.models._hub import generate_readme

from hgrn_vision.layers import HgruMixer
from hgrn_vision.models.hgrn_deit import HgrnDeit
from hgrn_vision.train.args import ParseKwargs, UserError
from hgrn_vision.train.checkpoint import (
    EMA_KEYS,
    load_checkpoint_file,
    load_trained_weights,
    saved_train_args,
    trained_model_name,
)
from hgrn_vision.train.trainer import create_train_model

__all__ = ['export_parser', 'load_export_model', 'model_card', 'export_onnx', 'export', 'main']

_logger = logging.getLogger('export')

# the flags that define the model of a bare state dict; a train.py checkpoint's saved args define them there
_MODEL_FLAGS = ('model', 'model_kwargs', 'num_classes', 'in_chans', 'img_size')
ONNX_FILE = 'model.onnx'
ONNX_ATOL = 1e-3  # fp32 logits, onnxruntime vs PyTorch
HGRN_CITATION = """@inproceedings{qin2023hierarchically,
  title={Hierarchically Gated Recurrent Neural Network for Sequence Modeling},
  author={Qin, Zhen and Yang, Songlin and Zhong, Yiran},
  booktitle={Advances in Neural Information Processing Systems},
  year={2023}
}"""


def export_parser() -> argparse.ArgumentParser:
    """The `python -m hgrn_vision.export` argument parser."""
    parser = argparse.ArgumentParser(
        prog='python -m hgrn_vision.export',
        description="Export a train.py checkpoint (or a bare state dict) as timm's Hugging Face Hub layout: "
                    'config.json, model.safetensors and a README.md model card; optionally model.onnx. Load it with '
                    'timm.create_model("local-dir:OUTPUT_DIR", pretrained=True) after `import hgrn_vision`.')
    parser.add_argument('checkpoint', metavar='CHECKPOINT', help='train.py checkpoint (.pth.tar) or a state dict')
    parser.add_argument('output_dir', metavar='OUTPUT_DIR', help='folder to write (new or empty, see --force)')
    parser.add_argument('--ema', action='store_true', help='export the EMA weights (an error if there are none)')
    parser.add_argument('--force', action='store_true',
                        help='write into an OUTPUT_DIR that is not empty: replaces the files of an export (and '
                             'removes a model.onnx that would no longer match), keeps all others')
    group = parser.add_argument_group('Model of a bare state dict (a train.py checkpoint names its own; these '
                                      'flags must then agree with it)')
    group.add_argument('--model', '-m', default=None, metavar='MODEL', help='model name, e.g. hgrn_deit_tiny')
    group.add_argument('--model-kwargs', nargs='*', default=None, action=ParseKwargs,
                       help='model kwargs, e.g. --model-kwargs embed_dim=64 depth=4')
    group.add_argument('--num-classes', type=int, default=None, metavar='N', help='classifier outputs')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size the model was trained at')
    group = parser.add_argument_group('ONNX')
    group.add_argument('--onnx', action='store_true',
                       help=f'also write {ONNX_FILE} (dynamic batch, height and width; PyTorch scan path), checked '
                            f'against PyTorch with onnxruntime (max |difference| < {ONNX_ATOL:g})')
    group = parser.add_argument_group('Hugging Face Hub')
    group.add_argument('--push-to-hub', default=None, metavar='REPO_ID',
                       help='also upload the model (config.json, model.safetensors, README.md if the repo has '
                            "none; not model.onnx) with timm's push_to_hf_hub. Needs network and a token (HF_TOKEN "
                            'or `hf auth login`); not covered by the offline tests')
    group.add_argument('--private', action='store_true', help='create the Hub repo as private')
    return parser


def _trained_model_flags(ckpt: Dict[str, Any], saved: Dict[str, Any]) -> Dict[str, Any]:
    """What a train.py checkpoint's saved args say for each of `_MODEL_FLAGS`."""
    input_size = saved.get('input_size')
    return dict(
        model=trained_model_name(ckpt),
        model_kwargs=saved.get('model_kwargs') or {},
        num_classes=saved.get('num_classes'),
        in_chans=saved.get('in_chans'),
        img_size=input_size[-1] if input_size else saved.get('img_size'),
    )


def load_export_model(
        checkpoint: str,
        use_ema: bool = False,
        **model_flags: Any,
) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """The model a checkpoint holds, in eval mode, with its pretrained cfg set to its training preprocessing.

    Args:
        checkpoint: a `train.py` checkpoint (model from its saved args) or a bare state dict (model from the flags).
        use_ema: the EMA weights; a `UserError` when the checkpoint has none.
        model_flags: `_MODEL_FLAGS` values, None where not given; with a train.py checkpoint they must agree with it.

    Returns:
        (model, model_args: the create_model kwargs that rebuild it, info: checkpoint facts for the model card).
    """
    ckpt = load_checkpoint_file(checkpoint)
    saved = saved_train_args(ckpt)
    given = {k: v for k, v in model_flags.items() if v is not None}
    flags = given
    if saved:
        flags = _trained_model_flags(ckpt, saved)
        for key, value in given.items():
            if value != flags[key]:
                raise UserError(
                    f'--{key.replace("_", "-")} {value} disagrees with checkpoint {checkpoint!r}, trained with '
                    f'{key}={flags[key]}: drop the flag, its saved args define the model.')
    if not flags.get('model'):
        raise UserError(f'Checkpoint {checkpoint!r} has no train.py args naming its model: pass --model NAME (and '
                        f'--model-kwargs / --num-classes as it was trained).')
    model_kwargs = dict(flags.get('model_kwargs') or {})
    for key in ('in_chans', 'img_size'):
        if flags.get(key) is not None:
            model_kwargs.setdefault(key, flags[key])
    model = create_train_model(
        argparse.Namespace(model=flags['model'], model_kwargs=model_kwargs, in_chans=None, img_size=None,
                           input_size=None),
        num_classes=flags.get('num_classes'))

    key = load_trained_weights(model, ckpt, checkpoint, flags['model'], use_ema=use_ema,
                               ema_flag='--ema' if use_ema else None)
    model.eval()

    data_config = resolve_data_config(
        dict({k: saved.get(k) for k in ('input_size', 'img_size', 'mean', 'std', 'crop_pct', 'interpolation')},
             img_size=flags.get('img_size'), in_chans=model_kwargs.get('in_chans')),
        model=model)
    # the registered entry's tag and notes describe its untrained default, not these weights
    pretrained_cfg = dict(model.pretrained_cfg, **data_config, tag=None, notes=None)
    if tuple(data_config['input_size'][1:]) != tuple(model.pretrained_cfg['input_size'][1:]):
        pretrained_cfg['pool_size'] = None  # the default cfg's feature grid is for another size
    model.pretrained_cfg = pretrained_cfg

    model_args = dict(model_kwargs, num_classes=model.num_classes)
    model_args.pop('scan_impl', None)  # a runtime choice, not part of the weights: the loader picks for its device
    info = dict(checkpoint=checkpoint, key=key, ema=key in EMA_KEYS, epoch=ckpt.get('epoch'), saved=saved,
                top1=_summary_top1(checkpoint, ckpt, saved, key in EMA_KEYS))
    _logger.info(f'Loaded {"EMA" if info["ema"] else "raw"} weights ({key or "bare state dict"}) of '
                 f'{flags["model"]} {model_args} from {checkpoint}')
    return model, model_args, info


def _summary_top1(
        checkpoint: str,
        ckpt: Dict[str, Any],
        saved: Dict[str, Any],
        ema: bool,
) -> Optional[Tuple[float, str]]:
    """(top-1, split) of the checkpoint's epoch in the run's summary.csv beside it; None when there is none.

    Only end-of-epoch checkpoints (those with a `metric`) match a row: a recovery checkpoint is from mid-epoch.
    """
    summary = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), 'summary.csv')
    if 'metric' not in ckpt or not os.path.isfile(summary):
        return None
    column = 'eval_ema_top1' if ema else 'eval_top1'
    with open(summary, newline='') as f:
        for row in csv.DictReader(f):
            if row.get('epoch') == str(ckpt.get('epoch')) and row.get(column):
                return float(row[column]), saved.get('val_split', 'validation')
    return None


def _recipe(saved: Dict[str, Any], epoch: Optional[int], img_size: int) -> Dict[str, str]:
    """The training recipe of a train.py checkpoint's saved args, for the model card."""
    batch = saved['batch_size'] * saved.get('world_size', 1) * saved.get('grad_accum_steps', 1)
    epochs = f'{saved["epochs"]}'
    if epoch is not None and epoch + 1 != saved['epochs']:
        epochs += f' (weights after epoch {epoch + 1})'
    recipe = {
        'Dataset': f'{saved.get("dataset") or "image folder " + os.path.basename(str(saved.get("data_dir")))}, '
                   f'split {saved.get("train_split", "train")}',
        'Epochs': epochs,
        'Batch size': f'{batch} ({saved["batch_size"]} per process)',
        'Learning rate': f'{saved["lr"]:g}, {saved.get("sched")} schedule, {saved.get("warmup_epochs", 0):g} '
                         f'warmup epochs',
        'Optimizer': f'{saved.get("opt")}, weight decay {saved.get("weight_decay", 0):g}',
        'Image size': f'{img_size}',
    }
    regularization = [
        f'{name} {saved[key]}' for key, name in (
            ('smoothing', 'label smoothing'), ('aa', 'auto-augment'), ('mixup', 'mixup'), ('cutmix', 'cutmix'),
            ('reprob', 'random erasing'), ('drop_path', 'drop path')) if saved.get(key)]
    if saved.get('model_ema'):
        regularization.append(f'EMA decay {saved.get("model_ema_decay")}')
    if regularization:
        recipe['Regularization'] = ', '.join(regularization)
    if saved.get('amp'):
        recipe['Mixed precision'] = saved.get('amp_dtype', 'bfloat16')
    return recipe


def model_card(
        model: nn.Module,
        model_args: Dict[str, Any],
        info: Dict[str, Any],
        model_id: str,
        onnx: bool = False,
) -> Dict[str, Any]:
    """timm's model card dict (for `generate_readme` / `push_to_hf_hub`): architecture, params, recipe, top-1."""
    cfg = model.pretrained_cfg
    n_params = sum(p.numel() for p in model.parameters())
    _, h, w = cfg['input_size']
    details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone',
        'Architecture': cfg['architecture'],
        'Model args': model_args,
        'Model Stats': {'Params': f'{n_params:,} ({n_params / 1e6:.2f} M)', 'Image size': f'{h} x {w}'},
        'Weights': f'{"EMA" if info["ema"] else "raw"} weights of {os.path.basename(info["checkpoint"])}' + (
            f', epoch {info["epoch"]}' if info['epoch'] is not None else ''),
    }
    if info['top1'] is not None:
        top1, split = info['top1']
        details['Top-1'] = f'{top1:.2f}% on the {split} split (summary.csv of the run)'
    if info['saved']:
        details['Training recipe'] = _recipe(info['saved'], info['epoch'], info['saved'].get('img_size') or h)
    if cfg.get('paper_ids'):
        details['Papers'] = [f'{cfg.get("paper_name", "")}: https://arxiv.org/abs/{cfg["paper_ids"].split(":")[-1]}']
    if cfg.get('origin_url'):
        details['Original'] = cfg['origin_url']
    if onnx:
        details['ONNX'] = f'{ONNX_FILE}: dynamic batch, height and width (any image size)'
    usage = (
        '```python\nimport timm\nimport hgrn_vision  # registers the HGRN-DeiT models with timm\n\n'
        f"model = timm.create_model('{model_id}', pretrained=True).eval()\n"
        'data_config = timm.data.resolve_model_data_config(model)\n'
        'transforms = timm.data.create_transform(**data_config, is_training=False)\n'
        'logits = model(transforms(img).unsqueeze(0))  # img: a PIL image\n```\n')
    card = dict(
        description=f'A {cfg["architecture"]} image classifier trained with hgrn_vision (timm machinery).',
        details=details, usage=usage, license=cfg.get('license', 'apache-2.0'))
    if isinstance(model, HgrnDeit):
        card['citation'] = HGRN_CITATION
    return card


def export_onnx(model: nn.Module, path: str) -> Dict[Tuple[int, ...], float]:
    """Write `model` (an HgrnDeit) to `path` as ONNX with dynamic batch, height and width, on the PyTorch scan path
    (`bihgru_scan_chunked`: its chunks' carries an ONNX Scan, so that the graph holds for any number of tokens); check
    it against PyTorch with onnxruntime on a batch of 2 at the model's input size, a smaller one and a larger one.
    Returns the max |difference| per input shape."""
    if not isinstance(model, HgrnDeit):
        raise UserError(f'--onnx exports HGRN-DeiT models, not {type(model).__name__}.')
    try:
        import onnxruntime
        import onnxscript.optimizer
    except ImportError as e:
        raise UserError(f'--onnx needs onnxruntime and onnxscript ({e}): pip install onnxruntime onnxscript') from None
    c, h, w = model.pretrained_cfg['input_size']
    onnx_model = copy.deepcopy(model).eval()
    for m in onnx_model.modules():
        if isinstance(m, HgruMixer):
            m.scan_impl = 'torch'  # the Triton op cannot be exported
    for name in ('onnx_ir', 'onnxscript'):  # their graph passes log each step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    auto = torch.export.Dim.AUTO  # height and width: the exporter keeps them symbolic
    program = torch.onnx.export(
        onnx_model, (torch.randn(2, c, h, w),), dynamo=True, optimize=False,
        dynamic_shapes=({0: torch.export.Dim('batch'), 2: auto, 3: auto},), input_names=['input0'],
        output_names=['output0'], verbose=False)
    for node in program.model.graph:  # each node's stack trace (local paths): two thirds of the file
        node.metadata_props.clear()
    # constants folded (a third of the nodes remain), not `optimize=True`: its pattern rewrites take minutes here
    onnxscript.optimizer.fold_constants(program.model)
    onnxscript.optimizer.remove_unused_nodes(program.model)
    program.save(path, external_data=False)

    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    diffs = {}
    # the input size; smaller and larger ones, not in whole patches
    for shape in ((2, c, h, w), (2, c, h // 2 + 1, w - w // 4 + 1), (2, c, 2 * h - 3, w + w // 2 + 5)):
        x = torch.randn(shape)
        with torch.inference_mode():
            ref = model(x)
        out = torch.from_numpy(session.run(None, {'input0': x.numpy()})[0])
        diffs[shape] = (out - ref).abs().max().item()
    _logger.info(f'ONNX check (onnxruntime {onnxruntime.__version__} vs PyTorch, fp32): max |difference| ' +
                 ', '.join(f'{d:.2e} at {tuple(s)}' for s, d in diffs.items()))
    if not all(d < ONNX_ATOL for d in diffs.values()):  # also catches NaN
        raise RuntimeError(f'{ONNX_FILE} differs from PyTorch by more than {ONNX_ATOL:g}: {diffs}')
    return diffs


def _check_output_dir(output_dir: str, force: bool) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f'OUTPUT_DIR {output_dir!r} exists and is not a folder.')
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not force:
        raise UserError(f'OUTPUT_DIR {output_dir!r} exists and is not empty: pick another folder, or pass --force '
                        f'to write the export into it (other files are kept).')


def _move_into(src_dir: str, output_dir: str, stale: Sequence[str]) -> List[str]:
    """Move the finished files of `src_dir` into `output_dir` (created if missing); remove its `stale` files."""
    if not os.path.exists(output_dir):
        os.replace(src_dir, output_dir)
        return sorted(os.listdir(output_dir))
    names = sorted(os.listdir(src_dir))
    for name in names:
        os.replace(os.path.join(src_dir, name), os.path.join(output_dir, name))
    for name in stale:
        if os.path.exists(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
            _logger.info(f'Removed the {name} of an earlier export from {output_dir}: this one wrote none')
    return names


def export(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the export configured by `args` (the `python -m hgrn_vision.export` flags). Returns what was written."""
    output_dir = os.path.abspath(args.output_dir)
    _check_output_dir(output_dir, args.force)
    model, model_args, info = load_export_model(
        args.checkpoint, use_ema=args.ema, **{k: getattr(args, k) for k in _MODEL_FLAGS})
    model_id = f'hf-hub:{args.push_to_hub}' if args.push_to_hub else f'local-dir:{args.output_dir}'
    card = model_card(model, model_args, info, model_id, args.onnx)

    tmp = f'{output_dir}.partial-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    result: Dict[str, Any] = {'output_dir': output_dir, 'model_args': model_args}
    try:  # everything is written beside OUTPUT_DIR first: a failed export leaves it as it was
        save_for_hf(model, tmp, model_args=model_args, safe_serialization=True)
        with open(os.path.join(tmp, 'README.md'), 'w', encoding='utf-8') as f:
            f.write(generate_readme(card, os.path.basename(output_dir)))
        if args.onnx:
            result['onnx_max_diff'] = export_onnx(model, os.path.join(tmp, ONNX_FILE))
        result['files'] = _move_into(tmp, output_dir, stale=() if args.onnx else (ONNX_FILE,))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _logger.info(f'Wrote {", ".join(result["files"])} to {output_dir}')

    if args.push_to_hub:
        result['hub_commit'] = push_to_hf_hub(
            model, args.push_to_hub, model_card=card, model_args=model_args, private=args.private,
            safe_serialization=True)
        _logger.info(f'Pushed to https://huggingface.co/{args.push_to_hub}')
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from hgrn_vision.train.cli import run_cli
    return run_cli(lambda: export(export_parser().parse_args(argv)))


if __name__ == '__main__':
    main()

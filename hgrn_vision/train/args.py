"""Command-line arguments of `train.py` / `validate.py`, YAML config files and user-facing errors.

Flag names follow timm's own `train.py` / `validate.py`. A YAML file given with `-c/--config` sets defaults, the
command line overrides it (on/off flags also take a `--no-` form, e.g. `--no-amp`, to override a file's `true`), and
a key the parser does not know is an error that names it.
"""
import argparse
import difflib
import os
from typing import Any, Dict, Optional, Sequence

import yaml

__all__ = ['UserError', 'ParseKwargs', 'train_parser', 'validate_parser', 'parse_args', 'load_config_file',
           'args_to_yaml']


COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')  # torch.compile's
ON_OFF = argparse.BooleanOptionalAction  # `--flag` / `--no-flag`: the CLI can turn off what a config file turned on


class UserError(Exception):
    """A problem with the user's input (data, config, model name, checkpoint): printed without a traceback."""


class ParseKwargs(argparse.Action):
    """`--model-kwargs key=value ...` into a dict, values parsed as YAML scalars (ints, floats, bools, lists)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = {}
        for value in values:
            if '=' not in value:
                raise argparse.ArgumentError(self, f'expected key=value, got {value!r}')
            key, val = value.split('=', 1)
            kw[key] = yaml.safe_load(val)
        setattr(namespace, self.dest, kw)


def _add_data_args(parser: argparse.ArgumentParser, training: bool) -> None:
    group = parser.add_argument_group('Dataset')
    group.add_argument('data_dir', metavar='DIR', nargs='?', default=None, help='path to dataset (root dir)')
    group.add_argument('--data-dir', dest='data', metavar='DIR', default=None, help='path to dataset (overrides DIR)')
    group.add_argument('--dataset', '-d', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>"), e.g. torch/fashion_mnist; empty: image folder')
    if training:
        group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split')
        group.add_argument('--val-split', metavar='NAME', default='validation', help='dataset validation split')
        group.add_argument('--train-num-samples', type=int, default=None, metavar='N',
                           help='manually specify num samples in train split, for IterableDatasets')
        group.add_argument('--train-subset', type=int, default=None, metavar='N',
                           help='train on a fixed random subset of N samples (quick runs, tests)')
        group.add_argument('--val-subset', type=int, default=None, metavar='N',
                           help='evaluate on a fixed random subset of N samples')
    else:
        group.add_argument('--split', metavar='NAME', default='validation', help='dataset split')
    group.add_argument('--dataset-download', action=ON_OFF, default=False,
                       help='allow download of the dataset for torch/ and tfds/ datasets that support it')
    group.add_argument('--input-img-mode', default=None, type=str, help='dataset image conversion mode')
    group.add_argument('--input-key', default=None, type=str, help='dataset key for input images')
    group.add_argument('--target-key', default=None, type=str, help='dataset key for target labels')


def _add_model_args(parser: argparse.ArgumentParser, training: bool) -> None:
    group = parser.add_argument_group('Model')
    group.add_argument('--model', '-m', default='hgrn_deit_tiny' if training else None, type=str, metavar='MODEL',
                       help='name of the model to train')
    group.add_argument('--num-classes', type=int, default=None, metavar='N', help='number of label classes')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (default: model cfg)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='input dims (d h w), e.g. --input-size 3 224 224')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='center crop pct of the eval image')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='dataset pixel mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='dataset pixel std')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME', help='resize interpolation')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra model kwargs, e.g. --model-kwargs embed_dim=64 depth=4 patch_size=7')
    group.add_argument('--channels-last', action=ON_OFF, default=False, help='use channels_last memory layout')
    group.add_argument('--grad-checkpointing', action=ON_OFF, default=False,
                       help='enable gradient checkpointing through the model')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='torch.compile the model (backend, default inductor)')
    group.add_argument('--torchcompile-mode', default=None, choices=COMPILE_MODES,
                       help="torch.compile's mode with --torchcompile (default: torch's); reduce-overhead replays "
                            'CUDA graphs, taking the host out of a step (small models, CUDA only)')
    group.add_argument('--amp', action=ON_OFF, default=False, help='use mixed precision (torch.autocast)')
    group.add_argument('--amp-dtype', default='bfloat16', type=str, choices=('bfloat16', 'float16'),
                       help='lower precision AMP dtype; float16 uses a loss scaler')
    group.add_argument('--device', default='cuda' if training else None, type=str,
                       help='device (cuda falls back to cpu when no GPU is present)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loading processes per rank')
    group.add_argument('--pin-mem', action=ON_OFF, default=False, help='pin CPU memory in the DataLoader')


def train_parser() -> argparse.ArgumentParser:
    """The `train.py` argument parser (timm's flag names)."""
    parser = argparse.ArgumentParser(description='HGRN-DeiT training (timm machinery)')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file; command-line flags override it')
    _add_data_args(parser, training=True)
    _add_model_args(parser, training=True)

    group = parser.add_argument_group('Model init / fine-tuning')
    group.add_argument('--pretrained', action=ON_OFF, default=False,
                       help='start from the pretrained weights of the model cfg (none ship with this package)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help="fine-tune from this checkpoint (ours or the authors'); mismatched head re-initialised")
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume the full training state from this checkpoint (or "auto": last in --output run)')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='prevent resume of optimizer state when resuming model')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')

    group = parser.add_argument_group('Optimizer')
    group.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER', help='optimizer')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum')
    group.add_argument('--weight-decay', type=float, default=0.05, help='weight decay')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='gradient clipping (off: None)')
    group.add_argument('--clip-mode', type=str, default='norm', help='gradient clipping mode: norm, value, agc')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N', help='gradient accumulation steps')

    group = parser.add_argument_group('Learning rate schedule')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler')
    group.add_argument('--sched-on-updates', action=ON_OFF, default=False,
                       help='apply the LR schedule per optimizer update instead of per epoch')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate; None: lr_base * global batch / lr_base_size')
    group.add_argument('--lr-base', type=float, default=5e-4, metavar='LR', help='base LR at --lr-base-size')
    group.add_argument('--lr-base-size', type=int, default=512, metavar='DIV', help='base batch size (DeiT: 512)')
    group.add_argument('--lr-base-scale', type=str, default='linear', choices=('linear', 'sqrt'),
                       help='LR scaling with the global batch')
    group.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR', help='warmup learning rate')
    group.add_argument('--min-lr', type=float, default=1e-5, metavar='LR', help='lower LR bound of the cosine')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train')
    group.add_argument('--warmup-epochs', type=float, default=5, metavar='N', help='epochs of linear LR warmup')
    group.add_argument('--warmup-prefix', action=ON_OFF, default=False,
                       help='exclude the warmup from the decay schedule')
    group.add_argument('--stop-epoch', type=int, default=None, metavar='N',
                       help='end this invocation after epoch N-1 without changing the schedule (job time limits); '
                            'continue later with --resume')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs at min_lr after cosine')

    group = parser.add_argument_group('Augmentation and regularization')
    group.add_argument('--no-aug', action='store_true', default=False, help='disable all training augmentation')
    group.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], metavar='PCT',
                       help='random resized crop scale range')
    group.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resized crop aspect ratio range')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='auto augment policy, e.g. rand-m9-mstd0.5-inc1 (DeiT)')
    group.add_argument('--aug-repeats', type=int, default=0, help='repeated augmentation count (distributed only)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase probability')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode')
    group.add_argument('--recount', type=int, default=1, help='random erase count')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio')
    group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of switching to cutmix when both are active')
    group.add_argument('--mixup-mode', type=str, default='batch', help='how to apply mixup: batch, pair, elem')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='turn off mixup after this epoch')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='training interpolation (random, bilinear, bicubic)')

    group = parser.add_argument_group('Model EMA')
    group.add_argument('--model-ema', action=ON_OFF, default=False, help='keep an EMA of the weights')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay')
    group.add_argument('--model-ema-warmup', action=ON_OFF, default=False, help='EMA decay warmup')

    group = parser.add_argument_group('Miscellaneous')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed')
    group.add_argument('--deterministic', action=ON_OFF, default=False,
                       help='deterministic algorithms (reproducible runs and exact --resume)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N', help='batches between log lines')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='batches between recovery checkpoints (0: off)')
    group.add_argument('--checkpoint-hist', type=int, default=3, metavar='N', help='best checkpoints to keep')
    group.add_argument('--output', default='output/train', type=str, metavar='PATH', help='root of the run folders')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='run folder name (default: date-time-model)')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help='metric that ranks checkpoints (top1, loss, ema_top1, ...)')
    group.add_argument('--dist-bn', type=str, default='reduce', help='distribute BatchNorm stats (broadcast, reduce)')
    group.add_argument('--no-plot', action='store_true', default=False, help='do not write the PNG plot')
    group.add_argument('--no-progress', action='store_true', default=False, help='no progress bar even on a TTY')
    return parser


def validate_parser() -> argparse.ArgumentParser:
    """The `validate.py` argument parser (timm's flag names)."""
    parser = argparse.ArgumentParser(description='HGRN-DeiT validation (timm machinery)')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE', help='YAML config file')
    _add_data_args(parser, training=False)
    _add_model_args(parser, training=False)
    parser.set_defaults(workers=2, batch_size=256)
    parser.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='checkpoint to evaluate')
    parser.add_argument('--pretrained', action=ON_OFF, default=False, help='use the model cfg weights')
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument('--use-ema', dest='use_ema', action='store_true', default=None,
                     help='evaluate the EMA weights (default when the checkpoint has them)')
    ema.add_argument('--no-ema', dest='use_ema', action='store_false', help='evaluate the raw (non-EMA) weights')
    parser.add_argument('--log-freq', default=50, type=int, metavar='N', help='batches between log lines')
    parser.add_argument('--results-file', default='', type=str, metavar='FILENAME', help='write the JSON result here')
    parser.add_argument('--num-batches', default=None, type=int, metavar='N', help='evaluate only N batches')
    return parser


def load_config_file(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Read a YAML config into parser dests; an unknown key raises `UserError` naming it (and the closest flag)."""
    if not os.path.isfile(path):
        raise UserError(f'Config file {path!r} does not exist.')
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f'Config file {path!r} is not valid YAML: {e}') from None
    if not isinstance(cfg, dict):
        raise UserError(f'Config file {path!r} must hold a mapping of option: value, got {type(cfg).__name__}.')
    dests = {a.dest for a in parser._actions if a.dest != 'help'}
    out = {}
    for key, value in cfg.items():
        dest = str(key).replace('-', '_')
        if dest not in dests or dest == 'config':
            close = difflib.get_close_matches(dest, sorted(dests), n=1)
            hint = f'; did you mean {close[0]!r}?' if close else ''
            raise UserError(f'Unknown key {key!r} in config file {path!r}{hint}')
        out[dest] = value
    return out


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse `argv` over the defaults of the `-c/--config` YAML file (CLI flags win)."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str)
    cfg_args, _ = config_parser.parse_known_args(argv)
    if cfg_args.config:
        parser.set_defaults(**load_config_file(cfg_args.config, parser))
    args = parser.parse_args(argv)
    if getattr(args, 'data', None):
        args.data_dir = args.data
    return args


def args_to_yaml(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The resolved configuration as YAML, loadable again with `-c` (runtime fields such as `rank` left out)."""
    dests = {a.dest for a in parser._actions}
    d: Dict[str, Any] = {}
    for k, v in sorted(vars(args).items()):
        if k in ('config', 'data') or k not in dests:
            continue
        d[k] = list(v) if isinstance(v, tuple) else v
    return yaml.safe_dump(d, default_flow_style=None, sort_keys=False)

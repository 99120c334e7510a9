"""Datasets and loaders for training and validation, through timm's `create_dataset` / `create_loader`.

Also gets Fashion-MNIST for the demo and the tests: the Debian package `dataset-fashion-mnist` where apt is
available, otherwise torchvision's download; timm reads it as `torch/fashion_mnist` from `<root>/FashionMNIST/raw/`.
"""
import gzip
import logging
import os
import shutil
import subprocess
from typing import Any, Dict, Optional

import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset, create_loader

from .args import UserError

__all__ = ['FASHION_MNIST_FILES', 'prepare_fashion_mnist', 'build_dataset', 'StrictImageDataset', 'DatasetSubset',
           'dataset_classes', 'create_eval_loader']

_logger = logging.getLogger(__name__)

FASHION_MNIST_FILES = (
    'train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


def _fashion_mnist_present(raw: str) -> bool:
    return all(os.path.isfile(os.path.join(raw, f)) for f in FASHION_MNIST_FILES)


def _debian_files_present() -> bool:
    return all(os.path.isfile(os.path.join(DEBIAN_FASHION_MNIST, f + '.gz')) for f in FASHION_MNIST_FILES)


def _try_apt() -> bool:
    """Install the Debian package when apt is usable here (root); True when its files are present afterwards."""
    if _debian_files_present():
        return True
    if shutil.which('apt-get') is None or not hasattr(os, 'geteuid') or os.geteuid() != 0:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    install = ['apt-get', 'install', '-y', '-q', 'dataset-fashion-mnist']
    for cmds in ([install], [['apt-get', 'update', '-q'], install]):  # retry with fresh package lists
        for cmd in cmds:
            _logger.info('Running %s', ' '.join(cmd))
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if _debian_files_present():
            return True
    return False


def prepare_fashion_mnist(root: str) -> str:
    """Make `<root>/FashionMNIST/raw/` hold the four unzipped Fashion-MNIST files; returns `root`.

    Sources, first that works: files already there, the Debian package `dataset-fashion-mnist` (installed with
    apt-get when running as root), torchvision's download.
    """
    raw = os.path.join(root, 'FashionMNIST', 'raw')
    if _fashion_mnist_present(raw):
        return root
    errors = []
    if _try_apt():
        os.makedirs(raw, exist_ok=True)
        for name in FASHION_MNIST_FILES:
            tmp = os.path.join(raw, name + '.tmp')
            with gzip.open(os.path.join(DEBIAN_FASHION_MNIST, name + '.gz'), 'rb') as src, open(tmp, 'wb') as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, os.path.join(raw, name))
        _logger.info('Fashion-MNIST from the Debian package into %s', raw)
        return root
    errors.append('apt: package dataset-fashion-mnist not available (no apt-get, not root, or install failed)')
    try:
        import torchvision
        torchvision.datasets.FashionMNIST(root, train=True, download=True)
        torchvision.datasets.FashionMNIST(root, train=False, download=True)
    except Exception as e:  # no network, mirror down, ...
        errors.append(f'torchvision download: {e}')
    if _fashion_mnist_present(raw):
        return root
    raise UserError(f'Could not get Fashion-MNIST into {raw}: ' + '; '.join(errors))


class StrictImageDataset(ImageDataset):
    """timm's `ImageDataset` that fails on an unreadable image, naming the file, instead of skipping it."""

    def __getitem__(self, index: int):
        img, target = self.reader[index]
        try:
            img = img.read() if self.load_bytes else Image.open(img)
            if self.input_img_mode and not self.load_bytes:
                img = img.convert(self.input_img_mode)
        except Exception as e:
            name = self.reader._filename(index, absolute=True) if hasattr(self.reader, '_filename') else index
            raise UserError(f'Cannot read image {name}: {type(e).__name__}: {e}') from None
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def build_dataset(
        name: str,
        root: Optional[str],
        split: str,
        is_training: bool,
        download: bool = False,
        subset: Optional[int] = None,
        **kwargs: Any,
):
    """`timm.data.create_dataset` with errors that name the culprit (missing / empty dir, unknown dataset)."""
    if not name or '/' not in name:  # image folder or tar: the directory must exist
        if not root:
            raise UserError('No data directory given: pass DIR (an image folder with train/ and validation/ or '
                            'val/ splits) or --dataset torch/<name> with --dataset-download.')
        if not os.path.exists(root):
            raise UserError(f'Data directory {root!r} does not exist.')
    elif name.lower().startswith('torch/') and root and not download and not os.path.isdir(root):
        raise UserError(f'Data directory {root!r} for {name} does not exist (add --dataset-download to fetch it).')
    extra: Dict[str, Any] = {k: v for k, v in kwargs.items() if v is not None}
    try:
        dataset = create_dataset(name, root=root, split=split, is_training=is_training, download=download, **extra)
    except UserError:
        raise
    except Exception as e:
        what = f'dataset {name!r}' if name else 'image folder'
        raise UserError(f'Cannot load {what} split {split!r} from {root!r}: {type(e).__name__}: {e}') from None
    if isinstance(dataset, ImageDataset):
        dataset.__class__ = StrictImageDataset
    if subset:
        dataset = DatasetSubset(dataset, subset)
    try:
        n = len(dataset)
    except TypeError:  # iterable datasets
        n = None
    if n == 0:
        raise UserError(f'Split {split!r} of {root!r} holds no samples.')
    return dataset


class DatasetSubset(torch.utils.data.Dataset):
    """A fixed random subset of `n` samples (same for every seed-equal run); `transform` reaches the wrapped dataset,
    so timm's `create_loader` sets it as usual."""

    def __init__(self, dataset, n: int, seed: int = 0):
        self.dataset = dataset
        g = torch.Generator().manual_seed(seed)
        self.indices = torch.randperm(len(dataset), generator=g)[:n].tolist()

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, t):
        self.dataset.transform = t

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def dataset_classes(dataset) -> Optional[int]:
    """Number of classes of a dataset when it can be told without reading it."""
    dataset = getattr(dataset, 'dataset', dataset)
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx'):
        return len(reader.class_to_idx)
    if hasattr(dataset, 'classes'):
        return len(dataset.classes)
    return None


def create_eval_loader(dataset, data_config: Dict[str, Any], args, device: torch.device, distributed: bool = False):
    """The evaluation loader of train.py (each epoch) and validate.py: timm's eval transform (resize, center crop
    at `crop_pct`, normalise) from `data_config`, `args.batch_size` / `args.workers`, memory pinned on CUDA when
    `args.pin_mem`."""
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=distributed, crop_pct=data_config['crop_pct'],
        pin_memory=args.pin_mem and device.type == 'cuda', device=device, use_prefetcher=False,
        persistent_workers=False)

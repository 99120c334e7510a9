"""`python -m hgrn_vision.train.prepare_data fashion_mnist DIR`: get Fashion-MNIST for `make demo` and the tests.

The Debian package `dataset-fashion-mnist` where apt is available, otherwise torchvision's download; the files land
unzipped in `DIR/FashionMNIST/raw/`, where timm's `torch/fashion_mnist` dataset reads them.
"""
import argparse
import logging
import os
from typing import Optional, Sequence

from .args import UserError
from .data import prepare_fashion_mnist


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`python -m hgrn_vision.train.prepare_data fashion_mnist DIR`: get Fashion-MNIST into DIR/FashionMNIST/raw/."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument('name', choices=('fashion_mnist',))
    parser.add_argument('root', help='dataset root (timm: --dataset torch/fashion_mnist DIR)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        root = prepare_fashion_mnist(args.root)
    except UserError as e:
        raise SystemExit(f'error: {e}') from None
    print(f'Fashion-MNIST ready in {os.path.join(root, "FashionMNIST", "raw")}')


if __name__ == '__main__':
    main()

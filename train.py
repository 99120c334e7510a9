#!/usr/bin/env python3
"""Train HGRN-DeiT (or any timm model) with timm's data, optimizer, scheduler, EMA and checkpointing.

    python train.py -c configs/hgrn_deit_tiny_in1k.yaml /data/imagenet
    torchrun --nproc_per_node=8 train.py -c configs/hgrn_deit_small_in1k.yaml /data/imagenet
    python train.py -c configs/fashion_mnist_cpu.yaml data/

Flags follow timm's `train.py`; see `python train.py --help`. The logic lives in `hgrn_vision.train`.
"""
import hgrn_vision  # noqa: F401  (registers the hgrn_deit_* models with timm)
from hgrn_vision.train.trainer import main

if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Evaluate a model or a `train.py` checkpoint: top-1 / top-5 / loss / img/s as timm's `--result` JSON.

    python validate.py data/ --dataset torch/fashion_mnist --checkpoint output/train/RUN/model_best.pth.tar
    python validate.py /data/imagenet --checkpoint RUN/last.pth.tar --img-size 288 --crop-pct 1.0 --amp

With `--checkpoint`, the model (name and kwargs) is the one the checkpoint was trained as; a `--model` /
`--model-kwargs` that names another is refused. The result names the model and its kwargs. EMA weights are used
when the checkpoint has them (`--no-ema` for the raw ones). The logic lives in `hgrn_vision.train.evaluate`.
"""
import hgrn_vision  # noqa: F401  (registers the hgrn_deit_* models with timm)
from hgrn_vision.train.evaluate import main

if __name__ == '__main__':
    main()

"""Fixtures of the train.py / validate.py tests."""
import pytest


@pytest.fixture(scope='session')
def tiny() -> list:
    """train.py flags for a small HGRN-DeiT on the CPU: hgrn_deit_tiny's blocks at C=32, depth 2, patch 8 on 32x32
    images (4x4 tokens)."""
    return ['--model', 'hgrn_deit_tiny', '--model-kwargs', 'embed_dim=32', 'depth=2', 'patch_size=8', '--img-size',
            '32', '--device', 'cpu', '--workers', '0', '--no-progress', '--log-interval', '1000']


@pytest.fixture(scope='session')
def quick() -> list:
    """train.py flags for a schedule that learns within a few epochs: no warmup, per-update cosine."""
    return ['--lr', '1e-3', '--warmup-epochs', '0', '--min-lr', '1e-5', '--sched-on-updates']


@pytest.fixture(scope='session')
def image_folder(make_image_folder, tmp_path_factory) -> str:
    """An ImageNet-style folder of 3 classes, 8 train and 4 val images each, shared by the tests that only read it."""
    return make_image_folder(tmp_path_factory.mktemp('imagefolder'))

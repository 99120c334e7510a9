"""hgrn_vision: HGRN-DeiT image classifiers for timm.

`import hgrn_vision` registers `hgrn_deit_tiny`, `hgrn_deit_small` and `hgrn_deit_base` with timm, so
`timm.create_model('hgrn_deit_small')` works. It also works as a pytest plugin (`pytest -p hgrn_vision`),
which registers the entries before timm's own test suite collects its model list.
"""
from .layers import HgruMixer
from .models import HgrnDeit, checkpoint_filter_fn
from .ops import bihgru_scan

__version__ = '0.1.0'

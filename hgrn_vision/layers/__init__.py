"""Layers reusable beside the models."""
from .hgru import HgruMixer, hgru_theta_init
from .mlp import SiluGluMlp
from .norm import LayerNormLinear
from .patch_embed import LinearPatchEmbed

"""Layers reusable beside the models."""
from .hgru import HgruMixer, hgru_theta_init
from .patch_embed import LinearPatchEmbed

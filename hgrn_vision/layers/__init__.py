"""Layers reusable beside the models."""
from .hgru import HgruMixer, hgru_theta_init
from .mlp import SiluGluMlp
from .patch_embed import LinearPatchEmbed
from .projection import NormArgs, norm_args, project_in

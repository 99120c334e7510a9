"""Custom ops: the bidirectional HGRU scan (alone, and with the mixer's LayerNorm and gate) and its implementations;
the SiLU GLU with the projection after it."""
from .bihgru import (
    available_impls,
    bihgru_scan,
    bihgru_scan_chunked,
    bihgru_scan_norm_gate,
    bihgru_scan_reference,
    default_impl,
    is_exporting,
)
from .glu import silu_glu_linear
from .norm_linear import layer_norm_linear

"""Custom ops: the bidirectional HGRU scan (alone, and with the mixer's LayerNorm and gate) and its implementations."""
from .bihgru import (
    available_impls,
    bihgru_scan,
    bihgru_scan_norm_gate,
    bihgru_scan_parallel,
    bihgru_scan_reference,
    default_impl,
)

"""Custom ops: the bidirectional HGRU scan and its implementations."""
from .bihgru import available_impls, bihgru_scan, bihgru_scan_parallel, bihgru_scan_reference, default_impl

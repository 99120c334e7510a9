"""Run Triton kernels in Triton's interpreter: CI has no GPU. Must be set before triton kernels are defined."""
import os

os.environ.setdefault('TRITON_INTERPRET', '1')

"""Benchmarks behind `benchmark.py`: whole models side by side (`models`), the scan kernels (`scan`), where a model's
step spends its time (`profile`) and the ONNX export against PyTorch on the CPU (`onnx`)."""
from .models import (
    SCAN_BWD_OPS,
    SCAN_FWD_OPS,
    batch_for,
    benchmark_models,
    compare_runs,
    count_flops,
    create_benchmark_model,
    train_step,
)
from .onnx import benchmark_onnx
from .profile import CATEGORIES, categorize, profile_models
from .scan import (
    BWD_ELEMS,
    FWD_ELEMS,
    SCAN_SHAPES,
    benchmark_scan,
    cast_scan_inputs,
    check_scan,
    float64_reference,
    make_scan_inputs,
    rel_err,
)
from .utils import format_table, measure_copy_bandwidth, measure_matmul_peak, parse_dtype, time_fn

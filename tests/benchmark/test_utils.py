import torch

from hgrn_vision.benchmark.utils import time_fn


def test_time_fn_counts_calls():
    calls = []
    times = time_fn(lambda: calls.append(1), torch.device('cpu'), warmup=2, min_iters=5, max_iters=3, max_time=0.)
    assert len(times) == 5 and len(calls) == 7  # min_iters wins over a smaller max_iters; warmup is not timed
    times = time_fn(lambda: None, torch.device('cpu'), warmup=0, min_iters=1, max_iters=4, max_time=1e9)
    assert len(times) == 4

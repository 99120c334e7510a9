"""Fixtures of the benchmark tests: benchmark.py's main, and the CSV files it writes read back."""
import csv
import importlib.util
import math
from pathlib import Path

import pytest


@pytest.fixture(scope='session')
def bench():
    """benchmark.py as a module: `bench.main(argv)` runs one subcommand."""
    path = Path(__file__).resolve().parents[2] / 'benchmark.py'
    spec = importlib.util.spec_from_file_location('benchmark_script', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def read_csv():
    """`read_csv(path)`: the rows of a CSV file, as dicts of strings."""
    def read(path):
        with open(path, newline='') as f:
            return list(csv.DictReader(f))
    return read


@pytest.fixture(scope='session')
def positive():
    """`positive(cell)`: the CSV cell holds a finite number above 0."""
    return lambda value: value not in (None, '') and math.isfinite(float(value)) and float(value) > 0

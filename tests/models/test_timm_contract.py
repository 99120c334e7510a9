"""timm's own model tests on our entries.

The `tests/test_models.py` of the timm sdist that matches the installed timm is fetched from PyPI into
`.timm_tests/` (ignored by git) and run unchanged with our package loaded as a pytest plugin, so that the
entries are registered before timm's suite collects its model list. The tests that pick models by module name
are called directly.
"""
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

import hgrn_vision  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / '.timm_tests'
MODELS = ('hgrn_deit_tiny', 'hgrn_deit_small', 'hgrn_deit_base')
# every test of timm's suite that our entries are parametrized into, one per model
EXPECTED_TESTS = (
    'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_torchscript',
    'test_model_forward_features', 'test_model_forward_fx', 'test_model_backward_fx',
    'test_model_forward_fx_torchscript',
)


@pytest.fixture(scope='module')
def timm_suite() -> Path:
    """The folder holding timm's tests for the installed version, fetched once."""
    version = timm.__version__
    dest = CACHE / f'timm-{version}'
    if not (dest / 'tests' / 'test_models.py').exists():
        sdist_dir = CACHE / 'sdist'
        cmd = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--no-binary', ':all:',
               '-d', str(sdist_dir), f'timm=={version}']
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f'could not fetch the timm {version} sdist for its tests:\n{res.stderr}'
        with tarfile.open(next(sdist_dir.glob(f'timm-{version}.tar.gz'))) as tar:
            prefix = f'timm-{version}/'
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix + 'tests/') or m.name == prefix + 'pyproject.toml']
            tar.extractall(CACHE, members=members, filter='data')
    return dest


def test_timm_model_suite(timm_suite):
    """timm's test_models.py, unchanged, selected to our entries: every test must run and pass."""
    cmd = [sys.executable, '-m', 'pytest', '-p', 'hgrn_vision', '-p', 'no:cacheprovider',
           '-c', str(timm_suite / 'pyproject.toml'), '--rootdir', str(timm_suite),
           str(timm_suite / 'tests' / 'test_models.py'), '-k', 'hgrn_deit', '-rA', '-q']
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=timm_suite, env=env)
    report = res.stdout[-20000:] + res.stderr[-5000:]
    assert res.returncode == 0, report
    passed = set(re.findall(r'^PASSED \S+::(\w+)\[\d+-(hgrn_deit_[a-z]+)', res.stdout, re.M))
    missing = [(t, m) for t in EXPECTED_TESTS for m in MODELS if (t, m) not in passed]
    assert not missing, f'not run or not passed: {missing}\n{report}'
    assert not re.search(r'^(SKIPPED|FAILED|ERROR)', res.stdout, re.M), report


def _load_suite_module(timm_suite):
    spec = importlib.util.spec_from_file_location('timm_test_models', timm_suite / 'tests' / 'test_models.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('model_name', MODELS)
def test_timm_module_selected_tests(timm_suite, model_name):
    """timm's intermediates / features / prune tests select models by module name, so call them directly."""
    suite = _load_suite_module(timm_suite)
    suite.test_model_forward_intermediates(model_name, 1)
    suite.test_model_forward_intermediates_features(model_name, 1)
    if model_name == 'hgrn_deit_tiny':  # slow: prunes at every block; the model size does not change the logic
        suite.test_prune_intermediate_layers_contract(model_name)
        suite.test_prune_intermediate_layers_params_used(model_name)

"""benchmark.py in its CPU mode: every subcommand runs end to end on tiny settings and writes sane results."""
import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from hgrn_vision.benchmark import batch_for, categorize
from hgrn_vision.benchmark.models import add_ratios, compare_runs, reference_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('benchmark_script', ROOT / 'benchmark.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _positive(value) -> bool:
    return value not in (None, '') and math.isfinite(float(value)) and float(value) > 0


def test_batch_for():
    assert batch_for(224, 256 * 224 * 224) == 256
    assert batch_for(1024, 256 * 224 * 224) == 12
    assert batch_for(4096, 100) == 1
    assert batch_for(224, 256 * 224 * 224, batch_size=7) == 7


def test_ratio_references(bench, capsys):
    """Ratios are the first model over each other, or with --pairs each pair's first over its second."""
    models = ['a', 'b', 'c', 'd']
    assert reference_models(models) == {'b': 'a', 'c': 'a', 'd': 'a'}
    refs = reference_models(models, pairs=True)
    assert refs == {'b': 'a', 'd': 'c'}
    rows = [dict(model=m, mode='infer', compile='eager', res=224, img_s=s, mem_per_img_mb=mem)
            for m, s, mem in (('a', 30., 1.), ('b', 10., 4.), ('c', 5., 2.), ('d', 20., 1.))]
    add_ratios(rows, refs)
    assert [r.get('ratio_img_s') for r in rows] == [None, 3., None, 0.25]
    assert [r.get('ratio_mem') for r in rows] == [None, 0.25, None, 2.]
    with pytest.raises(SystemExit):
        bench.main(['models', '--device', 'cpu', '--pairs', '--models', 'a', 'b', 'c'])
    assert '--pairs takes (model, baseline) pairs, got 3 models: a b c' in capsys.readouterr().err


def test_compare_runs():
    """Two trees' rounds as one table: a row per tree, medians over the rounds, the first tree's images/s and memory
    over the other's; a round that failed keeps its status, and the runs' own ratios (over their first model) go."""
    def row(model, img_s, mem, status='ok'):
        return dict(model=model, mode='train', compile='compiled', res=224, img_s=img_s, step_ms=1e3 / img_s,
                    mem_per_img_mb=mem, ratio_img_s=9., status=status)

    runs = {'before': [[row('m', 100., 2.), row('n', 50., 1.)], [row('m', 110., 2.), row('n', 40., 1.)],
                       [row('m', 90., 2.), row('n', 45., 1.)]],
            'after': [[row('m', 200., 4.), row('n', 50., None, 'oom')], [row('m', 210., 4.), row('n', 60., 1.)],
                      [row('m', 190., 4.), row('n', 50., 1.)]]}
    rows = {r['model']: r for r in compare_runs(runs)}
    assert list(rows) == ['m [before]', 'm [after]', 'n [before]', 'n [after]']
    assert rows['m [before]']['img_s'] == 100. and rows['m [after]']['img_s'] == 200.
    assert rows['m [before]']['img_s_rounds'] == '100.0 110.0 90.0'
    assert rows['m [after]']['ratio_img_s'] == 0.5 and rows['m [after]']['ratio_mem'] == 0.5
    assert 'ratio_img_s' not in rows['m [before]'] and rows['n [before]']['status'] == 'ok'
    assert rows['n [after]']['status'] == 'oom' and rows['n [after]']['mem_per_img_mb'] == 1.
    assert rows['n [after]']['ratio_img_s'] == pytest.approx(45. / 50.)


def test_models_cpu(bench, tmp_path, capsys):
    models = ['hgrn_deit_tiny', 'deit_tiny_patch16_224']
    result = bench.main([
        'models', '--device', 'cpu', '--models', *models, '--model-kwargs', 'depth=1',
        '--resolutions', '28', '42', '--batch-size', '2', '--warmup', '0', '--min-iters', '1', '--max-iters', '2',
        '--output-dir', str(tmp_path)])
    printed = capsys.readouterr().out
    assert 'img/s' in printed and 'ref/this img/s' in printed

    rows = _read_csv(tmp_path / 'models.csv')
    assert len(rows) == 2 * 2 * 2  # models x modes x resolutions, eager only on the CPU
    assert {(r['model'], r['mode'], r['res']) for r in rows} == {
        (m, mode, res) for m in models for mode in ('infer', 'train') for res in ('28', '42')}
    for r in rows:
        assert r['status'] == 'ok' and r['compile'] == 'eager' and r['batch'] == '2'
        for key in ('img_s', 'step_ms', 'params_m', 'gflops_per_img', 'tflops', 'pct_peak'):
            assert _positive(r[key]), (key, r)
        if r['model'] == models[0]:
            assert _positive(r['scan_gops_per_img'])
        else:
            assert float(r['scan_gops_per_img']) == 0 and _positive(r['ratio_img_s'])
    # training counts the backward: more FLOPs and scan work per image than inference
    by_key = {(r['model'], r['mode'], r['res']): r for r in rows}
    for m in models:
        assert float(by_key[m, 'train', '28']['gflops_per_img']) > float(by_key[m, 'infer', '28']['gflops_per_img'])

    data = json.loads((tmp_path / 'models.json').read_text())
    assert data['meta']['matmul_tflops'] > 0 and data['meta']['models'] == models
    assert data['meta']['ratio_refs'] == {models[1]: models[0]}
    assert len(data['rows']) == len(rows) == len(result['rows'])
    png = tmp_path / 'models.png'
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_scan_cpu(bench, tmp_path, capsys):
    bench.main([
        'scan', '--device', 'cpu', '--shapes', '2x16x8', '1x5x3', '--impls', 'torch', '--check',
        '--warmup', '0', '--min-iters', '1', '--max-iters', '2', '--output-dir', str(tmp_path)])
    printed = capsys.readouterr().out
    assert 'copy bandwidth' in printed and 'fwd GB/s' in printed and 'dtheta_r' in printed

    rows = _read_csv(tmp_path / 'scan.csv')
    assert len(rows) == 2 * 2 * 2  # shapes x dtypes x ops
    assert {r['op'] for r in rows} == {'scan', 'mixer'}
    for r in rows:
        assert r['impl'] == 'torch' and r['status'] == 'ok'
        for key in ('fwd_ms', 'bwd_ms', 'fwdbwd_ms', 'fwd_gbps', 'bwd_gbps', 'fwdbwd_gbps', 'fwd_pct_copy'):
            assert _positive(r[key]), (key, r)
        floor = (5, 8) if r['op'] == 'scan' else (7, 12)  # elements per (B, N, C) element, forward / backward
        nbytes = int(r['B']) * int(r['N']) * int(r['C']) * (4 if r['dtype'] == 'float32' else 2)
        assert math.isclose(float(r['fwd_gbps']), floor[0] * nbytes / float(r['fwd_ms']) / 1e6, rel_tol=1e-6)
        assert math.isclose(float(r['bwd_gbps']), floor[1] * nbytes / float(r['bwd_ms']) / 1e6, rel_tol=1e-6)
        assert not r.get('fwd_host_ms')  # no CUDA graphs on the CPU: the wall clock is the only time

    check = _read_csv(tmp_path / 'scan_check.csv')
    assert len(check) == len(rows) // 2  # the scan's rows
    for r in check:
        assert r['status'] == 'ok'
        bound = 1e-5 if r['dtype'] == 'float32' else 2e-2
        for key in ('out', 'du', 'dz', 'dgamma', 'dtheta_f', 'dtheta_r'):
            assert 0 <= float(r[key]) < bound, (key, r)

    data = json.loads((tmp_path / 'scan.json').read_text())
    assert data['meta']['copy_gbps'] > 0 and len(data['check']) == len(check)


def test_categorize():
    assert categorize('_bihgru_fwd_kernel') == 'scan'
    assert categorize('sm90_xmma_gemm_bf16bf16_bf16f32') == 'matmul' and categorize('aten::addmm') == 'matmul'
    assert categorize('pytorch_flash::flash_fwd_kernel') == 'attention'
    assert categorize('triton_per_fused_native_layer_norm_0') == 'layer_norm' == categorize('_norm_gate_bwd_kernel')
    assert categorize('triton_poi_fused_mul_silu_1') == 'elementwise / fused'
    assert categorize('some_unknown_kernel') == 'other'


def test_profile_cpu(bench, tmp_path, capsys):
    bench.main(['profile', '--device', 'cpu', '--models', 'hgrn_deit_tiny', 'deit_tiny_patch16_224',
                '--model-kwargs', 'depth=1', '--steps', '2', '--output-dir', str(tmp_path)])
    printed = capsys.readouterr().out
    assert 'ms/step' in printed and 'largest kernels' in printed
    rows = _read_csv(tmp_path / 'profile.csv')
    for model in ('hgrn_deit_tiny', 'deit_tiny_patch16_224'):
        for mode in ('infer', 'train'):
            block = [r for r in rows if r['model'] == model and r['mode'] == mode]
            cats = {r['category']: float(r['ms_per_step']) for r in block}
            assert 'matmul' in cats and 'total' in cats, cats
            assert all(v > 0 for v in cats.values()), cats
            assert math.isclose(sum(v for k, v in cats.items() if k != 'total'), cats['total'], rel_tol=1e-6)
            assert math.isclose(sum(float(r['pct']) for r in block if r['category'] != 'total'), 100, rel_tol=1e-6)
        assert 'optimizer' in {r['category'] for r in rows if r['model'] == model and r['mode'] == 'train'}


def test_scan_failing_impl_is_a_row(tmp_path, monkeypatch):
    """An impl that cannot run gives a row with its error, one without a backward keeps its forward time and
    forward error, and the other impls still run."""
    from hgrn_vision.benchmark import benchmark_scan
    from hgrn_vision.ops import bihgru
    impls = bihgru._IMPLS  # the dispatch table: add two stand-in impls for this test

    def broken(*args):
        raise ValueError('needs CUDA tensors')

    def forward_only(*args):
        return bihgru.bihgru_scan_parallel(*args).detach()

    monkeypatch.setitem(impls, '_broken', broken)
    monkeypatch.setitem(impls, '_forward_only', forward_only)
    out = benchmark_scan('cpu', shapes=[(1, 4, 2)], dtypes=[torch.float32], impls=['torch', '_broken', '_forward_only'],
                         check=True, output_dir=str(tmp_path), timing=dict(warmup=0, min_iters=1, max_iters=1))
    rows = {r['impl']: r for r in out['rows']}
    assert rows['torch']['status'] == 'ok' and rows['_broken']['status'].startswith('error: ValueError')
    assert rows['_forward_only']['status'].startswith('error') and rows['_forward_only']['fwd_gbps'] > 0
    check = {r['impl']: r for r in out['check']}
    assert check['torch']['status'] == 'ok' and check['_forward_only']['out'] < 1e-5
    assert check['_broken']['status'].startswith('not run')


def test_compile_settings(bench, capsys, monkeypatch):
    """'cudagraphs' is torch.compile's mode 'reduce-overhead', each of its steps a new generation of the graph trees;
    it needs CUDA, and asking for it elsewhere is a usage error before anything runs."""
    from hgrn_vision.benchmark.models import check_compile_settings, compile_model, make_step
    with pytest.raises(SystemExit):
        bench.main(['models', '--device', 'cpu', '--compile', 'cudagraphs', '--models', 'hgrn_deit_tiny'])
    err = capsys.readouterr().err
    assert "compile setting 'cudagraphs' needs a CUDA device (got cpu): use eager or compiled" in err
    with pytest.raises(ValueError, match=r"unknown compile setting\(s\) \['graphs'\]: use eager, compiled, cudagraphs"):
        check_compile_settings(['eager', 'graphs'], torch.device('cpu'))
    check_compile_settings(['eager', 'compiled', 'cudagraphs'], torch.device('cuda'))

    calls = []
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(3, 4)
    assert compile_model(model, 'eager') is model and calls == []
    compile_model(model, 'compiled')
    compile_model(model, 'cudagraphs')
    assert calls == [dict(dynamic=False, mode=None), dict(dynamic=False, mode='reduce-overhead')]

    marks = []
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: marks.append(len(marks)))
    x, y = torch.randn(2, 3), torch.tensor([0, 3])
    for cudagraphs, expected in ((False, []), (True, [0, 1, 2])):
        step = make_step(model, x, y, 'train', torch.device('cpu'), None, cudagraphs=cudagraphs)
        for _ in range(3):
            step()
        assert marks == expected and model.weight.grad is not None
        model.zero_grad(set_to_none=True)

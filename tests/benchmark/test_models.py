"""benchmark.py models: the batch at a resolution, the ratios between models and between trees, the compile settings,
and a CPU run end to end on tiny settings that writes sane results."""
import json

import pytest
import torch

from hgrn_vision.benchmark import batch_for
from hgrn_vision.benchmark.models import add_ratios, compare_runs, reference_models


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


def test_models_cpu(bench, read_csv, positive, tmp_path, capsys):
    models = ['hgrn_deit_tiny', 'deit_tiny_patch16_224']
    result = bench.main([
        'models', '--device', 'cpu', '--models', *models, '--model-kwargs', 'depth=1',
        '--resolutions', '28', '42', '--batch-size', '2', '--warmup', '0', '--min-iters', '1', '--max-iters', '2',
        '--output-dir', str(tmp_path)])
    printed = capsys.readouterr().out
    assert 'img/s' in printed and 'ref/this img/s' in printed

    rows = read_csv(tmp_path / 'models.csv')
    assert len(rows) == 2 * 2 * 2  # models x modes x resolutions, eager only on the CPU
    assert {(r['model'], r['mode'], r['res']) for r in rows} == {
        (m, mode, res) for m in models for mode in ('infer', 'train') for res in ('28', '42')}
    for r in rows:
        assert r['status'] == 'ok' and r['compile'] == 'eager' and r['batch'] == '2'
        for key in ('img_s', 'step_ms', 'params_m', 'gflops_per_img', 'tflops', 'pct_peak'):
            assert positive(r[key]), (key, r)
        if r['model'] == models[0]:
            assert positive(r['scan_gops_per_img'])
        else:
            assert float(r['scan_gops_per_img']) == 0 and positive(r['ratio_img_s'])
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

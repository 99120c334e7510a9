"""benchmark.py scan on the CPU: byte-floor rates consistent with the times, the check against float64, and an impl
that cannot run as a row of its own."""
import json
import math

import torch


def test_scan_cpu(bench, read_csv, positive, tmp_path, capsys):
    bench.main([
        'scan', '--device', 'cpu', '--shapes', '2x16x8', '1x5x3', '--impls', 'torch', '--check',
        '--warmup', '0', '--min-iters', '1', '--max-iters', '2', '--output-dir', str(tmp_path)])
    printed = capsys.readouterr().out
    assert 'copy bandwidth' in printed and 'fwd GB/s' in printed and 'dtheta_r' in printed

    rows = read_csv(tmp_path / 'scan.csv')
    assert len(rows) == 2 * 2 * 2  # shapes x dtypes x ops
    assert {r['op'] for r in rows} == {'scan', 'mixer'}
    for r in rows:
        assert r['impl'] == 'torch' and r['status'] == 'ok'
        for key in ('fwd_ms', 'bwd_ms', 'fwdbwd_ms', 'fwd_gbps', 'bwd_gbps', 'fwdbwd_gbps', 'fwd_pct_copy'):
            assert positive(r[key]), (key, r)
        floor = (5, 8) if r['op'] == 'scan' else (7, 12)  # elements per (B, N, C) element, forward / backward
        nbytes = int(r['B']) * int(r['N']) * int(r['C']) * (4 if r['dtype'] == 'float32' else 2)
        assert math.isclose(float(r['fwd_gbps']), floor[0] * nbytes / float(r['fwd_ms']) / 1e6, rel_tol=1e-6)
        assert math.isclose(float(r['bwd_gbps']), floor[1] * nbytes / float(r['bwd_ms']) / 1e6, rel_tol=1e-6)
        assert not r.get('fwd_host_ms')  # no CUDA graphs on the CPU: the wall clock is the only time

    check = read_csv(tmp_path / 'scan_check.csv')
    assert len(check) == len(rows) // 2  # the scan's rows
    for r in check:
        assert r['status'] == 'ok'
        bound = 1e-5 if r['dtype'] == 'float32' else 2e-2
        for key in ('out', 'du', 'dz', 'dgamma', 'dtheta_f', 'dtheta_r'):
            assert 0 <= float(r[key]) < bound, (key, r)

    data = json.loads((tmp_path / 'scan.json').read_text())
    assert data['meta']['copy_gbps'] > 0 and len(data['check']) == len(check)


def test_scan_failing_impl_is_a_row(tmp_path, monkeypatch):
    """An impl that cannot run gives a row with its error, one without a backward keeps its forward time and
    forward error, and the other impls still run."""
    from hgrn_vision.benchmark import benchmark_scan
    from hgrn_vision.ops import bihgru
    impls = bihgru._IMPLS  # the dispatch table: add two stand-in impls for this test

    def broken(*args):
        raise ValueError('needs CUDA tensors')

    def forward_only(*args):
        return bihgru.bihgru_scan_chunked(*args).detach()

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

"""benchmark.py onnx: a CPU run end to end on a tiny model; onnxruntime gives PyTorch's logits at the timed size and
at a larger, non-square one, and the JSON holds the rows and checks."""
import json


def test_onnx_cpu_run(bench, tmp_path):
    out = bench.main(['onnx', '--models', 'hgrn_deit_tiny', '--model-kwargs', 'depth=1', 'embed_dim=32',
                      '--res', '32', '--batch-sizes', '1', '3', '--check-sizes', '48x80', '--rounds', '1',
                      '--max-time', '0.1', '--threads', '2', '--output-dir', str(tmp_path)])
    assert [(r['model'], r['batch']) for r in out['rows']] == [('hgrn_deit_tiny', 1), ('hgrn_deit_tiny', 3)]
    for row in out['rows']:
        assert row['torch_img_s'] > 0 and row['ort_img_s'] > 0 and row['max_rel_diff'] < 1e-5
    assert [(c['height'], c['width']) for c in out['checks']] == [(48, 80)] and out['checks'][0]['max_rel_diff'] < 1e-5
    saved = json.loads((tmp_path / 'onnx.json').read_text())
    assert saved['meta']['threads'] == 2 and saved['meta']['onnxruntime'] and len(saved['rows']) == 2

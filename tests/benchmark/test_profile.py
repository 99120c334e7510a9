"""benchmark.py profile: kernel names sorted into kinds of work, and a CPU run whose categories add up to the step."""
import math

from hgrn_vision.benchmark import categorize


def test_categorize():
    assert categorize('_bihgru_fwd_kernel') == 'scan'
    assert categorize('sm90_xmma_gemm_bf16bf16_bf16f32') == 'matmul' and categorize('aten::addmm') == 'matmul'
    assert categorize('pytorch_flash::flash_fwd_kernel') == 'attention'
    assert categorize('triton_per_fused_native_layer_norm_0') == 'layer_norm' == categorize('_norm_gate_bwd_kernel')
    assert categorize('triton_poi_fused_mul_silu_1') == 'elementwise / fused'
    assert categorize('some_unknown_kernel') == 'other'


def test_profile_cpu(bench, read_csv, tmp_path, capsys):
    bench.main(['profile', '--device', 'cpu', '--models', 'hgrn_deit_tiny', 'deit_tiny_patch16_224',
                '--model-kwargs', 'depth=1', '--steps', '2', '--output-dir', str(tmp_path)])
    printed = capsys.readouterr().out
    assert 'ms/step' in printed and 'largest kernels' in printed
    rows = read_csv(tmp_path / 'profile.csv')
    for model in ('hgrn_deit_tiny', 'deit_tiny_patch16_224'):
        for mode in ('infer', 'train'):
            block = [r for r in rows if r['model'] == model and r['mode'] == mode]
            cats = {r['category']: float(r['ms_per_step']) for r in block}
            assert 'matmul' in cats and 'total' in cats, cats
            assert all(v > 0 for v in cats.values()), cats
            assert math.isclose(sum(v for k, v in cats.items() if k != 'total'), cats['total'], rel_tol=1e-6)
            assert math.isclose(sum(float(r['pct']) for r in block if r['category'] != 'total'), 100, rel_tol=1e-6)
        assert 'optimizer' in {r['category'] for r in rows if r['model'] == model and r['mode'] == 'train'}

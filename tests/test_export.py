"""`python -m hgrn_vision.export`: a train.py checkpoint (raw and EMA) and a bare state dict (the authors') to timm's
hub layout, loaded back through `local-dir:` with identical logits; the model card; ONNX checked with onnxruntime at
two sizes (and NaN past its size limit); one clean error line for each kind of bad input."""
import csv
import json
import os

import onnxruntime as ort
import pytest
import timm
import torch

import hgrn_vision  # noqa: F401
from hgrn_vision import export as export_mod

KWARGS = dict(embed_dim=32, depth=2, patch_size=8)  # 32 px images: 4 x 4 tokens


@pytest.fixture(scope='module')
def run(make_image_folder, run_train, tmp_path_factory):
    """A 1-epoch train.py run with EMA of a small HGRN-DeiT on 3 classes of 32 px images: (run folder, checkpoint)."""
    root = tmp_path_factory.mktemp('export_run')
    res = run_train([
        make_image_folder(root / 'data'), '--val-split', 'val', '--model', 'hgrn_deit_tiny', '--model-kwargs',
        *[f'{k}={v}' for k, v in KWARGS.items()], '--img-size', 32, '--device', 'cpu', '--workers', 0, '--no-progress',
        '--no-plot', '-b', 8, '--epochs', 1, '--lr', 1e-3, '--warmup-epochs', 0, '--model-ema',
        '--output', root, '--experiment', 'run'])
    return res['run_dir'], os.path.join(res['run_dir'], 'last.pth.tar')


def _checkpoint_model(path, key):
    model = timm.create_model('hgrn_deit_tiny', num_classes=3, **KWARGS).eval()
    model.load_state_dict(torch.load(path, weights_only=True)[key])
    return model


def _logits(model, x):
    with torch.inference_mode():
        return model(x)


def _export(argv):
    return export_mod.main([str(a) for a in argv])


@pytest.fixture
def fails(main_fails):
    """`fails(argv)` runs the export that must fail and returns its one-line error."""
    def run(argv):
        err = main_fails(export_mod.main, argv).strip()
        assert err.startswith('error: ') and 'Traceback' not in err, err
        return err
    return run


@pytest.mark.parametrize('ema', [False, True])
def test_round_trip_and_model_card(run, tmp_path, ema):
    """local-dir: rebuilds the checkpoint's model (kwargs from config.json) with the very same logits."""
    run_dir, ckpt = run
    out = tmp_path / 'hub'
    res = _export([ckpt, out] + ['--ema'] * ema)
    assert sorted(os.listdir(out)) == res['files'] == ['README.md', 'config.json', 'model.safetensors']
    expected = _checkpoint_model(ckpt, 'state_dict_ema' if ema else 'state_dict')
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(expected, x), rtol=0, atol=0)
    x = torch.randn(1, 3, 40, 56)  # another size: the model takes any
    torch.testing.assert_close(_logits(loaded, x), _logits(expected, x), rtol=0, atol=0)

    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'hgrn_deit_tiny' and config['num_classes'] == 3
    assert {k: config['model_args'][k] for k in KWARGS} == KWARGS and config['model_args']['num_classes'] == 3
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32] and 'tag' not in config['pretrained_cfg']

    card = (out / 'README.md').read_text()
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        row = list(csv.DictReader(f))[-1]
    top1 = float(row['eval_ema_top1' if ema else 'eval_top1'])
    n_params = sum(p.numel() for p in expected.parameters())
    for line in ('- **Architecture:** hgrn_deit_tiny', '  - embed_dim: 32', '  - depth: 2', '  - patch_size: 8',
                 f'  - Params: {n_params:,}', f'- **Weights:** {"EMA" if ema else "raw"} weights of last.pth.tar',
                 f'- **Top-1:** {top1:.2f}% on the val split', '  - Dataset: image folder data, split train',
                 '  - Epochs: 1', '  - Batch size: 8', '  - Learning rate: 0.001, cosine', '  - Image size: 32',
                 f"timm.create_model('local-dir:{out}', pretrained=True)", 'Hierarchically Gated'):
        assert line in card, line


def test_onnx(run, tmp_path):
    """model.onnx: dynamic batch, height and width; PyTorch's logits at any size and aspect, from one token to many
    times the tokens of the size it was traced at."""
    _, ckpt = run
    out = tmp_path / 'onnx'
    res = _export([ckpt, out, '--onnx'])
    assert 'model.onnx' in res['files'] and all(d < 1e-5 for d in res['onnx_max_diff'].values())
    assert '- **ONNX:** model.onnx: dynamic batch, height and width (any image size)' in (out / 'README.md').read_text()
    session = ort.InferenceSession(str(out / 'model.onnx'), providers=['CPUExecutionProvider'])
    expected = _checkpoint_model(ckpt, 'state_dict')
    for shape in ((2, 3, 32, 32), (1, 3, 8, 8), (3, 3, 41, 17), (2, 3, 8, 64), (1, 3, 200, 260)):
        x = torch.randn(shape)
        out_onnx = torch.from_numpy(session.run(None, {'input0': x.numpy()})[0])
        torch.testing.assert_close(out_onnx, _logits(expected, x), rtol=0, atol=1e-4)
    _export([ckpt, out, '--force'])  # new weights without --onnx: the old model.onnx must not stay beside them
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'model.safetensors']


def test_bare_state_dict_of_the_authors(authors_dir, fails, tmp_path):
    """A bare state dict (the authors' layout, converted) with its model named by flags; EMA is refused there."""
    argv = [authors_dir / 'checkpoint.pth', tmp_path / 'hub', '--model', 'hgrn_deit_tiny',
            '--model-kwargs', 'embed_dim=64', 'depth=2', '--num-classes', 10]
    assert 'holds no EMA weights' in fails(argv + ['--ema'])
    assert 'no train.py args naming its model: pass --model' in fails(argv[:2])
    _export(argv)
    model = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    x = torch.load(authors_dir / 'input.pt')
    torch.testing.assert_close(_logits(model, x), torch.load(authors_dir / 'logits_fp32.pt'), rtol=0, atol=1e-5)


def test_bad_input(run, fails, tmp_path):
    """One line for each, and nothing written: another architecture, keys or flags that do not fit, a missing file,
    an unknown model, an OUTPUT_DIR in use (unless --force, which keeps
    the other files)."""
    _, ckpt = run
    out = tmp_path / 'out'
    for name in ('deit_tiny_patch16_224', 'test_resnet'):
        torch.save(timm.create_model(name, num_classes=3).state_dict(), tmp_path / f'{name}.pth')
        err = fails([tmp_path / f'{name}.pth', out, '--model', 'hgrn_deit_tiny', '--num-classes', 3])
        assert 'does not fit' in err and 'hgrn_deit_tiny' in err and 'another architecture' in err and len(err) < 500
    torch.save(_checkpoint_model(ckpt, 'state_dict').state_dict(), tmp_path / 'ours.pth')
    err = fails([tmp_path / 'ours.pth', out, '--model', 'hgrn_deit_tiny', '--model-kwargs', 'embed_dim=48', 'depth=2',
                 'patch_size=8', '--num-classes', 3])
    assert 'does not fit model hgrn_deit_tiny' in err and 'embed_dim=48' in err
    err = fails([ckpt, out, '--model-kwargs', 'embed_dim=48'])
    assert "--model-kwargs {'embed_dim': 48} disagrees with checkpoint" in err
    assert 'does not exist' in fails([tmp_path / 'missing.pth', out])
    assert "Unknown model 'hgrn_deit_tinny'; did you mean hgrn_deit_tiny" in fails(
        [tmp_path / 'ours.pth', out, '--model', 'hgrn_deit_tinny'])
    assert not os.path.exists(out)

    os.makedirs(out)
    (out / 'notes.txt').write_text('mine')
    assert 'exists and is not empty' in fails([ckpt, out])
    assert os.listdir(out) == ['notes.txt']
    _export([ckpt, out, '--force'])
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'model.safetensors', 'notes.txt']
    assert not [f for f in os.listdir(tmp_path) if '.partial-' in f]

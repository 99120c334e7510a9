"""validate.py evaluates the model a checkpoint was trained as, refuses a --model / --model-kwargs that names another,
and its result names the model and its kwargs."""
import json

import pytest
import torch

import hgrn_vision  # noqa: F401
from hgrn_vision.train import evaluate as evaluate_mod

# trained as hgrn_deit_small with kwargs that make it tiny: the name alone does not say what the checkpoint holds
KWARGS = {'embed_dim': 32, 'depth': 2, 'patch_size': 8}
MODEL = ['--model', 'hgrn_deit_small', '--model-kwargs', *(f'{k}={v}' for k, v in KWARGS.items())]
EVAL = ['--split', 'val', '--device', 'cpu', '--workers', '0', '-b', 8]


@pytest.fixture(scope='module')
def run(make_image_folder, run_train, quick, tmp_path_factory):
    """(image folder, last.pth.tar) of a one-epoch train.py run."""
    root = tmp_path_factory.mktemp('validate')
    folder = make_image_folder(root / 'data', classes=2, n_train=4, n_val=2)
    res = run_train([folder, '--val-split', 'val', *MODEL, '--img-size', 32, '--device', 'cpu', '--workers', 0,
                     '--no-progress', '-b', 4, '--epochs', 1, *quick, '--output', root / 'out', '--experiment', 'x'])
    return folder, f'{res["run_dir"]}/last.pth.tar'


def _validate(folder, ckpt, *argv, results_file=None):
    extra = ['--results-file', results_file] if results_file else []
    return evaluate_mod.main([str(a) for a in (folder, '--checkpoint', ckpt, *EVAL, *argv, *extra)])


@pytest.mark.parametrize('argv', [[], MODEL, ['--model-kwargs', *MODEL[3:]]], ids=['own', 'same', 'same-kwargs'])
def test_result_names_the_checkpoints_model(run, argv, tmp_path):
    """No flags, or flags that repeat what the checkpoint was trained as: its model is evaluated and named."""
    out = _validate(*run, *argv, results_file=tmp_path / 'res.json')
    assert out['model'] == 'hgrn_deit_small' and out['model_kwargs'] == KWARGS
    assert json.loads((tmp_path / 'res.json').read_text())['model_kwargs'] == KWARGS
    assert out['param_count'] == round(sum(p.numel() for p in torch.load(
        run[1], weights_only=False)['state_dict'].values()) / 1e6, 2)


@pytest.mark.parametrize('argv,given,asked', [
    (['--model', 'hgrn_deit_small'], '--model hgrn_deit_small', 'hgrn_deit_small'),
    (['--model', 'hgrn_deit_tiny'], '--model hgrn_deit_tiny', 'hgrn_deit_tiny'),
    (['--model-kwargs', 'embed_dim=32', 'depth=2'], '--model-kwargs embed_dim=32 depth=2',
     'hgrn_deit_small with model_kwargs {embed_dim: 32, depth: 2}'),
    (['--model', 'hgrn_deit_tiny', *MODEL[2:]], '--model hgrn_deit_tiny --model-kwargs embed_dim=32 depth=2 '
     'patch_size=8', 'hgrn_deit_tiny with model_kwargs {embed_dim: 32, depth: 2, patch_size: 8}'),
], ids=['same-name-no-kwargs', 'other-name', 'other-kwargs', 'other-name-same-kwargs'])
def test_other_model_than_the_checkpoints_is_refused(run, argv, given, asked, main_fails, tmp_path, monkeypatch):
    """The error names the flags, the checkpoint's model and the way out; nothing is evaluated or written."""
    monkeypatch.setattr(evaluate_mod, 'build_dataset', lambda *a, **k: pytest.fail('evaluated after all'))
    err = main_fails(evaluate_mod.main, [run[0], '--checkpoint', run[1], *EVAL, *argv,
                                         '--results-file', tmp_path / 'res.json'])
    drop = ' and '.join(f for f in ('--model', '--model-kwargs') if f in argv)
    assert (f'error: {given} disagrees with checkpoint {run[1]!r}, trained as hgrn_deit_small with model_kwargs '
            f"{{embed_dim: 32, depth: 2, patch_size: 8}}: drop {drop} to evaluate the checkpoint's own model, or pass "
            f'a checkpoint of {asked}.') in err, err
    assert not (tmp_path / 'res.json').exists()


def test_checkpoint_with_only_an_arch_name(run, main_fails, tmp_path):
    """A checkpoint that names its model but not its kwargs: only the name is compared."""
    path = tmp_path / 'arch_only.pth'
    torch.save({'state_dict': torch.load(run[1], weights_only=False)['state_dict'], 'arch': 'hgrn_deit_small'}, path)
    out = _validate(run[0], path, *MODEL)
    assert out['model'] == 'hgrn_deit_small' and out['model_kwargs'] == KWARGS
    err = main_fails(evaluate_mod.main, [run[0], '--checkpoint', path, *EVAL, '--model', 'hgrn_deit_tiny'])
    assert f'--model hgrn_deit_tiny disagrees with checkpoint {str(path)!r}, trained as hgrn_deit_small: ' in err, err


def test_authors_checkpoint(authors_dir, make_image_folder, tmp_path, monkeypatch):
    """A checkpoint written by the authors' code (`authors_dir`) is converted and evaluated as the model named on the
    command line; the model evaluated gives their logits."""
    folder = make_image_folder(tmp_path / 'data', classes=10, n_train=1, n_val=1, size=56)
    evaluated = []
    run_eval = evaluate_mod.evaluate
    monkeypatch.setattr(evaluate_mod, 'evaluate', lambda model, *a, **k: evaluated.append(model) or run_eval(
        model, *a, **k))
    out = _validate(folder, authors_dir / 'checkpoint.pth', '--model', 'hgrn_deit_tiny', '--model-kwargs',
                    'embed_dim=64', 'depth=2', '--num-classes', 10, '--img-size', 56)
    assert out['model'] == 'hgrn_deit_tiny' and out['model_kwargs'] == {'embed_dim': 64, 'depth': 2}
    assert out['samples'] == 10 and out['param_count'] == 0.15  # their 147,658
    with torch.no_grad():
        logits = evaluated[0].cpu().float()(torch.load(authors_dir / 'input.pt'))
    torch.testing.assert_close(logits, torch.load(authors_dir / 'logits_fp32.pt'), rtol=0, atol=1e-5)

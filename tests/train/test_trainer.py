"""train.py end to end on the CPU: real data, exact resume, torchrun (gloo), ImageNet-style folders with the DeiT
recipe, fine-tuning, torch.compile's modes, and clear errors on bad input."""
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hgrn_vision  # noqa: F401
from hgrn_vision.train import evaluate as evaluate_mod
from hgrn_vision.train import trainer
from hgrn_vision.train.args import UserError, load_config_file, parse_args, train_parser
from hgrn_vision.train.checkpoint import load_checkpoint_file
from hgrn_vision.train.data import prepare_fashion_mnist

REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope='session')
def fashion_mnist():
    """Fashion-MNIST as `make demo` gets it (Debian package, else torchvision download), cached in data/."""
    return prepare_fashion_mnist(os.path.join(REPO, 'data'))


def _summary(run_dir):
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        return list(csv.DictReader(f))


def test_fashion_mnist_learns_and_validate_agrees(fashion_mnist, run_train, tiny, quick, tmp_path, capsys):
    """A short training on a Fashion-MNIST subset lands far above chance (10%); validate.py reproduces it."""
    res = run_train([
        fashion_mnist, '--dataset', 'torch/fashion_mnist', '--val-split', 'test', '--train-subset', 4000,
        '--val-subset', 2000, *tiny, '--img-size', 28, '--model-kwargs', 'embed_dim=48', 'depth=2', 'patch_size=7',
        '--in-chans', 1, '--num-classes', 10, '--mean', 0.286, '--std', 0.353, '--crop-pct', 1, '--scale', 0.8, 1,
        '--color-jitter', 0, '-b', 64, '--epochs', 3, *quick, '--lr', 3e-3, '--output', tmp_path, '--experiment', 'fm'])
    assert res['eval']['top1'] > 60, res['eval']
    run = res['run_dir']
    for name in ('args.yaml', 'summary.csv', 'summary.png', 'last.pth.tar', 'model_best.pth.tar', 'log.txt'):
        assert os.path.isfile(os.path.join(run, name)), name
    rows = _summary(run)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    with open(os.path.join(run, 'log.txt')) as f:
        log = f.read()
    assert 'img/s' in log and 'ETA' in log and 'LR:' in log and 'Data:' in log

    # validate.py on the full 10k test split, everything else from the checkpoint's saved args
    capsys.readouterr()
    results_file = tmp_path / 'res.json'
    out = evaluate_mod.main([fashion_mnist, '--checkpoint', os.path.join(run, 'last.pth.tar'), '--split', 'test',
                             '--device', 'cpu', '--workers', '0', '--results-file', str(results_file)])
    printed = capsys.readouterr().out
    assert '--result' in printed
    assert json.loads(printed.split('--result', 1)[1]) == json.loads(results_file.read_text()) == json.loads(
        json.dumps(out))
    assert out['samples'] == 10000 and out['ema'] is False and out['model'] == 'hgrn_deit_tiny'
    assert out['top1'] > 60 and abs(out['top1'] - res['eval']['top1']) < 5  # 2k subset vs the full 10k


def _resume_argv(tiny, quick, folder, out, exp):
    return [folder, '--val-split', 'val', *tiny, '-b', 8, '--epochs', 4, *quick, '--model-ema', '--model-ema-warmup',
            '--mixup', 0.8, '--cutmix', 1.0, '--reprob', 0.25, '--aa', 'rand-m9-mstd0.5-inc1', '--clip-grad', 5,
            '--train-interpolation', 'bicubic', '--output', out, '--experiment', exp, '--seed', 7]


def test_resume_is_exact(image_folder, run_train, tiny, quick, tmp_path):
    """4 epochs straight == 2 epochs + --resume + 2 epochs: identical weights, EMA, optimizer state and metrics."""
    straight = run_train(_resume_argv(tiny, quick, image_folder, tmp_path, 'straight'))
    first = run_train(_resume_argv(tiny, quick, image_folder, tmp_path, 'split') + ['--stop-epoch', 2])
    assert [int(r['epoch']) for r in _summary(first['run_dir'])] == [0, 1]
    resumed = run_train(_resume_argv(tiny, quick, image_folder, tmp_path, 'split')[:-4] + [
        '--resume', os.path.join(first['run_dir'], 'last.pth.tar')])
    assert resumed['run_dir'] == first['run_dir']  # continues in its own folder

    for name in ('model', 'model_ema'):
        a, b = straight[name].state_dict(), resumed[name].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f'{name}.{k} differs after resume'
    sa = load_checkpoint_file(os.path.join(straight['run_dir'], 'last.pth.tar'))
    sb = load_checkpoint_file(os.path.join(resumed['run_dir'], 'last.pth.tar'))
    assert sa['epoch'] == sb['epoch'] == 3
    for (ka, va), (kb, vb) in zip(sa['optimizer']['state'].items(), sb['optimizer']['state'].items()):
        assert all(torch.equal(va[s], vb[s]) for s in va), f'optimizer state {ka} differs'
    rows_a, rows_b = _summary(straight['run_dir']), _summary(resumed['run_dir'])
    assert len(rows_a) == len(rows_b) == 4
    for ra, rb in zip(rows_a, rows_b):
        ra.pop('train_img_per_sec'), rb.pop('train_img_per_sec'), ra.pop('eval_img_per_sec'), rb.pop('eval_img_per_sec')
        ra.pop('eval_ema_img_per_sec'), rb.pop('eval_ema_img_per_sec')
        assert ra == rb


def test_torchrun_two_processes_gloo_agree(image_folder, tiny, quick, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): both ranks end with the same weights; only rank 0 writes."""
    driver = tmp_path / 'driver.py'
    argv = [image_folder, '--val-split', 'val', *tiny, '-b', 4, '--epochs', 2, *quick, '--model-ema', '--mixup', 0.8,
            '--aug-repeats', 2, '--output', tmp_path / 'out', '--experiment', 'ddp', '--dist-bn', '']
    driver.write_text(textwrap.dedent(f"""
        import logging, os, sys, torch
        sys.path.insert(0, {REPO!r})
        import hgrn_vision
        logging.basicConfig(level=logging.INFO)
        from hgrn_vision.train import trainer
        from hgrn_vision.train.args import parse_args, train_parser
        res = trainer.train(parse_args(train_parser(), {[str(a) for a in argv]!r}))
        assert torch.distributed.get_backend() == 'gloo' and torch.distributed.get_world_size() == 2
        torch.save({{'model': res['model'].state_dict(), 'ema': res['model_ema'].state_dict(), 'eval': res['eval']}},
                   os.path.join({str(tmp_path)!r}, f"rank{{os.environ['RANK']}}.pt"))
    """))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           str(driver)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    for part in ('model', 'ema'):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f'{part}.{k} differs between ranks'
    timing = ('img_per_sec', 'ema_img_per_sec')
    assert {k: v for k, v in r0['eval'].items() if k not in timing} == {
        k: v for k, v in r1['eval'].items() if k not in timing}  # metrics reduced across ranks
    assert os.listdir(tmp_path / 'out') == ['ddp']
    assert 'Distributed: process 1 of 2' in proc.stderr + proc.stdout


def test_image_folder_deit_recipe_then_validate_and_finetune(image_folder, run_train, tiny, quick, tmp_path, caplog):
    """An ImageNet-style folder trains with the DeiT augmentation / AdamW + layer decay / EMA, validates at another
    resolution, and fine-tunes to another number of classes and resolution with the head re-initialised."""
    cfg = os.path.join(REPO, 'configs', 'hgrn_deit_tiny_in1k.yaml')
    res = run_train([image_folder, '--val-split', 'val', '-c', cfg, *tiny, '-b', 8, '--epochs', 2, '--warmup-epochs', 1,
                     '--layer-decay', 0.75, '--output', tmp_path, '--experiment', 'folder', '--model-ema',
                     '--model-ema-decay', 0.9])
    run = res['run_dir']
    saved = load_config_file(os.path.join(run, 'args.yaml'), train_parser())
    assert saved['aa'] == 'rand-m9-mstd0.5-inc1' and saved['mixup'] == 0.8 and saved['cutmix'] == 1.0
    assert saved['epochs'] == 2 and saved['num_classes'] == 3  # the CLI overrode the file; classes from the folder
    assert saved['lr'] == pytest.approx(5e-4 * 8 / 512)  # DeiT: lr_base x global batch / 512
    assert {'eval_top1', 'eval_ema_top1'} <= set(_summary(run)[0])

    ckpt = os.path.join(run, 'last.pth.tar')
    out = evaluate_mod.main([image_folder, '--checkpoint', ckpt, '--split', 'val', '--device', 'cpu', '--workers', '0',
                             '--img-size', '40', '--crop-pct', '0.875'])
    assert out['ema'] is True and out['img_size'] == 40 and out['crop_pct'] == 0.875 and out['samples'] == 12
    raw = evaluate_mod.main([image_folder, '--checkpoint', ckpt, '--split', 'val', '--device', 'cpu', '--workers', '0',
                             '--no-ema'])
    assert raw['ema'] is False
    sd = load_checkpoint_file(ckpt)
    assert not all(torch.equal(sd['state_dict'][k], sd['state_dict_ema'][k]) for k in sd['state_dict'])

    caplog.set_level('INFO')
    ft = run_train([image_folder, '--val-split', 'val', *tiny, '--img-size', 48, '--num-classes', 5,
                    '--initial-checkpoint', ckpt, '-b', 8, '--epochs', 1, *quick, '--output', tmp_path,
                    '--experiment', 'ft'])
    assert 'dropped and re-initialised: head.weight (3, 32) -> (5, 32), head.bias (3,) -> (5,)' in caplog.text
    ft_sd = torch.load(os.path.join(ft['run_dir'], 'last.pth.tar'), weights_only=True)['state_dict']
    assert ft_sd['head.weight'].shape == (5, 32)


# ---- bad input: a clear error naming the culprit, exit status 2, no run folder left behind


@pytest.mark.parametrize('case', ['missing', 'empty'])
def test_bad_data_dir(case, main_fails, tiny, tmp_path):
    data = tmp_path / 'nope'
    if case == 'empty':
        data.mkdir()
    err = main_fails(trainer.main, [data, *tiny, '--output', tmp_path / 'out', '--experiment', 'x'], tmp_path / 'out')
    assert str(data) in err and ('does not exist' in err if case == 'missing' else 'Found 0 images' in err), err


def test_corrupt_image(make_image_folder, main_fails, tiny, quick, tmp_path):
    folder = make_image_folder(tmp_path / 'data', classes=2, n_train=3, n_val=2)
    bad = os.path.join(folder, 'train', 'class_1', 'broken.jpg')
    with open(bad, 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 this is not a jpeg')
    err = main_fails(trainer.main, [folder, '--val-split', 'val', *tiny, '-b', 2, '--epochs', 1, *quick,
                                    '--output', tmp_path / 'out', '--experiment', 'x'], tmp_path / 'out')
    assert f'Cannot read image {bad}' in err, err


def test_unknown_model(image_folder, main_fails, tiny, tmp_path):
    err = main_fails(trainer.main, [image_folder, *tiny, '--model', 'hgrn_deit_tiniest', '--output', tmp_path],
                     tmp_path)
    assert "Unknown model 'hgrn_deit_tiniest'" in err and 'hgrn_deit_tiny' in err, err


def test_torchcompile_mode(main_fails, tmp_path, monkeypatch):
    """--torchcompile-mode (timm's flag) reaches torch.compile, needs --torchcompile, and takes only torch's modes."""
    seen = {}
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: seen.update(kw) or model)
    model = torch.nn.Linear(2, 2)
    args = parse_args(train_parser(), [str(tmp_path), '--torchcompile', '--torchcompile-mode', 'reduce-overhead'])
    assert trainer.compile_model(model, args) is model
    assert seen == {'backend': 'inductor', 'mode': 'reduce-overhead'}
    with pytest.raises(UserError, match='--torchcompile-mode default needs --torchcompile'):
        trainer.compile_model(model, parse_args(train_parser(), [str(tmp_path), '--torchcompile-mode', 'default']))
    err = main_fails(trainer.main, [tmp_path, '--torchcompile', '--torchcompile-mode', 'fast'])
    assert "invalid choice: 'fast'" in err and 'reduce-overhead' in err

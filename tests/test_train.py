"""train.py / validate.py end to end on the CPU: real data, exact resume, atomic checkpoints, torchrun (gloo),
ImageNet-style folders, fine-tuning, and clear errors on bad input."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from test_checkpoint_conversion import AuthorsHgrnVit

import hgrn_vision  # noqa: F401
from hgrn_vision.train import evaluate as evaluate_mod
from hgrn_vision.train import trainer
from hgrn_vision.train.args import UserError, load_config_file, parse_args, train_parser
from hgrn_vision.train.checkpoint import load_checkpoint_file, load_finetune_checkpoint
from hgrn_vision.train.data import prepare_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small HGRN-DeiT: hgrn_deit_tiny's blocks at C=32, depth 2, patch 8 on 32x32 images (4x4 tokens)
TINY = ['--model', 'hgrn_deit_tiny', '--model-kwargs', 'embed_dim=32', 'depth=2', 'patch_size=8', '--img-size', '32',
        '--device', 'cpu', '--workers', '0', '--no-progress', '--log-interval', '1000']
QUICK = ['--lr', '1e-3', '--warmup-epochs', '0', '--min-lr', '1e-5', '--sched-on-updates']


def _train(argv):
    return trainer.train(parse_args(train_parser(), [str(a) for a in argv]))


def _run_main(main, argv, capsys):
    """Run a script main that must fail; returns its stderr."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def _make_folder(root, classes=3, n_train=8, n_val=4, size=32):
    """ImageNet-style folder of small JPEGs: train/<class>/*.jpg, val/<class>/*.jpg; class = colour + stripe."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f'class_{c}'), exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                img[..., c % 3] += 150
                img[(c * size) // classes: ((c + 1) * size) // classes] += 40
                Image.fromarray(img).save(os.path.join(root, split, f'class_{c}', f'{i}.jpg'), quality=90)
    return str(root)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp('imagefolder'))


@pytest.fixture(scope='session')
def fashion_mnist():
    """Fashion-MNIST as `make demo` gets it (Debian package, else torchvision download), cached in data/."""
    return prepare_fashion_mnist(os.path.join(REPO, 'data'))


def _summary(run_dir):
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        return list(csv.DictReader(f))


def test_fashion_mnist_learns_and_validate_agrees(fashion_mnist, tmp_path, capsys):
    """A short training on a Fashion-MNIST subset lands far above chance (10%); validate.py reproduces it."""
    res = _train([
        fashion_mnist, '--dataset', 'torch/fashion_mnist', '--val-split', 'test', '--train-subset', 4000,
        '--val-subset', 2000, *TINY, '--img-size', 28, '--model-kwargs', 'embed_dim=48', 'depth=2', 'patch_size=7',
        '--in-chans', 1, '--num-classes', 10, '--mean', 0.286, '--std', 0.353, '--crop-pct', 1, '--scale', 0.8, 1,
        '--color-jitter', 0, '-b', 64, '--epochs', 3, *QUICK, '--lr', 3e-3, '--output', tmp_path, '--experiment', 'fm'])
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


def _resume_argv(folder, out, exp):
    return [folder, '--val-split', 'val', *TINY, '-b', 8, '--epochs', 4, *QUICK, '--model-ema', '--model-ema-warmup',
            '--mixup', 0.8, '--cutmix', 1.0, '--reprob', 0.25, '--aa', 'rand-m9-mstd0.5-inc1', '--clip-grad', 5,
            '--train-interpolation', 'bicubic', '--output', out, '--experiment', exp, '--seed', 7]


def test_resume_is_exact(image_folder, tmp_path):
    """4 epochs straight == 2 epochs + --resume + 2 epochs: identical weights, EMA, optimizer state and metrics."""
    straight = _train(_resume_argv(image_folder, tmp_path, 'straight'))
    first = _train(_resume_argv(image_folder, tmp_path, 'split') + ['--stop-epoch', 2])
    assert [int(r['epoch']) for r in _summary(first['run_dir'])] == [0, 1]
    resumed = _train(_resume_argv(image_folder, tmp_path, 'split')[:-4] + [
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


def test_kill_while_writing_checkpoint_keeps_previous(tmp_path):
    """SIGKILL in the middle of writing a checkpoint: last.pth.tar is still the previous, complete one."""
    script = textwrap.dedent(f"""
        import os, signal, sys, types, torch
        sys.path.insert(0, {REPO!r})
        from hgrn_vision.train.checkpoint import AtomicCheckpointSaver
        model = torch.nn.Linear(64, 64)
        opt = torch.optim.AdamW(model.parameters())
        saver = AtomicCheckpointSaver(model, opt, args=types.SimpleNamespace(model='linear'),
                                      checkpoint_dir={str(tmp_path)!r}, recovery_dir={str(tmp_path)!r})
        saver.save_checkpoint(0, metric=1.0)
        with torch.no_grad():
            model.weight.add_(1.0)
        real_save = torch.save
        def dying_save(obj, f, *a, **kw):  # write part of the file, then get killed
            real_save(obj, f, *a, **kw)
            f.flush()
            f.truncate(f.tell() // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        saver.save_checkpoint(1, metric=2.0)
    """)
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any('.partial-' in f for f in os.listdir(tmp_path))  # the half-written file, never renamed
    ckpt = load_checkpoint_file(os.path.join(tmp_path, 'last.pth.tar'))
    assert ckpt['epoch'] == 0 and ckpt['metric'] == 1.0
    assert not (ckpt['state_dict']['weight'] > 0.9).all()  # the weights of epoch 0, before the +1
    assert os.path.isfile(os.path.join(tmp_path, 'checkpoint-0.pth.tar'))
    assert not os.path.exists(os.path.join(tmp_path, 'checkpoint-1.pth.tar'))


def test_torchrun_two_processes_gloo_agree(image_folder, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): both ranks end with the same weights; only rank 0 writes."""
    driver = tmp_path / 'driver.py'
    argv = [image_folder, '--val-split', 'val', *TINY, '-b', 4, '--epochs', 2, *QUICK, '--model-ema', '--mixup', 0.8,
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


def test_image_folder_deit_recipe_then_validate_and_finetune(image_folder, tmp_path, capsys, caplog):
    """An ImageNet-style folder trains with the DeiT augmentation / AdamW + layer decay / EMA, validates at another
    resolution, and fine-tunes to another number of classes and resolution with the head re-initialised."""
    res = _train([image_folder, '--val-split', 'val', '-c', os.path.join(REPO, 'configs', 'hgrn_deit_tiny_in1k.yaml'),
                  *TINY, '-b', 8, '--epochs', 2, '--warmup-epochs', 1, '--layer-decay', 0.75,
                  '--output', tmp_path, '--experiment', 'folder', '--model-ema', '--model-ema-decay', 0.9])
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
    ft = _train([image_folder, '--val-split', 'val', *TINY, '--img-size', 48, '--num-classes', 5,
                 '--initial-checkpoint', ckpt, '-b', 8, '--epochs', 1, *QUICK, '--output', tmp_path,
                 '--experiment', 'ft'])
    assert 'dropped and re-initialised: head.weight (3, 32) -> (5, 32), head.bias (3,) -> (5,)' in caplog.text
    ft_sd = torch.load(os.path.join(ft['run_dir'], 'last.pth.tar'), weights_only=True)['state_dict']
    assert ft_sd['head.weight'].shape == (5, 32)


def test_finetune_from_authors_checkpoint(tmp_path, caplog):
    """The authors' layout converts through checkpoint_filter_fn; their 1000-class head is dropped, the log says so."""
    authors = AuthorsHgrnVit(dim=32, depth=2, patch=8, in_chans=3, num_classes=1000)
    path = tmp_path / 'authors.pth'
    torch.save({'model': authors.state_dict()}, path)
    model = trainer.create_train_model(parse_args(train_parser(), TINY), 3)
    head_before = model.head.weight.detach().clone()
    caplog.set_level('INFO')
    assert load_finetune_checkpoint(model, str(path), 'hgrn_deit_tiny') == ['head.weight', 'head.bias']
    assert 'head.weight (1000, 32) -> (3, 32)' in caplog.text
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, authors.layers[1].feature_mixer.l3.weight)
    assert torch.equal(model.lower_bounds, authors.lower_bounds)


# ---- bad input: a clear error naming the culprit, exit status 2, no run folder left behind


def _assert_no_run(out_dir):
    assert not os.path.exists(out_dir) or os.listdir(out_dir) == [], os.listdir(out_dir)


@pytest.mark.parametrize('case', ['missing', 'empty'])
def test_bad_data_dir(case, tmp_path, capsys):
    data = tmp_path / 'nope'
    if case == 'empty':
        data.mkdir()
    err = _run_main(trainer.main, [data, *TINY, '--output', tmp_path / 'out', '--experiment', 'x'], capsys)
    assert str(data) in err and ('does not exist' in err if case == 'missing' else 'Found 0 images' in err), err
    _assert_no_run(tmp_path / 'out')


def test_corrupt_image(tmp_path, capsys):
    folder = _make_folder(tmp_path / 'data', classes=2, n_train=3, n_val=2)
    bad = os.path.join(folder, 'train', 'class_1', 'broken.jpg')
    with open(bad, 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 this is not a jpeg')
    err = _run_main(trainer.main, [folder, '--val-split', 'val', *TINY, '-b', 2, '--epochs', 1, *QUICK,
                                   '--output', tmp_path / 'out', '--experiment', 'x'], capsys)
    assert f'Cannot read image {bad}' in err, err
    _assert_no_run(tmp_path / 'out')


def test_unknown_model(image_folder, tmp_path, capsys):
    err = _run_main(trainer.main, [image_folder, *TINY, '--model', 'hgrn_deit_tiniest', '--output', tmp_path],
                    capsys)
    assert "Unknown model 'hgrn_deit_tiniest'" in err and 'hgrn_deit_tiny' in err, err
    _assert_no_run(tmp_path)


def test_unknown_config_key(image_folder, tmp_path, capsys):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('epochs: 3\nwarmup_epoch: 1\n')
    err = _run_main(trainer.main, ['-c', cfg, image_folder, *TINY, '--output', tmp_path / 'out'], capsys)
    assert "Unknown key 'warmup_epoch'" in err and str(cfg) in err and 'warmup_epochs' in err, err
    _assert_no_run(tmp_path / 'out')


def test_config_file_and_cli_override(tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('epochs: 3\nlr: 0.01\nmodel-kwargs: {depth: 2}\n')
    args = parse_args(train_parser(), ['-c', str(cfg), '--lr', '0.5'])
    assert args.epochs == 3 and args.lr == 0.5 and args.model_kwargs == {'depth': 2}


def test_checkpoint_of_another_architecture(image_folder, tmp_path, capsys):
    other = trainer.create_train_model(parse_args(train_parser(), TINY + ['--model-kwargs', 'embed_dim=48']), 3)
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': other.state_dict(), 'epoch': 0, 'arch': 'hgrn_deit_tiny'}, path)
    common = [image_folder, '--val-split', 'val', *TINY, '-b', 8, '--output', tmp_path / 'out', '--experiment', 'x']
    err = _run_main(trainer.main, common + ['--initial-checkpoint', path], capsys)
    assert str(path) in err and 'embed_dim=32' in err and 'differ in shape' in err, err
    err = _run_main(trainer.main, common + ['--resume', path], capsys)
    assert str(path) in err and 'another architecture' in err and 'size mismatch' in err, err
    vit = tmp_path / 'vit.pth'
    torch.save({'state_dict': {'cls_token': torch.zeros(1, 1, 32)}}, vit)
    err = _run_main(trainer.main, common + ['--initial-checkpoint', vit], capsys)
    assert str(vit) in err and 'another architecture' in err and 'cls_token' in err, err
    _assert_no_run(tmp_path / 'out')


def test_torchcompile_mode(tmp_path, monkeypatch, capsys):
    """--torchcompile-mode (timm's flag) reaches torch.compile, needs --torchcompile, and takes only torch's modes."""
    seen = {}
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: seen.update(kw) or model)
    model = torch.nn.Linear(2, 2)
    args = parse_args(train_parser(), [str(tmp_path), '--torchcompile', '--torchcompile-mode', 'reduce-overhead'])
    assert trainer.compile_model(model, args) is model
    assert seen == {'backend': 'inductor', 'mode': 'reduce-overhead'}
    with pytest.raises(UserError, match='--torchcompile-mode default needs --torchcompile'):
        trainer.compile_model(model, parse_args(train_parser(), [str(tmp_path), '--torchcompile-mode', 'default']))
    err = _run_main(trainer.main, [tmp_path, '--torchcompile', '--torchcompile-mode', 'fast'], capsys)
    assert "invalid choice: 'fast'" in err and 'reduce-overhead' in err

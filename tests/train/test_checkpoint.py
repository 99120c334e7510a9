"""Checkpoints: a write killed midway leaves the previous one whole, fine-tuning from the authors' layout, and a clear
error for a checkpoint of another architecture."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import hgrn_vision  # noqa: F401
from hgrn_vision.train import trainer
from hgrn_vision.train.args import parse_args, train_parser
from hgrn_vision.train.checkpoint import load_checkpoint_file, load_finetune_checkpoint

REPO = str(Path(__file__).resolve().parents[2])


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


def test_finetune_from_authors_checkpoint(authors_hgrn_vit, tiny, tmp_path, caplog):
    """The authors' layout converts through checkpoint_filter_fn; their 1000-class head is dropped, the log says so."""
    authors = authors_hgrn_vit(dim=32, depth=2, patch=8, in_chans=3, num_classes=1000)
    path = tmp_path / 'authors.pth'
    torch.save({'model': authors.state_dict()}, path)
    model = trainer.create_train_model(parse_args(train_parser(), tiny), 3)
    head_before = model.head.weight.detach().clone()
    caplog.set_level('INFO')
    assert load_finetune_checkpoint(model, str(path), 'hgrn_deit_tiny') == ['head.weight', 'head.bias']
    assert 'head.weight (1000, 32) -> (3, 32)' in caplog.text
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, authors.layers[1].feature_mixer.l3.weight)
    assert torch.equal(model.lower_bounds, authors.lower_bounds)


def test_checkpoint_of_another_architecture(image_folder, main_fails, tiny, tmp_path):
    other = trainer.create_train_model(parse_args(train_parser(), tiny + ['--model-kwargs', 'embed_dim=48']), 3)
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': other.state_dict(), 'epoch': 0, 'arch': 'hgrn_deit_tiny'}, path)
    common = [image_folder, '--val-split', 'val', *tiny, '-b', 8, '--output', tmp_path / 'out', '--experiment', 'x']
    err = main_fails(trainer.main, common + ['--initial-checkpoint', path], tmp_path / 'out')
    assert str(path) in err and 'embed_dim=32' in err and 'differ in shape' in err, err
    err = main_fails(trainer.main, common + ['--resume', path], tmp_path / 'out')
    assert str(path) in err and 'another architecture' in err and 'size mismatch' in err, err
    vit = tmp_path / 'vit.pth'
    torch.save({'state_dict': {'cls_token': torch.zeros(1, 1, 32)}}, vit)
    err = main_fails(trainer.main, common + ['--initial-checkpoint', vit], tmp_path / 'out')
    assert str(vit) in err and 'another architecture' in err and 'cls_token' in err, err

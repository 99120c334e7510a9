"""The authors' checkpoints load through checkpoint_filter_fn and give identical logits.

`authors_dir` holds a checkpoint written by the authors' own code with its input and logits: the ground truth.
`authors_hgrn_vit` is a re-implementation of their model with their layout and names, for other sizes and channels.
"""
import pytest
import timm
import torch

import hgrn_vision  # noqa: F401
from hgrn_vision.models.hgrn_deit import checkpoint_filter_fn


def _randomize(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1 if p.ndim == 1 else 0) * 0.1)


@pytest.mark.parametrize('scan_impl', [None, 'torch', 'reference'])
def test_authors_real_checkpoint_gives_their_logits(authors_dir, scan_impl):
    """The checkpoint their code wrote loads as the fixture's README shows and gives their logits."""
    model = timm.create_model(
        'hgrn_deit_tiny', embed_dim=64, depth=2, num_classes=10, img_size=(42, 56), scan_impl=scan_impl,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(authors_dir / 'checkpoint.pth'), num_classes=10)).eval()
    x = torch.load(authors_dir / 'input.pt')
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.load(authors_dir / 'logits_fp32.pt'), rtol=0, atol=1e-5)
        model = model.double()
        torch.testing.assert_close(
            model(x.double()), torch.load(authors_dir / 'logits_fp64.pt'), rtol=0, atol=1e-12)


@pytest.mark.parametrize('in_chans,size', [(3, (56, 42)), (1, (28, 28))])
def test_authors_checkpoint_gives_identical_logits(authors_hgrn_vit, tmp_path, in_chans, size):
    torch.manual_seed(0)
    authors = authors_hgrn_vit(dim=12, depth=3, patch=14, in_chans=in_chans, num_classes=7).double().eval()
    _randomize(authors)
    path = tmp_path / 'authors.pth'
    torch.save({'model': authors.state_dict()}, path)
    ours = timm.create_model(
        'hgrn_deit_tiny', embed_dim=12, depth=3, num_classes=7, in_chans=in_chans, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=7), dtype=torch.float64).eval()
    x = torch.randn(2, in_chans, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('theta_shape', [(1, 1, 8), (8,)])
def test_filter_fn_maps_every_authors_tensor(authors_hgrn_vit, theta_shape):
    """Their thetas load whether stored (1, 1, C), as their code does, or flat (C,)."""
    authors = authors_hgrn_vit(dim=8, depth=2, patch=14, in_chans=3, num_classes=5)
    sd = {k: v.reshape(theta_shape) if 'theta' in k else v for k, v in authors.state_dict().items()}
    model = timm.create_model('hgrn_deit_tiny', embed_dim=8, depth=2, num_classes=5)
    converted = checkpoint_filter_fn(sd, model)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted)
    assert torch.equal(model.blocks[1].mixer.theta_reverse, authors.layers[1].token_mixer.theta_reverse.flatten())


def test_filter_fn_rejects_wrong_patch(authors_hgrn_vit):
    authors = authors_hgrn_vit(dim=8, depth=2, patch=16, in_chans=3, num_classes=5)
    model = timm.create_model('hgrn_deit_tiny', embed_dim=8, depth=2, num_classes=5)
    with pytest.raises(ValueError, match='does not fit patches of 14x14'):
        checkpoint_filter_fn(authors.state_dict(), model)


@pytest.mark.parametrize('name', ['hgrn_deit_tiny', 'hgrn_deit_small', 'hgrn_deit_base'])
def test_cfg_names_the_source_and_no_weights(name):
    """A user reading the cfg learns the paper, where the architecture comes from, and that no weights ship."""
    cfg = timm.create_model(name, device='meta').pretrained_cfg
    assert not any(cfg.get(k) for k in ('url', 'file', 'hf_hub_id', 'state_dict')) and cfg['tag'] == 'untrained'
    assert cfg['paper_ids'] == 'arXiv:2311.04823' and cfg['license'] == 'apache-2.0'
    notes = ' '.join(cfg['notes'])
    assert 'OpenNLPLab/im' in notes and 'Doraemonzzz/hgru-pytorch' in notes and 'pretrained_cfg_overlay' in notes

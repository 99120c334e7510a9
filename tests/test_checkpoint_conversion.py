"""The authors' checkpoints load through checkpoint_filter_fn and give identical logits.

`data/authors_hgrn/` holds a checkpoint written by the authors' own code with its input and logits (see its
README): the ground truth. `AuthorsHgrnVit` is an independent re-implementation of the authors' formulation written
from the math, laid out as their code is (sequence-first tokens, separate projections, a Linear patch embedding on
(p1 p2 c)-flattened patches, complex arithmetic with flipped sequences for the reverse scan, thetas of shape
(1, 1, C)) and with their parameter names, for the sizes and channel counts the fixture does not cover.
"""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import hgrn_vision  # noqa: F401
from hgrn_vision.models.hgrn_deit import checkpoint_filter_fn

AUTHORS_FIXTURE = Path(__file__).parent / 'data' / 'authors_hgrn'


class AuthorsHgru(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.input_proj = nn.Linear(dim, 2 * dim)
        self.lambda_proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(2 * dim)
        self.theta_forward = nn.Parameter(torch.randn(1, 1, dim) * 3)  # stored (1, 1, C), as BiHgru1d does
        self.theta_reverse = nn.Parameter(torch.randn(1, 1, dim) * 3)

    @staticmethod
    def scan(a, v):  # (N, B, C) complex, h_t = a_t h_{t-1} + v_t
        h, out = torch.zeros_like(v[0]), []
        for t in range(v.shape[0]):
            h = a[t] * h + v[t]
            out.append(h)
        return torch.stack(out)

    def forward(self, x, lower_bound):  # x (N, B, C)
        n, b, d = x.shape
        c = torch.view_as_complex(F.silu(self.input_proj(x)).reshape(n, b, d, 2).contiguous())
        lam = lower_bound + (1 - lower_bound) * torch.sigmoid(self.lambda_proj(x))
        v = (1 - lam) * c
        a_f = lam * torch.exp(1j * self.theta_forward)
        a_r = lam * torch.exp(1j * self.theta_reverse)
        h = self.scan(a_f, v) + self.scan(a_r.flip(0), v.flip(0)).flip(0)
        feat = torch.cat([h.real, h.imag], dim=-1)
        return self.out_proj(self.norm(feat) * F.silu(self.gate(x)))


class AuthorsGlu(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.l3(F.silu(self.l1(x)) * self.l2(x))


class AuthorsLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.token_norm, self.feature_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mixer, self.feature_mixer = AuthorsHgru(dim), AuthorsGlu(dim, 2 * dim)

    def forward(self, x, lower_bound):
        x = x + self.token_mixer(self.token_norm(x), lower_bound)
        return x + self.feature_mixer(self.feature_norm(x))


class Patchify(nn.Module):
    """b c (h p1) (w p2) -> b (h w) (p1 p2 c)"""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, img):
        b, c, H, W = img.shape
        p = self.p
        x = img.reshape(b, c, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (H // p) * (W // p), p * p * c)


class RmsNormFree(nn.Module):
    def forward(self, x):
        return x / (x.norm(dim=-1, keepdim=True) * x.shape[-1] ** -0.5 + 1e-8)


class AuthorsHgrnVit(nn.Module):
    def __init__(self, dim, depth, patch, in_chans, num_classes):
        super().__init__()
        self.to_patch_embedding = nn.Sequential(Patchify(patch), nn.Linear(patch * patch * in_chans, dim))
        self.lower_bounds = nn.Parameter(torch.randn(depth, dim))
        self.layers = nn.ModuleList([AuthorsLayer(dim) for _ in range(depth)])
        self.head = nn.Sequential(RmsNormFree(), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = self.to_patch_embedding(img).transpose(0, 1)  # (N, B, C), sequence first
        p = torch.softmax(self.lower_bounds, dim=0)
        cum = torch.cumsum(p, dim=0)
        for i, layer in enumerate(self.layers):
            lower_bound = torch.zeros_like(cum[0]) if i == 0 else cum[i - 1]
            x = layer(x, lower_bound)
        return self.head(x.mean(dim=0))


def _randomize(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1 if p.ndim == 1 else 0) * 0.1)


@pytest.mark.parametrize('scan_impl', [None, 'torch', 'reference'])
def test_authors_real_checkpoint_gives_their_logits(scan_impl):
    """The checkpoint their code wrote loads as the fixture's README shows and gives their logits."""
    model = timm.create_model(
        'hgrn_deit_tiny', embed_dim=64, depth=2, num_classes=10, img_size=(42, 56), scan_impl=scan_impl,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(AUTHORS_FIXTURE / 'checkpoint.pth'), num_classes=10)).eval()
    x = torch.load(AUTHORS_FIXTURE / 'input.pt')
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.load(AUTHORS_FIXTURE / 'logits_fp32.pt'), rtol=0, atol=1e-5)
        model = model.double()
        torch.testing.assert_close(
            model(x.double()), torch.load(AUTHORS_FIXTURE / 'logits_fp64.pt'), rtol=0, atol=1e-12)


@pytest.mark.parametrize('in_chans,size', [(3, (56, 42)), (1, (28, 28))])
def test_authors_checkpoint_gives_identical_logits(tmp_path, in_chans, size):
    torch.manual_seed(0)
    authors = AuthorsHgrnVit(dim=12, depth=3, patch=14, in_chans=in_chans, num_classes=7).double().eval()
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
def test_filter_fn_maps_every_authors_tensor(theta_shape):
    """Their thetas load whether stored (1, 1, C), as their code does, or flat (C,)."""
    authors = AuthorsHgrnVit(dim=8, depth=2, patch=14, in_chans=3, num_classes=5)
    sd = {k: v.reshape(theta_shape) if 'theta' in k else v for k, v in authors.state_dict().items()}
    model = timm.create_model('hgrn_deit_tiny', embed_dim=8, depth=2, num_classes=5)
    converted = checkpoint_filter_fn(sd, model)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted)
    assert torch.equal(model.blocks[1].mixer.theta_reverse, authors.layers[1].token_mixer.theta_reverse.flatten())


def test_filter_fn_rejects_wrong_patch():
    authors = AuthorsHgrnVit(dim=8, depth=2, patch=16, in_chans=3, num_classes=5)
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

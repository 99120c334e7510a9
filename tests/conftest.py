"""Shared test setup: Triton kernels run in Triton's interpreter (CI has no GPU; set before any triton kernel is
defined), and the fixtures that tests in more than one folder use."""
import os

os.environ.setdefault('TRITON_INTERPRET', '1')

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope='session')
def authors_dir() -> Path:
    """A checkpoint written by the authors' own code, with its input and logits (see its README)."""
    return Path(__file__).parent / 'data' / 'authors_hgrn'


# An independent re-implementation of the authors' formulation written from the math, laid out as their code is
# (sequence-first tokens, separate projections, a Linear patch embedding on (p1 p2 c)-flattened patches, complex
# arithmetic with flipped sequences for the reverse scan, thetas of shape (1, 1, C)) and with their parameter names,
# for the sizes and channel counts that `authors_dir` does not cover.


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


@pytest.fixture(scope='session')
def authors_hgrn_vit() -> type:
    """The authors' model class, `AuthorsHgrnVit(dim, depth, patch, in_chans, num_classes)`."""
    return AuthorsHgrnVit


def _make_image_folder(root, classes: int = 3, n_train: int = 8, n_val: int = 4, size: int = 32) -> str:
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
def make_image_folder():
    """`make_image_folder(root, classes=3, n_train=8, n_val=4, size=32)` writes an ImageNet-style folder of small
    JPEGs (train/<class>/*.jpg, val/<class>/*.jpg; a class is a colour and a stripe) and returns its path."""
    return _make_image_folder


@pytest.fixture(scope='session')
def run_train():
    """`run_train(argv)`: train.py's training on `argv` (any objects, passed as strings) in this process."""
    from hgrn_vision.train import trainer
    from hgrn_vision.train.args import parse_args, train_parser
    return lambda argv: trainer.train(parse_args(train_parser(), [str(a) for a in argv]))


@pytest.fixture
def main_fails(capsys):
    """`main_fails(main, argv, out_dir=None)` runs a script's `main` that must stop with a usage error (exit status
    2) and returns its stderr; with `out_dir`, checks that no run folder was left in it."""
    def run(main, argv, out_dir=None) -> str:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 2
        if out_dir is not None:
            assert not os.path.exists(out_dir) or os.listdir(out_dir) == [], os.listdir(out_dir)
        return capsys.readouterr().err
    return run

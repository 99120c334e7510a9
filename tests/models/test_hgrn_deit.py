"""HGRN-DeiT models: architecture facts, shapes, the timm API beyond timm's own tests, bad input."""
import copy

import pytest
import timm
import torch
from timm.layers import PatchEmbed

import hgrn_vision  # noqa: F401  (registers the entries)
from hgrn_vision.layers import LinearPatchEmbed
from hgrn_vision.models.hgrn_deit import HgrnDeit

TINY = dict(embed_dim=16, depth=3)  # small stand-in for fast API tests


@pytest.mark.parametrize('name,count', [
    ('hgrn_deit_tiny', 6_107_560), ('hgrn_deit_small', 23_715_688), ('hgrn_deit_base', 93_436_648)])
def test_param_counts(name, count):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == count


def test_listed():
    assert timm.list_models('hgrn_deit*') == ['hgrn_deit_base', 'hgrn_deit_small', 'hgrn_deit_tiny']


def test_default_cfg():
    cfg = timm.create_model('hgrn_deit_small', device='meta').pretrained_cfg
    assert cfg['tag'] == 'untrained'
    assert not cfg.get('url') and not cfg.get('hf_hub_id') and not cfg.get('file')
    assert cfg['input_size'] == (3, 224, 224) and cfg['pool_size'] == (16, 16)
    assert cfg['crop_pct'] == 0.9 and cfg['interpolation'] == 'bicubic'
    assert cfg['first_conv'] == 'patch_embed.proj' and cfg['classifier'] == 'head'
    assert cfg['paper_ids'] == 'arXiv:2311.04823'


def test_lower_bound_schedule():
    model = HgrnDeit(embed_dim=4, depth=5)
    with torch.no_grad():
        model.lower_bounds.copy_(torch.randn(5, 4))
    gammas = model.lower_bound_schedule()
    p = torch.softmax(model.lower_bounds, dim=0)
    assert torch.equal(gammas[0], torch.zeros(4))
    for k in range(1, 5):
        torch.testing.assert_close(gammas[k], p[:k].sum(0))
    assert (gammas[-1] < 1).all()
    # with the init (all ones) block k gets k / depth
    torch.testing.assert_close(HgrnDeit(embed_dim=4, depth=5).lower_bound_schedule()[:, 0], torch.arange(5) / 5)


@pytest.mark.parametrize('low_memory', [False, True])
def test_blocks_receive_their_lower_bound(monkeypatch, low_memory):
    """Each block's mixer gets its own lower bound, in both modes."""
    model = HgrnDeit(embed_dim=8, depth=3, num_classes=0, low_memory=low_memory).eval()
    seen = []
    for blk in model.blocks:
        orig = blk.mixer.forward
        monkeypatch.setattr(blk.mixer, 'forward', lambda x, lb, orig=orig: (seen.append(lb), orig(x, lb))[1])
    model(torch.randn(1, 3, 28, 28))
    torch.testing.assert_close(torch.stack(seen), model.lower_bound_schedule())


def _outputs_and_grads(model, x, autocast=False):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize('scan_impl,autocast', [('torch', False), ('triton', False), ('triton', True)])
def test_low_memory_same_model(scan_impl, autocast):
    """`low_memory` changes neither the parameters, their names nor the results (on the Triton path, where its fused
    ops run, up to rounding; under bf16 autocast up to bf16's); forward hooks on the blocks' norms fire in both
    modes."""
    models, fired = [], []
    for low_memory in (False, True):
        torch.manual_seed(0)
        model = HgrnDeit(embed_dim=8, depth=2, num_classes=3, scan_impl=scan_impl, low_memory=low_memory)
        for blk in model.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.register_forward_hook(lambda m, i, o, low_memory=low_memory: fired.append(low_memory))
        models.append(model)
    default, low = models
    assert list(default.state_dict()) == list(low.state_dict())
    for k, v in default.state_dict().items():
        assert torch.equal(v, low.state_dict()[k]), k
    x = torch.randn(2, 3, 42, 56)
    (out, grads), (out_low, grads_low) = [_outputs_and_grads(m, x, autocast) for m in models]
    tol = {'torch': dict(rtol=0, atol=0), 'triton': dict(rtol=1e-5, atol=1e-6)}[scan_impl]
    if autocast:
        tol = dict(rtol=3e-2, atol=3e-2 * out.abs().max().item())
    torch.testing.assert_close(out_low, out, **tol)
    for name, g in grads.items():
        tol_g = tol if not autocast else dict(rtol=3e-2, atol=3e-2 * g.abs().max().item())
        torch.testing.assert_close(grads_low[name], g, **tol_g, msg=name)
    assert fired.count(False) == fired.count(True) == 4


@pytest.mark.parametrize('low_memory', [False, True])
def test_triton_model_matches_torch_path(low_memory):
    """The model on the Triton path (the fused ops in the interpreter: in_proj's and fc1's biases added detached, their
    gradients from the kernels' sums; with `low_memory` the fused norms and out_proj too) gives the outputs and
    parameter gradients of the PyTorch path."""
    results = []
    for scan_impl in ('triton', 'torch'):
        torch.manual_seed(0)
        model = HgrnDeit(embed_dim=12, depth=2, patch_size=7, in_chans=1, num_classes=3, scan_impl=scan_impl,
                         low_memory=low_memory)
        results.append(_outputs_and_grads(model, torch.randn(2, 1, 28, 21, generator=torch.Generator().manual_seed(1))))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=name)


def test_low_memory_flops_count_as_default():
    """`benchmark.py`'s FLOP count sees the matmuls inside the low_memory ops (their registered formulas) and its scan
    count the mixers' calls: both as for the default model."""
    from hgrn_vision.benchmark.models import count_flops
    counts = {}
    for low_memory in (False, True):
        model = timm.create_model('hgrn_deit_tiny', depth=1, scan_impl='triton', low_memory=low_memory)
        counts[low_memory] = [count_flops(model, 28, mode, torch.device('cpu')) for mode in ('infer', 'train')]
    assert counts[True] == counts[False] and counts[True][0]['flops_per_img'] > 0


def test_low_memory_model_scripts_and_copies():
    """A low_memory model scripts (its blocks take the plain path there) and deep-copies, giving the eager logits."""
    model = HgrnDeit(embed_dim=8, depth=1, num_classes=3, low_memory=True).eval()
    x = torch.randn(2, 3, 28, 42)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-4, atol=1e-5)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.blocks[0].mixer.in_proj.weight.mul_(2)  # the copy's norm runs the copy's in_proj
    assert not torch.allclose(clone(x), model(x))


@pytest.mark.parametrize('scan_impl', ['torch', 'cpu'])
def test_model_compiles_on_cpu(scan_impl):
    """torch.compile(fullgraph=True) takes the CPU model whole, with the eager logits and gradients: the 'torch' scan
    traced, the C kernel as an op of its own."""
    torch.manual_seed(0)
    model = HgrnDeit(embed_dim=16, depth=2, num_classes=3, scan_impl=scan_impl).double()
    x = torch.randn(2, 3, 28, 42, dtype=torch.float64)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend='aot_eager')(x)
    ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    params = list(model.parameters())
    for g, r in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('size,grid', [
    ((224, 224), (16, 16)), ((96, 96), (7, 7)), ((160, 224), (12, 16)), ((100, 130), (8, 10)), ((14, 14), (1, 1)),
    ((14, 30), (1, 3))])
def test_shapes_any_size(size, grid):
    model = timm.create_model('hgrn_deit_tiny', **TINY).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, *grid, 16)
        assert model(x).shape == (2, 1000)


def test_in_chans_1_small_patch():
    model = timm.create_model('hgrn_deit_tiny', num_classes=10, in_chans=1, img_size=28, patch_size=4).eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert model.forward_features(torch.randn(3, 1, 28, 28)).shape == (3, 7, 7, 192)


def test_grad_reaches_every_parameter():
    model = timm.create_model('hgrn_deit_tiny', **TINY, num_classes=5)
    model(torch.randn(2, 3, 42, 56)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_scan_impls_agree_in_model():
    torch.manual_seed(0)
    model = timm.create_model('hgrn_deit_tiny', **TINY, scan_impl='reference').eval()
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        ref = model(x)
        for blk in model.blocks:
            blk.mixer.scan_impl = 'torch'
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_features_only():
    model = timm.create_model('hgrn_deit_small', features_only=True, out_indices=(3, 7, 11), **TINY | dict(depth=12))
    assert model.feature_info.channels() == [16, 16, 16]
    assert model.feature_info.reduction() == [14, 14, 14]
    feats = model(torch.randn(1, 3, 70, 84))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 5, 6)] * 3


def test_forward_intermediates_and_prune():
    model = timm.create_model('hgrn_deit_tiny', **TINY | dict(depth=4)).eval()
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 4 and inter[0].shape == (2, 16, 4, 3)
        torch.testing.assert_close(final, model.forward_features(x))
        nhwc = model.forward_intermediates(x, indices=[1], output_fmt='NHWC', intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inter[1].permute(0, 2, 3, 1))
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[1])
        with pytest.raises(ValueError, match='output_fmt'):
            model.forward_intermediates(x, output_fmt='NLC')
        kept = model.prune_intermediate_layers([1])
        assert kept == [1] and len(model.blocks) == 2 and model.num_classes == 0
        torch.testing.assert_close(model.forward_features(x), inter[1].permute(0, 2, 3, 1))


def test_head_api():
    model = timm.create_model('hgrn_deit_tiny', **TINY).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        # parameter-free RMS norm after mean pooling
        pooled = feats.mean((1, 2))
        torch.testing.assert_close(pre, pooled / (pooled.norm(dim=-1, keepdim=True) / 4 + 1e-8))
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
        model.reset_classifier(0, '')
        assert model(x).shape == (2, 2, 2, 16)


def test_no_weight_decay_and_group_matcher():
    from timm.models._manipulate import group_parameters
    from timm.optim import create_optimizer_v2
    model = timm.create_model('hgrn_deit_tiny', **TINY)
    groups = group_parameters(model, model.group_matcher(), reverse=True)
    assert groups['patch_embed.proj.weight'] == groups['lower_bounds'] == 0
    assert groups['blocks.0.mixer.in_proj.weight'] == 1 and groups['blocks.2.mlp.fc2.bias'] == 3
    assert groups['head.weight'] == 4
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    no_wd = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert id(model.lower_bounds) in no_wd and id(model.blocks[0].mixer.theta_forward) in no_wd
    assert id(model.blocks[0].mixer.in_proj.weight) not in no_wd


def test_set_input_size_and_meta():
    model = timm.create_model('hgrn_deit_tiny', device='meta')
    assert model.lower_bounds.device.type == 'meta'
    model = timm.create_model('hgrn_deit_tiny', **TINY)
    model.set_input_size(img_size=112, patch_size=7)
    assert model.patch_embed.patch_size == (7, 7) and model.feature_info[0]['reduction'] == 7
    assert model.forward_features(torch.randn(1, 3, 112, 112)).shape == (1, 16, 16, 16)


def test_drop_path_rate():
    model = timm.create_model('hgrn_deit_tiny', **TINY, drop_path_rate=0.2)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_bad_input_errors():
    model = timm.create_model('hgrn_deit_tiny', **TINY)
    with pytest.raises(ValueError, match=r'got a 3-D tensor'):
        model(torch.randn(3, 28, 28))
    with pytest.raises(ValueError, match='built for 3 input channels, got 1'):
        model(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r'at least one patch \(14x14\), got 10x20'):
        model(torch.randn(1, 3, 10, 20))
    with pytest.raises(ValueError, match="global_pool 'avg' or ''"):
        timm.create_model('hgrn_deit_tiny', **TINY, global_pool='max')
    with pytest.raises(ValueError, match="got 'token'"):
        model.reset_classifier(10, 'token')


def test_local_pretrained_file_roundtrip(tmp_path):
    src = timm.create_model('hgrn_deit_tiny', **TINY).eval()
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': src.state_dict(), 'epoch': 3}, path)
    model = timm.create_model('hgrn_deit_tiny', **TINY, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))
    # a new head is made for another number of classes, the rest is loaded
    model = timm.create_model('hgrn_deit_tiny', **TINY, pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), src.forward_features(x))


def test_checkpoint_of_other_width_is_refused(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save(timm.create_model('hgrn_deit_tiny', **TINY | dict(embed_dim=24)).state_dict(), path)
    with pytest.raises(ValueError, match=r'does not fit this model \(embed_dim=16, depth=3\).*lower_bounds'):
        timm.create_model('hgrn_deit_tiny', **TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('in_chans,patch,size', [(3, 14, (30, 43)), (1, 4, (28, 28)), (2, (3, 5), (7, 11))])
def test_linear_patch_embed_equals_timm_conv(in_chans, patch, size):
    """The matmul patch embedding gives timm's conv PatchEmbed's output (padding included) with the same weights."""
    kw = dict(img_size=None, patch_size=patch, in_chans=in_chans, embed_dim=6, output_fmt='NHWC', strict_img_size=False,
              dynamic_img_pad=True)
    torch.manual_seed(0)
    ours, conv = LinearPatchEmbed(**kw), PatchEmbed(**kw)
    conv.load_state_dict(ours.state_dict())
    x = torch.randn(2, in_chans, *size, dtype=torch.float64)
    ours, conv = ours.double(), conv.double()
    torch.testing.assert_close(ours(x), conv(x))
    with pytest.raises(ValueError, match='NHWC'):
        LinearPatchEmbed(**{**kw, 'output_fmt': 'NCHW'})

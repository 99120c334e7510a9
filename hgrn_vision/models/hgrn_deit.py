"""HGRN-DeiT: isotropic image classifiers whose token mixer is a bidirectional HGRU.

Paper:
* `Hierarchically Gated Recurrent Neural Network for Sequence Modeling` - https://arxiv.org/abs/2311.04823
  (Zhen Qin, Songlin Yang, Yiran Zhong, NeurIPS 2023)

Architecture of the authors' released vision code, re-implemented for timm's model API:
* https://github.com/OpenNLPLab/im (`classification/models/hgrn/`, `Hgrn1dVit`)
* https://github.com/Doraemonzzz/hgru-pytorch (`hgru/bihgru1d.py`, `BiHgru1d`: the HGRU token mixer)
Patch 14, no class token, no position embedding, pre-norm blocks of HGRU mixer + GLU, hierarchical lower bounds on
the forget gate shared across depth, mean pooling, a parameter-free RMS norm and a linear head.

This code is Apache-2.0; for the license of the authors' code see their repositories. No pretrained weights ship:
the `default_cfgs` entries are tagged `untrained` and name no weight source. Local weights, ours or the authors'
(converted by `checkpoint_filter_fn`), load with
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file='path/to/checkpoint.pth'))`; for a
checkpoint of other than 1000 classes put its `num_classes` in the overlay too, or timm drops its classifier.
"""
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from hgrn_vision.layers import HgruMixer, LayerNormLinear, LinearPatchEmbed, SiluGluMlp

__all__ = ['HgrnDeit', 'checkpoint_filter_fn', 'check_image_input']


@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int, patch_size: Tuple[int, int]) -> None:
    """Clear errors for inputs the model cannot take. Public, so FX autowraps it as one call."""
    if x.ndim != 4:
        raise ValueError(
            f'HgrnDeit expects a batch of images (B, {in_chans}, H, W), got a {x.ndim}-D tensor of shape '
            f'{x.shape}; add a batch dimension with x.unsqueeze(0) for a single image.')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'HgrnDeit was built for {in_chans} input channels, got {x.shape[1]} (input shape {x.shape}); '
            f'create the model with in_chans={x.shape[1]} or convert the images.')
    if x.shape[2] < patch_size[0] or x.shape[3] < patch_size[1]:
        raise ValueError(
            f'HgrnDeit needs images of at least one patch ({patch_size[0]}x{patch_size[1]}), got '
            f'{x.shape[2]}x{x.shape[3]}; resize the images or create the model with a smaller patch_size.')


class RmsNormNoAffine(nn.Module):
    """Parameter-free RMS norm of the authors' head: `x / (||x||_2 / sqrt(C) + eps)` over the last dim."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        return x / (rms + self.eps)


class HgrnBlock(nn.Module):
    """Pre-norm block: `x + mixer(norm1(x), lower_bound)`, then `x + mlp(norm2(x))`; the MLP is a SiLU GLU. With
    `low_memory` each norm is a `LayerNormLinear` built with the projection after it (the mixer's `in_proj`, the MLP's
    `fc1`), which it runs, on the Triton path as one op."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 2.,
            scan_impl: Optional[str] = None,
            drop_path: float = 0.,
            low_memory: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: channels C.
            mlp_ratio: GLU hidden width over C (the authors use 2).
            scan_impl: `bihgru_scan` implementation (of the mixer, and of the MLP's fused op where 'triton'), None
                for the best available.
            drop_path: stochastic depth rate.
            low_memory: on the Triton path, keep 13 C instead of 17 C elements per token for the backward: each
                norm runs with the projection after it as one op and out_proj inside the mixer's op (as fc2 always
                runs inside the MLP's), their backward kernels writing the projections' inputs again instead of
                keeping them. Same parameters, state dict and results.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        mixer = HgruMixer(dim, scan_impl=scan_impl, low_memory=low_memory, **dd)
        # fc1 holds the authors' l1 (gated by SiLU) and l2 side by side, fc2 is their l3
        mlp = SiluGluMlp(dim, 2 * int(mlp_ratio * dim), impl=scan_impl, low_memory=low_memory, **dd)
        self.norm1 = LayerNormLinear(dim, mixer.in_proj, scan_impl, **dd) if low_memory else nn.LayerNorm(dim, **dd)
        self.mixer = mixer
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = LayerNormLinear(dim, mlp.fc1, scan_impl, **dd) if low_memory else nn.LayerNorm(dim, **dd)
        self.mlp = mlp
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.mixer(self.norm1(x), lower_bound))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class HgrnDeit(nn.Module):
    """HGRN-DeiT: patch embedding, isotropic HGRU blocks over raster-ordered tokens, mean pool, RMS norm, head.

    Inputs of any size work: there is no position embedding, and an image whose sides are not a multiple of the
    patch is zero-padded on the bottom and right to the next multiple (timm's `dynamic_img_pad`). `forward_features`
    returns NHWC tokens.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 14,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 384,
            depth: int = 12,
            mlp_ratio: float = 2.,
            scan_impl: Optional[str] = None,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            low_memory: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: nominal input size (sets `pool_size`; other sizes work too).
            patch_size: patch side, 14 in the paper.
            in_chans: image channels.
            num_classes: classifier outputs, 0 for none.
            global_pool: 'avg' or '' (no pooling).
            embed_dim: channels C (tiny 192, small 384, base 768).
            depth: number of blocks.
            mlp_ratio: GLU hidden width over C.
            scan_impl: `bihgru_scan` implementation for every block, None for the best available on the device.
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth, linearly increasing over depth (the authors trained with 0).
            low_memory: training keeps 13 C instead of 17 C elements per block and token for the backward (on the
                Triton path; no matmul recomputed). Same parameters, same results (`HgrnBlock`).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_global_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.output_fmt = 'NHWC'
        self.grad_checkpointing = False

        self.patch_embed = LinearPatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt='NHWC',
            strict_img_size=False,
            dynamic_img_pad=True,
            **dd,
        )
        # the hierarchical lower bounds: block k gets gamma_k = sum_{i<k} softmax(lower_bounds, dim=0)_i
        self.lower_bounds = nn.Parameter(torch.ones(depth, embed_dim, **dd))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear over depth, as timm does
        self.blocks = nn.ModuleList([
            HgrnBlock(embed_dim, mlp_ratio=mlp_ratio, scan_impl=scan_impl, drop_path=dpr[i], low_memory=low_memory,
                      **dd)
            for i in range(depth)
        ])
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.fc_norm = RmsNormNoAffine()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    @torch.jit.ignore
    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'lower_bounds', 'blocks.*.mixer.theta_forward', 'blocks.*.mixer.theta_reverse'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^patch_embed|^lower_bounds',  # the lower bounds feed every block, so they sit with the stem
            blocks=[(r'^blocks\.(\d+)', None), (r'^fc_norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        weight = self.lower_bounds
        self.head = nn.Linear(self.embed_dim, num_classes, device=weight.device, dtype=weight.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.ignore
    def set_input_size(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            patch_size: Optional[Union[int, Tuple[int, int]]] = None,
    ) -> None:
        """Change the nominal input size and/or the patch size (the patch embedding weights are resampled)."""
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        reduction = self.patch_embed.feat_ratio()
        for info in self.feature_info:
            info['reduction'] = reduction

    def lower_bound_schedule(self) -> torch.Tensor:
        """(depth, C) lower bounds: row k is the exclusive cumulative sum of softmax(lower_bounds) over depth."""
        p = self.lower_bounds.softmax(dim=0)
        return p.cumsum(dim=0) - p

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates.

        Args:
            x: input images.
            indices: take the last n blocks if int, all if None, the listed ones if a sequence.
            norm: accepted for API compatibility; the model has no final norm before pooling.
            stop_early: stop iterating over blocks after the last wanted intermediate.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}.")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        check_image_input(x, self.in_chans, self.patch_embed.patch_size)
        x = self.patch_embed(x)
        grid_shape = x.shape
        x = x.flatten(1, 2)
        lower_bounds = self.lower_bound_schedule()
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, lower_bounds[i])
            else:
                x = blk(x, lower_bounds[i])
            if i in take_indices:
                y = x.reshape(grid_shape)
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)

        if intermediates_only:
            return intermediates
        return x.reshape(grid_shape), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last wanted intermediate (and the head if `prune_head`)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_chans, self.patch_embed.patch_size)
        x = self.patch_embed(x)
        grid_shape = x.shape
        x = x.flatten(1, 2)  # tokens in raster order
        lower_bounds = self.lower_bound_schedule()
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, lower_bounds[i])
            else:
                x = blk(x, lower_bounds[i])
        return x.reshape(grid_shape)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ('avg', ''):
        raise ValueError(f"HgrnDeit supports global_pool 'avg' or '' (no pooling), got {global_pool!r}.")


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: HgrnDeit) -> Dict[str, torch.Tensor]:
    """Convert the authors' checkpoints (or ours, wrapped or not) to this model's state dict.

    Authors' names: `to_patch_embedding.1` (a Linear on patches flattened as (p1 p2 c)), `lower_bounds`,
    `layers.{i}.token_norm|feature_norm`, `layers.{i}.token_mixer.{input_proj,lambda_proj,gate,out_proj,norm,
    theta_forward,theta_reverse}`, `layers.{i}.feature_mixer.{l1,l2,l3}`, `head.1`. Their thetas are stored as
    (1, 1, C); (C,) is accepted too.
    """
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    if 'to_patch_embedding.1.weight' in state_dict:
        state_dict = _convert_authors(state_dict, model.patch_embed.patch_size)
    _check_shapes(state_dict, model)
    return state_dict


def _convert_authors(sd: Dict[str, torch.Tensor], patch_size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    out = {}
    w = sd['to_patch_embedding.1.weight']  # (C, p1 * p2 * c_in), patches flattened as (p1 p2 c)
    ph, pw = patch_size
    in_chans = w.shape[1] // (ph * pw)
    if in_chans * ph * pw != w.shape[1]:
        raise ValueError(
            f'to_patch_embedding.1.weight has shape {tuple(w.shape)}, which does not fit patches of {ph}x{pw}; '
            f'create the model with the patch_size the checkpoint was trained with.')
    out['patch_embed.proj.weight'] = w.reshape(w.shape[0], ph, pw, in_chans).permute(0, 3, 1, 2).contiguous()
    out['patch_embed.proj.bias'] = sd['to_patch_embedding.1.bias']
    out['lower_bounds'] = sd['lower_bounds']
    depth = sd['lower_bounds'].shape[0]
    for i in range(depth):
        src, dst = f'layers.{i}.', f'blocks.{i}.'
        tm, ff = src + 'token_mixer.', src + 'feature_mixer.'
        for t in ('weight', 'bias'):
            out[dst + f'norm1.{t}'] = sd[src + f'token_norm.{t}']
            out[dst + f'norm2.{t}'] = sd[src + f'feature_norm.{t}']
            out[dst + f'mixer.in_proj.{t}'] = torch.cat(
                [sd[tm + f'input_proj.{t}'], sd[tm + f'lambda_proj.{t}'], sd[tm + f'gate.{t}']], 0)
            out[dst + f'mixer.norm.{t}'] = sd[tm + f'norm.{t}']
            out[dst + f'mixer.out_proj.{t}'] = sd[tm + f'out_proj.{t}']
            out[dst + f'mlp.fc1.{t}'] = torch.cat([sd[ff + f'l1.{t}'], sd[ff + f'l2.{t}']], 0)
            out[dst + f'mlp.fc2.{t}'] = sd[ff + f'l3.{t}']
        for t in ('theta_forward', 'theta_reverse'):
            out[dst + f'mixer.{t}'] = _flat_channels(sd[tm + t])
    if 'head.1.weight' in sd:
        out['head.weight'] = sd['head.1.weight']
        out['head.bias'] = sd['head.1.bias']
    return out


def _flat_channels(v: torch.Tensor) -> torch.Tensor:
    """A per-channel vector stored as (1, ..., 1, C), as the authors' BiHgru1d keeps its thetas, as (C,)."""
    return v.reshape(v.shape[-1]) if v.ndim > 1 and v.shape[:-1].numel() == 1 else v


def _check_shapes(state_dict: Dict[str, torch.Tensor], model: HgrnDeit) -> None:
    """Fail early, naming the keys, when a checkpoint is for another width or depth.

    The classifier and the patch embedding are left to timm's loader, which adapts them to
    `num_classes` / `in_chans`.
    """
    expected = model.state_dict()
    adapted = ('head.', 'patch_embed.proj.')
    bad = [
        f'{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and not k.startswith(adapted) and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise ValueError(
            f'Checkpoint does not fit this model (embed_dim={model.embed_dim}, depth={len(model.blocks)}); '
            f'{len(bad)} tensors differ in shape, e.g. ' + '; '.join(bad[:4]) +
            '. Create the variant the checkpoint was trained as (hgrn_deit_tiny/small/base).')


def _create_hgrn_deit(variant: str, pretrained: bool = False, **kwargs) -> HgrnDeit:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        HgrnDeit, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (16, 16),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2311.04823',
        'paper_name': 'Hierarchically Gated Recurrent Neural Network for Sequence Modeling',
        'origin_url': 'https://github.com/OpenNLPLab/im',
        'license': 'apache-2.0',
        'notes': (
            'Architecture from https://github.com/OpenNLPLab/im and https://github.com/Doraemonzzz/hgru-pytorch; '
            'the license is that of this code, see those repositories for theirs.',
            "No weights ship: load local ones (ours or the authors') with pretrained=True, "
            "pretrained_cfg_overlay=dict(file='path/to/checkpoint.pth').",
        ),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'hgrn_deit_tiny.untrained': _cfg(),
    'hgrn_deit_small.untrained': _cfg(),
    'hgrn_deit_base.untrained': _cfg(),
})


@register_model
def hgrn_deit_tiny(pretrained: bool = False, **kwargs) -> HgrnDeit:
    """HGRN-DeiT-Tiny: C=192, depth 12, patch 14; 6.1M params, 74.40 top-1 on ImageNet-1K in the paper."""
    model_args = dict(patch_size=14, embed_dim=192, depth=12)
    return _create_hgrn_deit('hgrn_deit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hgrn_deit_small(pretrained: bool = False, **kwargs) -> HgrnDeit:
    """HGRN-DeiT-Small: C=384, depth 12, patch 14; 23.7M params, 80.09 top-1 on ImageNet-1K in the paper."""
    model_args = dict(patch_size=14, embed_dim=384, depth=12)
    return _create_hgrn_deit('hgrn_deit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hgrn_deit_base(pretrained: bool = False, **kwargs) -> HgrnDeit:
    """HGRN-DeiT-Base: C=768, depth 12, patch 14; 93.4M params (not reported in the paper)."""
    model_args = dict(patch_size=14, embed_dim=768, depth=12)
    return _create_hgrn_deit('hgrn_deit_base', pretrained=pretrained, **dict(model_args, **kwargs))

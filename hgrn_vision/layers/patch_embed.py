"""Patch embedding as one matmul over non-overlapping patches."""
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.layers.format import Format


class LinearPatchEmbed(PatchEmbed):
    """timm's `PatchEmbed` (NHWC output, inputs padded up to whole patches) computed as a matmul of the flattened
    patches with the conv weight, which is what a conv with stride = kernel is. The parameters stay `proj`'s conv
    weight and bias, so state dicts, `first_conv` and timm's `adapt_input_conv` work unchanged.

    Why: cuDNN runs the bf16 patch conv of a compiled model as an implicit GEMM far below the matmul rate; as a
    matmul it is a patch copy plus a GEMM.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.output_fmt != Format.NHWC or self.flatten or self.proj.stride != self.proj.kernel_size:
            raise ValueError('LinearPatchEmbed needs output_fmt="NHWC", flatten=False and stride = patch size.')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.patch_size
        if self.dynamic_img_pad:  # unconditionally, as timm does: no branch on sizes, so FX can trace it
            x = F.pad(x, (0, -x.shape[3] % q, 0, -x.shape[2] % p))
        else:
            torch._assert(x.shape[2] % p == 0, f'Input height is not a multiple of the patch height {p}.')
            torch._assert(x.shape[3] % q == 0, f'Input width is not a multiple of the patch width {q}.')
        B, C, H, W = x.shape
        x = x.reshape(B, C, H // p, p, W // q, q).permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // q, C * p * q)
        x = F.linear(x, self.proj.weight.flatten(1), self.proj.bias)
        return self.norm(x)

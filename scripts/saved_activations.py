"""What torch.compile keeps for the backward, per block and token: the activations its partitioner saves in the
forward graph of a training step (bf16 autocast), one block's worth (depth 2 minus depth 1), for timm models side by
side. Traced on the CPU (the HGRN scan through the Triton op in the interpreter), so it runs anywhere:

    python scripts/saved_activations.py                       # hgrn_deit_small vs deit_small_patch16_224 at 224
    python scripts/saved_activations.py --models hgrn_deit_tiny deit_tiny_patch16_224
    python scripts/saved_activations.py --selective   # each block checkpointed: keep matmul / attention / op outputs
    python scripts/saved_activations.py --low-memory  # HGRN with low_memory=True

The GPU's peak memory per image (`benchmark.py models`) adds workspace and transients on top of these.
"""
import argparse
import functools
import os

os.environ.setdefault('TRITON_INTERPRET', '1')  # before hgrn_vision imports triton: the op runs on CPU tensors

import timm  # noqa: E402
import torch  # noqa: E402
from torch._functorch.aot_autograd import aot_module_simplified  # noqa: E402
from torch._functorch.partitioners import min_cut_rematerialization_partition  # noqa: E402
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts  # noqa: E402

import hgrn_vision  # noqa: E402,F401  (registers the models)

# what a selective checkpoint keeps: the outputs of matmuls, attention and the HGRU mixer op (costly to redo)
_KEEP = ('aten.mm', 'aten.addmm', 'aten.bmm', 'aten._scaled_dot_product_flash_attention_for_cpu',
         'aten._scaled_dot_product_flash_attention', 'aten._scaled_dot_product_efficient_attention',
         'aten._scaled_dot_product_cudnn_attention', 'hgrn_vision.bihgru_norm_gate_fwd')


def _policy(ctx, op, *args, **kwargs):
    keep = str(op).rsplit('.', 1)[0] in _KEEP
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_blocks(model: torch.nn.Module) -> None:
    """Run every block under a selective checkpoint with `_policy`: everything else recomputed in the backward."""
    for blk in model.blocks:
        blk.forward = functools.partial(
            checkpoint, blk.forward, use_reentrant=False,
            context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))


def saved_activations(name: str, depth: int, res: int, selective: bool = False, low_memory: bool = False):
    """(shape, dtype) of every tensor the forward graph saves whose shape holds the token count (the weights' bf16
    casts are per model, not per image), and the token count. The HGRN models take their default scan for CPU
    tensors ('torch'), so the mixer op is forced to 'triton' (the GPU's path) here; `low_memory` is theirs."""
    torch._dynamo.reset()
    kwargs = dict(scan_impl='triton', low_memory=low_memory) if name.startswith('hgrn') else {}
    model = timm.create_model(name, depth=depth, num_classes=10, img_size=res, **kwargs)
    tokens = model.patch_embed.num_patches + getattr(model, 'num_prefix_tokens', 0)
    if selective:
        _checkpoint_blocks(model)
    saved = []

    def fw_compiler(gm, example_inputs):
        out = next(n for n in gm.graph.nodes if n.op == 'output')
        vals = [a.meta.get('val') for a in out.args[0][1:] if a is not None and hasattr(a, 'meta')]  # [0]: logits
        saved.extend((tuple(v.shape), v.dtype) for v in vals if isinstance(v, torch.Tensor))
        return gm

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler, bw_compiler=lambda g, e: g,
                                     partition_fn=min_cut_rematerialization_partition)

    x = torch.randn(1, 3, res, res)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        torch.compile(model, backend=backend)(x)  # compiling partitions; no backward needs to run
    return [(s, d) for s, d in saved if tokens in s], tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['hgrn_deit_small', 'deit_small_patch16_224'])
    p.add_argument('--res', type=int, default=224)
    p.add_argument('--selective', action='store_true',
                   help='checkpoint every block, keeping only matmul, attention and HGRU op outputs')
    p.add_argument('--low-memory', action='store_true', help='the HGRN models with low_memory=True')
    args = p.parse_args()
    for name in args.models:
        one, _ = saved_activations(name, 1, args.res, args.selective, args.low_memory)
        two, tokens = saved_activations(name, 2, args.res, args.selective, args.low_memory)
        nbytes = sum(torch.Size(s).numel() * d.itemsize for s, d in two) - \
            sum(torch.Size(s).numel() * d.itemsize for s, d in one)
        width = timm.create_model(name, depth=1).num_features
        print(f'{name} at {args.res} ({tokens} tokens): {nbytes / tokens:.0f} bytes per block and token '
              f'({nbytes / tokens / 2 / width:.1f} C in bf16 elements); {nbytes / 2 ** 20:.2f} MiB per block and image')
        print('    depth 1 (one block, the stem, the head): ' + '; '.join(f'{s} {str(d)[6:]}' for s, d in one))


if __name__ == '__main__':
    main()

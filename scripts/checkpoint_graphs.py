"""What a torch.compile'd training step of an HGRN model under timm's full activation checkpointing
(`set_grad_checkpointing`) keeps, read from the graphs inductor is handed (after AOT autograd's partition and the
post-grad passes) and run eagerly on the CPU, the Triton ops in the interpreter: the token-sized bytes the forward
saves for the backward, and the peak of the backward's live token-sized tensors taken in its graph's order (no
inductor scheduling). Both per image, in C bf16 elements per token, for each depth given:

    python scripts/checkpoint_graphs.py --depths 6 12 --res 112     # about 20 min on 2 CPU cores

Per added block the forward should keep 1 C (the block's input) and the backward's peak should not grow by a block's
activations; docs/performance.md (run74) compares this with the GPU's measured memory.
"""
import argparse
import os

os.environ.setdefault('TRITON_INTERPRET', '1')  # before hgrn_vision imports triton: the ops run on CPU tensors

import timm  # noqa: E402
import torch  # noqa: E402
from torch._inductor.compile_fx import compile_fx  # noqa: E402

import hgrn_vision  # noqa: E402,F401  (registers the models)

# the custom-op aliasing check's dispatch mode stops the interpreted Triton kernels inside a checkpointed region
torch._functorch.config.check_custom_op_aliasing = False


def _token_bytes(node: torch.fx.Node, tokens: int) -> int:
    vals = node.meta.get('val') if hasattr(node, 'meta') else None
    vals = vals if isinstance(vals, (tuple, list)) else [vals]
    return sum(v.numel() * v.dtype.itemsize for v in vals if isinstance(v, torch.Tensor) and tokens in v.shape)


def _peak_in_order(graph: torch.fx.Graph, tokens: int) -> int:
    """Largest sum of token-sized values alive at once when `graph` runs in its node order (inputs not counted)."""
    nodes = list(graph.nodes)
    last_use = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    live, cur, peak = {}, 0, 0
    for i, n in enumerate(nodes):
        if n.op not in ('placeholder', 'output'):
            live[n] = _token_bytes(n, tokens)
            cur += live[n]
        peak = max(peak, cur)
        for a in [a for a in live if last_use.get(a, -1) <= i]:
            cur -= live.pop(a)
    return peak


def checkpointed_graphs(name: str, depth: int, res: int) -> dict:
    """Compile a training step of `name` at `depth` and `res` (one image, bf16 autocast, every block checkpointed)
    and return the forward's saved and the backward's peak token-sized bytes, in C bf16 elements per token."""
    torch._dynamo.reset()
    model = timm.create_model(name, depth=depth, num_classes=10, img_size=res, scan_impl='triton')
    model.set_grad_checkpointing(True)
    tokens = model.patch_embed.num_patches
    unit = tokens * model.num_features * 2
    out = {}

    def inner_compile(gm, example_inputs, **kwargs):
        if kwargs.get('is_backward', False):
            out['backward peak C'] = _peak_in_order(gm.graph, tokens) / unit
        else:
            saved = next(n for n in gm.graph.nodes if n.op == 'output').args[0]
            out['forward saves C'] = sum(_token_bytes(a, tokens) for a in saved if isinstance(a, torch.fx.Node)) / unit

        def run(args):
            return gm(*args)
        run._boxed_call = True
        return run

    x = torch.randn(1, 3, res, res)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = torch.compile(model, backend=lambda gm, ex: compile_fx(gm, ex, inner_compile=inner_compile))(x)
    logits.sum().backward()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='hgrn_deit_small')
    p.add_argument('--depths', nargs='+', type=int, default=[1, 2])
    p.add_argument('--res', type=int, default=112)
    args = p.parse_args()
    for depth in args.depths:
        r = checkpointed_graphs(args.model, depth, args.res)
        print(f'{args.model} depth {depth} at {args.res}: ' + ', '.join(f'{k} {v:.2f}' for k, v in r.items()),
              flush=True)


if __name__ == '__main__':
    main()

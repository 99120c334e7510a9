"""The MLP module on the fused GLU op against timm's GluMlp."""
import torch
from timm.layers import GluMlp
from torch import nn

from hgrn_vision.benchmark import rel_err
from hgrn_vision.layers import SiluGluMlp


def test_silu_glu_mlp_matches_timm_glu_mlp():
    """The MLP on the fused op gives timm's GluMlp(act_layer=SiLU, gate_last=False) outputs and parameter
    gradients from the same state dict (fc1's bias gradient through the op's sums)."""
    torch.manual_seed(0)
    ours = SiluGluMlp(6, 10, impl='triton')
    ref = GluMlp(6, 10, act_layer=nn.SiLU, gate_last=False)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 6)
    outs = []
    for m in (ours, ref):
        y = m(x)
        y.square().sum().backward()
        outs.append((y, {n: p.grad for n, p in m.named_parameters()}))
    assert rel_err(outs[0][0], outs[1][0]) < 1e-6
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, g in outs[1][1].items():
        assert rel_err(outs[0][1][name], g) < 1e-5, name

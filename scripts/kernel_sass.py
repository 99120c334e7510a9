"""What the GPU will run, read on the CPU: each Triton kernel compiled for sm_90a (H100 / H200) with Triton's bundled
ptxas, then its registers and spills (`ptxas -v`) and the SASS instructions of each loop (`cuobjdump -sass`: a loop is
a backward branch), by kind. No GPU needed: the stand-in driver of `tests/kernel_writes.py` names sm_90 as the
target. Kernel arguments are specialised as at a launch on contiguous tensors (pointers and sizes divisible by 16).

    python scripts/kernel_sass.py                 # every kernel at its 16-bit config (the small model's shapes)
    python scripts/kernel_sass.py _bihgru_bwd_kernel
    PYTHONPATH=DIR python scripts/kernel_sass.py   # another Triton, e.g. the GPU box's: pip install --target DIR
                                                    # --no-deps triton==3.6.0

A loop's instruction count over the rows it handles is what a row costs to issue; see docs/kernels.md, "Byte floors"
and "Limits and next steps", for what the counts say about the scan kernels.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ['TRITON_INTERPRET'] = '0'
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
import kernel_writes  # noqa: E402,F401  (installs the stand-in sm_90 driver)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import hgrn_vision.ops.bihgru.fused as fz  # noqa: E402
import hgrn_vision.ops.bihgru.norm_gate as ng  # noqa: E402
import hgrn_vision.ops.glu as glu  # noqa: E402
import hgrn_vision.ops.norm_linear as nl  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
INT_OPS = ('IADD3', 'IMAD', 'LEA', 'ISETP', 'SHF', 'PRMT', 'LOP3', 'SEL', 'VIADD', 'IABS', 'IMNMX')
FP_OPS = ('FMUL', 'FFMA', 'FADD', 'FSEL', 'FSETP', 'MUFU', 'FMNMX', 'F2FP')
BF, F32 = '*bf16', '*fp32'
# u as the models' launches pass it: bf16 (Re, Im) pairs read as int32 (fused._as_pairs)
_SCAN = dict(u_ptr='*i32', z_ptr=BF, gamma_ptr=F32, tf_ptr=F32, tr_ptr=F32, out_ptr=BF, do_ptr=BF, du_ptr=BF, dz_ptr=BF,
             part_ptr=F32, sum_ptr=F32, scr_ptr=F32)
_ROWS = dict(h_ptr=BF, x_ptr=BF, w_ptr=F32, b_ptr=F32, y_ptr=BF, dy_ptr=BF, dh_ptr=BF, dx_ptr=BF, part_ptr=F32,
             dp_ptr=BF, p_ptr=BF, mean_ptr=F32, rstd_ptr=F32, eps='fp32')
_NG_D = 768  # 2C of the small model
_NG_FWD_ROWS, _, _NG_FWD_META = ng._launch(ng.FWD_CFG, _NG_D, ng.FWD_CHANNELS_PER_WARP)
_NG_BWD_ROWS, _, _NG_BWD_META = ng._launch(ng.BWD_CFG, _NG_D, ng.BWD_CHANNELS_PER_WARP)
_NG_FWD_WARPS, _NG_BWD_WARPS = _NG_FWD_META.pop('num_warps'), _NG_BWD_META.pop('num_warps')
# name: (kernel, pointer / float types, constexprs, compile options) at the 16-bit configs and the small model's widths
KERNELS = {
    '_bihgru_fwd_kernel': (fz._bihgru_fwd_kernel, _SCAN, dict(BLOCK_C=fz.FWD_CFG[2][0], UNROLL=fz.GROUP,
                                                               SUMMARY=False, EVEN=True, AHEAD=fz.FWD_AHEAD[2]),
                           dict(num_warps=fz.FWD_CFG[2][1])),
    '_bihgru_bwd_kernel': (fz._bihgru_bwd_kernel, _SCAN, dict(BLOCK_C=fz.BWD_CFG[2][0], UNROLL=fz.GROUP,
                                                               SUMMARY=False, DZ_IN_DU=True, EVEN=True),
                           dict(num_warps=fz.BWD_CFG[2][1], maxnreg=fz.BWD_MAXNREG)),
    '_norm_gate_fwd_kernel': (ng._norm_gate_fwd_kernel, _ROWS, dict(ROWS=_NG_FWD_ROWS, FLAT=True, **_NG_FWD_META),
                              dict(num_warps=_NG_FWD_WARPS)),
    '_norm_gate_bwd_kernel': (ng._norm_gate_bwd_kernel, _ROWS, dict(ROWS=_NG_BWD_ROWS, WRITE_Y=False, FLAT=True,
                                                                     **_NG_BWD_META), dict(num_warps=_NG_BWD_WARPS)),
    '_silu_glu_bwd_kernel': (glu._silu_glu_bwd_kernel, _ROWS, dict(ROWS=glu.BWD_CFG[0], BLOCK_H=glu.BWD_CFG[1]),
                             dict(num_warps=glu.BWD_CFG[2])),
    '_layer_norm_bwd_kernel': (nl._layer_norm_bwd_kernel, _ROWS, dict(BLOCK_D=512, ROWS=nl.BWD_CFG[0]),
                               dict(num_warps=ng._warps(nl.BWD_CFG[1], 512, ng.BWD_CHANNELS_PER_WARP))),
}


def compile_sm90(kernel, types, constexprs, options):
    """(ptxas -v's register / spill line, [(address, opcode)] of the SASS) of `kernel` for sm_90a."""
    params = list(kernel.arg_names)
    signature = {p: 'constexpr' if p in constexprs else types.get(p, 'i32') for p in params}
    attrs = {(i,): [['tt.divisibility', 16]] for i, p in enumerate(params)
             if p not in constexprs and types.get(p, 'i32') != 'fp32'}
    src = ASTSource(kernel, signature, constexprs={(params.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget('cuda', 90, 32), options=options)
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = os.path.join(d, 'k.ptx'), os.path.join(d, 'k.cubin')
        with open(ptx, 'w') as f:
            f.write(compiled.asm['ptx'])
        out = subprocess.run([os.path.join(BIN, 'ptxas'), '-arch=sm_90a', '-v', ptx, '-o', cubin],
                             capture_output=True, text=True, check=True)
        sass = subprocess.run([os.path.join(BIN, 'cuobjdump'), '-sass', cubin], capture_output=True, text=True,
                              check=True).stdout
    info = ' '.join(x.split(':', 1)[-1].strip() for x in out.stderr.splitlines() if 'registers' in x or 'spill' in x)
    instrs = []
    for line in sass.splitlines():
        m = re.match(r'\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)', line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2), line))
    return info, instrs


def loops(instrs, min_bytes=0x200):
    """(start, end) addresses of the loops: backward branches over at least `min_bytes` of code."""
    found = []
    for addr, op, line in instrs:
        target = re.search(r'BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)', line) if op == 'BRA' else None
        if target and addr - int(target.group(1), 16) >= min_bytes:
            found.append((int(target.group(1), 16), addr))
    return found


def describe(counts):
    ints, fps = sum(counts[k] for k in INT_OPS), sum(counts[k] for k in FP_OPS)
    return (f'{sum(counts.values()):5d} instructions: integer {ints}, float {fps} (MUFU {counts["MUFU"]}), '
            f'LDG {counts["LDG"]}, STG {counts["STG"]}, shared {counts["LDS"] + counts["STS"]}, '
            f'local {counts["LDL"] + counts["STL"]}')


def main(names):
    print('triton', triton.__version__, '- sm_90a, 16-bit configs', flush=True)
    for name in names:
        if name not in KERNELS:
            raise SystemExit(f'unknown kernel {name!r}: one of {", ".join(KERNELS)}')
        kernel, types, constexprs, options = KERNELS[name]
        info, instrs = compile_sm90(kernel, types, constexprs, options)
        print(f'{name} {constexprs} {options}: {info}')
        print(f'  whole kernel {describe(collections.Counter(op for _, op, _ in instrs))}')
        for lo, hi in loops(instrs):
            body = collections.Counter(op for a, op, _ in instrs if lo <= a <= hi)
            print(f'  loop {lo:#06x}-{hi:#06x} {describe(body)}', flush=True)


if __name__ == '__main__':
    main(sys.argv[1:] or list(KERNELS))

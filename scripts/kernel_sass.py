"""What the GPU will run, read on the CPU: each Triton kernel compiled for sm_90a (H100 / H200) with Triton's bundled
ptxas, then its registers and spills (`ptxas -v`) and the SASS instructions of each loop (`cuobjdump -sass`: a loop is
a backward branch), by kind. No GPU needed (`hgrn_vision.ops.triton_utils.use_sm90_target`). Kernel arguments are
specialised as at a launch on contiguous tensors (pointers and sizes divisible by 16).

    python scripts/kernel_sass.py                 # every kernel at its 16-bit config (the small model's shapes)
    python scripts/kernel_sass.py bihgru_bwd_kernel
    PYTHONPATH=DIR:. python scripts/kernel_sass.py   # another Triton, e.g. the GPU box's: pip install --target DIR
                                                      # --no-deps triton==3.6.0

A loop's instruction count over the rows it handles is what a row costs to issue; see docs/kernels.md, "Byte floors",
for what the counts say about the scan kernels.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ['TRITON_INTERPRET'] = '0'
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hgrn_vision.ops.bihgru.bwd import BWD_CONFIGS, bihgru_bwd_kernel  # noqa: E402
from hgrn_vision.ops.bihgru.common import GROUP  # noqa: E402
from hgrn_vision.ops.bihgru.fwd import FWD_CONFIGS, bihgru_fwd_kernel  # noqa: E402
from hgrn_vision.ops.bihgru.norm_gate import launch_meta, norm_gate_bwd_kernel, norm_gate_fwd_kernel  # noqa: E402
from hgrn_vision.ops.glu import BWD_CONFIG as GLU_CONFIG  # noqa: E402
from hgrn_vision.ops.glu import silu_glu_bwd_kernel  # noqa: E402
from hgrn_vision.ops.norm_linear import BWD_CONFIG as LN_CONFIG  # noqa: E402
from hgrn_vision.ops.norm_linear import layer_norm_bwd_kernel  # noqa: E402
from hgrn_vision.ops.triton_utils import BWD_CHANNELS_PER_WARP, row_warps, use_sm90_target  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
INT_OPS = ('IADD3', 'IMAD', 'LEA', 'ISETP', 'SHF', 'PRMT', 'LOP3', 'SEL', 'VIADD', 'IABS', 'IMNMX')
FP_OPS = ('FMUL', 'FFMA', 'FADD', 'FSEL', 'FSETP', 'MUFU', 'FMNMX', 'F2FP')
BF, F32 = '*bf16', '*fp32'
# u as the models' launches pass it: bf16 (Re, Im) pairs read as int32 (`common.as_pairs`)
_SCAN = dict(u_ptr='*i32', z_ptr=BF, gamma_ptr=F32, tf_ptr=F32, tr_ptr=F32, out_ptr=BF, do_ptr=BF, du_ptr=BF, dz_ptr=BF,
             part_ptr=F32, sum_ptr=F32, scr_ptr=F32)
_ROWS = dict(h_ptr=BF, x_ptr=BF, w_ptr=F32, b_ptr=F32, y_ptr=BF, dy_ptr=BF, dh_ptr=BF, dx_ptr=BF, part_ptr=F32,
             dp_ptr=BF, p_ptr=BF, mean_ptr=F32, rstd_ptr=F32, eps='fp32')
_D = 768  # 2C of the small model
_NG_FWD_ROWS, _, _NG_FWD_META = launch_meta(_D, backward=False)
_NG_BWD_ROWS, _, _NG_BWD_META = launch_meta(_D, backward=True)
_NG_FWD_WARPS, _NG_BWD_WARPS = _NG_FWD_META.pop('num_warps'), _NG_BWD_META.pop('num_warps')
_FWD, _BWD = FWD_CONFIGS[2], BWD_CONFIGS[2]
# name: (kernel, pointer / float types, constexprs, compile options) at the 16-bit configs and the small model's widths
KERNELS = {
    'bihgru_fwd_kernel': (bihgru_fwd_kernel, _SCAN, dict(BLOCK_C=_FWD.block_c, UNROLL=GROUP, SUMMARY=False, EVEN=True,
                                                         AHEAD=_FWD.load_ahead), dict(num_warps=_FWD.num_warps)),
    'bihgru_bwd_kernel': (bihgru_bwd_kernel, _SCAN, dict(BLOCK_C=_BWD.block_c, UNROLL=GROUP, SUMMARY=False,
                                                         DZ_IN_DU=True, EVEN=True),
                          dict(num_warps=_BWD.num_warps, maxnreg=_BWD.max_registers)),
    'norm_gate_fwd_kernel': (norm_gate_fwd_kernel, _ROWS, dict(ROWS=_NG_FWD_ROWS, FLAT=True, **_NG_FWD_META),
                             dict(num_warps=_NG_FWD_WARPS)),
    'norm_gate_bwd_kernel': (norm_gate_bwd_kernel, _ROWS, dict(ROWS=_NG_BWD_ROWS, WRITE_Y=False, FLAT=True,
                                                               **_NG_BWD_META), dict(num_warps=_NG_BWD_WARPS)),
    'silu_glu_bwd_kernel': (silu_glu_bwd_kernel, _ROWS, dict(ROWS=GLU_CONFIG.rows, BLOCK_H=GLU_CONFIG.block_h),
                            dict(num_warps=GLU_CONFIG.num_warps)),
    'layer_norm_bwd_kernel': (layer_norm_bwd_kernel, _ROWS, dict(BLOCK_D=512, ROWS=LN_CONFIG.rows),
                              dict(num_warps=row_warps(LN_CONFIG.num_warps, 512, BWD_CHANNELS_PER_WARP))),
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
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise SystemExit(f'unknown kernel {unknown[0]!r}: one of {", ".join(KERNELS)}')
    use_sm90_target()
    print('triton', triton.__version__, '- sm_90a, 16-bit configs', flush=True)
    for name in names:
        kernel, types, constexprs, options = KERNELS[name]
        info, instrs = compile_sm90(kernel, types, constexprs, options)
        print(f'{name} {constexprs} {options}: {info}')
        print(f'  whole kernel {describe(collections.Counter(op for _, op, _ in instrs))}')
        for lo, hi in loops(instrs):
            body = collections.Counter(op for a, op, _ in instrs if lo <= a <= hi)
            print(f'  loop {lo:#06x}-{hi:#06x} {describe(body)}', flush=True)


if __name__ == '__main__':
    if {'-h', '--help'} & set(sys.argv[1:]):
        print(__doc__ + '\nkernels: ' + ', '.join(KERNELS))
        sys.exit()
    main(sys.argv[1:] or list(KERNELS))

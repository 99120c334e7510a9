"""torch.compile's mutation analysis sees each Triton kernel write its output buffers and nothing else, and the fused
op's compiled forward and backward copy no buffer after inductor's reinplacing (on the GPU the ops are triton_ops
whose kernels torch.compile launches itself: a kernel seen writing an input would make it clone that input, or refuse
a parameter; a kernel writing views of a buffer made it clone the views and scatter them back into the buffer). The
analysis compiles the kernels for sm_90 on the CPU, outside the interpreter, so it runs in a subprocess
(`tests/kernel_writes.py`)."""
import os
import subprocess
import sys

EXPECTED = {
    '_bihgru_fwd_kernel': 'out_ptr scr_ptr',
    '_bihgru_fwd_kernel not AHEAD': 'out_ptr scr_ptr',
    '_bihgru_fwd_kernel EVEN': 'out_ptr scr_ptr',
    '_bihgru_fwd_kernel SUMMARY': 'sum_ptr',
    '_bihgru_fwd_onchip_kernel': 'out_ptr',
    '_bihgru_bwd_kernel': 'du_ptr dz_ptr part_ptr scr_ptr',
    '_bihgru_bwd_kernel SUMMARY': 'sum_ptr',
    '_bihgru_bwd_kernel DZ_IN_DU': 'du_ptr part_ptr scr_ptr',
    '_bihgru_bwd_kernel DZ_IN_DU EVEN': 'du_ptr part_ptr scr_ptr',
    '_norm_gate_fwd_kernel': 'y_ptr',
    '_norm_gate_bwd_kernel': 'dh_ptr dx_ptr part_ptr',
    '_norm_gate_bwd_kernel WRITE_Y': 'dh_ptr dx_ptr part_ptr y_ptr',
    '_silu_glu_bwd_kernel': 'dx_ptr p_ptr part_ptr',
    '_layer_norm_bwd_kernel': 'dx_ptr part_ptr y_ptr',
    'forward graph copies': '-',
    'backward graph copies': '-',
}


def test_kernels_write_only_their_outputs_and_nothing_is_copied():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, 'TRITON_INTERPRET': '0', 'PYTHONPATH': root}  # this tree's hgrn_vision, not an installed one
    out = subprocess.run([sys.executable, os.path.join(root, 'tests', 'kernel_writes.py')], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = dict(line.split(': ', 1) for line in out.stdout.splitlines())
    assert seen == EXPECTED, (seen, out.stderr[-3000:])


def test_kernel_sass_script():
    """`scripts/kernel_sass.py` (registers and per-loop SASS of a kernel for sm_90a, on the CPU) runs and finds the
    LayerNorm backward's one loop over row tiles, with its loads, stores and no spills; an unknown name is refused."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, 'TRITON_INTERPRET': '0', 'PYTHONPATH': root}
    script = os.path.join(root, 'scripts', 'kernel_sass.py')
    out = subprocess.run([sys.executable, script, '_layer_norm_bwd_kernel'], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert '0 bytes spill stores' in lines[1] and 'registers' in lines[1], lines
    loop = [x for x in lines if x.lstrip().startswith('loop ')]
    assert len(loop) == 1 and ' LDG 0,' not in loop[0] and ' STG 0,' not in loop[0], lines
    bad = subprocess.run([sys.executable, script, 'no_such_kernel'], env=env, cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "unknown kernel 'no_such_kernel'" in bad.stderr

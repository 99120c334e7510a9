"""Two trees of this package side by side on the GPU: `step_probe.py`'s probe of the same steps in this tree and in
OTHER (e.g. `git archive main | tar -x -C OTHER`), alternated over rounds, each probe in a fresh process run from its
tree's root with PYTHONPATH=. (so each uses its own kernels), then each step's medians and the ratio OTHER / this.
Alternating keeps a drift of the machine from reading as a difference between the trees.

    PYTHONPATH=. python scripts/ab_probe.py OTHER hgrn_deit_small [hgrn_deit_tiny::reduce-overhead ...] [--rounds 2]

A spec is `step_probe.py`'s NAME[:CKPT[:MODE[:RES[:KEY=VALUE,...]]]]. Prints every probe's line as it comes and a table
at the end.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEP = re.compile(r'step ms median\s+([0-9.]+)')


def probe(tree: str, tag: str, spec: str) -> float:
    """Median step ms of one `step_probe.py` run of `spec` in `tree` (its line echoed)."""
    out = subprocess.run([sys.executable, os.path.join('scripts', 'step_probe.py'), tag, spec], cwd=tree,
                         env={**os.environ, 'PYTHONPATH': '.'}, capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if 'step ms median' in x]
    if out.returncode != 0 or not lines:
        raise SystemExit(f'{tag} {spec} in {tree} failed:\n{out.stderr[-3000:]}')
    print(lines[-1], flush=True)
    return float(_STEP.search(lines[-1]).group(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('other', help="the other tree's root (a copy of this package)")
    parser.add_argument('specs', nargs='+', help='step_probe.py specs: NAME[:CKPT[:MODE[:RES[:KEY=VALUE,...]]]]')
    parser.add_argument('--rounds', type=int, default=2)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.other, 'scripts', 'step_probe.py')):
        raise SystemExit(f'{args.other!r} is not a tree of this package (no scripts/step_probe.py in it)')
    times = {(spec, tree): [] for spec in args.specs for tree in ('this', 'other')}
    for _ in range(args.rounds):
        for spec in args.specs:
            times[spec, 'this'].append(probe(HERE, 'this', spec))
            times[spec, 'other'].append(probe(os.path.abspath(args.other), 'other', spec))
    print(f'\n{"step":>40} {"this ms":>20} {"other ms":>20} {"other / this":>13}')
    for spec in args.specs:
        a, b = times[spec, 'this'], times[spec, 'other']
        print(f'{spec:>40} {" ".join(f"{t:6.2f}" for t in a):>20} {" ".join(f"{t:6.2f}" for t in b):>20}'
              f' {statistics.median(b) / statistics.median(a):13.3f}')


if __name__ == '__main__':
    main()

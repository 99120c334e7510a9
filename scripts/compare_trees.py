#!/usr/bin/env python3
"""`benchmark.py models` in two trees of this package side by side on one machine, e.g. before and after a change.

    git worktree add ../before <commit>        # or: mkdir ../before && git archive <commit> | tar -x -C ../before
    PYTHONPATH=. python scripts/compare_trees.py ../before . --rounds 2 -- \\
        --models hgrn_deit_small deit_small_patch16_224 --resolutions 224 1024 --compile compiled

Everything after `--` goes to `benchmark.py models` in both trees. Each run is a fresh process started in its tree's
root with PYTHONPATH=. (so each tree runs its own kernels); the trees alternate, the first tree first in even rounds
and second in odd ones, so that a drift of the machine does not read as a difference between them. Prints one table,
every row of both trees with the median over the rounds and `ref/this` the first tree's images/s (and memory per
image) over the second's, and writes it to OUTPUT_DIR/compare_trees.csv and .json beside each run's own files.
"""
import argparse
import json
import os
import subprocess
import sys

from hgrn_vision.benchmark.models import TREE_COLUMNS, compare_runs
from hgrn_vision.benchmark.utils import format_table, write_csv, write_json


def run_benchmark(tree: str, bench_args: list, output_dir: str, name: str) -> list:
    """The rows of `python benchmark.py models BENCH_ARGS` run in `tree`."""
    cmd = [sys.executable, 'benchmark.py', 'models', *bench_args, '--output-dir', output_dir, '--name', name]
    print(f'=== {tree}: {" ".join(cmd[1:])}', flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, ['.', os.environ.get('PYTHONPATH')])))
    if subprocess.run(cmd, cwd=tree, env=env).returncode != 0:
        raise SystemExit(f'benchmark.py models failed in {tree}')
    with open(os.path.join(output_dir, f'{name}.json')) as f:
        return json.load(f)['rows']


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, bench_args = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     usage='%(prog)s TREE_A TREE_B [--rounds N] [--output-dir DIR] -- BENCHMARK_ARGS')
    parser.add_argument('trees', nargs=2, help='two roots of trees of this package; the first is the reference')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--output-dir', default='output/compare_trees')
    args = parser.parse_args(own)
    trees = [os.path.abspath(t) for t in args.trees]
    for tree in trees:
        if not os.path.isfile(os.path.join(tree, 'benchmark.py')):
            parser.error(f'{tree} is not a tree of this package (no benchmark.py in it)')
    labels = [os.path.basename(t) for t in trees]
    if labels[0] == labels[1]:
        labels = ['a', 'b']
    out_dir = os.path.abspath(args.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    runs = {label: [] for label in labels}
    for r in range(args.rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            runs[labels[i]].append(run_benchmark(trees[i], bench_args, out_dir, f'{labels[i]}_round{r}'))
    rows = compare_runs(runs)
    print()
    print(format_table(rows, TREE_COLUMNS))
    print(f'ref/this: {labels[0]} over {labels[1]} (medians over {args.rounds} rounds)')
    base = os.path.join(out_dir, 'compare_trees')
    write_csv(base + '.csv', rows)
    write_json(base + '.json', dict(trees=dict(zip(labels, trees)), rounds=args.rounds, benchmark_args=bench_args),
               rows)
    print(f'wrote {base}.csv, {base}.json')


if __name__ == '__main__':
    main()

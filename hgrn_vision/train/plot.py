"""`summary.csv` upkeep on resume and the PNG plot of the training curves."""
import csv
import logging
import os
from typing import Dict, List

__all__ = ['read_summary', 'trim_summary', 'plot_summary']

_logger = logging.getLogger(__name__)


def read_summary(path: str) -> Dict[str, List[float]]:
    """Columns of a timm `summary.csv` as float lists."""
    with open(path, newline='') as f:
        rows = [r for r in csv.DictReader(f)]
    cols: Dict[str, List[float]] = {}
    for r in rows:
        for k, v in r.items():
            try:
                cols.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k, []).append(float('nan'))
    return cols


def trim_summary(path: str, start_epoch: int) -> None:
    """Keep only rows of epochs before `start_epoch` (a resumed run rewrites the later ones)."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [r for r in rows[1:] if r and int(float(r[0])) < start_epoch]
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        if keep:
            writer = csv.writer(f)
            writer.writerow(rows[0])
            writer.writerows(keep)
    os.replace(tmp, path)


def plot_summary(summary_csv: str, out_png: str) -> bool:
    """Loss, top-1 and LR per epoch into a PNG; False (and a log line) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        _logger.warning('matplotlib is not installed: no plot written')
        return False
    cols = read_summary(summary_csv)
    if not cols.get('epoch'):
        return False
    ep = cols['epoch']
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ep, cols['train_loss'], label='train')
    for key, label in (('eval_loss', 'eval'), ('eval_ema_loss', 'eval (EMA)')):
        if key in cols:
            axes[0].plot(ep, cols[key], label=label)
    axes[0].set_title('loss')
    for key, label in (('eval_top1', 'top-1'), ('eval_ema_top1', 'top-1 (EMA)'), ('eval_top5', 'top-5')):
        if key in cols:
            axes[1].plot(ep, cols[key], label=label)
    axes[1].set_title('eval accuracy (%)')
    axes[2].plot(ep, cols.get('lr', cols.get('train_lr', [])), label='lr')
    axes[2].set_title('learning rate (end of epoch)')
    for ax in axes:
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = out_png + '.tmp.png'
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    _logger.info(f'Curves plotted in {out_png}')
    return True

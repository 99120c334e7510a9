#!/usr/bin/env bash
# GPU check of the training pipeline: the Fashion-MNIST GPU recipe (configs/fashion_mnist_gpu.yaml,
# hgrn_deit_tiny-sized: C=192, depth 12, patch 4) on 1 GPU and, when 2 or more GPUs are present, the same with
# `torchrun --nproc_per_node=2`. Prints top-1 (raw and EMA weights) and wall time of each run.
#
#   bash scripts/gpu_train_check.sh [DATA_DIR]     DATA_DIR holds FashionMNIST/raw/ (default: data)
#
# Runs from the project tree (PYTHONPATH=.), needs no network and installs nothing. Environment overrides:
#   PYTHON (python), OUT_DIR (output/gpu_check), EPOCHS (the config's), EXTRA_ARGS (more train.py flags),
#   MAX_GPUS (2; 1 skips the torchrun run), NGPU (the GPUs torch sees; set it to try the script on a CPU),
#   ORDER (1gpu-first; 2gpu-first runs the torchrun run before the single-GPU one).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data}
PY=${PYTHON:-python}
OUT=${OUT_DIR:-output/gpu_check}
CFG=configs/fashion_mnist_gpu.yaml
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
STAMP=$(date +%Y%m%d-%H%M%S)

for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [ ! -f "$DATA/FashionMNIST/raw/$f" ]; then
        echo "error: $DATA/FashionMNIST/raw/$f is missing (get it with: python -m hgrn_vision.train.prepare_data" \
             "fashion_mnist $DATA)" >&2
        exit 2
    fi
done

"$PY" - <<'PY'
import torch, timm, triton
print(f'torch {torch.__version__}  timm {timm.__version__}  triton {triton.__version__}  cuda {torch.version.cuda}')
for i in range(torch.cuda.device_count()):
    print(f'GPU {i}: {torch.cuda.get_device_name(i)}')
PY
NGPU=${NGPU:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}
MAX_GPUS=${MAX_GPUS:-2}
EXTRA=()
[ -n "${EPOCHS:-}" ] && EXTRA+=(--epochs "$EPOCHS")
# shellcheck disable=SC2206
[ -n "${EXTRA_ARGS:-}" ] && EXTRA+=($EXTRA_ARGS)

SUMMARY=()
run() {  # run NAME NPROC
    local name=$1 nproc=$2 exp="${STAMP}-$1" t0 t1 launcher
    if [ "$nproc" -gt 1 ]; then
        launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc")
    else
        launcher=("$PY")
    fi
    echo "=== $name: $nproc process(es)"
    t0=$(date +%s.%N)
    "${launcher[@]}" train.py -c "$CFG" "$DATA" --output "$OUT" --experiment "$exp" --no-progress "${EXTRA[@]}" \
        2>&1 | tee "$OUT-$exp.log" | grep -E 'Epoch [0-9]+:|Learning rate|error|Error|\*\*\*' || true
    t1=$(date +%s.%N)
    if [ ! -f "$OUT/$exp/last.pth.tar" ]; then
        echo "error: $name training failed, see $OUT-$exp.log" >&2
        tail -30 "$OUT-$exp.log" >&2
        SUMMARY+=("$name: FAILED")
        return 0
    fi
    "$PY" validate.py "$DATA" --checkpoint "$OUT/$exp/last.pth.tar" --split test --results-file "$OUT/$exp/results.json" \
        > "$OUT/$exp/validate.log" 2>&1 || { echo "error: validate failed"; tail -20 "$OUT/$exp/validate.log"; }
    local line
    line=$("$PY" - "$OUT/$exp" "$t0" "$t1" <<'PY'
import csv, json, sys
run, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rows = list(csv.DictReader(open(f'{run}/summary.csv')))
last = rows[-1]
res = json.load(open(f'{run}/results.json'))
ips = sum(float(r['train_img_per_sec']) for r in rows) / len(rows)
print(f"top-1 raw {float(last['eval_top1']):.2f}  EMA {float(last.get('eval_ema_top1', 'nan')):.2f}"
      f"  validate.py ({'EMA' if res['ema'] else 'raw'}) {res['top1']:.2f}  |  train wall {t1 - t0:.0f} s"
      f" for {len(rows)} epochs, {ips:.0f} img/s mean")
PY
)
    echo "RESULT $name: $line"
    SUMMARY+=("$name: $line")
}

run_2gpu() {
    if [ "$NGPU" -ge 2 ] && [ "$MAX_GPUS" -ge 2 ]; then
        run 2gpu 2
    else
        echo "=== only $NGPU GPU(s) visible (or MAX_GPUS < 2): torchrun --nproc_per_node=2 run skipped"
    fi
}

mkdir -p "$OUT"
if [ "${ORDER:-1gpu-first}" = 2gpu-first ]; then
    run_2gpu
    run 1gpu 1
else
    run 1gpu 1
    run_2gpu
fi
echo
echo "===== summary (recipe $CFG, data $DATA)"
for s in "${SUMMARY[@]}"; do echo "$s"; done

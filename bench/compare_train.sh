#!/usr/bin/env bash
# Local training throughput, greyfed (candle) vs PyTorch, side by side.
#
#   bench/compare_train.sh [DATA_DIR]          # default ../shared/data/mnist-10k
#   THREADS=2 REPEATS=3 PYTHON=/work/pyenv/bin/python bench/compare_train.sh
#   MODELS="blocknet cnn" EPOCHS=2 bench/compare_train.sh
#
# For each model, runs `examples/train_bench.rs` and `bench/pytorch_train.py`
# alternately (greyfed, pytorch, greyfed, pytorch, ... REPEATS times each)
# with the same THREADS, data, epochs (EPOCHS, default 2), batch 64 and Adam
# lr 1e-3 (LR), keeps the best throughput of each, and prints a markdown
# table. Accuracy and peak RSS are those of the best run. Without PyTorch
# (`import torch` fails under ${PYTHON:-python3}) only greyfed's column is
# filled. Run it from anywhere; paths are relative to the repository root.
set -euo pipefail

cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/mnist-10k}"
THREADS="${THREADS:-1}"
REPEATS="${REPEATS:-2}"
EPOCHS="${EPOCHS:-2}"
LR="${LR:-1e-3}"
PYTHON="${PYTHON:-python3}"
MODELS="${MODELS:-blocknet cnn vit}"

if [ ! -d "$DATA" ]; then
    echo "data directory $DATA not found (an MNIST-layout IDX directory); nothing to compare"
    exit 0
fi

have_torch=1
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "PyTorch not installed; skipping the PyTorch column ($PYTHON cannot import torch)"
    have_torch=0
fi

cargo build --release --example train_bench >&2
BIN=target/release/examples/train_bench

# The value of KEY in a result line "images_per_sec=X accuracy=Y peak_rss_mb=Z".
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

# Keeps in the variable named $1 whichever of its value and $2 has the higher images_per_sec.
keep_best() {
    local current="${!1}"
    if [ -z "$current" ] || awk -v a="$(field "$2" images_per_sec)" -v b="$(field "$current" images_per_sec)" \
        'BEGIN { exit !(a > b) }'; then
        printf -v "$1" '%s' "$2"
    fi
}

rows=()
for model in $MODELS; do
    best_g=""
    best_p=""
    for ((r = 1; r <= REPEATS; r++)); do
        echo "[$model, run $r/$REPEATS, $THREADS threads] greyfed" >&2
        line=$("$BIN" --model "$model" --data "$DATA" --threads "$THREADS" --epochs "$EPOCHS" --lr "$LR" | tail -n 1)
        echo "  $line" >&2
        keep_best best_g "$line"
        if [ "$have_torch" = 1 ]; then
            echo "[$model, run $r/$REPEATS, $THREADS threads] pytorch" >&2
            line=$(OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" "$PYTHON" bench/pytorch_train.py \
                --model "$model" --data "$DATA" --threads "$THREADS" --epochs "$EPOCHS" --lr "$LR" | tail -n 1)
            echo "  $line" >&2
            keep_best best_p "$line"
        fi
    done
    g_ips=$(field "$best_g" images_per_sec)
    if [ "$have_torch" = 1 ]; then
        p_ips=$(field "$best_p" images_per_sec)
        ratio=$(awk -v a="$g_ips" -v b="$p_ips" 'BEGIN { printf "%.2f", a / b }')
        rows+=("| $model | $g_ips | $p_ips | $ratio | $(field "$best_g" accuracy) | $(field "$best_p" accuracy) | $(field "$best_g" peak_rss_mb) | $(field "$best_p" peak_rss_mb) |")
    else
        rows+=("| $model | $g_ips | - | - | $(field "$best_g" accuracy) | - | $(field "$best_g" peak_rss_mb) | - |")
    fi
done

echo
echo "Local training, $THREADS thread(s), batch 64, Adam lr $LR, $EPOCHS epochs on $DATA, best of $REPEATS (alternating)"
echo
echo "| model | greyfed img/s | pytorch img/s | greyfed/pytorch | greyfed acc | pytorch acc | greyfed peak RSS MB | pytorch peak RSS MB |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"

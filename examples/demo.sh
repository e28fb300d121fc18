#!/usr/bin/env bash
# `make demo`: a tiny LLaMA on the embedded corpus, two CPU ranks under the deepspeed launcher,
# ZeRO-2 and activation checkpointing, then a plot of its metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN_DIR=${RUN_DIR:-runs/demo}
deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" --module megallama train examples/tiny.yaml --set run_dir="$RUN_DIR" "$@"
python tools/plot_metrics.py "$RUN_DIR"
echo "metrics: $RUN_DIR/metrics.jsonl   report: $RUN_DIR/report.json   plot: $RUN_DIR/metrics.png"

#!/usr/bin/env bash
# Every method through the same commands: shard -> pretrain (2 Ray workers) -> evaluate ->
# promote -> embed, for MoCo v2, MoCo v3 with the ResNet and MoCo v3 with the tiny ViT, in one
# scratch project (one MLflow store and registry, so each promotion is gated against the last).
#   bench/methods_e2e.sh [scratch-dir]     (~4 min in all on 2 CPUs)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d)}
MOCOPIPE="$ROOT/.venv/bin/mocopipe"
PYTHON="$ROOT/.venv/bin/python"
mkdir -p "$WORK" && cd "$WORK"
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
SMALL=(--params "$ROOT/params.yaml" --set data.train_limit=4000 --set data.test_limit=1000
  --set data.min_shards=2 --set train.epochs=1 --set eval.monitor_bank=0
  --set tracking.artifact_location="$WORK/mlartifacts" --set eval.fewshot_episodes=0
  --set eval.transfer_source="''" --set eval.supervised_steps=0 --set eval.tsne_points=0)
"$MOCOPIPE" shard "${SMALL[@]}"
for method in "method.name=mocov2" "method.name=mocov3" \
  "method.name=mocov3 --set model.backbone=vit_tiny --set model.patch_size=7"; do
  # shellcheck disable=SC2206  # the ViT line carries two more --set pairs
  run=("${SMALL[@]}" --set $method)
  echo "=== $method"
  "$MOCOPIPE" pretrain "${run[@]}"
  "$MOCOPIPE" evaluate "${run[@]}"
  "$MOCOPIPE" promote "${run[@]}"
  version=$("$PYTHON" -c 'import json; print(json.load(open("promotion.json"))["version"])')
  "$MOCOPIPE" embed "${run[@]}" --source data/shards --model "models:/moco-encoder/$version" \
    --out "embeddings-${method//[ =.-]/_}.parquet"
done

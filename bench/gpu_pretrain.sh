#!/usr/bin/env bash
# One short GPU check, sized for a single `device` call (<10 min): shard Fashion-MNIST, pretrain a
# few minutes with the GPU preset (params-gpu.yaml), print images/s, data-wait fraction and kNN.
# Assumes torch/torchvision are importable and the wheels of requirements.lock are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pipeline.cli shard --params params-gpu.yaml
python -m pipeline.cli pretrain --params params-gpu.yaml 2>&1 | grep -E "\[pretrain\]|pretrain:"
# GPU JPEG decoding (train.gpu_decode): the CUDA test (skipped without a GPU), then the loader's
# CPU cost per 224-px JPEG with and without it
python -m pytest -q -rs tests/data/test_data_encoded_batches.py
python bench/loader_224.py --batches 20 | tail -3

#!/usr/bin/env bash
# The speed benchmarks on a CUDA GPU, one after the other:
#   1. training throughput: a jigsaw job with a resnet18 trunk on 9 tiles of
#      64 px (Fashion-MNIST resized to 224 px), batch 256, against PyTorch
#      eager on synthetic inputs already on the GPU (bench/reference/gpu_synthetic.py);
#   2. serving: /classify of a resnet18 classifier at 224 px over HTTP at
#      concurrency 1-256 against FastAPI + PyTorch on the same GPU, and against
#      PyTorch's own batch-1 and batch-64 inference rate.
#
# Usage: bench/gpu.sh [results folder, default bench/results]
#
# Needs a built binary (PRETEXT_BINARY, default target/release/pretext), a
# python3 with torch, torchvision, pillow, fastapi, uvicorn and
# python-multipart (PYTHON, default python3), wrk, psql and dropdb on PATH,
# and a PostgreSQL at postgres://postgres@127.0.0.1:5432 (trust).
set -euo pipefail

cd "$(dirname "$0")/.."
results=${1:-bench/results}
binary=${PRETEXT_BINARY:-target/release/pretext}
python=${PYTHON:-python3}
mkdir -p "$results"

echo "== training throughput (GPU)"
"$python" bench/train_throughput/run.py --device cuda:0 --binary "$binary" --python "$python" \
    --images "${TRAIN_IMAGES:-10000}" --steps "${TRAIN_STEPS:-200}" --warmup-steps 50 \
    --config '{"pretext":"jigsaw","backbone":"resnet18","image_size":224,"tile_size":64,"batch_size":256,"epochs":100,"seed":0}' \
    --out "$results"

echo "== serving (GPU)"
"$python" bench/serve/run.py --device cuda --skip-build --binary "$binary" \
    --image-size 224 --request-size 224 --concurrency 1,8,32,128,256 \
    --duration "${SERVE_DURATION:-8}" --warmup 3 --wrk-threads 4 \
    --max-batch-size 64 --output serve_gpu
cp bench/results/serve_gpu.md bench/results/serve_gpu.json "$results"/ 2>/dev/null || true

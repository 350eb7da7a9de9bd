#!/usr/bin/env bash
# One-shot GPU check (run on a machine with an NVIDIA GPU and PyTorch, from the repo root):
# the CUDA tests, face-detection throughput (facenet-pytorch's MTCNN against our batched
# cascade), then `mmid bench` on CUDA for the paper preset (random weights).
# Wheels that the machine lacks (facenet-pytorch) may be given in .whl/.
# Results go to ${OUT:-gpu-out}/: pytest.log, detect.txt, bench.jsonl, env.txt. DETECT=0 skips the
# face-detection timing; BACKENDS, BATCHES, SCOPES, ITERS, THREADS, BENCH_TIMEOUT shape the bench.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import torch, onnxruntime, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ort', onnxruntime.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout 150 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest.log" | tail -15
[ "${DETECT:-1}" = 1 ] && timeout 120 python3 benchmarks/mtcnn_time.py cuda 2>&1 | tee "$OUT/detect.txt"
timeout ${BENCH_TIMEOUT:-330} python3 -m engine.cli bench --preset paper --backends ${BACKENDS:-torch-cuda,torch-cuda-graphs} \
  --batches ${BATCHES:-1,8,32,128} --scopes ${SCOPES:-model,window} --iters ${ITERS:-10} --threads ${THREADS:-8} --json --no-write \
  --cache-dir /tmp/mmid-bench 2>"$OUT/bench.err" | tee "$OUT/bench.jsonl"
tail -5 "$OUT/bench.err"

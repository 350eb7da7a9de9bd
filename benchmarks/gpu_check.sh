#!/usr/bin/env bash
# One-shot GPU check (run on a machine with an NVIDIA GPU and PyTorch, from the repo root):
# `mmid bench` on CUDA for the paper preset (random weights), the window scope taken apart
# (benchmarks/window_parts.py), face-detection throughput (facenet-pytorch's MTCNN against
# our batched cascade), then the CUDA tests. The figures come first: a lent machine's time
# may run out before the end.
# Wheels that the machine lacks (facenet-pytorch) may be given in .whl/.
# Results go to ${OUT:-gpu-out}/: bench.jsonl, parts.jsonl, detect.txt, pytest.log, env.txt.
# DETECT=0 skips the face-detection timing, PARTS=0 the parts; BACKENDS, BATCHES, SCOPES,
# ITERS, THREADS, BENCH_TIMEOUT shape the bench, PART_BATCHES the parts (timed with the first of BACKENDS).
set -uo pipefail
OUT=${OUT:-gpu-out}
BACKENDS=${BACKENDS:-torch-cuda,torch-cuda-graphs}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import torch, onnxruntime, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ort', onnxruntime.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout ${BENCH_TIMEOUT:-330} python3 -m engine.cli bench --preset paper --backends $BACKENDS \
  --batches ${BATCHES:-1,8,32,128} --scopes ${SCOPES:-model,window} --iters ${ITERS:-10} --threads ${THREADS:-8} --json --no-write \
  --cache-dir /tmp/mmid-bench 2>"$OUT/bench.err" | tee "$OUT/bench.jsonl"
tail -5 "$OUT/bench.err"
if [ "${PARTS:-1}" = 1 ]; then
  parts=$(ls -d /tmp/mmid-bench/paper-mme2e-run /tmp/mmid-bench/paper-mme2e_sparse-run 2>/dev/null)
  [ -n "$parts" ] && timeout ${PARTS_TIMEOUT:-90} python3 benchmarks/window_parts.py --backend ${BACKENDS%%,*} \
    --batches ${PART_BATCHES:-32,128} --threads ${THREADS:-8} --json $parts 2>"$OUT/parts.err" | tee "$OUT/parts.jsonl"
fi
[ "${DETECT:-1}" = 1 ] && timeout 120 python3 benchmarks/mtcnn_time.py cuda 2>&1 | tee "$OUT/detect.txt"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest.log" | tail -15

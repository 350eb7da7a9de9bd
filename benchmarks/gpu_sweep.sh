#!/usr/bin/env bash
# Training sweep on a lent GPU machine (run from the repo root): several `mmid train`
# runs of the default preset side by side on one GPU, then each run's test accuracy
# (fused and per branch), fitted fusion weights and FLOPs (benchmarks/sweep_summary.py).
# Inputs, too big to travel as they are, come compressed in .gpu/ (git-ignored):
#   .gpu/data.tar.xz    a prepared dataset folder `data/` (mmid prepare)
#   .gpu/minilm.tar.xz  a text-encoder folder `minilm/` (config.json, tokenizer.json,
#                       model.safetensors; fp16, embedding rows no transcript uses zeroed)
# or set DATA and TEXT to folders that are already there. Further datasets may come as
# .gpu/data*.tar.xz (each holding one folder); a run line selects one with
# `--data @WORK/FOLDER`. A device call carries at most 64 MiB: with more inputs than that,
# stage them in two back-to-back calls (the first copies its .gpu/*.tar.xz to /tmp/stash on
# the machine, the second copies them back into .gpu/ before running this script). One run per line of ${CONFIGS:-benchmarks/sweep.txt}:
# NAME MODEL [--data @WORK/FOLDER] [--set key=value ...].
# TIME_LIMIT (seconds) lets each run finish its epoch, stop and fit its fusion weights
# before TRAIN_TIMEOUT kills it. Results go to ${OUT:-gpu-out}/: NAME.log, NAME.metrics.jsonl
# and NAME.logits.npz (branch logits on valid/test) per run, summary.jsonl.
# Session 7 ran it so (H200; 15 runs side by side at 8-17 s per epoch, 6 runs at 8 s; the
# whole lease, start included, about 11 minutes for 21 runs):
#   call 1, carry .gpu/data.tar.xz .gpu/data23.tar.xz:
#     mkdir -p /tmp/stash && cp .gpu/data.tar.xz .gpu/data23.tar.xz /tmp/stash/
#   call 2 at once (a machine idle for 30 s is given back), carry .gpu/data31.tar.xz .gpu/minilm.tar.xz:
#     cp /tmp/stash/*.tar.xz .gpu/ && PACK="$OUT/sweep.tgz" OUT=/tmp/gout CONFIGS=benchmarks/sweep9.txt \
#       EPOCHS=20 PATIENCE=8 TIME_LIMIT=400 TRAIN_TIMEOUT=480 WORKERS=1 SUMMARY_JOBS=8 bash benchmarks/gpu_sweep.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
WORK=${WORK:-/tmp/sweep}
mkdir -p "$OUT" "$WORK/runs"
if [ -z "${DATA:-}" ]; then tar xJf .gpu/data.tar.xz -C "$WORK" && DATA=$WORK/data; fi
for extra_data in .gpu/data?*.tar.xz; do [ -e "$extra_data" ] && tar xJf "$extra_data" -C "$WORK"; done
if [ -z "${TEXT:-}" ]; then tar xJf .gpu/minilm.tar.xz -C "$WORK" && TEXT=$WORK/minilm; fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
# Many runs share the machine's cores: one compute thread each unless told otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
if ! python3 -c "import tqdm" 2>/dev/null; then  # progress bars only: a pass-through stand-in
  mkdir -p "$WORK/shim" && printf 'def tqdm(iterable, *args, **kwargs):\n    return iterable\n' > "$WORK/shim/tqdm.py"
  export PYTHONPATH=$PYTHONPATH:$WORK/shim
fi
while read -r name model extra; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  extra=${extra//@WORK/$WORK}
  # shellcheck disable=SC2086
  timeout "${TRAIN_TIMEOUT:-330}" python3 -m engine.cli train --data "$DATA" --model "$model" --out "$WORK/runs/$name" \
    --preset "${PRESET:-default}" --device "${DEVICE:-cuda}" --set "model.text_model=$TEXT" \
    --set "train.epochs=${EPOCHS:-15}" --set "train.patience=${PATIENCE:-4}" --set "train.time_limit_s=${TIME_LIMIT:-0}" --set "train.num_workers=${WORKERS:-2}" $extra \
    > "$OUT/$name.log" 2>&1 &
done < "${CONFIGS:-benchmarks/sweep.txt}"
wait
for run in "$WORK"/runs/*; do cp "$run/metrics.jsonl" "$OUT/$(basename "$run").metrics.jsonl" 2>/dev/null; done
SUMMARY_JOBS=${SUMMARY_JOBS:-4} python3 benchmarks/sweep_summary.py "$DATA" "$WORK"/runs/* | tee "$OUT/summary.jsonl"
for run in "$WORK"/runs/*; do cp "$run/branch_logits.npz" "$OUT/$(basename "$run").logits.npz" 2>/dev/null; done
# A lent machine brings back a few files only: PACK=FILE.tgz packs the whole of $OUT into one.
if [ -n "${PACK:-}" ]; then tar czf "$PACK" -C "$OUT" .; fi

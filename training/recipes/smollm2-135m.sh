#!/usr/bin/env bash
# Reproduce the drafters shipped for smollm2-135m (workers/drafters/checkpoints/smollm2-135m/): generate the
# training data with the target itself, then train mtp1, eagle and dspark on it.
#
#   bash training/recipes/smollm2-135m.sh OUT_DIR                 # a 2-core CPU machine (about 3 hours)
#   DEVICE=cuda bash training/recipes/smollm2-135m.sh OUT_DIR     # one GPU (about 8 minutes)
#
# Knobs (environment): TARGET (default smollm2-135m: a name, .gguf, or HF directory), DEVICE (cpu|cuda),
# KINDS (default "mtp1 eagle dspark"), PROMPTS (a prompt file to use instead of the built-in corpus), DATA_S (seconds of answer generation), TRAIN_MIN (minutes per drafter),
# SPECRAY (how to call the CLI; default `specray`).
set -euo pipefail
OUT=${1:?usage: smollm2-135m.sh OUT_DIR}
TARGET=${TARGET:-smollm2-135m}
DEVICE=${DEVICE:-cpu}
KINDS=${KINDS:-mtp1 eagle dspark}
SPECRAY=${SPECRAY:-specray}
if [ "$DEVICE" = cpu ]; then
  DATA_S=${DATA_S:-5400}; TRAIN_MIN=${TRAIN_MIN:-30}
  DATA_ARGS="--batch-size 48 --builtin 6000 --self-instruct 0"
  TRAIN_ARGS="--batch-tokens 4096 --epochs 3"
  PARALLEL=0
else
  DATA_S=${DATA_S:-150}; TRAIN_MIN=${TRAIN_MIN:-3.5}
  DATA_ARGS="--batch-size 384 --builtin 9000 --self-instruct 3000"
  TRAIN_ARGS="--batch-tokens 32768 --epochs 50 --eval-every 100"
  PARALLEL=1  # the heads are small: three trainings share one GPU
fi
if [ -n "${PROMPTS:-}" ]; then DATA_ARGS="$DATA_ARGS --prompts $PROMPTS --builtin 0"; fi
mkdir -p "$OUT"
if [ ! -f "$OUT/data/train.jsonl" ]; then
  $SPECRAY data --target "$TARGET" --device "$DEVICE" --dtype bf16 $DATA_ARGS --max-new-tokens 256 \
    --time-budget-s "$DATA_S" --out "$OUT/data" 2>&1 | tee "$OUT/data.log"
fi
pids=()
for kind in $KINDS; do
  cmd=($SPECRAY train --target "$TARGET" --drafter "$kind" --data "$OUT/data" --out "$OUT/$kind"
       --device "$DEVICE" --time-budget-min "$TRAIN_MIN" $TRAIN_ARGS)
  if [ "$PARALLEL" = 1 ]; then
    "${cmd[@]}" --no-progress > "$OUT/$kind.log" 2>&1 &
    pids+=($!)
  else
    "${cmd[@]}" 2>&1 | tee "$OUT/$kind.log"
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
tail -n 1 "$OUT"/*.log

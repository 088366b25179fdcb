#!/usr/bin/env bash
# Reproduce the drafters shipped for smollm2-135m (workers/drafters/checkpoints/smollm2-135m/): generate the
# training data with the target itself, then train mtp1, eagle and dspark together on it (one target forward per
# batch feeds all three).
#
#   bash training/recipes/smollm2-135m.sh OUT_DIR                # what produced the shipped drafters: a 2-core
#                                                                # CPU machine, 40 min of data + 47 min of training
#   DEVICE=cuda bash training/recipes/smollm2-135m.sh OUT_DIR    # one GPU: bigger batches, more data
#
# Knobs (environment): TARGET (default smollm2-135m: a name, .gguf, or HF directory), DEVICE (cpu|cuda),
# KINDS (default "dspark,eagle,mtp1"), PROMPTS (a prompt file instead of the built-in corpus), DATA_S (seconds of
# answer generation), MORE_S (seconds of a second, --resume pass that answers only the prompts the first one did
# not reach; default 0), FEATURE_CACHE=1 (keep the first epoch's target features on disk, a few GB, and read them
# back in later epochs), TRAIN_MIN (minutes of training), SPECRAY (how to call the CLI; default `specray`).
# Then copy OUT_DIR/KIND/{config.json,model.safetensors,training_args.json} to ship a drafter.
# The shipped drafters' data was built without Debian's `python3-doc` (passages: stdlib docstrings only); with it
# installed the passage pool holds paragraphs of the Python manual too, and the prompts differ.
# A larger run (DATA_S=3300 MORE_S=1500 TRAIN_MIN=45, --builtin 7000, python3-doc installed: 1.03M training answer
# tokens from 5,447 prompts) gave weaker drafters than the shipped ones on a slower day (230 training steps at
# 11.8 s against 329 at 8.6 s; the prompt mix differs too): README, "Measured".
set -euo pipefail
OUT=${1:?usage: smollm2-135m.sh OUT_DIR}
TARGET=${TARGET:-smollm2-135m}
DEVICE=${DEVICE:-cpu}
KINDS=${KINDS:-dspark,eagle,mtp1}
SPECRAY=${SPECRAY:-specray}
MORE_S=${MORE_S:-0}
if [ "$DEVICE" = cpu ]; then
  DATA_S=${DATA_S:-2400}; TRAIN_MIN=${TRAIN_MIN:-47}
  DATA_ARGS="--builtin 6000 --self-instruct 0 --batch-size 64"
  TRAIN_ARGS="--batch-tokens 4096 --eval-every 40 --eval-batches 3 --epochs 10"
else
  DATA_S=${DATA_S:-600}; TRAIN_MIN=${TRAIN_MIN:-20}
  DATA_ARGS="--builtin 10000 --self-instruct 3000 --batch-size 384"
  TRAIN_ARGS="--batch-tokens 32768 --eval-every 100 --epochs 20"
fi
if [ -n "${PROMPTS:-}" ]; then DATA_ARGS="$DATA_ARGS --prompts $PROMPTS --builtin 0"; fi
if [ -n "${FEATURE_CACHE:-}" ]; then TRAIN_ARGS="$TRAIN_ARGS --feature-cache $OUT/feature-cache"; fi
mkdir -p "$OUT"
if [ ! -f "$OUT/data/train.jsonl" ]; then
  $SPECRAY data --target "$TARGET" --device "$DEVICE" --dtype bf16 $DATA_ARGS --max-new-tokens 256 \
    --time-budget-s "$DATA_S" --out "$OUT/data" 2>&1 | tee "$OUT/data.log"
  if [ "$MORE_S" != 0 ]; then  # the rest of the corpus, skipping the prompts already answered
    $SPECRAY data --resume --target "$TARGET" --device "$DEVICE" --dtype bf16 $DATA_ARGS --max-new-tokens 256 \
      --time-budget-s "$MORE_S" --out "$OUT/data" 2>&1 | tee -a "$OUT/data.log"
  fi
fi
CKPT="$OUT"; case "$KINDS" in *,*) ;; *) CKPT="$OUT/$KINDS" ;; esac  # one kind writes to --out itself
$SPECRAY train --target "$TARGET" --drafter "$KINDS" --data "$OUT/data" --out "$CKPT" --device "$DEVICE" \
  --time-budget-min "$TRAIN_MIN" $TRAIN_ARGS 2>&1 | tee "$OUT/train.log"

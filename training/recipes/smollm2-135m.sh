#!/usr/bin/env bash
# Reproduce the drafters shipped for smollm2-135m (workers/drafters/checkpoints/smollm2-135m/): generate training
# data with the target itself and train mtp1, eagle and dspark together on it (one target forward per batch feeds
# all three); then a second stage answers a fresh prompt draw and fine-tunes the three heads on it (`--init`).
#
#   bash training/recipes/smollm2-135m.sh OUT_DIR                # what produced the shipped drafters on a 2-core
#                                                                # CPU machine: stage 1, 40 min of data + 47 min of
#                                                                # training; stage 2, 25 min of data + 25 min of
#                                                                # fine-tuning (about 2 h 20 min in all)
#   DEVICE=cuda bash training/recipes/smollm2-135m.sh OUT_DIR    # what produced them on one H200 GPU: stage 1,
#                                                                # 2.5 min of data (813k answer tokens) + 2.4 min of
#                                                                # training (720 steps, 20 epochs); stage 2 answers
#                                                                # the rest of the same prompts (--resume; 2.13M
#                                                                # tokens in all) + 2.4 min of fine-tuning on all of
#                                                                # it (about 12 min in all, model loads included)
#
# The shipped drafters are OUT_DIR/ft/KIND (stage 1 alone leaves OUT_DIR/KIND): copy
# {config.json,model.safetensors,training_args.json} from there to ship them.
# Knobs (environment): TARGET (default smollm2-135m: a name, .gguf, or HF directory), DEVICE (cpu|cuda),
# KINDS (default "dspark,eagle,mtp1"), PROMPTS (a prompt file instead of the built-in corpus), DATA_S (seconds of
# answer generation), MORE_S (seconds of a second, --resume pass that answers only the prompts the first one did
# not reach; default 0), FEATURE_CACHE=1 (keep the first epoch's target features on disk, a few GB, and read them
# back in later epochs), TRAIN_MIN (minutes of training), FT_DATA_S and FT_MIN (stage 2's seconds of data and
# minutes of fine-tuning; FT_DATA_S=0 skips stage 2), DATA_ARGS / FT_DATA_ARGS / TRAIN_ARGS (replace the device's
# default arguments of each stage), FT_RESUME=1 (stage 2 answers the rest of stage 1's prompts instead of a fresh
# draw, and fine-tunes on all the answers; the GPU default), DTYPE (default auto), SPECRAY (how to call the CLI;
# default `specray`).
# The shipped drafters' data was built without Debian's `python3-doc` (passages: stdlib docstrings only); with it
# installed the passage pool holds paragraphs of the Python manual too, and the prompts differ.
# A larger stage 1 (DATA_S=3300 MORE_S=1500 TRAIN_MIN=45, --builtin 7000, python3-doc installed: 1.03M training
# answer tokens from 5,447 prompts) gave weaker drafters than stage 1 with the defaults on a slower day (230 training
# steps at 11.8 s against 329 at 8.6 s; the prompt mix differs too); stage 2 on top of the defaults' stage 1 beat
# it (README, "Measured").
set -euo pipefail
OUT=${1:?usage: smollm2-135m.sh OUT_DIR}
TARGET=${TARGET:-smollm2-135m}
DEVICE=${DEVICE:-cpu}
KINDS=${KINDS:-dspark,eagle,mtp1}
SPECRAY=${SPECRAY:-specray}
MORE_S=${MORE_S:-0}
DTYPE=${DTYPE:-auto}  # the target's dtype while answering: auto = bf16 on GPUs and CPUs with native bf16, else fp32
if [ "$DEVICE" = cpu ]; then
  DATA_S=${DATA_S:-2400}; TRAIN_MIN=${TRAIN_MIN:-47}; FT_DATA_S=${FT_DATA_S:-1500}; FT_MIN=${FT_MIN:-25}
  DATA_ARGS=${DATA_ARGS:-"--builtin 6000 --self-instruct 0 --batch-size 64"}
  FT_DATA_ARGS=${FT_DATA_ARGS:-"--builtin 8000 --seed 1 --self-instruct 0 --batch-size 64"}
  TRAIN_ARGS=${TRAIN_ARGS:-"--batch-tokens 4096 --eval-every 40 --eval-batches 3 --epochs 10"}
  FT_CACHE_ARGS="--feature-cache $OUT/feature-cache-ft"  # stage 2: ~2.5 GB here, reused after epoch 1, then deleted
else
  DATA_S=${DATA_S:-150}; TRAIN_MIN=${TRAIN_MIN:-4.5}; FT_DATA_S=${FT_DATA_S:-185}; FT_MIN=${FT_MIN:-2.4}
  FT_RESUME=${FT_RESUME:-1}  # stage 2 answers the prompts stage 1 did not reach and fine-tunes on all the answers
  DATA_ARGS=${DATA_ARGS:-"--builtin 16000 --seed 2 --self-instruct 0 --batch-size 768"}
  FT_DATA_ARGS=${FT_DATA_ARGS:-"--builtin 16000 --seed 1 --self-instruct 0 --batch-size 768"}
  TRAIN_ARGS=${TRAIN_ARGS:-"--batch-tokens 32768 --eval-every 100 --epochs 20"}
  FT_CACHE_ARGS=""
fi
if [ -n "${PROMPTS:-}" ]; then
  DATA_ARGS="$DATA_ARGS --prompts $PROMPTS --builtin 0"; FT_DATA_ARGS="$FT_DATA_ARGS --prompts $PROMPTS --builtin 0"
fi
CACHE_ARGS=""; if [ -n "${FEATURE_CACHE:-}" ]; then CACHE_ARGS="--feature-cache $OUT/feature-cache"; fi
answer() {  # answer SECONDS DIR ARGS...: the target's answers to a prompt corpus (ARGS), for at most SECONDS, into DIR
  local seconds=$1 dir=$2; shift 2
  $SPECRAY data --target "$TARGET" --device "$DEVICE" --dtype "$DTYPE" --max-new-tokens 256 \
    --time-budget-s "$seconds" --out "$dir" "$@"
}
mkdir -p "$OUT"
if [ ! -f "$OUT/data/train.jsonl" ]; then
  answer "$DATA_S" "$OUT/data" $DATA_ARGS 2>&1 | tee "$OUT/data.log"
  if [ "$MORE_S" != 0 ]; then  # the rest of the corpus, skipping the prompts already answered
    answer "$MORE_S" "$OUT/data" --resume $DATA_ARGS 2>&1 | tee -a "$OUT/data.log"
  fi
fi
ONE=""; case "$KINDS" in *,*) ;; *) ONE="/$KINDS" ;; esac  # one kind writes to --out itself
CKPT="$OUT$ONE"; FT="$OUT/ft$ONE"
$SPECRAY train --target "$TARGET" --drafter "$KINDS" --data "$OUT/data" --out "$CKPT" --device "$DEVICE" \
  --time-budget-min "$TRAIN_MIN" $TRAIN_ARGS $CACHE_ARGS 2>&1 | tee "$OUT/train.log"
[ "$FT_DATA_S" = 0 ] && exit 0

# stage 2: answers to a fresh draw of prompts (another seed), or with FT_RESUME=1 to the rest of stage 1's prompts
# (all stage 1's answers kept), then fine-tune every head from stage 1's weights
FT_DATA="$OUT/data-ft"
if [ "${FT_RESUME:-0}" = 1 ]; then
  FT_DATA="$OUT/data"
  answer "$FT_DATA_S" "$FT_DATA" --resume $DATA_ARGS 2>&1 | tee "$OUT/data-ft.log"
elif [ ! -f "$FT_DATA/train.jsonl" ]; then
  answer "$FT_DATA_S" "$FT_DATA" $FT_DATA_ARGS 2>&1 | tee "$OUT/data-ft.log"
fi
$SPECRAY train --target "$TARGET" --drafter "$KINDS" --data "$FT_DATA" --out "$FT" --device "$DEVICE" \
  --init "$OUT" --lr 5e-4 --warmup 20 --time-budget-min "$FT_MIN" $TRAIN_ARGS $FT_CACHE_ARGS 2>&1 | tee "$OUT/ft.log"
rm -rf "$OUT/feature-cache-ft"

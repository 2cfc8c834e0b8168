#!/usr/bin/env bash
# The embedded demo, on CPU in minutes: generate the synthetic shapes data set (if
# missing), train Deformable DETR on it, test it with COCO mAP, draw its detections on
# the val images, run demo/image_demo.py on a few of them, draw the deformable attention's
# sampling points on one of them and plot the training curve.
#
#   bash tools/demo.sh [extra tools/train.py args, e.g. --cfg-options ...]
#
# Environment: PYTHON, CONFIG, WORK_DIR, DATA (must match the config's data_root),
# NUM_TRAIN, NUM_VAL, SEED, NICE (niceness for train/test, default 10; 0 to disable),
# OMP_WAIT_POLICY (PASSIVE on a machine busy with other work).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py}
WORK_DIR=${WORK_DIR:-work_dirs/demo}
DATA=${DATA:-data/synthetic}
NUM_TRAIN=${NUM_TRAIN:-2000}
NUM_VAL=${NUM_VAL:-200}
SEED=${SEED:-0}
PYTHON=${PYTHON:-python}  # make demo passes the environment's interpreter
RUN="nice -n ${NICE:-10}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# OpenMP's idle threads keep libgomp's default (they spin a moment, then sleep) unless
# OMP_WAIT_POLICY is set: sleeping at once (PASSIVE) made a training iteration 1.4x
# slower on an idle 2-core machine; on one busy with other work, PASSIVE is the faster.

step() { printf '\n==> %s\n' "$*"; }

if [[ ! -f $DATA/annotations/train.json || ! -f $DATA/annotations/val.json ]]; then
    step "generating the synthetic data set in $DATA"
    "$PYTHON" tools/dataset_converters/synthetic_coco.py --out "$DATA" \
        --num-train "$NUM_TRAIN" --num-val "$NUM_VAL" --seed "$SEED"
fi

step "training $CONFIG -> $WORK_DIR"
start=$SECONDS
$RUN "$PYTHON" tools/train.py "$CONFIG" --work-dir "$WORK_DIR" "$@"
train_s=$((SECONDS - start))

# the final checkpoint, not the best one: the numbers below are not picked on val
CKPT=$(cat "$WORK_DIR/last_checkpoint")
# the config as trained (train.py writes it to the work dir, --cfg-options applied), so
# that testing and drawing build the model that the checkpoint holds
RUN_CONFIG="$WORK_DIR/$(basename "$CONFIG")"
# (without --show-dir: drawing all 200 val images took 9 s of the 19; image_demo below
# draws 8 with the same visualizer)
step "testing $CKPT"
$RUN "$PYTHON" tools/test.py "$RUN_CONFIG" "$CKPT" --work-dir "$WORK_DIR/test" \
    --out "$WORK_DIR/test/results.pkl"

step "pictures"
# 128 px images are small to look at: a grid of a few, enlarged
"$PYTHON" tools/analysis_tools/draw_predictions.py "$WORK_DIR/test/results.pkl" \
    "$DATA/annotations/val.json" --out "$WORK_DIR/predictions.png"

step "image demo on a few val images (demo/image_demo.py)"
"$PYTHON" demo/image_demo.py "$DATA/val/00000[1-8].jpg" "$RUN_CONFIG" --weights "$CKPT" \
    --out-dir "$WORK_DIR/image_demo" --device cpu

step "sampling points of the deformable attention on one val image"
"$PYTHON" tools/analysis_tools/visualize_attention.py "$RUN_CONFIG" "$CKPT" "$DATA/val/000001.jpg" \
    --top-k 2 --pixels 64,64 --out-dir "$WORK_DIR/attention" --device cpu

step "training curve"
"$PYTHON" tools/analysis_tools/plot_convergence.py "$WORK_DIR" --labels "Deformable DETR" \
    --out "$WORK_DIR/training_curve.png"

step "result"
"$PYTHON" - "$WORK_DIR/test" "$train_s" <<'PY'
import glob, json, os, sys
work_dir, train_s = sys.argv[1], int(sys.argv[2])
# MMEngine's LoggerHook dumps test metrics to <work_dir>/<timestamp>/<timestamp>.json
run = sorted(glob.glob(os.path.join(work_dir, '2*')))[-1]  # the newest test run
m = json.load(open(os.path.join(run, os.path.basename(run) + '.json')))
print(f"training took {train_s / 60:.1f} min")
print(f"COCO bbox mAP {m['coco/bbox_mAP']:.3f}  mAP_50 {m['coco/bbox_mAP_50']:.3f}  "
      f"mAP_s {m['coco/bbox_mAP_s']:.3f}  mAP_m {m['coco/bbox_mAP_m']:.3f}  "
      f"mAP_l {m['coco/bbox_mAP_l']:.3f}")
PY
echo "training curve: $WORK_DIR/training_curve.png, detections: $WORK_DIR/predictions.png"
echo "image demo: $WORK_DIR/image_demo/vis/*.png, $WORK_DIR/image_demo/predictions.json"
echo "attention: $WORK_DIR/attention/000001.png, $WORK_DIR/attention/attention.json"

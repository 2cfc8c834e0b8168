#!/usr/bin/env bash
# Every GPU check in one command of at most 8 minutes, most important first. Prepared
# here by tools/gpu/prepare.sh (wheels and mmcv's source into .gpu/); on the GPU machine:
#
#   run(command="bash tools/gpu/check_all.sh", carry=[".gpu"], timeout_s=540)
#
# Steps, each writing under $OUT as soon as it has a result (a run cut short still
# reports what it reached); a step that would not fit in what is left of BUDGET_S is
# skipped and says so:
#   1. build, all at once on the machine's cores: ours for sm_90, mmcv 2.1.0's multi-scale
#      deformable attention CUDA kernel alone (the reference), and, in the background
#      until step 5 needs it, mmcv with CPU ops only (for mmdet's models; GPU hidden);
#   2. tests/test_ops/test_op_cuda.py;
#   3. the op benchmark: encoder 800x1333 at batch 2 and 8, decoder 800x1333; fp32, bf16,
#      fp16; ours (atomic and deterministic backward) against mmcv's CUDA kernel; peak
#      memory; time against the traffic floor;
#   4. compute-sanitizer memcheck and racecheck (outputs printed without it as well);
#   5. the detector, R50 refine + two-stage at 2x800x1333: a training step against mmdet
#      with mmcv's CUDA kernel in fp32, fp16 and bf16 (ours only) with peak memory and
#      losses compared; then the inference FPS of the five COCO configs against mmdet's.
# STEPS="build test bench sanitize detector fps" picks steps. DRY_RUN=1 rehearses the
# script on a machine without a GPU: every command is printed, none run.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${STEPS:-build test bench sanitize detector fps}
BUDGET_S=${BUDGET_S:-480}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export MMCV_SDIST=$PWD/.gpu/mmcv-2.1.0.tar.gz
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
CORES=$(nproc)
MMCV_JOBS=$((CORES > 5 ? CORES - 4 : 1))
SUMMARY=$OUT/summary.txt
START=$(date +%s)
status=0
elapsed() { echo $(($(date +%s) - START)); }
say() { echo "== $(printf '%4d' "$(elapsed)") s: $*" | tee -a "$SUMMARY"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
# fits NEED_S: whether NEED_S seconds are left of the budget; says so when not.
fits() {
    local left=$((BUDGET_S - $(elapsed)))
    ((left >= $1)) && return 0
    say "SKIPPED $2: needs about $1 s, $left s left of $BUDGET_S"
    return 1
}
# run TIMEOUT LOG COMMAND...: the command with its output in $OUT/LOG.
run() {
    local limit=$1 log=$OUT/$2
    shift 2
    if [[ -n ${DRY_RUN:-} ]]; then echo "   would run (timeout $limit): $*" | tee -a "$SUMMARY"; return 0; fi
    timeout "$limit" "$@" > "$log" 2>&1
}

say "machine ($CORES cores)"
if [[ -z ${DRY_RUN:-} ]]; then
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
      nvcc --version | tail -1; command -v compute-sanitizer; } 2>&1 | tee -a "$SUMMARY"
fi

mmcv_cpu_pid=
if has build; then
    [[ -f $MMCV_SDIST || -n ${DRY_RUN:-} ]] || { say "missing $MMCV_SDIST: run tools/gpu/prepare.sh and carry .gpu"; exit 3; }
    say "build: wheels into /tmp/site"
    run 60 setup_wheels.log "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target /tmp/site .gpu/wheels/*.whl || { say "wheels failed"; status=3; }
    if ! "$PY" -c "import mmcv.ops" 2>/dev/null; then
        # mmcv's CPU ops for mmdet's models, GPU hidden from its setup.py; not needed
        # before step 5, so the op steps run meanwhile on the cores it leaves free.
        say "build: mmcv 2.1.0 with CPU ops only, in the background ($MMCV_JOBS jobs)"
        CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 MAX_JOBS=$MMCV_JOBS run 420 build_mmcv_cpu.log \
            "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
            "$MMCV_SDIST" &
        mmcv_cpu_pid=$!
    fi
    say "build: ours (FORCE_CUDA=1, arch $TORCH_CUDA_ARCH_LIST) and mmcv's kernel alone, in parallel"
    # tools/gpu/mmcv_cuda.py needs only torch: imported alone, not with ops being built.
    (cd tools/gpu && MAX_JOBS=4 run 240 build_mmcv_kernel.log "$PY" -c \
        "import os, mmcv_cuda; mmcv_cuda.build_mmcv_cuda(os.environ['MMCV_SDIST'], verbose=True)") &
    kernel_pid=$!
    FORCE_CUDA=1 MAX_JOBS=4 run 240 build_ours.log "$PY" setup.py build_ext --inplace
    ours=$?
    wait $kernel_pid
    kernel=$?
    say "build: ours exit $ours, mmcv's kernel exit $kernel"
    [[ -z ${DRY_RUN:-} ]] && tail -n 3 "$OUT/build_ours.log" "$OUT/build_mmcv_kernel.log" | tee -a "$SUMMARY"
    [[ $ours == 0 ]] || { say "our build failed: nothing else can run"; exit 4; }
    [[ $kernel == 0 ]] || status=5
    [[ -n ${DRY_RUN:-} ]] || "$PY" -c "from ops import has_kernel; assert has_kernel('cuda'), 'no CUDA kernel in ops._C'" \
        2>&1 | tee -a "$SUMMARY" || exit 4
fi

if has test && fits 60 "op tests"; then
    say "op tests (tests/test_ops/test_op_cuda.py)"
    run 150 test_ops.log "$PY" -m pytest tests/test_ops/test_op_cuda.py -q -p no:cacheprovider \
        --junitxml="$OUT/test_ops.xml"
    rc=$?
    [[ -z ${DRY_RUN:-} ]] && tail -n 25 "$OUT/test_ops.log" | tee -a "$SUMMARY"
    say "op tests exit $rc"
    [[ $rc == 0 ]] || status=6
fi

if has bench && fits 60 "op benchmark"; then
    say "op benchmark"
    run 120 bench.md "$PY" tools/analysis_tools/benchmark_multi_scale_deformable_attn.py \
        --device cuda --dtypes float32 bfloat16 float16 \
        --cases enc-800x1333-b2 enc-800x1333-b8 dec-800x1333-b2 --min-time 0.3 --max-repeat 20
    rc=$?
    [[ -z ${DRY_RUN:-} ]] && tee -a "$SUMMARY" < "$OUT/bench.md"
    say "op benchmark exit $rc"
    [[ $rc == 0 ]] || status=8
fi

if has sanitize && fits 60 "compute-sanitizer"; then
    # The same inputs without the sanitizer: what to show if the runtime refuses it.
    run 60 sanitize_outputs.log "$PY" tools/gpu/sanitize_op.py || status=7
    for tool in memcheck racecheck; do
        fits 40 "compute-sanitizer $tool" || continue
        say "compute-sanitizer $tool"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 run 90 "sanitize_$tool.log" compute-sanitizer --tool $tool \
            --error-exitcode 9 --print-limit 20 "$PY" tools/gpu/sanitize_op.py
        rc=$?
        [[ -z ${DRY_RUN:-} ]] && grep -E "ERROR SUMMARY|RACECHECK SUMMARY|not supported|Error" \
            "$OUT/sanitize_$tool.log" | tail -n 5 | tee -a "$SUMMARY"
        say "compute-sanitizer $tool exit $rc"
        [[ $rc == 0 ]] || status=7
    done
fi

if has detector || has fps; then
    if [[ -n $mmcv_cpu_pid ]]; then
        say "waiting for mmcv's CPU-ops build"
        wait $mmcv_cpu_pid || { say "mmcv's CPU-ops build failed"; tail -n 20 "$OUT/build_mmcv_cpu.log"; status=4; }
    fi
    [[ -n ${DRY_RUN:-} ]] || "$PY" -c "import mmcv.ops, mmdet, mmengine, pycocotools" 2>&1 | tee -a "$SUMMARY"
fi

if has detector; then
    for amp in none fp16 bf16; do
        fits 45 "training step ($amp)" || continue
        say "training step, R50 refine + two-stage, 2 x 800x1333, autocast $amp"
        run 90 "train_step_$amp.log" "$PY" tools/analysis_tools/benchmark_model.py --device cuda \
            --shape 800 1333 --variant refine-twostage --amp $amp --repeat 5 --warmup 2
        rc=$?
        [[ -z ${DRY_RUN:-} ]] && sed -n '/^Deformable DETR/,$p' "$OUT/train_step_$amp.log" | tee -a "$SUMMARY"
        [[ $rc == 0 ]] || { tail -n 20 "$OUT/train_step_$amp.log"; status=9; }
    done
fi

if has fps && fits 40 "FPS"; then
    run 60 fps_data.log "$PY" tools/dataset_converters/synthetic_coco.py --out /tmp/fps_data \
        --num-train 1 --num-val 25 --img-size 800 --no-validate || status=10
    # Every image resized to exactly 800x1333 (no keep_ratio), batch 1, as the paper's FPS.
    FPS_OPTS="test_dataloader.dataset.data_root=/tmp/fps_data/ test_dataloader.dataset.ann_file=annotations/val.json test_dataloader.dataset.data_prefix.img=val/ test_dataloader.dataset.pipeline.1.keep_ratio=False test_dataloader.dataset.pipeline.1.scale=(1333,800) model.backbone.init_cfg=None"
    MMDET_CONFIGS=$("$PY" -c "import mmdet, os; print(os.path.join(os.path.dirname(mmdet.__file__), '.mim/configs/deformable_detr'))" 2>/dev/null)
    printf '| config | ours fp32 FPS | mmdet fp32 FPS |\n|---|---|---|\n' > "$OUT/fps.md"
    for cfg in configs/deformable_detr/deformable-detr*_coco.py; do
        name=$(basename "$cfg")
        row="| $name"
        for impl in ours mmdet; do
            path=$cfg
            [[ $impl == mmdet ]] && path=$MMDET_CONFIGS/$name
            fps="-"  # mmdet ships no single-scale configs
            if [[ -f $path ]] && fits 25 "FPS of $impl $name"; then
                run 60 "fps_${impl}_$name.log" "$PY" tools/analysis_tools/benchmark.py "$path" \
                    --max-iter 25 --num-warmup 5 --log-interval 100 --cfg-options $FPS_OPTS
                fps=$(grep -oE "Overall fps: \[[0-9.]+\]" "$OUT/fps_${impl}_$name.log" 2>/dev/null \
                    | grep -oE "[0-9.]+" || echo "failed")
            fi
            row="$row | $fps"
        done
        echo "$row |" | tee -a "$OUT/fps.md" "$SUMMARY"
    done
fi
say "done, status $status"
exit $status

#!/usr/bin/env bash
# The op's whole GPU check in one command (issue: the CUDA op run, proven against mmcv's
# CUDA op, and made fast). Prepared by tools/gpu/prepare.sh here; on the device tool:
#
#   run(command="bash tools/gpu/check_op.sh", carry=[".gpu"], timeout_s=570)
#
# Steps, each logged under $OUT (the device tool brings that folder back):
#   1. build ours with CUDA for sm_90 and, at the same time, mmcv 2.1.0's own
#      multi-scale deformable attention CUDA kernel alone (tools/gpu/mmcv_cuda.py);
#   2. the CUDA op tests (tests/test_ops/test_op_cuda.py: against the CPU kernel in
#      float64, mmcv in float32 and float16, half precision, CUDA graphs, inductor);
#   3. compute-sanitizer memcheck and racecheck on forward and backward
#      (tools/gpu/sanitize_op.py; the same inputs' outputs are printed either way);
#   4. the benchmark table (tools/analysis_tools/benchmark_multi_scale_deformable_attn.py).
# STEPS="build test sanitize bench" picks steps (build is needed once per machine).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${STEPS:-build test sanitize bench}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
export MMCV_SDIST=$PWD/.gpu/mmcv-2.1.0.tar.gz
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
SUMMARY=$OUT/summary.txt
say() { echo "== $(date +%T) $*" | tee -a "$SUMMARY"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
status=0

say "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -2; command -v compute-sanitizer; } 2>&1 | tee -a "$SUMMARY"

if has build; then
    say "build: ours (FORCE_CUDA=1, arch $TORCH_CUDA_ARCH_LIST) and mmcv's kernel, in parallel"
    [[ -f $MMCV_SDIST ]] || { say "missing $MMCV_SDIST: run tools/gpu/prepare.sh here and carry .gpu"; exit 3; }
    # mmcv_cuda.py needs only torch: import it alone, not the ops package being built.
    (cd tools/gpu && "$PY" -c "import os, mmcv_cuda; mmcv_cuda.build_mmcv_cuda(os.environ['MMCV_SDIST'], verbose=True)") \
        > "$OUT/build_mmcv.log" 2>&1 &
    mmcv_pid=$!
    FORCE_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build_ours.log" 2>&1
    ours=$?
    wait $mmcv_pid
    mmcv=$?
    say "build: ours exit $ours, mmcv exit $mmcv"
    tail -n 5 "$OUT/build_ours.log" "$OUT/build_mmcv.log" | tee -a "$SUMMARY"
    [[ $ours == 0 ]] || exit 4
    [[ $mmcv == 0 ]] || status=5
    "$PY" -c "from ops import has_kernel; assert has_kernel('cuda'), 'no CUDA kernel in ops._C'" || exit 4
fi

if has test; then
    say "op tests"
    timeout 300 "$PY" -m pytest tests/test_ops/test_op_cuda.py -q -p no:cacheprovider \
        --junitxml="$OUT/test_ops.xml" > "$OUT/test_ops.log" 2>&1
    rc=$?
    tail -25 "$OUT/test_ops.log" | tee -a "$SUMMARY"
    say "op tests exit $rc"
    [[ $rc == 0 ]] || status=6
fi

if has sanitize; then
    for tool in memcheck racecheck; do
        say "compute-sanitizer $tool"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool $tool \
            --error-exitcode 9 --print-limit 20 "$PY" tools/gpu/sanitize_op.py \
            > "$OUT/sanitize_$tool.log" 2>&1
        rc=$?
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Device not supported|Error" "$OUT/sanitize_$tool.log" \
            | tail -5 | tee -a "$SUMMARY"
        say "compute-sanitizer $tool exit $rc"
        [[ $rc == 0 ]] || status=7
    done
    # The same inputs without the sanitizer: outputs to show if the runtime refused it.
    "$PY" tools/gpu/sanitize_op.py > "$OUT/sanitize_outputs.log" 2>&1 || status=7
fi

if has bench; then
    say "benchmark"
    timeout 300 "$PY" tools/analysis_tools/benchmark_multi_scale_deformable_attn.py --device cuda \
        --dtypes float32 float16 bfloat16 --min-time 1 --max-repeat 30 > "$OUT/bench.md" 2>&1
    rc=$?
    cat "$OUT/bench.md" | tee -a "$SUMMARY"
    say "benchmark exit $rc"
    [[ $rc == 0 ]] || status=8
fi
say "done, status $status"
exit $status

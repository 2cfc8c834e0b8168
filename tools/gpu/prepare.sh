#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a GPU check: fetches into .gpu/ (git-ignored)
# what the bare GPU machine lacks. It has Python 3.12, torch 2.11 + CUDA 13, numpy,
# scipy, opencv, matplotlib, pytest, hypothesis, onnx, onnxruntime, but no network and
# nothing of OpenMMLab's.
#   - mmcv 2.1.0's source distribution: its multi-scale deformable attention CUDA kernel
#     is compiled standalone there (tools/gpu/mmcv_cuda.py); for the detector check mmcv is also
#     built there with CPU ops only;
#   - wheels for Python 3.12 of mmengine, mmdet, pycocotools and their small dependencies.
# Then, on the GPU machine with .gpu/ beside the checkout: `bash tools/gpu/check_all.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p .gpu/wheels
# Getting the sdist runs its setup.py, which needs torch and setuptools < 81 (pkg_resources):
# use the project environment (make install).
"$PYTHON" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d .gpu mmcv==2.1.0
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
# One version of each; the GPU machine's image already has everything else they need.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .gpu/wheels \
    mmengine==0.10.7 mmdet==3.3.0 pycocotools==2.0.10 addict==2.4.0 yapf==0.43.0 \
    termcolor==3.1.0 terminaltables==3.1.10 platformdirs==4.3.8 shapely==2.1.1
ls -la .gpu .gpu/wheels
du -sh .gpu

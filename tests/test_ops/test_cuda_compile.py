"""The CUDA kernels compile for Hopper with nvcc, even on a machine without a GPU."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which('nvcc') or next(
    (str(p) for p in sorted(Path('/usr/local').glob('cuda*/bin/nvcc'), reverse=True)), None)

INSTANTIATIONS = """
#include "ops/csrc/cuda/multi_scale_deformable_attn_kernels.cuh"
using namespace ddetr::cuda;
#define FORWARD(T) template cudaError_t ddetr::cuda::launch_forward<T>(const KernelSizes&, bool, const T*, \\
    const int64_t*, const int64_t*, const T*, const T*, T*, cudaStream_t);
#define BACKWARD(T) template cudaError_t ddetr::cuda::launch_backward<T>(const KernelSizes&, bool, const T*, \\
    const T*, const int64_t*, const int64_t*, const T*, const T*, Acc<T>::type*, T*, T*, \\
    cudaStream_t);
FORWARD(float) FORWARD(double) FORWARD(__half) FORWARD(__nv_bfloat16)
BACKWARD(float) BACKWARD(double) BACKWARD(__half) BACKWARD(__nv_bfloat16)
"""


@pytest.mark.skipif(NVCC is None, reason='nvcc not found')
@pytest.mark.parametrize('arch', ['sm_90', 'sm_80'])
def test_kernels_compile(tmp_path, arch):
    src = tmp_path / 'instantiate.cu'
    src.write_text(INSTANTIATIONS)
    cmd = [NVCC, '-std=c++17', f'-arch={arch}', '-O3', '-Werror', 'all-warnings', f'-I{ROOT}',
           '-c', str(src), '-o', str(tmp_path / 'out.o')]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr

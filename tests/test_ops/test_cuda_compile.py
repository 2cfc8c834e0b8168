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
#define TERMS(T) template cudaError_t ddetr::cuda::launch_backward_terms<T>(const KernelSizes&, bool, \\
    const T*, const T*, const int64_t*, const int64_t*, const T*, const T*, int32_t*, Acc<T>::type*, \\
    T*, T*, cudaStream_t);
#define FROM_TERMS(T) template cudaError_t ddetr::cuda::launch_grad_value_from_terms<T>( \\
    const KernelSizes&, bool, const T*, const int32_t*, const int64_t*, const Acc<T>::type*, T*, \\
    cudaStream_t);
#define ALL(T) FORWARD(T) BACKWARD(T) TERMS(T) FROM_TERMS(T)
ALL(float) ALL(double) ALL(__half) ALL(__nv_bfloat16)
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


@pytest.mark.skipif(NVCC is None, reason='nvcc not found')
def test_launcher_compiles(tmp_path):
    """The torch-facing launcher (.cu) compiles too, against this torch's headers.

    A CPU build of torch ships the c10/cuda headers but not the one CMake generates for
    CUDA builds (c10/cuda/impl/cuda_cmake_macros.h); an empty stand-in suffices here.
    """
    import sysconfig

    from torch.utils.cpp_extension import include_paths
    if not any((Path(p) / 'c10/cuda/CUDAStream.h').exists() for p in include_paths()):
        pytest.skip("this torch ships no c10/cuda headers")
    generated = tmp_path / 'generated/c10/cuda/impl'
    generated.mkdir(parents=True)
    (generated / 'cuda_cmake_macros.h').write_text('#pragma once\n')
    flags = [f'-I{tmp_path / "generated"}', *(f'-I{p}' for p in include_paths()),
             f'-I{sysconfig.get_paths()["include"]}', '-DWITH_CUDA', '-DTORCH_EXTENSION_NAME=_C',
             # what torch.utils.cpp_extension passes nvcc
             '-D__CUDA_NO_HALF_OPERATORS__', '-D__CUDA_NO_HALF_CONVERSIONS__',
             '-D__CUDA_NO_BFLOAT16_CONVERSIONS__', '-D__CUDA_NO_HALF2_OPERATORS__',
             '--expt-relaxed-constexpr', '--use_fast_math']
    cmd = [NVCC, '-std=c++20', '-arch=sm_90', '-O3', *flags, '-c',
           str(ROOT / 'ops/csrc/cuda/multi_scale_deformable_attn_cuda.cu'), '-o',
           str(tmp_path / 'launcher.o')]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr[-5000:]

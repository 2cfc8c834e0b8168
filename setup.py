"""Builds the multi-scale deformable attention extension (ops._C) and installs the package.

The C++ (CPU) kernels are always built. The CUDA kernels are built when torch has CUDA
and nvcc is found, or when FORCE_CUDA=1 (e.g. to build on a machine without a GPU).
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

CSRC = os.path.join('ops', 'csrc')


def make_extension():
    sources = [os.path.join(CSRC, 'multi_scale_deformable_attn.cpp')]
    sources += glob.glob(os.path.join(CSRC, 'cpu', '*.cpp'))
    sources += glob.glob(os.path.join(CSRC, 'autocast', '*.cpp'))
    # -fopenmp: at::parallel_for is inlined into this library and parallelises through
    # OpenMP pragmas; without the flag it silently runs on one thread.
    args = {'cxx': ['-O3', '-fopenmp']}
    with_cuda = os.environ.get('FORCE_CUDA') == '1' or (torch.cuda.is_available()
                                                         and CUDA_HOME is not None)
    if not with_cuda:
        return CppExtension('ops._C', sources, extra_compile_args=args,
                            extra_link_args=['-fopenmp'])
    sources += glob.glob(os.path.join(CSRC, 'cuda', '*.cu'))
    args['nvcc'] = ['-O3', '--use_fast_math', '-lineinfo']
    return CUDAExtension('ops._C', sources, extra_compile_args=args,
                         extra_link_args=['-fopenmp'], define_macros=[('WITH_CUDA', None)])


setup(
    name='deformable-detr-mm',
    version='0.1.0',
    description='Deformable DETR for MMDetection, with a fast multi-scale deformable '
                'attention op (CPU and CUDA)',
    packages=find_packages(include=['ops', 'ops.*', 'projects', 'projects.*']),
    package_data={'ops': ['csrc/*.h', 'csrc/*/*.cpp', 'csrc/*/*.cu', 'csrc/*/*.cuh']},
    ext_modules=[make_extension()],
    cmdclass={'build_ext': BuildExtension},
    python_requires='>=3.10',  # torch 2.13's own floor
    license='Apache-2.0',
)

"""mmcv 2.1.0's CUDA kernel of the op, to compare ours against on a GPU.

A full CUDA build of mmcv compiles some 300 kernels (far longer than a GPU check may
take), so this compiles only mmcv's own multi-scale deformable attention source,
``mmcv/ops/csrc/pytorch/cuda/ms_deform_attn_cuda.cu`` and the headers it includes, from
mmcv's source distribution, as a standalone torch extension. The extension exposes
``ms_deform_attn_forward`` and ``ms_deform_attn_backward`` with the names and arguments of
mmcv's own ``_ext`` module, so that it can also stand in for it
(:func:`install_into_mmcv`) and run mmdet's Deformable DETR on a GPU with mmcv's kernel.

    ext = build_mmcv_cuda('mmcv-2.1.0.tar.gz')          # compiles once, then cached
    out = mmcv_cuda_attention(ext)(value, spatial_shapes, level_start_index,
                                   sampling_locations, attention_weights)

:func:`load_mmcv_cuda` finds the kernel for tests and benchmarks: mmcv's own CUDA build
if it has one, else the source distribution named by ``$MMCV_SDIST``.
"""
import os
import tarfile
import tempfile
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch

MMCV_VERSION = '2.1.0'
_EXT_NAME = 'mmcv_multi_scale_deformable_attn_cuda'
_KERNEL = 'mmcv/ops/csrc/pytorch/cuda/ms_deform_attn_cuda.cu'
_HEADERS = ('mmcv/ops/csrc/common/cuda/ms_deform_attn_cuda_kernel.cuh',
            'mmcv/ops/csrc/common/cuda/common_cuda_helper.hpp',
            'mmcv/ops/csrc/common/pytorch_cuda_helper.hpp')

# mmcv's ext module signatures (mmcv/ops/csrc/pytorch/pybind.cpp), bound to the CUDA
# functions directly instead of through mmcv's device registry.
_BINDING = r'''
#include <torch/extension.h>

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor &value, const at::Tensor &spatial_shapes,
                                       const at::Tensor &level_start_index,
                                       const at::Tensor &sampling_loc,
                                       const at::Tensor &attn_weight, const int im2col_step);
void ms_deform_attn_cuda_backward(const at::Tensor &value, const at::Tensor &spatial_shapes,
                                  const at::Tensor &level_start_index,
                                  const at::Tensor &sampling_loc, const at::Tensor &attn_weight,
                                  const at::Tensor &grad_output, at::Tensor &grad_value,
                                  at::Tensor &grad_sampling_loc, at::Tensor &grad_attn_weight,
                                  const int im2col_step);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ms_deform_attn_forward", &ms_deform_attn_cuda_forward, py::arg("value"),
        py::arg("value_spatial_shapes"), py::arg("value_level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("im2col_step"));
  m.def("ms_deform_attn_backward", &ms_deform_attn_cuda_backward, py::arg("value"),
        py::arg("value_spatial_shapes"), py::arg("value_level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("grad_output"),
        py::arg("grad_value"), py::arg("grad_sampling_loc"), py::arg("grad_attn_weight"),
        py::arg("im2col_step"));
}
'''
# torch 2.x no longer ships THC; mmcv 2.1.0 still includes its atomics header.
_THC_SHIM = '#pragma once\n#include <ATen/cuda/Atomic.cuh>\n'


def extract_mmcv_sources(sdist: str, dst: str) -> dict:
    """Writes the kernel's sources, a binding and a THC shim under ``dst``.

    Args:
        sdist: mmcv's source distribution: the ``.tar.gz`` or an extracted folder.
        dst: Folder to write into (created).

    Returns:
        ``dict(sources=[...], include_dirs=[...])`` for a torch extension build.

    Raises:
        FileNotFoundError: ``sdist`` does not exist or lacks the kernel's files.
    """
    if not os.path.exists(sdist):
        raise FileNotFoundError(f'{sdist}: no such mmcv source distribution (pip download '
                                f'--no-deps --no-binary :all: mmcv=={MMCV_VERSION})')
    wanted = (_KERNEL, ) + _HEADERS
    files = {}
    if os.path.isdir(sdist):
        for rel in wanted:
            path = os.path.join(sdist, rel)
            if os.path.exists(path):
                with open(path, 'rb') as f:
                    files[rel] = f.read()
    else:
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name.split('/', 1)[-1]  # drop mmcv-X.Y.Z/
                if rel in wanted and member.isfile():
                    files[rel] = tar.extractfile(member).read()
    missing = [rel for rel in wanted if rel not in files]
    if missing:
        raise FileNotFoundError(f'{sdist}: not an mmcv {MMCV_VERSION} source distribution: '
                                f'missing {", ".join(missing)}')
    for rel, data in files.items():
        path = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)
    os.makedirs(os.path.join(dst, 'shim', 'THC'), exist_ok=True)
    with open(os.path.join(dst, 'shim', 'THC', 'THCAtomics.cuh'), 'w') as f:
        f.write(_THC_SHIM)
    binding = os.path.join(dst, 'binding.cpp')
    with open(binding, 'w') as f:
        f.write(_BINDING)
    common = os.path.join(dst, 'mmcv', 'ops', 'csrc', 'common')
    return dict(sources=[binding, os.path.join(dst, _KERNEL)],
                include_dirs=[common, os.path.join(common, 'cuda'), os.path.join(dst, 'shim')])


def build_mmcv_cuda(sdist: str, build_dir: Optional[str] = None,
                    arch_flags: Sequence[str] = (), verbose: bool = False) -> ModuleType:
    """Compiles mmcv's CUDA kernel of the op as a torch extension and imports it.

    torch's extension cache keeps the build (and rebuilds when the sources change): a
    second call loads it at once. ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures,
    as for any extension.

    Args:
        sdist: mmcv's source distribution (``.tar.gz``) or an extracted folder.
        build_dir: Where the sources and the build go (default:
            ``mmcv_multi_scale_deformable_attn_cuda`` in the system's temporary folder).
        arch_flags: Extra nvcc flags (e.g. ``-gencode=arch=compute_90,code=sm_90``).
        verbose: Print the compiler's commands.
    """
    from torch.utils.cpp_extension import load
    build_dir = build_dir or os.path.join(tempfile.gettempdir(), _EXT_NAME)
    spec = extract_mmcv_sources(sdist, os.path.join(build_dir, 'src'))
    return load(_EXT_NAME, spec['sources'], extra_include_paths=spec['include_dirs'],
                extra_cflags=['-O3'], extra_cuda_cflags=['-O3', *arch_flags],
                build_directory=build_dir, verbose=verbose)


class _MMCVAttention(torch.autograd.Function):
    """mmcv's kernel behind autograd, with mmcv's arguments (grads zero-initialised)."""

    @staticmethod
    def forward(ctx, ext, im2col_step, value, spatial_shapes, level_start_index,
                sampling_locations, attention_weights):
        args = (value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                sampling_locations.contiguous(), attention_weights.contiguous())
        ctx.ext, ctx.im2col_step = ext, im2col_step
        ctx.save_for_backward(*args)
        return ext.ms_deform_attn_forward(*args, im2col_step=im2col_step)

    @staticmethod
    def backward(ctx, grad_output):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = (torch.zeros_like(t) for t in (value, loc, attn))
        ctx.ext.ms_deform_attn_backward(value, shapes, starts, loc, attn,
                                        grad_output.contiguous(), grad_value, grad_loc,
                                        grad_attn, im2col_step=ctx.im2col_step)
        return None, None, grad_value, None, None, grad_loc, grad_attn


def mmcv_cuda_attention(ext: ModuleType, im2col_step: int = 64) -> Callable[..., torch.Tensor]:
    """The op's function (our argument order) computed by mmcv's kernel in ``ext``.

    All float inputs must share one dtype (float32, float64 or float16: mmcv has no
    bfloat16 kernel).
    """

    def attention(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights):
        return _MMCVAttention.apply(ext, im2col_step, value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights)

    return attention


def mmcv_has_cuda_ops() -> bool:
    """Whether the installed mmcv was built with its CUDA ops.

    Not whether ``_ext`` has ``ms_deform_attn_forward``: a CPU-only build has it too,
    and fails only when it is called on a CUDA tensor.
    """
    try:
        from mmcv.ops import get_compiling_cuda_version
    except ImportError:
        return False
    return get_compiling_cuda_version() != 'not available'


def load_mmcv_cuda() -> Optional[ModuleType]:
    """mmcv's CUDA kernel, or None where there is none.

    mmcv's own ``_ext`` if mmcv was built with its CUDA ops; else the standalone build
    from the source distribution named by ``$MMCV_SDIST`` (compiled on first use).
    """
    if not torch.cuda.is_available():
        return None
    if mmcv_has_cuda_ops():
        from mmcv.ops import multi_scale_deform_attn
        return multi_scale_deform_attn.ext_module
    sdist = os.environ.get('MMCV_SDIST')
    return build_mmcv_cuda(sdist) if sdist else None


def install_into_mmcv(ext: ModuleType) -> None:
    """Makes mmcv's ``MultiScaleDeformableAttnFunction`` call ``ext``'s kernel.

    For an mmcv built with CPU ops only: mmdet's Deformable DETR then runs on a GPU with
    mmcv's CUDA kernel, compiled standalone.
    """
    from mmcv.ops import multi_scale_deform_attn
    multi_scale_deform_attn.ext_module = ext


def give_mmcv_its_cuda_kernel() -> str:
    """Makes sure mmcv's attention layers have mmcv's CUDA kernel; says which build.

    mmcv's own CUDA build if it has one; else the kernel compiled standalone from
    ``$MMCV_SDIST`` and installed into mmcv (:func:`install_into_mmcv`).

    Raises:
        RuntimeError: mmcv has no CUDA ops and ``$MMCV_SDIST`` is unset.
    """
    if mmcv_has_cuda_ops():
        return "mmcv's own CUDA build"
    ext = load_mmcv_cuda()
    if ext is None:
        raise RuntimeError('mmcv has no CUDA ops: set MMCV_SDIST to mmcv-2.1.0.tar.gz so that '
                           'its kernel is compiled standalone (tools/gpu/mmcv_cuda.py)')
    install_into_mmcv(ext)
    return f"mmcv's kernel compiled standalone from {os.path.basename(os.environ['MMCV_SDIST'])}"

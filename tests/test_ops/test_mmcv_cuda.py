"""tools/gpu/mmcv_cuda.py on a machine without a GPU: how mmcv's CUDA build is told apart."""
import tarfile

import pytest
import torch

from mmcv_cuda import extract_mmcv_sources, load_mmcv_cuda, mmcv_has_cuda_ops


@pytest.mark.skipif(torch.cuda.is_available(), reason='mmcv may have CUDA ops here')
def test_cpu_only_mmcv_is_not_taken_for_a_cuda_build():
    """A CPU-only mmcv still exports ms_deform_attn_forward (it fails only when called
    on a CUDA tensor), so that name alone must not count as mmcv's CUDA kernel."""
    multi_scale_deform_attn = pytest.importorskip('mmcv.ops.multi_scale_deform_attn')
    assert hasattr(multi_scale_deform_attn.ext_module, 'ms_deform_attn_forward')
    assert not mmcv_has_cuda_ops()
    assert load_mmcv_cuda() is None


def test_sources_missing_or_not_mmcv(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such mmcv source distribution'):
        extract_mmcv_sources(str(tmp_path / 'mmcv-2.1.0.tar.gz'), str(tmp_path / 'out'))
    other = tmp_path / 'other.tar.gz'
    (tmp_path / 'README').write_text('not mmcv')
    with tarfile.open(other, 'w:gz') as tar:
        tar.add(tmp_path / 'README', arcname='pkg-1.0/README')
    with pytest.raises(FileNotFoundError, match='missing mmcv/ops/csrc/pytorch/cuda/'
                                                'ms_deform_attn_cuda.cu'):
        extract_mmcv_sources(str(other), str(tmp_path / 'out'))

"""Runs the CUDA op's forward and backward on the inputs compute-sanitizer should see.

    compute-sanitizer --tool memcheck --error-exitcode 9 python tools/gpu/sanitize_op.py

Every case runs forward and backward once (fast atomic and deterministic backward) and
prints a checksum of each result, so that the outputs can be shown where the runtime
refuses the sanitizer. Cases: the shape that exposed a read past grad_output's end
(bs 2, 37 queries, 8 heads, 32 channels: idle threads in the last block), every dtype,
the vectorised and the scalar path (32 and 33 channels), one level, eight points, and
level shapes that claim more keys than ``value`` holds (must read nothing outside it).
Run with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that each tensor is its own allocation
and a read past its end is outside any allocation.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402

from ops import has_kernel, multi_scale_deformable_attn  # noqa: E402


def make_inputs(shapes, bs, nq, heads, dim, points, dtype, num_keys=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes)
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    keys = num_keys or int(sizes.sum())
    levels = len(shapes)
    value = torch.randn(bs, keys, heads, dim, generator=gen)
    loc = torch.rand(bs, nq, heads, levels, points, 2, generator=gen) * 1.4 - 0.2
    weights = torch.rand(bs, nq, heads, levels, points, generator=gen)
    cast = dict(device='cuda', dtype=dtype)
    return dict(value=value.to(**cast), spatial_shapes=spatial_shapes.cuda(),
                level_start_index=starts.cuda(), sampling_locations=loc.to(**cast),
                attention_weights=weights.to(**cast))


FOUR = [(13, 7), (7, 4), (3, 2), (1, 1)]
CASES = {
    # name: (shapes, bs, nq, heads, dim, points, num_keys)
    'grad_out-tail': (FOUR, 2, 37, 8, 32, 4, None),
    'odd-channels': (FOUR, 2, 37, 8, 33, 4, None),
    'one-level': ([(9, 11)], 1, 5, 3, 16, 4, None),
    'eight-points': (FOUR, 1, 3, 2, 64, 8, None),
    'keys-short-of-shapes': (FOUR, 2, 37, 8, 32, 4, 50),  # shapes claim 124 keys
}


def main() -> int:
    if not (torch.cuda.is_available() and has_kernel('cuda')):
        print('needs a GPU and ops._C built with CUDA')
        return 2
    for name, (shapes, bs, nq, heads, dim, points, num_keys) in CASES.items():
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for deterministic in (False, True):
                torch.use_deterministic_algorithms(deterministic)
                inputs = make_inputs(shapes, bs, nq, heads, dim, points, dtype, num_keys)
                leaves = {k: v.requires_grad_() if v.is_floating_point() else v
                          for k, v in inputs.items()}
                out = multi_scale_deformable_attn(**leaves)
                grads = torch.autograd.grad(out, [leaves['value'], leaves['sampling_locations'],
                                                  leaves['attention_weights']],
                                            torch.ones_like(out))
                torch.cuda.synchronize()
                sums = ' '.join(f'{t.double().abs().sum().item():.6e}' for t in (out, *grads))
                finite = all(torch.isfinite(t).all().item() for t in (out, *grads))
                print(f'{name:22s} {str(dtype):15s} deterministic={int(deterministic)} '
                      f'finite={finite} |out| |grad_value| |grad_loc| |grad_attn| = {sums}')
    torch.use_deterministic_algorithms(False)
    return 0


if __name__ == '__main__':
    sys.exit(main())

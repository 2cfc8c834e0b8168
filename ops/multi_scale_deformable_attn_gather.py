"""Multi-scale deformable attention written with row gathers and arithmetic only.

The same contract as :func:`ops.multi_scale_deformable_attn` (bilinear sampling,
``align_corners=False``, zero padding), written without ``grid_sample``: every sampling
point's four corner pixels are computed, the corners outside their level get weight
zero, and the corner rows of ``value`` are fetched with one ``index_select`` per level.
Exported to ONNX (``op_mode='gather'`` of :func:`projects.deformable_detr.deployment.export_onnx`),
this becomes ``Gather``, ``MatMul``, ``Floor``, ``Where``, ``Cast`` and elementwise nodes:
no ``GridSample``, whose TensorRT compilation has been reported to give wrong results
(NVIDIA/TensorRT issues 4646 and 4813).

The level sizes and starts are read from the ``spatial_shapes`` and
``level_start_index`` tensors, never turned into Python numbers, so that an exported
graph reads them at run time and serves every image size.
"""
import torch
from torch import Tensor


def multi_scale_deformable_attn_gather(value: Tensor, spatial_shapes: Tensor,
                                       level_start_index: Tensor, sampling_locations: Tensor,
                                       attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention as gathers of ``value`` rows and a weighted sum.

    Shapes as in :func:`ops.multi_scale_deformable_attn`: value (bs, num_keys, heads,
    dim), spatial_shapes (levels, 2) (h, w), level_start_index (levels,),
    sampling_locations (bs, nq, heads, levels, points, 2) with (x, y) in [0, 1],
    attention_weights (bs, nq, heads, levels, points); returns (bs, nq, heads * dim).

    Locations are mapped to pixels as ``x * w - 0.5`` (align_corners=False) in float32
    (float64 for float64 input), as the kernels do. A corner outside its level gets
    weight zero and reads the level's first pixel instead, so that every index is in
    range; a NaN or infinite location has no corner inside and adds nothing, as in the
    kernels. (A non-finite number in ``value`` itself would spread through those zero
    weights: the kernels skip such corners instead.)

    The corners' indices and weights are computed for all levels at once; the rows are
    gathered level by level, each level's a (bs, nq, heads, 4 * points, dim) tensor (four
    times what ``grid_sample`` returns for the level), reduced at once by one batched
    matrix product with the weights.
    """
    bs, num_keys, heads, dim = value.shape
    nq, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], \
        sampling_locations.shape[4]
    coord = torch.promote_types(sampling_locations.dtype, torch.float32)
    device = value.device
    # (levels, 1, 1): broadcast against (..., levels, points, 4 corners).
    h, w = (spatial_shapes[:, i, None, None] for i in (0, 1))
    start = level_start_index[:, None, None]
    loc = sampling_locations.to(coord)
    x = (loc[..., 0] * w[..., 0].to(coord) - 0.5)[..., None]  # (bs, nq, heads, levels, points, 1)
    y = (loc[..., 1] * h[..., 0].to(coord) - 0.5)[..., None]
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    # The four corners, in the kernels' order: (x0, y0), (x0 + 1, y0), (x0, y0 + 1),
    # (x0 + 1, y0 + 1).
    cx = torch.cat([x0, x0 + 1, x0, x0 + 1], -1)
    cy = torch.cat([y0, y0, y0 + 1, y0 + 1], -1)
    bilinear = torch.cat([1 - fx, fx, 1 - fx, fx], -1) * torch.cat([1 - fy, 1 - fy, fy, fy], -1)
    # Tested on the float coordinates, before any cast: NaN fails every comparison, and
    # no huge coordinate reaches an integer.
    inside = (cx >= 0) & (cx < w.to(coord)) & (cy >= 0) & (cy < h.to(coord))
    weight = torch.where(inside, bilinear * attention_weights.to(coord)[..., None], 0)
    weight = weight.to(value.dtype)
    pixel = start + torch.where(inside, cy, 0).long() * w + torch.where(inside, cx, 0).long()
    # Row of (image n, key k, head m) in `rows`: (n * num_keys + k) * heads + m.
    first = (torch.arange(bs, device=device)[:, None] * (num_keys * heads) +
             torch.arange(heads, device=device)[None, :])
    index = first[:, None, :, None, None, None] + pixel * heads
    rows = value.reshape(bs * num_keys * heads, dim)
    out = None
    for lvl in range(levels):
        corners = rows.index_select(0, index[:, :, :, lvl].reshape(-1))
        part = torch.matmul(weight[:, :, :, lvl].reshape(bs, nq, heads, 1, points * 4),
                            corners.reshape(bs, nq, heads, points * 4, dim))
        out = part if out is None else out + part
    return out.reshape(bs, nq, heads * dim)

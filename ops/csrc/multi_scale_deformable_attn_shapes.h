// Size checks shared by the CPU and CUDA launchers.
//
// The Python entry point (ops.multi_scale_deformable_attn) gives the friendly messages;
// these checks are the kernels' own guard for anyone calling torch.ops.ddetr.* directly:
// nothing with inconsistent sizes reaches a kernel.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

namespace ddetr {

struct Sizes {
  int64_t bs, num_keys, heads, dim, nq, levels, points;
};

inline Sizes check_sizes(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& loc,
                         const at::Tensor& attn) {
  TORCH_CHECK_VALUE(value.dim() == 4, "value must be (bs, num_keys, heads, dim), got ", value.sizes());
  TORCH_CHECK_VALUE(loc.dim() == 6 && loc.size(5) == 2,
                    "sampling_locations must be (bs, nq, heads, levels, points, 2), got ", loc.sizes());
  TORCH_CHECK_VALUE(attn.dim() == 5, "attention_weights must be (bs, nq, heads, levels, points), got ",
                    attn.sizes());
  const Sizes s{value.size(0), value.size(1), value.size(2), value.size(3),
                loc.size(1), loc.size(3), loc.size(4)};
  TORCH_CHECK_VALUE(loc.size(0) == s.bs && loc.size(2) == s.heads,
                    "sampling_locations ", loc.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK_VALUE(attn.sizes() == loc.sizes().slice(0, 5), "attention_weights ", attn.sizes(),
                    " does not match sampling_locations ", loc.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == s.levels &&
                        spatial_shapes.size(1) == 2,
                    "spatial_shapes must be (levels=", s.levels, ", 2), got ", spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == s.levels,
                    "level_start_index must be (levels=", s.levels, "), got ",
                    level_start_index.sizes());
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong &&
                       level_start_index.scalar_type() == at::kLong,
                   "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK_TYPE(loc.scalar_type() == value.scalar_type() &&
                       attn.scalar_type() == value.scalar_type(),
                   "value, sampling_locations and attention_weights must share one dtype, got ",
                   value.scalar_type(), ", ", loc.scalar_type(), ", ", attn.scalar_type());
  for (const auto* t : {&spatial_shapes, &level_start_index, &loc, &attn}) {
    TORCH_CHECK_VALUE(t->device() == value.device(), "all inputs must be on ", value.device(),
                      ", got one on ", t->device());
  }
  return s;
}

inline void check_grad_output(const at::Tensor& grad_out, const Sizes& s, const at::Tensor& value) {
  TORCH_CHECK_VALUE(grad_out.dim() == 3 && grad_out.size(0) == s.bs && grad_out.size(1) == s.nq &&
                        grad_out.size(2) == s.heads * s.dim,
                    "grad_output must be (", s.bs, ", ", s.nq, ", ", s.heads * s.dim, "), got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == value.scalar_type() && grad_out.device() == value.device(),
                   "grad_output must match value's dtype and device");
}

}  // namespace ddetr

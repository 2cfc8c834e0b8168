// The autocast rule of ddetr::multi_scale_deformable_attn, for AutocastCPU and
// AutocastCUDA (the schema is in ../multi_scale_deformable_attn.cpp).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace ddetr {
namespace {

// Under autocast the op runs in the autocast dtype of the moment (float16 or bfloat16 on
// CUDA, as the user chose), with its float inputs cast to it: a layer typically hands it
// low-precision values but float32 softmax weights. float64 stays float64, as in torch's
// own autocast rules. The kernels accumulate in float32.
template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor forward_autocast(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index,
                            const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ddetr::multi_scale_deformable_attn", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&)>();
  return op.call(at::autocast::cached_cast(dtype, value, device_type), spatial_shapes,
                 level_start_index,
                 at::autocast::cached_cast(dtype, sampling_locations, device_type),
                 at::autocast::cached_cast(dtype, attention_weights, device_type));
}

TORCH_LIBRARY_IMPL(ddetr, AutocastCPU, m) {
  m.impl("multi_scale_deformable_attn",
         &forward_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(ddetr, AutocastCUDA, m) {
  m.impl("multi_scale_deformable_attn",
         &forward_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

}  // namespace
}  // namespace ddetr

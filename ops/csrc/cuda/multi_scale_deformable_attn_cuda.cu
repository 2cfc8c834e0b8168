// Torch-facing launchers of the CUDA kernels: dtype dispatch, stream, allocation, and the
// choice of the deterministic backward.
// Nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../multi_scale_deformable_attn_shapes.h"
#include "multi_scale_deformable_attn_kernels.cuh"

namespace ddetr {
namespace {

// torch's half types and CUDA's share their bit layout.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
const typename CudaType<T>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<T>::type*>(t.const_data_ptr<T>());
}
template <typename T>
typename CudaType<T>::type* cuda_mut_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<T>::type*>(t.mutable_data_ptr<T>());
}

cuda::KernelSizes kernel_sizes(const Sizes& s) {
  return {s.bs, s.num_keys, s.heads, s.dim, s.nq, s.levels, s.points};
}

// One grid of at most 2^31 - 1 blocks serves all (batch, query, head) rows.
void check_grid(const Sizes& s) {
  const int64_t rows = s.bs * s.nq * s.heads;
  TORCH_CHECK_VALUE(cuda::num_blocks(rows, 32) <= cuda::kMaxBlocks,
                    "multi_scale_deformable_attn: bs * num_queries * heads = ", rows,
                    " is too large for one CUDA launch");
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "multi_scale_deformable_attn CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                        const at::Tensor& level_start_index_in, const at::Tensor& loc_in,
                        const at::Tensor& attn_in) {
  const Sizes s = check_sizes(value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  check_grid(s);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto value = value_in.contiguous(), loc = loc_in.contiguous(), attn = attn_in.contiguous();
  const auto shapes = spatial_shapes_in.contiguous(), starts = level_start_index_in.contiguous();
  auto out = at::empty({s.bs, s.nq, s.heads * s.dim}, value.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "multi_scale_deformable_attn_cuda", [&] {
    const bool vec = cuda::can_vectorise<typename CudaType<scalar_t>::type>(
        s.dim, {value.const_data_ptr(), out.const_data_ptr()});
    check_launch(cuda::launch_forward(kernel_sizes(s), vec, cuda_ptr<scalar_t>(value),
                                      shapes.const_data_ptr<int64_t>(),
                                      starts.const_data_ptr<int64_t>(), cuda_ptr<scalar_t>(loc),
                                      cuda_ptr<scalar_t>(attn), cuda_mut_ptr<scalar_t>(out), stream));
  });
  return out;
}

// Under torch.use_deterministic_algorithms: no floating-point atomics. Each corner of
// each sampling point is a term `weight * grad_out[b, q, h]` of one grad_value row; a
// stable sort by row puts each row's terms together in the order of their index, and
// each row sums its own in that order, so grad_value is the same bits on every run.
// Costs, beside the atomic path's work: 20 bytes per term (row, weight, sorted row,
// order) and the sort; see docs/op.md.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda_deterministic(
    const Sizes& s, const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& shapes,
    const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn) {
  const int64_t rows = s.bs * s.num_keys * s.heads;
  // Rows are int32 (half the sort's passes of int64), with `rows` itself for "no row".
  TORCH_CHECK_VALUE(rows < std::numeric_limits<int32_t>::max(),
                    "multi_scale_deformable_attn: the deterministic CUDA backward needs "
                    "bs * num_keys * heads below 2^31 - 1, got ", rows);
  TORCH_CHECK_VALUE(cuda::num_blocks(rows, 32) <= cuda::kMaxBlocks,
                    "multi_scale_deformable_attn: bs * num_keys * heads = ", rows,
                    " is too large for one CUDA launch");
  const int64_t terms = s.bs * s.nq * s.heads * s.levels * s.points * 4;
  const auto acc_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto term_row = at::empty({terms}, value.options().dtype(at::kInt));
  auto term_weight = at::empty({terms}, value.options().dtype(acc_type));
  auto grad_value = at::empty(value.sizes(), value.options());
  auto grad_loc = at::empty_like(loc);
  auto grad_attn = at::empty_like(attn);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "multi_scale_deformable_attn_backward_cuda", [&] {
    using acc_t = typename cuda::Acc<typename CudaType<scalar_t>::type>::type;
    const bool vec = cuda::can_vectorise<typename CudaType<scalar_t>::type>(
        s.dim, {grad_out.const_data_ptr(), value.const_data_ptr(), grad_value.const_data_ptr()});
    check_launch(cuda::launch_backward_terms(
        kernel_sizes(s), vec, cuda_ptr<scalar_t>(grad_out), cuda_ptr<scalar_t>(value),
        shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(), cuda_ptr<scalar_t>(loc),
        cuda_ptr<scalar_t>(attn), term_row.mutable_data_ptr<int32_t>(),
        term_weight.mutable_data_ptr<acc_t>(), cuda_mut_ptr<scalar_t>(grad_loc),
        cuda_mut_ptr<scalar_t>(grad_attn), stream));
    // Explicit optional: a plain `true` would pick the overload sort(self, dim, descending).
    const auto [sorted_row, order] =
        at::sort(term_row, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
    check_launch(cuda::launch_grad_value_from_terms(
        kernel_sizes(s), vec, cuda_ptr<scalar_t>(grad_out), sorted_row.const_data_ptr<int32_t>(),
        order.const_data_ptr<int64_t>(), term_weight.const_data_ptr<acc_t>(),
        cuda_mut_ptr<scalar_t>(grad_value), stream));
  });
  return {grad_value, grad_loc, grad_attn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
    const at::Tensor& level_start_index_in, const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const Sizes s = check_sizes(value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  check_grad_output(grad_out_in, s, value_in);
  check_grid(s);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto grad_out = grad_out_in.contiguous(), value = value_in.contiguous();
  const auto loc = loc_in.contiguous(), attn = attn_in.contiguous();
  const auto shapes = spatial_shapes_in.contiguous(), starts = level_start_index_in.contiguous();
  if (at::globalContext().deterministicAlgorithms()) {
    return backward_cuda_deterministic(s, grad_out, value, shapes, starts, loc, attn);
  }
  // Half types accumulate grad_value in float32: their atomics would lose the small terms.
  const auto acc_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::empty_like(loc);
  auto grad_attn = at::empty_like(attn);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "multi_scale_deformable_attn_backward_cuda", [&] {
    using acc_t = typename cuda::Acc<typename CudaType<scalar_t>::type>::type;
    const bool vec = cuda::can_vectorise<typename CudaType<scalar_t>::type>(
        s.dim, {grad_out.const_data_ptr(), value.const_data_ptr(), grad_value.const_data_ptr()});
    check_launch(cuda::launch_backward(
        kernel_sizes(s), vec, cuda_ptr<scalar_t>(grad_out), cuda_ptr<scalar_t>(value),
        shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(), cuda_ptr<scalar_t>(loc),
        cuda_ptr<scalar_t>(attn), grad_value.mutable_data_ptr<acc_t>(), cuda_mut_ptr<scalar_t>(grad_loc),
        cuda_mut_ptr<scalar_t>(grad_attn), stream));
  });
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CUDA, m) {
  m.impl("multi_scale_deformable_attn", &forward_cuda);
  m.impl("_multi_scale_deformable_attn_backward", &backward_cuda);
}

}  // namespace ddetr

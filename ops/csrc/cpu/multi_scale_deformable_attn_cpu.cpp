// CPU kernels of multi-scale deformable attention, forward and backward.
//
// float32, float64 and bfloat16 (accumulated in float32). Forward is parallel over
// (batch, query); backward over (batch, head), so that no two threads ever add into the
// same row of grad_value and no atomics are needed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../multi_scale_deformable_attn_common.h"
#include "../multi_scale_deformable_attn_shapes.h"

namespace ddetr {
namespace {

// The hot loops are compiled twice, for AVX2 + FMA and for baseline x86-64, and the
// loader picks the one the CPU supports: portable builds, without leaving 8-wide
// vectors unused on the machines that have them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MSDA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MSDA_CPU_CLONES
#endif

template <typename scalar_t>
struct Inputs {
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const scalar_t* loc;
  const scalar_t* attn;
};

// level_fits of every level, once per range of rows.
template <typename scalar_t>
std::vector<char> fitting_levels(const Sizes& s, const Inputs<scalar_t>& in) {
  std::vector<char> fits(s.levels);
  for (int64_t l = 0; l < s.levels; ++l) {
    fits[l] = level_fits(in.shapes[2 * l], in.shapes[2 * l + 1], in.starts[l], s.num_keys);
  }
  return fits;
}

// Output rows (b, q, :) for b * nq + q in [begin, end). kDim > 0 is the channel count of
// a head known at compile time (see with_channels): the accumulators then stay in vector
// registers across a row's taps instead of going through memory at each one.
template <typename scalar_t, int kDim>
MSDA_CPU_CLONES void forward_rows(const Sizes& s, const Inputs<scalar_t>& in, scalar_t* out,
                                  int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = kDim > 0 ? kDim : s.dim;
  const int64_t lp = s.levels * s.points;
  std::vector<acc_t> acc_any(kDim > 0 ? 0 : dim);
  acc_t acc_fixed[kDim > 0 ? kDim : 1];
  acc_t* acc = kDim > 0 ? acc_fixed : acc_any.data();
  const std::vector<char> fits = fitting_levels(s, in);
  for (int64_t bq = begin; bq < end; ++bq) {
    const int64_t b = bq / s.nq;
    for (int64_t h = 0; h < s.heads; ++h) {
      for (int64_t c = 0; c < dim; ++c) acc[c] = acc_t(0);
      const int64_t row = bq * s.heads + h;  // (b, q, h)
      for (int64_t l = 0; l < s.levels; ++l) {
        for (int64_t p = 0; p < s.points; ++p) {
          const int64_t i = row * lp + l * s.points + p;
          const auto taps = bilinear_taps<acc_t>(
              static_cast<acc_t>(in.loc[2 * i]), static_cast<acc_t>(in.loc[2 * i + 1]),
              in.shapes[2 * l], in.shapes[2 * l + 1], in.starts[l], s.num_keys, fits[l]);
          const acc_t a = static_cast<acc_t>(in.attn[i]);
          for (int k = 0; k < 4; ++k) {
            if (taps.index[k] < 0) continue;
            const acc_t wgt = a * taps.weight[k];
            const scalar_t* v = in.value + ((b * s.num_keys + taps.index[k]) * s.heads + h) * dim;
#pragma omp simd
            for (int64_t c = 0; c < dim; ++c) acc[c] += wgt * static_cast<acc_t>(v[c]);
          }
        }
      }
      scalar_t* o = out + row * dim;
      for (int64_t c = 0; c < dim; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

// Gradients of every (b, q, h) with b * heads + h in [begin, end): such a range owns the
// rows value[b, :, h, :], so grad_value (accumulated in acc_t, float32 for bfloat16)
// needs no atomics. kDim as in forward_rows.
template <typename scalar_t, int kDim>
MSDA_CPU_CLONES void backward_heads(const Sizes& s, const Inputs<scalar_t>& in,
                                    const scalar_t* grad_out,
                                    at::opmath_type<scalar_t>* grad_value, scalar_t* grad_loc,
                                    scalar_t* grad_attn, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = kDim > 0 ? kDim : s.dim;
  const int64_t lp = s.levels * s.points;
  std::vector<acc_t> go_any(kDim > 0 ? 0 : dim);
  acc_t go_fixed[kDim > 0 ? kDim : 1];
  acc_t* go = kDim > 0 ? go_fixed : go_any.data();
  const std::vector<char> fits = fitting_levels(s, in);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / s.heads, h = bh % s.heads;
    for (int64_t q = 0; q < s.nq; ++q) {
      const int64_t row = (b * s.nq + q) * s.heads + h;  // (b, q, h)
      const scalar_t* go_src = grad_out + row * dim;
      for (int64_t c = 0; c < dim; ++c) go[c] = static_cast<acc_t>(go_src[c]);
      for (int64_t l = 0; l < s.levels; ++l) {
        for (int64_t p = 0; p < s.points; ++p) {
          const int64_t i = row * lp + l * s.points + p;
          const auto taps = bilinear_taps<acc_t>(
              static_cast<acc_t>(in.loc[2 * i]), static_cast<acc_t>(in.loc[2 * i + 1]),
              in.shapes[2 * l], in.shapes[2 * l + 1], in.starts[l], s.num_keys, fits[l]);
          const acc_t a = static_cast<acc_t>(in.attn[i]);
          acc_t g_attn = 0, g_x = 0, g_y = 0;
          for (int k = 0; k < 4; ++k) {
            if (taps.index[k] < 0) continue;
            const int64_t offset = ((b * s.num_keys + taps.index[k]) * s.heads + h) * dim;
            const scalar_t* v = in.value + offset;
            acc_t* gv = grad_value + offset;
            const acc_t wgt = a * taps.weight[k];
            acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < dim; ++c) {
              dot += go[c] * static_cast<acc_t>(v[c]);
              gv[c] += wgt * go[c];
            }
            g_attn += taps.weight[k] * dot;
            g_x += taps.dweight_dx[k] * dot;
            g_y += taps.dweight_dy[k] * dot;
          }
          grad_attn[i] = static_cast<scalar_t>(g_attn);
          grad_loc[2 * i] = static_cast<scalar_t>(a * g_x);
          grad_loc[2 * i + 1] = static_cast<scalar_t>(a * g_y);
        }
      }
    }
  }
}

// Calls f(std::integral_constant<int, kDim>) with kDim = dim for the channel counts a head
// usually has (d_model 128 or 256 over 8 heads), 0 (any count) otherwise.
template <typename F>
void with_channels(int64_t dim, F&& f) {
  switch (dim) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

template <typename scalar_t>
Inputs<scalar_t> inputs_of(const at::Tensor& value, const at::Tensor& shapes,
                           const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn) {
  return {value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
          starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
          attn.const_data_ptr<scalar_t>()};
}

at::Tensor forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                       const at::Tensor& level_start_index_in, const at::Tensor& loc_in,
                       const at::Tensor& attn_in) {
  const Sizes s = check_sizes(value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  const auto value = value_in.contiguous(), loc = loc_in.contiguous(), attn = attn_in.contiguous();
  const auto shapes = spatial_shapes_in.contiguous(), starts = level_start_index_in.contiguous();
  auto out = at::empty({s.bs, s.nq, s.heads * s.dim}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "multi_scale_deformable_attn_cpu", [&] {
    const auto in = inputs_of<scalar_t>(value, shapes, starts, loc, attn);
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    // A (batch, query) row costs heads * levels * points * 4 * dim multiply-adds.
    const int64_t grain = std::max<int64_t>(1, 32768 / (s.heads * s.levels * s.points * 4 * s.dim));
    with_channels(s.dim, [&](auto k_dim) {
      at::parallel_for(0, s.bs * s.nq, grain, [&](int64_t begin, int64_t end) {
        forward_rows<scalar_t, decltype(k_dim)::value>(s, in, out_ptr, begin, end);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
    const at::Tensor& level_start_index_in, const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const Sizes s = check_sizes(value_in, spatial_shapes_in, level_start_index_in, loc_in, attn_in);
  check_grad_output(grad_out_in, s, value_in);
  const auto grad_out = grad_out_in.contiguous(), value = value_in.contiguous();
  const auto loc = loc_in.contiguous(), attn = attn_in.contiguous();
  const auto shapes = spatial_shapes_in.contiguous(), starts = level_start_index_in.contiguous();
  const auto acc_type = at::toOpMathType(value.scalar_type());
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::empty_like(loc);
  auto grad_attn = at::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "multi_scale_deformable_attn_backward_cpu", [&] {
    const auto in = inputs_of<scalar_t>(value, shapes, starts, loc, attn);
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    auto* gv = grad_value.mutable_data_ptr<at::opmath_type<scalar_t>>();
    scalar_t* gl = grad_loc.mutable_data_ptr<scalar_t>();
    scalar_t* ga = grad_attn.mutable_data_ptr<scalar_t>();
    with_channels(s.dim, [&](auto k_dim) {
      at::parallel_for(0, s.bs * s.heads, 1, [&](int64_t begin, int64_t end) {
        backward_heads<scalar_t, decltype(k_dim)::value>(s, in, go, gv, gl, ga, begin, end);
      });
    });
  });
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CPU, m) {
  m.impl("multi_scale_deformable_attn", &forward_cpu);
  m.impl("_multi_scale_deformable_attn_backward", &backward_cpu);
}

}  // namespace ddetr

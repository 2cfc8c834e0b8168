// CUDA kernels of multi-scale deformable attention, forward and backward.
//
// Needs only CUDA's own headers (no torch), so that it can be compile-checked with nvcc
// on a machine without a GPU or a CUDA build of torch (tests/test_ops/test_cuda_compile.py).
//
// Work split: a group of G consecutive threads (G a power of two, at most a warp) serves
// one (batch, query, head); each thread owns channel chunks of V elements, loaded with one
// 16-byte vector load where the layout allows it. Arithmetic is in float32 for
// float32/float16/bfloat16 inputs (float64 for float64). Backward reduces the per-point
// gradients of locations and weights across the G threads with warp shuffles, so they
// are written once, without atomics. grad_value has two paths: atomics into a float32
// (float64) buffer, the fast default; or, for torch.use_deterministic_algorithms, a list
// of its terms that the launcher sorts by row, summed per row in a fixed order
// (grad_value_from_terms_kernel).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "../multi_scale_deformable_attn_common.h"

namespace ddetr {
namespace cuda {

struct KernelSizes {
  int64_t bs, num_keys, heads, dim, nq, levels, points;
};

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// V elements moved by one load or store instruction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_acc(const T* src, typename Acc<T>::type* dst) {
  const Vec<T, V> vec = *reinterpret_cast<const Vec<T, V>*>(src);
#pragma unroll
  for (int i = 0; i < V; ++i) dst[i] = to_acc(vec.v[i]);
}

// grad_value += g, V elements. Hopper has 16-byte float atomics: one instruction for four.
template <int V>
__device__ __forceinline__ void atomic_add_vec(float* dst, const float* g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + i), make_float4(g[i], g[i + 1], g[i + 2], g[i + 3]));
    }
  } else
#endif
  {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(dst + i, g[i]);
  }
}
template <int V>
__device__ __forceinline__ void atomic_add_vec(double* dst, const double* g) {
#pragma unroll
  for (int i = 0; i < V; ++i) atomicAdd(dst + i, g[i]);
}

template <typename scalar_t, int V>
__global__ void forward_kernel(KernelSizes s, int group, const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t bqh = tid / group;  // row of (batch, query, head)
  if (bqh >= s.bs * s.nq * s.heads) return;
  const int lane = static_cast<int>(tid % group);
  const int64_t h = bqh % s.heads, b = bqh / (s.nq * s.heads);
  const int64_t lp = s.levels * s.points;
  const scalar_t* loc_q = loc + bqh * lp * 2;
  const scalar_t* attn_q = attn + bqh * lp;
  const scalar_t* value_bh = value + (b * s.num_keys * s.heads + h) * s.dim;
  const int64_t key_stride = s.heads * s.dim;

  for (int64_t c = lane * V; c < s.dim; c += static_cast<int64_t>(group) * V) {
    acc_t acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = acc_t(0);
    for (int64_t l = 0; l < s.levels; ++l) {
      const int64_t h_l = shapes[2 * l], w_l = shapes[2 * l + 1], start = starts[l];
      const bool fits = level_fits(h_l, w_l, start, s.num_keys);
      for (int64_t p = 0; p < s.points; ++p) {
        const int64_t i = l * s.points + p;
        const auto taps = bilinear_taps<acc_t>(to_acc(loc_q[2 * i]), to_acc(loc_q[2 * i + 1]),
                                               h_l, w_l, start, s.num_keys, fits);
        const acc_t a = to_acc(attn_q[i]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (taps.index[k] < 0) continue;
          acc_t v[V];
          load_acc<scalar_t, V>(value_bh + taps.index[k] * key_stride + c, v);
          const acc_t wgt = a * taps.weight[k];
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += wgt * v[j];
        }
      }
    }
    Vec<scalar_t, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_acc<scalar_t>(acc[j]);
    *reinterpret_cast<Vec<scalar_t, V>*>(out + bqh * s.dim + c) = o;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// grad_loc and grad_attn are written once per point by the group's first lane. grad_value:
//   - atomic path (kDeterministic false): added into `grad_value` (accumulated in acc_t,
//     zero-initialised by the caller) with atomics;
//   - deterministic path: not touched. Corner k of point i (i = (bqh * levels + l) * points
//     + p) is the term 4 * i + k, `term_weight * grad_out[bqh]` added into grad_value row
//     `term_row` ((b * num_keys + key) * heads + h), or into none (term_row = the number
//     of rows, bs * num_keys * heads, which the caller keeps below 2^31 - 1).
template <typename scalar_t, int V, bool kDeterministic>
__global__ void backward_kernel(KernelSizes s, int group, const scalar_t* __restrict__ grad_out,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc,
                                const scalar_t* __restrict__ attn,
                                typename Acc<scalar_t>::type* __restrict__ grad_value,
                                int32_t* __restrict__ term_row,
                                typename Acc<scalar_t>::type* __restrict__ term_weight,
                                scalar_t* __restrict__ grad_loc, scalar_t* __restrict__ grad_attn) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t bqh = tid / group;
  // No early return: every lane of a warp must reach the shuffles below.
  const bool active = bqh < s.bs * s.nq * s.heads;
  const int lane = static_cast<int>(tid % group);
  const int64_t h = bqh % s.heads, b = bqh / (s.nq * s.heads);
  const int64_t lp = s.levels * s.points;
  const int64_t value_offset = (b * s.num_keys * s.heads + h) * s.dim;
  const int64_t key_stride = s.heads * s.dim;
  const int64_t group_width = static_cast<int64_t>(group) * V;

  for (int64_t l = 0; l < s.levels; ++l) {
    const int64_t h_l = shapes[2 * l], w_l = shapes[2 * l + 1], start = starts[l];
    const bool fits = level_fits(h_l, w_l, start, s.num_keys);
    for (int64_t p = 0; p < s.points; ++p) {
      const int64_t i = bqh * lp + l * s.points + p;
      BilinearTaps<acc_t> taps;
      acc_t a = acc_t(0);
      if (active) {
        taps = bilinear_taps<acc_t>(to_acc(loc[2 * i]), to_acc(loc[2 * i + 1]), h_l, w_l, start,
                                    s.num_keys, fits);
        a = to_acc(attn[i]);
      } else {
        for (int k = 0; k < 4; ++k) taps.index[k] = -1;
      }
      acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t c0 = 0; c0 < s.dim; c0 += group_width) {
        const int64_t c = c0 + lane * V;
        // An idle thread's row lies past the end of grad_out: it loads nothing.
        if (!active || c >= s.dim) continue;
        acc_t go[V];
        load_acc<scalar_t, V>(grad_out + bqh * s.dim + c, go);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (taps.index[k] < 0) continue;
          const int64_t row = value_offset + taps.index[k] * key_stride + c;
          acc_t v[V], gv[V];
          load_acc<scalar_t, V>(value + row, v);
          const acc_t wgt = a * taps.weight[k];
#pragma unroll
          for (int j = 0; j < V; ++j) {
            dot[k] += go[j] * v[j];
            gv[j] = wgt * go[j];
          }
          if constexpr (!kDeterministic) atomic_add_vec<V>(grad_value + row, gv);
        }
      }
      acc_t g_attn = acc_t(0), g_x = acc_t(0), g_y = acc_t(0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (taps.index[k] < 0) continue;
        g_attn += taps.weight[k] * dot[k];
        g_x += taps.dweight_dx[k] * dot[k];
        g_y += taps.dweight_dy[k] * dot[k];
      }
      g_attn = group_sum(g_attn, group);
      g_x = group_sum(g_x, group);
      g_y = group_sum(g_y, group);
      if (active && lane == 0) {
        grad_attn[i] = from_acc<scalar_t>(g_attn);
        grad_loc[2 * i] = from_acc<scalar_t>(a * g_x);
        grad_loc[2 * i + 1] = from_acc<scalar_t>(a * g_y);
        if constexpr (kDeterministic) {
          const int64_t no_row = s.bs * s.num_keys * s.heads;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const bool used = taps.index[k] >= 0;
            term_row[4 * i + k] = static_cast<int32_t>(
                used ? (b * s.num_keys + taps.index[k]) * s.heads + h : no_row);
            term_weight[4 * i + k] = used ? a * taps.weight[k] : acc_t(0);
          }
        }
      }
    }
  }
}

// First index in [lo, hi) of the ascending `a` whose value is at least `key` (hi if none).
__device__ __forceinline__ int64_t first_at_least(const int32_t* __restrict__ a, int64_t lo,
                                                  int64_t hi, int64_t key) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Deterministic grad_value: a group of G threads per grad_value row (bs * num_keys *
// heads rows of dim) sums the row's terms, written by backward_kernel<..., true> and
// sorted stably by row by the caller (sorted_row ascending, order[j] the index of the
// j-th term), in that order: the same additions in the same order on every run, whatever
// the schedule. Every element of grad_value is written, rows without terms with zero.
template <typename scalar_t, int V>
__global__ void grad_value_from_terms_kernel(KernelSizes s, int group,
                                             const scalar_t* __restrict__ grad_out,
                                             const int32_t* __restrict__ sorted_row,
                                             const int64_t* __restrict__ order,
                                             const typename Acc<scalar_t>::type* __restrict__ term_weight,
                                             scalar_t* __restrict__ grad_value) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = tid / group;
  if (row >= s.bs * s.num_keys * s.heads) return;  // no shuffles here
  const int lane = static_cast<int>(tid % group);
  const int64_t terms_per_bqh = s.levels * s.points * 4;
  const int64_t terms = s.bs * s.nq * s.heads * terms_per_bqh;
  const int64_t begin = first_at_least(sorted_row, 0, terms, row);
  const int64_t end = first_at_least(sorted_row, begin, terms, row + 1);
  for (int64_t c = lane * V; c < s.dim; c += static_cast<int64_t>(group) * V) {
    acc_t acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = acc_t(0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t term = order[t];
      const acc_t wgt = term_weight[term];
      acc_t go[V];
      load_acc<scalar_t, V>(grad_out + (term / terms_per_bqh) * s.dim + c, go);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += wgt * go[j];
    }
    Vec<scalar_t, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_acc<scalar_t>(acc[j]);
    *reinterpret_cast<Vec<scalar_t, V>*>(grad_value + row * s.dim + c) = o;
  }
}

// Threads serving one (batch, query, head): a power of two, at most a warp.
inline int group_size(int64_t dim, int vec) {
  const int64_t chunks = (dim + vec - 1) / vec;
  int g = 1;
  while (g < chunks && g < 32) g *= 2;
  return g;
}

// Elements of one 16-byte vector load or store.
template <typename scalar_t>
constexpr int kVec = 16 / sizeof(scalar_t);

// Whether the vector path may run: dim a multiple of the vector (so that every chunk
// starts at a multiple of kVec elements) and every pointer that the kernels load or
// store by vectors 16-byte aligned. The caller lists those pointers.
template <typename scalar_t>
inline bool can_vectorise(int64_t dim, std::initializer_list<const void*> pointers) {
  if (dim % kVec<scalar_t> != 0) return false;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

constexpr int kThreads = 256;
// gridDim.x may be at most 2^31 - 1.
constexpr int64_t kMaxBlocks = 2147483647;

// Blocks for `rows` groups of `group` threads each.
inline int64_t num_blocks(int64_t rows, int group) {
  return (rows * group + kThreads - 1) / kThreads;
}

// Launches a kernel in CUDA's syntax; the host emulation of the tests
// (tests/test_ops/cuda_host_emulation/) defines it as a call of its own scheduler.
#ifndef MSDA_LAUNCH
#define MSDA_LAUNCH(blocks, threads, stream, ...) __VA_ARGS__<<<blocks, threads, 0, stream>>>
#endif

// `vectorised`: can_vectorise holds for value and out (the caller checks); otherwise one
// element per load.
template <typename scalar_t>
cudaError_t launch_forward(const KernelSizes& s, bool vectorised, const scalar_t* value,
                           const int64_t* shapes, const int64_t* starts, const scalar_t* loc,
                           const scalar_t* attn, scalar_t* out, cudaStream_t stream) {
  constexpr int vec = kVec<scalar_t>;
  const int group = group_size(s.dim, vectorised ? vec : 1);
  const int64_t blocks = num_blocks(s.bs * s.nq * s.heads, group);
  if (blocks == 0) return cudaSuccess;  // nothing to compute: a grid of 0 blocks is an error
  if (blocks > kMaxBlocks) return cudaErrorInvalidConfiguration;
  const auto grid = static_cast<unsigned int>(blocks);
  if (vectorised) {
    MSDA_LAUNCH(grid, kThreads, stream, forward_kernel<scalar_t, vec>)(
        s, group, value, shapes, starts, loc, attn, out);
  } else {
    MSDA_LAUNCH(grid, kThreads, stream, forward_kernel<scalar_t, 1>)(
        s, group, value, shapes, starts, loc, attn, out);
  }
  return cudaGetLastError();
}

// backward_kernel<.., kTerms> over every (batch, query, head): grad_value by atomics, or
// (kTerms) grad_value's terms for the deterministic path; the unused pointers are null.
template <typename scalar_t, bool kTerms>
cudaError_t launch_backward_kernel(const KernelSizes& s, bool vectorised,
                                   const scalar_t* grad_out, const scalar_t* value,
                                   const int64_t* shapes, const int64_t* starts,
                                   const scalar_t* loc, const scalar_t* attn,
                                   typename Acc<scalar_t>::type* grad_value, int32_t* term_row,
                                   typename Acc<scalar_t>::type* term_weight,
                                   scalar_t* grad_loc, scalar_t* grad_attn,
                                   cudaStream_t stream) {
  constexpr int vec = kVec<scalar_t>;
  const int group = group_size(s.dim, vectorised ? vec : 1);
  const int64_t blocks = num_blocks(s.bs * s.nq * s.heads, group);
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxBlocks) return cudaErrorInvalidConfiguration;
  const auto grid = static_cast<unsigned int>(blocks);
  if (vectorised) {
    MSDA_LAUNCH(grid, kThreads, stream, backward_kernel<scalar_t, vec, kTerms>)(
        s, group, grad_out, value, shapes, starts, loc, attn, grad_value, term_row,
        term_weight, grad_loc, grad_attn);
  } else {
    MSDA_LAUNCH(grid, kThreads, stream, backward_kernel<scalar_t, 1, kTerms>)(
        s, group, grad_out, value, shapes, starts, loc, attn, grad_value, term_row,
        term_weight, grad_loc, grad_attn);
  }
  return cudaGetLastError();
}

// `vectorised`: can_vectorise holds for grad_out, value and grad_value.
template <typename scalar_t>
cudaError_t launch_backward(const KernelSizes& s, bool vectorised, const scalar_t* grad_out,
                            const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                            const scalar_t* loc, const scalar_t* attn,
                            typename Acc<scalar_t>::type* grad_value, scalar_t* grad_loc,
                            scalar_t* grad_attn, cudaStream_t stream) {
  return launch_backward_kernel<scalar_t, false>(s, vectorised, grad_out, value, shapes,
                                                 starts, loc, attn, grad_value, nullptr,
                                                 nullptr, grad_loc, grad_attn, stream);
}

// Deterministic backward, first step: grad_loc, grad_attn and grad_value's terms
// (bs * nq * heads * levels * points * 4 of each); see backward_kernel. `vectorised`:
// can_vectorise holds for grad_out, value and grad_value.
template <typename scalar_t>
cudaError_t launch_backward_terms(const KernelSizes& s, bool vectorised, const scalar_t* grad_out,
                                  const scalar_t* value, const int64_t* shapes,
                                  const int64_t* starts, const scalar_t* loc,
                                  const scalar_t* attn, int32_t* term_row,
                                  typename Acc<scalar_t>::type* term_weight, scalar_t* grad_loc,
                                  scalar_t* grad_attn, cudaStream_t stream) {
  return launch_backward_kernel<scalar_t, true>(s, vectorised, grad_out, value, shapes, starts,
                                                loc, attn, nullptr, term_row, term_weight,
                                                grad_loc, grad_attn, stream);
}

// Deterministic backward, last step, after the caller's stable sort of term_row:
// grad_value in its own dtype. `vectorised`: as for launch_backward_terms.
template <typename scalar_t>
cudaError_t launch_grad_value_from_terms(const KernelSizes& s, bool vectorised,
                                         const scalar_t* grad_out, const int32_t* sorted_row,
                                         const int64_t* order,
                                         const typename Acc<scalar_t>::type* term_weight,
                                         scalar_t* grad_value, cudaStream_t stream) {
  constexpr int vec = kVec<scalar_t>;
  const int group = group_size(s.dim, vectorised ? vec : 1);
  const int64_t blocks = num_blocks(s.bs * s.num_keys * s.heads, group);
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxBlocks) return cudaErrorInvalidConfiguration;
  const auto grid = static_cast<unsigned int>(blocks);
  if (vectorised) {
    MSDA_LAUNCH(grid, kThreads, stream, grad_value_from_terms_kernel<scalar_t, vec>)(
        s, group, grad_out, sorted_row, order, term_weight, grad_value);
  } else {
    MSDA_LAUNCH(grid, kThreads, stream, grad_value_from_terms_kernel<scalar_t, 1>)(
        s, group, grad_out, sorted_row, order, term_weight, grad_value);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ddetr

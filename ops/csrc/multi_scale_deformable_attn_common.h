// Bilinear-sampling arithmetic shared by the CPU and the CUDA kernels.
//
// Needs only the C++ standard library (and CUDA's own headers under nvcc), so that
// the CUDA kernels can be compile-checked on a machine without a CUDA build of torch.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace ddetr {

// The four pixels one sampling point reads and the weights it reads them with.
// Pixels outside the feature map get index -1 and are skipped by the callers: this is
// grid_sample's zero padding.
template <typename acc_t>
struct BilinearTaps {
  int64_t index[4];      // row of `value` (level start included), or -1
  acc_t weight[4];       // bilinear weight
  acc_t dweight_dx[4];   // d weight / d x, x the normalised location in [0, 1]
  acc_t dweight_dy[4];   // d weight / d y
};

// Whether every pixel of an h x w level whose first key is `start` is a row of value
// (start + h * w <= num_keys): then no tap of the level needs its own bound. Computed once
// per level, it spares the hot loops four integer divisions a sampling point. Written so
// that no integer arithmetic can overflow, whatever h, w and start hold.
MSDA_HOST_DEVICE bool level_fits(int64_t h, int64_t w, int64_t start, int64_t num_keys) {
  return h > 0 && w > 0 && start >= 0 && start <= num_keys && h <= (num_keys - start) / w;
}

// Taps of location (x, y) in [0, 1] on an h x w level whose first key is `start`.
// align_corners=False: pixel i covers [i, i + 1) / size, so its centre is (i + 0.5) / size.
// Every index is also bounded by `num_keys`, so that inconsistent level shapes or starts
// (not validated on the GPU, where that would need a host sync) can never read outside
// value, whatever h, w and start hold: the row is formed only once it is known to lie in
// [0, num_keys), so that no integer arithmetic can overflow on the way. `fits` is
// level_fits(h, w, start, num_keys), which makes that per-tap bound unnecessary.
template <typename acc_t>
MSDA_HOST_DEVICE BilinearTaps<acc_t> bilinear_taps(acc_t x, acc_t y, int64_t h, int64_t w,
                                                   int64_t start, int64_t num_keys, bool fits) {
  BilinearTaps<acc_t> t;
  const acc_t xi = x * static_cast<acc_t>(w) - acc_t(0.5);
  const acc_t yi = y * static_cast<acc_t>(h) - acc_t(0.5);
  // Written so that NaN fails it too: no corner of such a point is inside the map.
  const bool near_map = xi > acc_t(-1) && yi > acc_t(-1) && xi < static_cast<acc_t>(w) &&
                        yi < static_cast<acc_t>(h);
  if (!near_map) {
    for (int k = 0; k < 4; ++k) {
      t.index[k] = -1;
      t.weight[k] = t.dweight_dx[k] = t.dweight_dy[k] = acc_t(0);
    }
    return t;
  }
  const int64_t x0 = static_cast<int64_t>(floor(xi));
  const int64_t y0 = static_cast<int64_t>(floor(yi));
  const acc_t lx = xi - static_cast<acc_t>(x0), ly = yi - static_cast<acc_t>(y0);
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  const acc_t sx = static_cast<acc_t>(w), sy = static_cast<acc_t>(h);  // d xi / d x, d yi / d y

  // Corner order: (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
  const acc_t wy[4] = {hy, hy, ly, ly};
  const acc_t wx[4] = {hx, lx, hx, lx};
  const acc_t sign_x[4] = {-1, 1, -1, 1};
  const acc_t sign_y[4] = {-1, -1, 1, 1};
  const bool start_valid = start >= 0 && start < num_keys;
  for (int k = 0; k < 4; ++k) {
    // x0 and y0 lie in [-1, 2^63 - 1024]: xi and yi are above -1 and below w and h.
    const int64_t xx = x0 + (k & 1), yy = y0 + (k >> 1);
    const bool in_map = xx >= 0 && xx < w && yy >= 0 && yy < h;
    // Given in_map (so w > 0): start + yy * w + xx < num_keys <=> yy * w <= room. room
    // cannot overflow once start and xx are in range, and the product is tested by division.
    const bool inside = in_map && (fits || (start_valid && num_keys - 1 - start - xx >= 0 &&
                                            yy <= (num_keys - 1 - start - xx) / w));
    t.index[k] = inside ? start + yy * w + xx : -1;
    t.weight[k] = wy[k] * wx[k];
    t.dweight_dx[k] = sign_x[k] * wy[k] * sx;
    t.dweight_dy[k] = sign_y[k] * wx[k] * sy;
  }
  return t;
}

}  // namespace ddetr

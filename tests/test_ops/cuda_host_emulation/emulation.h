// Host emulation of the CUDA built-ins that ops/csrc/cuda/*.cuh uses, so that g++ can
// compile the real kernel source and run it on a CPU (tests/test_ops/
// test_cuda_host_emulation.py). The fake cuda_runtime.h, cuda_fp16.h and cuda_bf16.h
// beside this file shadow CUDA's own (-I this folder) and include only this header.
//
// Execution model:
//   - a kernel launch runs every warp of the grid; a pool of host threads takes warps
//     one by one, so that warps run concurrently and their atomics really race;
//   - the 32 lanes of a warp are coroutines (ucontext) of one host thread, run in turn
//     up to their next __shfl_xor_sync, where they meet: the exchange happens only once
//     every lane named by the mask has arrived, and a lane that has exited while others
//     wait for it is reported (a full-mask shuffle after an early return);
//   - threadIdx, blockIdx, blockDim and gridDim are thread-locals, set before a lane runs;
//   - atomicAdd is std::atomic_ref; the 16-byte float4 atomicAdd checks its alignment;
//   - __CUDA_ARCH__ is 900 (Hopper, where the kernels are meant to run) unless
//     MSDA_EMULATED_CUDA_ARCH says otherwise, so that its code paths are the ones run.
// Every failure prints what went wrong and ends the process with status 3.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <algorithm>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#ifndef MSDA_EMULATED_CUDA_ARCH
#define MSDA_EMULATED_CUDA_ARCH 900
#endif
#define __CUDA_ARCH__ MSDA_EMULATED_CUDA_ARCH

namespace msda_emulation {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda host emulation: %s\n", what);
  std::fflush(stderr);
  _exit(3);
}

}  // namespace msda_emulation

// ---------------------------------------------------------------- runtime types
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
using cudaStream_t = void*;

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : "emulated CUDA error";
}

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---------------------------------------------------------------- half types
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
  } else if (exponent == 31) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};  // NaN stays NaN
  // 65520 = 65504 + half an ulp: from there up (ties to even included) the result is inf.
  if (ax >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};
  if (ax < 0x38800000u) {
    // Below 2^-14: a subnormal half, in units of 2^-24. Scaling by 2^24 is exact, and
    // nearbyint rounds to nearest even; 1024 units is the smallest normal's encoding.
    float magnitude;
    std::memcpy(&magnitude, &ax, 4);
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.0f)))};
  }
  uint32_t h = ((((ax >> 23) - 127 + 15) << 10) | ((ax >> 13) & 0x3ffu));
  const uint32_t rest = ax & 0x1fffu;  // the 13 bits dropped
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry bumps the exponent
  return {static_cast<uint16_t>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = static_cast<uint32_t>(b.bits) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((x >> 16) | 0x40u)};
  x += 0x7fffu + ((x >> 16) & 1u);
  return {static_cast<uint16_t>(x >> 16)};
}

// ---------------------------------------------------------------- atomics
inline float atomicAdd(float* address, float v) {
  return std::atomic_ref<float>(*address).fetch_add(v, std::memory_order_relaxed);
}
inline double atomicAdd(double* address, double v) {
  return std::atomic_ref<double>(*address).fetch_add(v, std::memory_order_relaxed);
}
// sm_90's vector atomic: each element is added atomically; the address must be 16-byte
// aligned (a misaligned one is a fault on the device).
inline float4 atomicAdd(float4* address, float4 v) {
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) msda_emulation::fail("atomicAdd(float4*) on an address that is not 16-byte aligned");
  float* f = reinterpret_cast<float*>(address);
  return {atomicAdd(f, v.x), atomicAdd(f + 1, v.y), atomicAdd(f + 2, v.z), atomicAdd(f + 3, v.w)};
}

// ---------------------------------------------------------------- warps and launches
namespace msda_emulation {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

// Host threads that run warps concurrently: set by the driver.
inline int workers = 4;

struct Warp {
  enum State { kReady, kAtShuffle, kDone };
  int lanes = 0;  // threads in this warp: 32, but in a block's last warp
  int current = 0;
  unsigned generation = 0;  // shuffles completed
  ucontext_t scheduler;
  ucontext_t context[kWarpSize];
  State state[kWarpSize];
  unsigned mask[kWarpSize];
  // Values offered to a shuffle, by generation parity: a lane that has read its value
  // and runs ahead to the next shuffle writes the other half.
  unsigned char slot[2][kWarpSize][8];
  const std::function<void()>* body = nullptr;
};

inline thread_local Warp* current_warp = nullptr;

inline void lane_main() {
  Warp* w = current_warp;
  (*w->body)();
  w->state[w->current] = Warp::kDone;
  // Returning resumes w->scheduler (uc_link).
}

inline void shuffle(unsigned mask, void* value, size_t bytes, int lane_mask, int width) {
  Warp* w = current_warp;
  if (w == nullptr) fail("__shfl_xor_sync outside a kernel");
  if (width != kWarpSize) fail("__shfl_xor_sync: only width 32 is emulated");
  const int me = w->current;
  if (!((mask >> me) & 1u)) fail("__shfl_xor_sync called by a lane outside its own mask");
  const unsigned generation = w->generation;
  std::memcpy(w->slot[generation & 1u][me], value, bytes);
  w->mask[me] = mask;
  w->state[me] = Warp::kAtShuffle;
  swapcontext(&w->context[me], &w->scheduler);
  // Resumed once every lane of the mask has arrived.
  const int source = me ^ lane_mask;
  if (source >= w->lanes || !((mask >> source) & 1u)) fail("__shfl_xor_sync reads a lane outside the mask");
  std::memcpy(value, w->slot[generation & 1u][source], bytes);
}

// Lane stacks of one host thread, each with a PROT_NONE page below it, so that a stack
// overflow faults instead of corrupting a neighbour.
class Stacks {
 public:
  Stacks() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes_ = kWarpSize * (kStackBytes + page);
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("mmap of the lane stacks failed");
    base_ = static_cast<char*>(p);
    for (int l = 0; l < kWarpSize; ++l) mprotect(base_ + l * (kStackBytes + page), page, PROT_NONE);
    page_ = page;
  }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  ~Stacks() { munmap(base_, bytes_); }
  // Lane l's stack begins at stack(l) and is kStackBytes long.
  char* stack(int l) const { return base_ + l * (kStackBytes + page_) + page_; }

 private:
  char* base_;
  size_t bytes_, page_;
};

// A fresh coroutine that runs lane_main on `stack` and then resumes `link`. Kept out of
// line: getcontext "returns twice" as far as the compiler knows.
[[gnu::noinline]] inline void start_lane(ucontext_t* context, char* stack, ucontext_t* link) {
  getcontext(context);
  context->uc_stack.ss_sp = stack;
  context->uc_stack.ss_size = kStackBytes;
  context->uc_link = link;
  makecontext(context, lane_main, 0);
}

// Runs the lanes of one warp until all have returned.
inline void run_warp(Warp& w, unsigned block, unsigned first_thread, dim3 grid, dim3 block_dim,
                     const Stacks& stacks) {
  for (int l = 0; l < w.lanes; ++l) {
    start_lane(&w.context[l], stacks.stack(l), &w.scheduler);
    w.state[l] = Warp::kReady;
  }
  w.generation = 0;
  current_warp = &w;
  gridDim = grid;
  blockDim = block_dim;
  blockIdx = dim3(block, 0, 0);
  while (true) {
    for (int l = 0; l < w.lanes; ++l) {
      if (w.state[l] != Warp::kReady) continue;
      threadIdx = dim3(first_thread + l, 0, 0);
      w.current = l;
      swapcontext(&w.scheduler, &w.context[l]);
    }
    // Every lane has now returned or waits in a shuffle.
    unsigned waiting = 0, done = 0;
    for (int l = 0; l < w.lanes; ++l) {
      if (w.state[l] == Warp::kAtShuffle) waiting |= 1u << l;
      if (w.state[l] == Warp::kDone) done |= 1u << l;
    }
    if (waiting == 0) break;
    for (int l = 0; l < w.lanes; ++l) {
      if (!((waiting >> l) & 1u)) continue;
      if (w.mask[l] & done) {
        char msg[200];
        std::snprintf(msg, sizeof msg,
                      "block %u, lane %d: __shfl_xor_sync(mask 0x%08x) waits for lanes that have "
                      "already returned (0x%08x)", block, l, w.mask[l], w.mask[l] & done);
        fail(msg);
      }
      if (w.mask[l] != w.mask[__builtin_ctz(waiting)]) fail("lanes meet at __shfl_xor_sync with different masks");
    }
    if ((w.mask[__builtin_ctz(waiting)] & ~waiting) != 0) {
      fail("__shfl_xor_sync: a lane of the mask is missing (outside the warp)");
    }
    ++w.generation;
    for (int l = 0; l < w.lanes; ++l) {
      if ((waiting >> l) & 1u) w.state[l] = Warp::kReady;
    }
  }
  current_warp = nullptr;
}

inline void run_grid(unsigned grid, unsigned threads, const std::function<void()>& body) {
  const unsigned warps_per_block = (threads + kWarpSize - 1) / kWarpSize;
  const uint64_t warps = static_cast<uint64_t>(grid) * warps_per_block;
  std::atomic<uint64_t> next{0};
  auto worker = [&] {
    const Stacks stacks;
    Warp w;
    w.body = &body;
    for (uint64_t i = next++; i < warps; i = next++) {
      const unsigned block = static_cast<unsigned>(i / warps_per_block);
      const unsigned first = static_cast<unsigned>(i % warps_per_block) * kWarpSize;
      w.lanes = static_cast<int>(std::min<unsigned>(kWarpSize, threads - first));
      run_warp(w, block, first, dim3(grid), dim3(threads), stacks);
    }
  };
  const int n = static_cast<int>(std::min<uint64_t>(static_cast<uint64_t>(workers), warps));
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(worker);
  if (n > 0) worker();
  for (auto& t : pool) t.join();
}

// What MSDA_LAUNCH(grid, threads, stream, kernel)(args...) becomes: the arguments are
// converted to the kernel's parameter types once, as a launch does, and every thread of
// the grid runs the kernel on them.
template <typename... Params>
struct Launch {
  unsigned grid, threads;
  void (*kernel)(Params...);

  template <typename... Args>
  void operator()(Args&&... args) const {
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    run_grid(grid, threads, body);
  }
};

template <typename... Params>
Launch<Params...> launch(unsigned grid, int threads, void (*kernel)(Params...)) {
  return {grid, static_cast<unsigned>(threads), kernel};
}

}  // namespace msda_emulation

#define MSDA_LAUNCH(blocks, threads, stream, ...) \
  ((void)(stream), ::msda_emulation::launch(blocks, threads, &__VA_ARGS__))

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  msda_emulation::shuffle(mask, &var, sizeof(T), lane_mask, width);
  return var;
}

// Runs the CUDA kernels of ops/csrc/cuda/ (their real source, through their own
// launchers) on a CPU under the host emulation of emulation.h, for
// tests/test_ops/test_cuda_host_emulation.py.
//
// Every tensor the kernels see lies in its own mapping, between two PROT_NONE pages and
// flush against one of them (the end by default, the start with `placement start`), so
// that a read or write past the end (or before the start) faults; the fault handler
// names the tensor and the distance. Outputs start filled with 0xff bytes (NaN in every
// float type), so that an element a kernel forgets to write shows.
//
// The glue around the launchers mirrors ops/csrc/cuda/multi_scale_deformable_attn_cuda.cu
// (which needs torch and cannot be built here): the same vectorisation checks, a zeroed
// float32/float64 grad_value for the atomic path, and for the deterministic path the
// stable sort of the terms by row (at::sort there, std::stable_sort here).
//
// Usage:
//   driver run CASE_DIR       inputs and case.txt in CASE_DIR; outputs written there;
//                             prints one JSON line of what ran
//   driver convert IN OUT_DIR float32 values of IN to half and bfloat16 bits, and every
//                             half and bfloat16 bit pattern back to float32
//   driver selftest NAME      a deliberate mistake the emulation must report:
//                             read_past_end, write_before_start, shuffle_after_return
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "ops/csrc/cuda/multi_scale_deformable_attn_kernels.cuh"

namespace {

using ddetr::cuda::Acc;
using ddetr::cuda::KernelSizes;

[[noreturn]] void die(const std::string& what) { msda_emulation::fail(what.c_str()); }

// ---------------------------------------------------------------- guarded buffers
struct Region {
  const char* name;
  uintptr_t begin, end;  // the tensor's bytes
  uintptr_t low, high;   // the PROT_NONE pages' extent: [low, begin) and [end, high)
  bool used;
};
constexpr int kMaxRegions = 64;
Region regions[kMaxRegions];

std::atomic<bool> faulted{false};

void on_fault(int, siginfo_t* info, void*) {
  if (faulted.exchange(true)) pause();  // another thread reports; _exit ends this one too
  const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
  char msg[256];
  int n = std::snprintf(msg, sizeof msg, "cuda host emulation: fault at 0x%" PRIxPTR
                        ", outside every tensor's guard pages (a stack overflow?)\n", a);
  for (const Region& r : regions) {
    if (!r.used) continue;
    if (a >= r.end && a < r.high) {
      n = std::snprintf(msg, sizeof msg, "cuda host emulation: fault %" PRIuPTR
                        " bytes past the end of %s (%" PRIuPTR " bytes)\n", a - r.end, r.name,
                        r.end - r.begin);
      break;
    }
    if (a >= r.low && a < r.begin) {
      n = std::snprintf(msg, sizeof msg, "cuda host emulation: fault %" PRIuPTR
                        " bytes before the start of %s (%" PRIuPTR " bytes)\n", r.begin - a,
                        r.name, r.end - r.begin);
      break;
    }
  }
  if (write(2, msg, static_cast<size_t>(n)) < 0) {
  }
  _exit(4);
}

enum class Placement { kEnd, kStart };

// `bytes` of memory flush against a PROT_NONE page at its end (kEnd) or its start
// (kStart), with another PROT_NONE page on the far side of the slack.
class Guarded {
 public:
  Guarded(const char* name, size_t bytes, Placement placement) : bytes_(bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t span = (bytes + page - 1) / page * page;
    map_bytes_ = span + 2 * page;
    void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die(std::string("mmap failed for ") + name);
    base_ = static_cast<char*>(p);
    if (mprotect(base_, page, PROT_NONE) != 0 || mprotect(base_ + page + span, page, PROT_NONE) != 0) {
      die("mprotect failed");
    }
    data_ = placement == Placement::kEnd ? base_ + page + span - bytes : base_ + page;
    for (region_ = 0; region_ < kMaxRegions && regions[region_].used; ++region_) {
    }
    if (region_ == kMaxRegions) die("too many guarded buffers");
    const uintptr_t b = reinterpret_cast<uintptr_t>(data_);
    regions[region_] = {name, b, b + bytes, reinterpret_cast<uintptr_t>(base_),
                        reinterpret_cast<uintptr_t>(base_ + map_bytes_), true};
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  ~Guarded() {
    regions[region_].used = false;
    munmap(base_, map_bytes_);
  }

  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }
  void fill(unsigned char byte) { std::memset(data_, byte, bytes_); }

 private:
  size_t bytes_, map_bytes_;
  char* base_;
  char* data_;
  int region_;
};

// ---------------------------------------------------------------- files
std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) die("cannot read " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void read_into(const std::string& path, Guarded& dst) {
  const std::vector<char> data = read_file(path);
  if (data.size() != dst.bytes()) {
    die(path + " holds " + std::to_string(data.size()) + " bytes, expected " + std::to_string(dst.bytes()));
  }
  std::memcpy(dst.as<char>(), data.data(), data.size());
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!f) die("cannot write " + path);
}

// case.txt: one `key values...` per line.
std::map<std::string, std::vector<std::string>> read_case(const std::string& path) {
  std::ifstream f(path);
  if (!f) die("cannot read " + path);
  std::map<std::string, std::vector<std::string>> out;
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream words(line);
    std::string key, word;
    if (!(words >> key)) continue;
    while (words >> word) out[key].push_back(word);
  }
  return out;
}

struct Case {
  std::string dir, dtype;
  KernelSizes s;
  bool vectorise;  // false: force the one-element path
  Placement placement;
  int repeats;     // runs of the deterministic backward (0: none)
};

Case parse_case(const std::string& dir) {
  auto kv = read_case(dir + "/case.txt");
  auto need = [&](const std::string& key, size_t n) -> const std::vector<std::string>& {
    if (kv[key].size() != n) die("case.txt: `" + key + "` needs " + std::to_string(n) + " values");
    return kv[key];
  };
  Case c;
  c.dir = dir;
  c.dtype = need("dtype", 1)[0];
  const auto& z = need("sizes", 7);  // bs num_keys heads dim nq levels points
  c.s = {std::stoll(z[0]), std::stoll(z[1]), std::stoll(z[2]), std::stoll(z[3]),
         std::stoll(z[4]), std::stoll(z[5]), std::stoll(z[6])};
  c.vectorise = need("vectorise", 1)[0] == "1";
  c.placement = need("placement", 1)[0] == "start" ? Placement::kStart : Placement::kEnd;
  msda_emulation::workers = std::stoi(need("workers", 1)[0]);
  c.repeats = std::stoi(need("repeats", 1)[0]);
  return c;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) die(std::string(what) + " returned an error");
}

// ---------------------------------------------------------------- the op
template <typename scalar_t>
void run_case(const Case& c) {
  using acc_t = typename Acc<scalar_t>::type;
  const KernelSizes& s = c.s;
  const auto p = c.placement;
  const size_t e = sizeof(scalar_t);
  const size_t n_value = s.bs * s.num_keys * s.heads * s.dim;
  const size_t n_attn = s.bs * s.nq * s.heads * s.levels * s.points;
  const size_t n_out = s.bs * s.nq * s.heads * s.dim;

  Guarded value("value", n_value * e, p), shapes("spatial_shapes", s.levels * 2 * 8, p),
      starts("level_start_index", s.levels * 8, p), loc("sampling_locations", n_attn * 2 * e, p),
      attn("attention_weights", n_attn * e, p), grad_out("grad_output", n_out * e, p);
  read_into(c.dir + "/value.bin", value);
  read_into(c.dir + "/spatial_shapes.bin", shapes);
  read_into(c.dir + "/level_start_index.bin", starts);
  read_into(c.dir + "/sampling_locations.bin", loc);
  read_into(c.dir + "/attention_weights.bin", attn);
  read_into(c.dir + "/grad_output.bin", grad_out);

  // Forward, as forward_cuda.
  Guarded out("output", n_out * e, p);
  out.fill(0xff);
  const bool fwd_vec = c.vectorise && ddetr::cuda::can_vectorise<scalar_t>(
                                          s.dim, {value.as<void>(), out.as<void>()});
  check(ddetr::cuda::launch_forward<scalar_t>(s, fwd_vec, value.as<scalar_t>(), shapes.as<int64_t>(),
                                              starts.as<int64_t>(), loc.as<scalar_t>(),
                                              attn.as<scalar_t>(), out.as<scalar_t>(), nullptr),
        "launch_forward");
  write_file(c.dir + "/output.bin", out.as<void>(), out.bytes());

  // Backward, atomic path, as backward_cuda: grad_value zeroed in the accumulation type.
  Guarded grad_value("grad_value", n_value * sizeof(acc_t), p),
      grad_loc("grad_sampling_locations", n_attn * 2 * e, p),
      grad_attn("grad_attention_weights", n_attn * e, p);
  grad_value.fill(0);
  grad_loc.fill(0xff);
  grad_attn.fill(0xff);
  const bool bwd_vec = c.vectorise && ddetr::cuda::can_vectorise<scalar_t>(
                                          s.dim, {grad_out.as<void>(), value.as<void>(),
                                                  grad_value.as<void>()});
  check(ddetr::cuda::launch_backward<scalar_t>(
            s, bwd_vec, grad_out.as<scalar_t>(), value.as<scalar_t>(), shapes.as<int64_t>(),
            starts.as<int64_t>(), loc.as<scalar_t>(), attn.as<scalar_t>(), grad_value.as<acc_t>(),
            grad_loc.as<scalar_t>(), grad_attn.as<scalar_t>(), nullptr),
        "launch_backward");
  write_file(c.dir + "/grad_value_atomic.bin", grad_value.as<void>(), grad_value.bytes());
  write_file(c.dir + "/grad_sampling_locations.bin", grad_loc.as<void>(), grad_loc.bytes());
  write_file(c.dir + "/grad_attention_weights.bin", grad_attn.as<void>(), grad_attn.bytes());

  // Deterministic backward, as backward_cuda_deterministic, `repeats` times.
  const size_t n_terms = n_attn * 4;
  bool det_vec = false;
  for (int r = 0; r < c.repeats; ++r) {
    Guarded term_row("term_row", n_terms * 4, p), term_weight("term_weight", n_terms * sizeof(acc_t), p),
        det_grad_value("grad_value", n_value * e, p),
        det_grad_loc("grad_sampling_locations", n_attn * 2 * e, p),
        det_grad_attn("grad_attention_weights", n_attn * e, p);
    for (Guarded* g : {&term_row, &term_weight, &det_grad_value, &det_grad_loc, &det_grad_attn}) {
      g->fill(0xff);  // at::empty
    }
    det_vec = c.vectorise && ddetr::cuda::can_vectorise<scalar_t>(
                                 s.dim, {grad_out.as<void>(), value.as<void>(),
                                         det_grad_value.as<void>()});
    check(ddetr::cuda::launch_backward_terms<scalar_t>(
              s, det_vec, grad_out.as<scalar_t>(), value.as<scalar_t>(), shapes.as<int64_t>(),
              starts.as<int64_t>(), loc.as<scalar_t>(), attn.as<scalar_t>(), term_row.as<int32_t>(),
              term_weight.as<acc_t>(), det_grad_loc.as<scalar_t>(), det_grad_attn.as<scalar_t>(),
              nullptr),
          "launch_backward_terms");
    // at::sort(term_row, stable=true): the one step the .cu does with torch.
    Guarded sorted_row("sorted_row", n_terms * 4, p), order("order", n_terms * 8, p);
    int64_t* ord = order.as<int64_t>();
    const int32_t* rows = term_row.as<int32_t>();
    for (size_t t = 0; t < n_terms; ++t) ord[t] = static_cast<int64_t>(t);
    std::stable_sort(ord, ord + n_terms, [&](int64_t a, int64_t b) { return rows[a] < rows[b]; });
    for (size_t t = 0; t < n_terms; ++t) sorted_row.as<int32_t>()[t] = rows[ord[t]];
    check(ddetr::cuda::launch_grad_value_from_terms<scalar_t>(
              s, det_vec, grad_out.as<scalar_t>(), sorted_row.as<int32_t>(), order.as<int64_t>(),
              term_weight.as<acc_t>(), det_grad_value.as<scalar_t>(), nullptr),
          "launch_grad_value_from_terms");
    const std::string tag = "_deterministic_" + std::to_string(r);
    write_file(c.dir + "/grad_value" + tag + ".bin", det_grad_value.as<void>(), det_grad_value.bytes());
    write_file(c.dir + "/grad_sampling_locations" + tag + ".bin", det_grad_loc.as<void>(), det_grad_loc.bytes());
    write_file(c.dir + "/grad_attention_weights" + tag + ".bin", det_grad_attn.as<void>(), det_grad_attn.bytes());
  }

  std::printf("{\"forward_vectorised\": %s, \"backward_vectorised\": %s, "
              "\"deterministic_vectorised\": %s, \"group\": %d}\n",
              fwd_vec ? "true" : "false", bwd_vec ? "true" : "false", det_vec ? "true" : "false",
              ddetr::cuda::group_size(s.dim, fwd_vec ? ddetr::cuda::kVec<scalar_t> : 1));
}

// ---------------------------------------------------------------- self-tests
__global__ void read_kernel(const float* src, float* dst, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= n) dst[0] += src[i];  // the mistake: <= reads one element past the end
}

__global__ void write_kernel(float* dst, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i - 1] = 1.0f;  // the mistake: i - 1 writes before the start
}

__global__ void early_return_kernel(float* dst, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;  // the mistake: these lanes never reach the shuffle
  dst[i] = __shfl_xor_sync(0xffffffffu, static_cast<float>(i), 1);
}

void selftest(const std::string& name) {
  msda_emulation::workers = 1;
  if (name == "read_past_end") {
    Guarded src("src", 40 * sizeof(float), Placement::kEnd), dst("dst", sizeof(float), Placement::kEnd);
    MSDA_LAUNCH(1, 64, nullptr, read_kernel)(src.as<float>(), dst.as<float>(), int64_t{40});
  } else if (name == "write_before_start") {
    Guarded dst("dst", 40 * sizeof(float), Placement::kStart);
    MSDA_LAUNCH(1, 64, nullptr, write_kernel)(dst.as<float>(), int64_t{40});
  } else if (name == "shuffle_after_return") {
    Guarded dst("dst", 40 * sizeof(float), Placement::kEnd);
    MSDA_LAUNCH(1, 64, nullptr, early_return_kernel)(dst.as<float>(), int64_t{40});
  } else {
    die("unknown self-test " + name);
  }
  std::printf("self-test %s ran without a report\n", name.c_str());
}

// ---------------------------------------------------------------- conversions
void convert(const std::string& in, const std::string& out_dir) {
  const std::vector<char> raw = read_file(in);
  std::vector<float> f(raw.size() / 4);
  std::memcpy(f.data(), raw.data(), f.size() * 4);
  std::vector<uint16_t> half(f.size()), bf16(f.size());
  for (size_t i = 0; i < f.size(); ++i) {
    half[i] = __float2half_rn(f[i]).bits;
    bf16[i] = __float2bfloat16_rn(f[i]).bits;
  }
  write_file(out_dir + "/to_half.bin", half.data(), half.size() * 2);
  write_file(out_dir + "/to_bfloat16.bin", bf16.data(), bf16.size() * 2);
  std::vector<float> from_half(65536), from_bf16(65536);
  for (uint32_t b = 0; b < 65536; ++b) {
    from_half[b] = __half2float(__half{static_cast<uint16_t>(b)});
    from_bf16[b] = __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(b)});
  }
  write_file(out_dir + "/from_half.bin", from_half.data(), 65536 * 4);
  write_file(out_dir + "/from_bfloat16.bin", from_bf16.data(), 65536 * 4);
}

}  // namespace

int main(int argc, char** argv) {
  struct sigaction action {};
  action.sa_sigaction = on_fault;
  action.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &action, nullptr);
  sigaction(SIGBUS, &action, nullptr);

  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "run" && argc == 3) {
    const Case c = parse_case(argv[2]);
    if (c.dtype == "float32") {
      run_case<float>(c);
    } else if (c.dtype == "float64") {
      run_case<double>(c);
    } else if (c.dtype == "float16") {
      run_case<__half>(c);
    } else if (c.dtype == "bfloat16") {
      run_case<__nv_bfloat16>(c);
    } else {
      die("unknown dtype " + c.dtype);
    }
  } else if (mode == "convert" && argc == 4) {
    convert(argv[2], argv[3]);
  } else if (mode == "selftest" && argc == 3) {
    selftest(argv[2]);
  } else {
    std::fprintf(stderr, "usage: driver run CASE_DIR | convert IN OUT_DIR | selftest NAME\n");
    return 2;
  }
  return 0;
}

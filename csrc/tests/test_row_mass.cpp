// ctest: the CUDA row-mass kernels against the CPU reference, forward and backward, on random problems
// (fp32 / fp16 / bf16, head dims 64 and 128, GQA, padding, causal or not, odd N, empty and repeated
// slots), plus bitwise determinism of the backward. Exits 77 (ctest: skipped) without a CUDA device.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "reference_row_mass.h"
#include "row_mass.h"

namespace {

constexpr int kSkipped = 77;

struct Case {
  abft::DType dtype;
  int head_dim, batch, num_q_heads, num_kv_heads, seq_len, num_classes;
  bool causal, padding;
};

const char* dtype_name(abft::DType dtype) {
  switch (dtype) {
    case abft::DType::kFloat32: return "fp32";
    case abft::DType::kFloat16: return "fp16";
    case abft::DType::kBFloat16: return "bf16";
  }
  return "?";
}

// Host storage of one dtype: the values rounded to it, their bytes, and back to float.
struct Stored {
  std::vector<float> rounded;
  std::vector<uint16_t> bits16;  // fp16 / bf16 bytes

  Stored(const std::vector<float>& values, abft::DType dtype) : rounded(values) {
    if (dtype == abft::DType::kFloat32) return;
    bits16.resize(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      if (dtype == abft::DType::kFloat16) {
        const __half h = __float2half_rn(values[i]);
        rounded[i] = __half2float(h);
        bits16[i] = __half_as_ushort(h);
      } else {
        const __nv_bfloat16 h = __float2bfloat16_rn(values[i]);
        rounded[i] = __bfloat162float(h);
        bits16[i] = __bfloat16_as_ushort(h);
      }
    }
  }
  const void* bytes() const { return bits16.empty() ? static_cast<const void*>(rounded.data()) : bits16.data(); }
  size_t num_bytes() const { return bits16.empty() ? rounded.size() * 4 : bits16.size() * 2; }
};

float to_float(const void* data, size_t i, abft::DType dtype) {
  switch (dtype) {
    case abft::DType::kFloat32: return static_cast<const float*>(data)[i];
    case abft::DType::kFloat16: return __half2float(__ushort_as_half(static_cast<const uint16_t*>(data)[i]));
    case abft::DType::kBFloat16:
      return __bfloat162float(__ushort_as_bfloat16(static_cast<const uint16_t*>(data)[i]));
  }
  return NAN;
}

double rel_err(const std::vector<double>& x, const std::vector<double>& ref) {
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i])) return INFINITY;
    diff += (x[i] - ref[i]) * (x[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  return norm == 0.0 ? std::sqrt(diff) : std::sqrt(diff / norm);
}

#define CHECK_CUDA(call)                                                                              \
  do {                                                                                                \
    const cudaError_t status_ = (call);                                                               \
    if (status_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(status_)); \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

template <typename T>
T* device_alloc(size_t num_bytes) {
  void* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, num_bytes));
  return static_cast<T*>(device);
}

template <typename T>
T* to_device(const void* host, size_t num_bytes) {
  T* device = device_alloc<T>(num_bytes);
  CHECK_CUDA(cudaMemcpy(device, host, num_bytes, cudaMemcpyHostToDevice));
  return device;
}

template <typename T>
std::vector<T> to_host(const void* device, size_t count) {
  std::vector<T> host(count);
  CHECK_CUDA(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

bool run_case(const Case& c, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  const int B = c.batch, Hq = c.num_q_heads, Hkv = c.num_kv_heads, N = c.seq_len, D = c.head_dim;
  const int C = c.num_classes;
  const bool half = c.dtype != abft::DType::kFloat32;
  const double tol = half ? 1e-2 : 1e-5;

  std::vector<float> q_values(static_cast<size_t>(B) * Hq * N * D), k_values(static_cast<size_t>(B) * Hkv * N * D);
  for (float& x : q_values) x = normal(gen);
  for (float& x : k_values) x = normal(gen);
  const Stored q(q_values, c.dtype), k(k_values, c.dtype);
  std::vector<int64_t> key_class(static_cast<size_t>(B) * N);
  std::uniform_int_distribution<int> label(-1, C - 1);
  for (int64_t& x : key_class) x = label(gen);
  std::vector<uint8_t> real(static_cast<size_t>(B) * N, 1);
  if (c.padding) {  // left padding on the first sample, right padding on the last
    for (int j = 0; j < N / 4; ++j) real[j] = 0;
    for (int j = N - N / 4; j < N; ++j) real[static_cast<size_t>(B - 1) * N + j] = 0;
  }
  // Slots: the last row, the first, an empty slot, a repeat of the last, one random row.
  std::uniform_int_distribution<int> any_row(0, N - 1);
  const int R = 5;
  std::vector<int64_t> rows;
  for (int b = 0; b < B; ++b) {
    for (int64_t row : {int64_t(N - 1), int64_t(0), int64_t(-1), int64_t(N - 1), int64_t(any_row(gen))}) rows.push_back(row);
  }
  std::vector<double> grad_mass(static_cast<size_t>(B) * Hq * R * C);
  for (double& x : grad_mass) x = normal(gen);
  const std::vector<float> grad_mass_f(grad_mass.begin(), grad_mass.end());
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));

  // Reference, on the same (rounded) inputs.
  const uint8_t* mask = c.padding ? real.data() : nullptr;
  std::vector<double> ref_mass(grad_mass.size());
  std::vector<double> ref_grad_q(q_values.size()), ref_grad_k(k_values.size());
  reference_row_mass_forward(q.rounded.data(), k.rounded.data(), rows.data(), key_class.data(), mask, B, Hq, Hkv, N,
                             D, R, C, c.causal, scale, ref_mass.data());
  reference_row_mass_backward(q.rounded.data(), k.rounded.data(), rows.data(), key_class.data(), mask, B, Hq, Hkv, N,
                              D, R, C, c.causal, scale, grad_mass.data(), ref_grad_q.data(), ref_grad_k.data());

  // Kernels.
  bool* mask_device = nullptr;
  if (c.padding) {
    std::vector<char> mask_bytes(real.begin(), real.end());  // bool is one byte
    mask_device = to_device<bool>(mask_bytes.data(), mask_bytes.size());
  }
  abft::RowMassProblem problem{to_device<void>(q.bytes(), q.num_bytes()),
                               to_device<void>(k.bytes(), k.num_bytes()),
                               to_device<int64_t>(rows.data(), rows.size() * 8),
                               to_device<int64_t>(key_class.data(), key_class.size() * 8),
                               mask_device, B, Hq, Hkv, N, D, R, C, c.causal, static_cast<float>(scale), c.dtype};
  const size_t num_items = static_cast<size_t>(B) * Hq * R;
  float* mass = device_alloc<float>(num_items * C * 4);
  float* lse = device_alloc<float>(num_items * 4);
  float* delta = device_alloc<float>(num_items * 4);
  float* grad_q_rows = device_alloc<float>(num_items * D * 4);
  void* grad_k = device_alloc<void>(k.num_bytes());
  float* grad_mass_device = to_device<float>(grad_mass_f.data(), grad_mass_f.size() * 4);
  CHECK_CUDA(abft::row_mass_forward(problem, mass, lse, nullptr));
  CHECK_CUDA(abft::row_mass_backward(problem, grad_mass_device, mass, lse, delta, grad_q_rows, grad_k, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());

  const std::vector<float> got_mass = to_host<float>(mass, num_items * C);
  const std::vector<float> got_q_rows = to_host<float>(grad_q_rows, num_items * D);
  const std::vector<char> got_k_bytes = to_host<char>(grad_k, k.num_bytes());
  // Slots that share a row add up, as the Python wrapper does.
  std::vector<double> got_grad_q(q_values.size(), 0.0);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < Hq; ++h) {
      for (int slot = 0; slot < R; ++slot) {
        const int64_t row = rows[static_cast<size_t>(b) * R + slot];
        if (row < 0) continue;
        for (int d = 0; d < D; ++d) {
          got_grad_q[((static_cast<size_t>(b) * Hq + h) * N + row) * D + d] +=
              got_q_rows[((static_cast<size_t>(b) * Hq + h) * R + slot) * D + d];
        }
      }
    }
  }
  std::vector<double> got_grad_k(k_values.size());
  for (size_t i = 0; i < got_grad_k.size(); ++i) got_grad_k[i] = to_float(got_k_bytes.data(), i, c.dtype);

  // The backward again: dq and dk must come out bit for bit the same.
  CHECK_CUDA(abft::row_mass_backward(problem, grad_mass_device, mass, lse, delta, grad_q_rows, grad_k, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const bool deterministic = to_host<char>(grad_k, k.num_bytes()) == got_k_bytes &&
                             to_host<float>(grad_q_rows, num_items * D) == got_q_rows;

  const double err_mass = rel_err(std::vector<double>(got_mass.begin(), got_mass.end()), ref_mass);
  const double err_q = rel_err(got_grad_q, ref_grad_q);
  const double err_k = rel_err(got_grad_k, ref_grad_k);
  const bool ok = err_mass < tol && err_q < tol && err_k < tol && deterministic;
  std::printf("%s %s D=%d B=%d Hq=%d Hkv=%d N=%d C=%d causal=%d padding=%d: mass %.2e dq %.2e dk %.2e%s\n",
              ok ? "PASS" : "FAIL", dtype_name(c.dtype), D, B, Hq, Hkv, N, C, c.causal, c.padding, err_mass, err_q,
              err_k, deterministic ? "" : " (backward not deterministic)");

  for (const void* p : {problem.q, problem.k, static_cast<const void*>(problem.query_rows),
                        static_cast<const void*>(problem.key_class), static_cast<const void*>(mask_device),
                        static_cast<const void*>(mass), static_cast<const void*>(lse), static_cast<const void*>(delta),
                        static_cast<const void*>(grad_q_rows), static_cast<const void*>(grad_mass_device),
                        static_cast<const void*>(grad_k)}) {
    CHECK_CUDA(cudaFree(const_cast<void*>(p)));
  }
  return ok;
}

}  // namespace

int main() {
  int num_devices = 0;
  if (cudaGetDeviceCount(&num_devices) != cudaSuccess || num_devices == 0) {
    std::printf("SKIPPED: no CUDA device; the kernels were built but cannot run here\n");
    return kSkipped;
  }
  const abft::DType dtypes[] = {abft::DType::kFloat32, abft::DType::kFloat16, abft::DType::kBFloat16};
  std::vector<Case> cases;
  for (abft::DType dtype : dtypes) {
    for (int head_dim : abft::kSupportedHeadDims) {
      cases.push_back({dtype, head_dim, 2, 4, 2, 257, 3, true, true});    // GQA, padding, odd N
      cases.push_back({dtype, head_dim, 1, 3, 3, 1, 2, true, false});     // a single key
      cases.push_back({dtype, head_dim, 2, 8, 1, 100, 64, false, true});  // MQA, all classes, not causal
    }
  }
  bool all_ok = true;
  unsigned seed = 0;
  for (const Case& c : cases) all_ok = run_case(c, seed++) && all_ok;

  // An unsupported head dim is refused, not run.
  abft::RowMassProblem bad{};
  bad.head_dim = 72;
  bad.num_classes = 2;
  bad.batch = bad.num_q_heads = bad.num_kv_heads = bad.seq_len = bad.num_rows = 1;
  const bool refused = abft::row_mass_forward(bad, nullptr, nullptr, nullptr) == cudaErrorInvalidValue;
  std::printf("%s unsupported head dim is refused\n", refused ? "PASS" : "FAIL");
  return all_ok && refused ? 0 : 1;
}

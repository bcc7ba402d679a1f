// pybind11 / torch binding of the row-mass kernels: checks tensors, allocates outputs, launches on the
// current stream. abft_kernels/ops/cuda_backend.py turns bad user input into ValueError before this;
// the checks here (RuntimeError) guard the raw-pointer interface.
#include <cstdint>
#include <iterator>
#include <optional>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "row_mass.h"

namespace {

abft::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return abft::DType::kFloat32;
    case at::kHalf: return abft::DType::kFloat16;
    case at::kBFloat16: return abft::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "abft_kernels._C: q and k must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_device_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "abft_kernels._C: ", name, " must be on ", q.device());
  TORCH_CHECK(t.is_contiguous(), "abft_kernels._C: ", name, " must be contiguous");
}

abft::RowMassProblem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& query_rows,
                                  const at::Tensor& key_class, const std::optional<at::Tensor>& key_padding_mask,
                                  int64_t num_classes, bool causal, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "abft_kernels._C: q and k must be [B, H, N, D]");
  const int64_t batch = q.size(0), num_q_heads = q.size(1), seq_len = q.size(2), head_dim = q.size(3);
  const int64_t num_kv_heads = k.size(1);
  TORCH_CHECK(k.size(0) == batch && k.size(2) == seq_len && k.size(3) == head_dim,
              "abft_kernels._C: k must be [B, Hkv, N, D] matching q");
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "abft_kernels._C: Hkv must divide Hq");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "abft_kernels._C: q and k must share one dtype");
  TORCH_CHECK(abft::head_dim_supported(static_cast<int>(head_dim)), "abft_kernels._C: head dim ", head_dim,
              " has no compiled kernel");
  TORCH_CHECK(num_classes >= 1 && num_classes <= abft::kMaxNumClasses, "abft_kernels._C: num_classes must be in [1, ",
              abft::kMaxNumClasses, "], got ", num_classes);
  check_device_tensor(q, "q", q);
  check_device_tensor(k, "k", q);
  for (const at::Tensor* t : {&q, &k}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "abft_kernels._C: q and k must be 16-byte aligned");
  }
  check_device_tensor(query_rows, "query_rows", q);
  TORCH_CHECK(query_rows.scalar_type() == at::kLong && query_rows.dim() == 2 && query_rows.size(0) == batch &&
                  query_rows.size(1) > 0,
              "abft_kernels._C: query_rows must be int64 [B, R>=1]");
  check_device_tensor(key_class, "key_class", q);
  TORCH_CHECK(key_class.scalar_type() == at::kLong && key_class.dim() == 2 && key_class.size(0) == batch &&
                  key_class.size(1) == seq_len,
              "abft_kernels._C: key_class must be int64 [B, N]");
  const bool* padding = nullptr;
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    check_device_tensor(mask, "key_padding_mask", q);
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == seq_len,
                "abft_kernels._C: key_padding_mask must be bool [B, N]");
    padding = mask.data_ptr<bool>();
  }
  return abft::RowMassProblem{
      q.data_ptr(), k.data_ptr(), query_rows.data_ptr<int64_t>(), key_class.data_ptr<int64_t>(), padding,
      static_cast<int>(batch), static_cast<int>(num_q_heads), static_cast<int>(num_kv_heads),
      static_cast<int>(seq_len), static_cast<int>(head_dim), static_cast<int>(query_rows.size(1)),
      static_cast<int>(num_classes), causal, static_cast<float>(scale), kernel_dtype(q)};
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "abft_kernels._C: ", what, " failed: ", cudaGetErrorString(status));
}

// Returns mass float [B, Hq, R, C] and lse float [B, Hq, R].
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& query_rows,
                                const at::Tensor& key_class, const std::optional<at::Tensor>& key_padding_mask,
                                int64_t num_classes, bool causal, double scale) {
  const abft::RowMassProblem problem =
      make_problem(q, k, query_rows, key_class, key_padding_mask, num_classes, causal, scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const auto options = q.options().dtype(at::kFloat);
  at::Tensor mass = at::empty({problem.batch, problem.num_q_heads, problem.num_rows, num_classes}, options);
  at::Tensor lse = at::empty({problem.batch, problem.num_q_heads, problem.num_rows}, options);
  check_launch(abft::row_mass_forward(problem, mass.data_ptr<float>(), lse.data_ptr<float>(),
                                      c10::cuda::getCurrentCUDAStream()),
               "row_mass_forward");
  return {mass, lse};
}

// Returns grad_q_rows float [B, Hq, R, D] (one per slot) and grad_k [B, Hkv, N, D] in k's dtype.
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& query_rows,
                                 const at::Tensor& key_class, const std::optional<at::Tensor>& key_padding_mask,
                                 const at::Tensor& grad_mass, const at::Tensor& mass, const at::Tensor& lse,
                                 bool causal, double scale) {
  TORCH_CHECK(mass.dim() == 4, "abft_kernels._C: mass must be [B, Hq, R, C]");
  const abft::RowMassProblem problem =
      make_problem(q, k, query_rows, key_class, key_padding_mask, mass.size(3), causal, scale);
  for (const at::Tensor* t : {&grad_mass, &mass, &lse}) {
    check_device_tensor(*t, "grad_mass, mass and lse", q);
    TORCH_CHECK(t->scalar_type() == at::kFloat, "abft_kernels._C: grad_mass, mass and lse must be float32");
  }
  TORCH_CHECK(grad_mass.sizes() == mass.sizes() && mass.size(0) == problem.batch &&
                  mass.size(1) == problem.num_q_heads && mass.size(2) == problem.num_rows,
              "abft_kernels._C: grad_mass and mass must be [B, Hq, R, C]");
  TORCH_CHECK(lse.dim() == 3 && lse.sizes() == mass.sizes().slice(0, 3), "abft_kernels._C: lse must be [B, Hq, R]");
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor delta = at::empty_like(lse);
  at::Tensor grad_q_rows = at::empty({problem.batch, problem.num_q_heads, problem.num_rows, problem.head_dim},
                                     q.options().dtype(at::kFloat));
  at::Tensor grad_k = at::empty_like(k);
  check_launch(abft::row_mass_backward(problem, grad_mass.data_ptr<float>(), mass.data_ptr<float>(),
                                       lse.data_ptr<float>(), delta.data_ptr<float>(), grad_q_rows.data_ptr<float>(),
                                       grad_k.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "row_mass_backward");
  return {grad_q_rows, grad_k};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "abft-kernels CUDA extension: label masses of selected attention rows and their backward";
  m.attr("MAX_NUM_CLASSES") = abft::kMaxNumClasses;
  pybind11::tuple head_dims(std::size(abft::kSupportedHeadDims));
  for (size_t i = 0; i < std::size(abft::kSupportedHeadDims); ++i) head_dims[i] = abft::kSupportedHeadDims[i];
  m.attr("SUPPORTED_HEAD_DIMS") = head_dims;
  m.def("row_mass_forward", &forward, "mass [B,Hq,R,C] and lse [B,Hq,R] of the selected rows",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("query_rows"), pybind11::arg("key_class"),
        pybind11::arg("key_padding_mask"), pybind11::arg("num_classes"), pybind11::arg("causal"),
        pybind11::arg("scale"));
  m.def("row_mass_backward", &backward, "grad_q_rows [B,Hq,R,D] (float32) and grad_k [B,Hkv,N,D]",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("query_rows"), pybind11::arg("key_class"),
        pybind11::arg("key_padding_mask"), pybind11::arg("grad_mass"), pybind11::arg("mass"), pybind11::arg("lse"),
        pybind11::arg("causal"), pybind11::arg("scale"));
}

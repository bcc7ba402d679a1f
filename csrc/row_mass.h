// Label masses of R selected query rows and their gradient: the decoupled path of docs/design.md §2.
//
// For query row i = query_rows[b, r] of head h, with the keys j it sees (j < N, key_padding_mask[b, j],
// and j <= i when causal):  P[j] = softmax_j(scale · q[b,h,i] · k[b,h/G,j]) and
// mass[b,h,r,c] = sum_{j : key_class[b,j] = c} P[j].  Empty slots (query_rows = -1) and rows that see no
// key get mass 0 and lse = -inf.  The backward gives dq of the selected rows and dk of every key.
//
// Plain C++ interface (no torch types): raw pointers to contiguous tensors, a stream, a cudaError_t.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace abft {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Per-class sums live in registers, two per lane of a warp.
constexpr int kMaxNumClasses = 64;

// Head dims with compiled kernels; others are rejected with cudaErrorInvalidValue.
constexpr int kSupportedHeadDims[] = {64, 128};

constexpr bool head_dim_supported(int head_dim) {
  for (int supported : kSupportedHeadDims) {
    if (supported == head_dim) return true;
  }
  return false;
}

struct RowMassProblem {
  const void* q;                  // [B, Hq, N, D] of dtype, contiguous, 16-byte aligned
  const void* k;                  // [B, Hkv, N, D] of dtype, contiguous, 16-byte aligned
  const int64_t* query_rows;      // [B, R]: a row in [0, N) or -1 (empty slot)
  const int64_t* key_class;       // [B, N]: a class in [0, num_classes) or -1 (not a label)
  const bool* key_padding_mask;   // [B, N], true = real key; nullptr = no padding
  int batch;
  int num_q_heads;
  int num_kv_heads;               // divides num_q_heads (GQA: q head h reads kv head h / (Hq / Hkv))
  int seq_len;
  int head_dim;
  int num_rows;
  int num_classes;                // 1 .. kMaxNumClasses
  bool causal;
  float scale;
  DType dtype;
};

// mass: float [B, Hq, R, C]; lse: float [B, Hq, R] (log-sum-exp of the row's visible scores).
cudaError_t row_mass_forward(const RowMassProblem& problem, float* mass, float* lse, cudaStream_t stream);

// grad_mass, mass: float [B, Hq, R, C]; lse: float [B, Hq, R] from the forward.
// delta: float [B, Hq, R] workspace (sum_c grad_mass · mass per row).
// grad_q_rows: float [B, Hq, R, D], the gradient of each slot's q row (the caller adds slots that
// share a row); grad_k: [B, Hkv, N, D] of dtype, every element written.
cudaError_t row_mass_backward(const RowMassProblem& problem, const float* grad_mass, const float* mass,
                              const float* lse, float* delta, float* grad_q_rows, void* grad_k,
                              cudaStream_t stream);

}  // namespace abft

// Backward of the row masses. With G = dL/dmass, P the row's softmax (recomputed from the saved lse)
// and delta = sum_c G[c] · mass[c]:  dS[j] = P[j] · (G[class(j)] - delta)  (G[-1] = 0),
// dq_row = scale · sum_j dS[j] · k[j],  dk[j] = scale · sum over rows and GQA heads of dS[j] · q_row.
//
// Two kernels, neither with atomics, so results are deterministic:
// * grad_q: one warp per (batch, q head, slot), like the forward; it owns its row's dq and delta.
// * grad_k: each warp owns a few keys and loops over every (head of the GQA group, slot) in a fixed
//   order, keeping dk in registers and writing it once. Reading the R selected q rows per key costs
//   O(Hq · R · N · D) in all, the same as the forward, and avoids a per-row partial buffer.
#include <cmath>

#include "row_mass_common.cuh"

namespace abft {
namespace detail {
namespace {

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
row_mass_grad_q_kernel(RowMassProblem p, const float* grad_mass, const float* mass, const float* lse,
                       float* delta, float* grad_q_rows) {
  using Layout = RowLayout<T, kHeadDim>;
  constexpr int kLanesPerKey = Layout::kLanesPerKey;
  constexpr int kKeysPerWarp = Layout::kKeysPerWarp;

  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (item >= static_cast<int64_t>(p.batch) * p.num_q_heads * p.num_rows) return;  // whole warp
  const int lane = threadIdx.x % kWarpSize;
  const int group = lane / kLanesPerKey;
  const int sub = lane % kLanesPerKey;
  const RowItem<T, kHeadDim> r(p, item);
  const float* row_grad_mass = grad_mass + item * p.num_classes;
  const float* row_mass = mass + item * p.num_classes;

  float partial_delta = 0.f;
  for (int label = lane; label < p.num_classes; label += kWarpSize) {
    partial_delta = fmaf(row_grad_mass[label], row_mass[label], partial_delta);
  }
  const float row_delta = group_sum<kWarpSize>(partial_delta);
  if (lane == 0) delta[item] = row_delta;

  const float row_lse = lse[item];
  float dq[Layout::kElemsPerLane] = {};
  if (r.row >= 0 && row_lse != -INFINITY) {
    float q_frag[Layout::kElemsPerLane];
    Layout::load(r.q_row, sub, q_frag);
    for (int first_key = 0; first_key < r.key_end; first_key += kKeysPerWarp) {
      const int key = first_key + group;
      float k_frag[Layout::kElemsPerLane] = {};
      if (key < r.key_end) Layout::load(r.keys + static_cast<int64_t>(key) * kHeadDim, sub, k_frag);
      const float key_dot = group_sum<kLanesPerKey>(dot(q_frag, k_frag));
      if (key < r.key_end && (r.key_real == nullptr || r.key_real[key])) {
        const int label = static_cast<int>(r.key_class[key]);
        const float grad_prob = label >= 0 ? row_grad_mass[label] : 0.f;
        const float grad_score = expf(key_dot * p.scale - row_lse) * (grad_prob - row_delta);
#pragma unroll
        for (int e = 0; e < Layout::kElemsPerLane; ++e) dq[e] = fmaf(grad_score, k_frag[e], dq[e]);
      }
    }
    // Lanes with the same `sub` in the kKeysPerWarp groups hold the same elements: add them up.
#pragma unroll
    for (int offset = kLanesPerKey; offset < kWarpSize; offset *= 2) {
#pragma unroll
      for (int e = 0; e < Layout::kElemsPerLane; ++e) dq[e] += __shfl_xor_sync(kFullMask, dq[e], offset);
    }
  }
  if (group == 0) {
    float* out = grad_q_rows + item * kHeadDim;
#pragma unroll
    for (int e = 0; e < Layout::kElemsPerLane; ++e) out[Layout::element_offset(sub, e)] = p.scale * dq[e];
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
row_mass_grad_k_kernel(RowMassProblem p, const float* grad_mass, const float* lse, const float* delta, T* grad_k,
                       int key_blocks_per_head) {
  using Layout = RowLayout<T, kHeadDim>;
  constexpr int kLanesPerKey = Layout::kLanesPerKey;
  constexpr int kKeysPerBlock = kWarpsPerBlock * Layout::kKeysPerWarp;

  const int lane = threadIdx.x % kWarpSize;
  const int group = lane / kLanesPerKey;
  const int sub = lane % kLanesPerKey;
  const int key_block = static_cast<int>(blockIdx.x % key_blocks_per_head);
  const int kv_head = static_cast<int>((blockIdx.x / key_blocks_per_head) % p.num_kv_heads);
  const int batch = static_cast<int>(blockIdx.x / (static_cast<int64_t>(key_blocks_per_head) * p.num_kv_heads));
  const int key = key_block * kKeysPerBlock + (threadIdx.x / kWarpSize) * Layout::kKeysPerWarp + group;
  const bool key_in_range = key < p.seq_len;
  const int64_t batch_key = static_cast<int64_t>(batch) * p.seq_len + key;
  const bool key_real = key_in_range && (p.key_padding_mask == nullptr || p.key_padding_mask[batch_key]);
  const int label = key_in_range ? static_cast<int>(p.key_class[batch_key]) : -1;
  const int64_t key_offset = ((static_cast<int64_t>(batch) * p.num_kv_heads + kv_head) * p.seq_len + key) * kHeadDim;

  float k_frag[Layout::kElemsPerLane] = {};
  if (key_in_range) Layout::load(static_cast<const T*>(p.k) + key_offset, sub, k_frag);
  float dk[Layout::kElemsPerLane] = {};
  const int group_size = p.num_q_heads / p.num_kv_heads;
  for (int head = kv_head * group_size; head < (kv_head + 1) * group_size; ++head) {
    for (int slot = 0; slot < p.num_rows; ++slot) {
      const int64_t item = (static_cast<int64_t>(batch) * p.num_q_heads + head) * p.num_rows + slot;
      const int64_t row = p.query_rows[static_cast<int64_t>(batch) * p.num_rows + slot];
      const float row_lse = lse[item];  // -inf for empty slots and rows that see no key
      const bool visible = key_real && row >= 0 && row_lse != -INFINITY && (!p.causal || key <= row);
      if (!__any_sync(kFullMask, visible)) continue;  // the same on every lane: skip the row
      float q_frag[Layout::kElemsPerLane];
      Layout::load(static_cast<const T*>(p.q) +
                       ((static_cast<int64_t>(batch) * p.num_q_heads + head) * p.seq_len + row) * kHeadDim,
                   sub, q_frag);
      const float key_dot = group_sum<kLanesPerKey>(dot(q_frag, k_frag));
      if (visible) {
        const float grad_prob = label >= 0 ? grad_mass[item * p.num_classes + label] : 0.f;
        const float grad_score = expf(key_dot * p.scale - row_lse) * (grad_prob - delta[item]);
#pragma unroll
        for (int e = 0; e < Layout::kElemsPerLane; ++e) dk[e] = fmaf(grad_score, q_frag[e], dk[e]);
      }
    }
  }
  if (key_in_range) {
#pragma unroll
    for (int e = 0; e < Layout::kElemsPerLane; ++e) dk[e] *= p.scale;
    Layout::store(grad_k + key_offset, sub, dk);
  }
}

}  // namespace
}  // namespace detail

cudaError_t row_mass_backward(const RowMassProblem& problem, const float* grad_mass, const float* mass,
                              const float* lse, float* delta, float* grad_q_rows, void* grad_k,
                              cudaStream_t stream) {
  using namespace detail;
  const int64_t num_items = static_cast<int64_t>(problem.batch) * problem.num_q_heads * problem.num_rows;
  if (num_items == 0) return cudaSuccess;
  const unsigned row_blocks = static_cast<unsigned>((num_items + kWarpsPerBlock - 1) / kWarpsPerBlock);
  return dispatch(problem, [&](auto config) {
    using Config = decltype(config);
    using T = typename Config::Elem;
    constexpr int kKeysPerBlock = kWarpsPerBlock * RowLayout<T, Config::kDim>::kKeysPerWarp;
    const int key_blocks_per_head = (problem.seq_len + kKeysPerBlock - 1) / kKeysPerBlock;
    const unsigned key_blocks =
        static_cast<unsigned>(static_cast<int64_t>(problem.batch) * problem.num_kv_heads * key_blocks_per_head);
    row_mass_grad_q_kernel<T, Config::kDim><<<row_blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
        problem, grad_mass, mass, lse, delta, grad_q_rows);
    // grad_k reads delta, written by grad_q: the stream orders them.
    row_mass_grad_k_kernel<T, Config::kDim><<<key_blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(
        problem, grad_mass, lse, delta, static_cast<T*>(grad_k), key_blocks_per_head);
  });
}

}  // namespace abft

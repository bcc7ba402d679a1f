// Forward of the row masses: one warp per (batch, q head, selected row), one pass over the keys.
#include <cmath>

#include "row_mass_common.cuh"

namespace abft {
namespace detail {
namespace {

// The warp walks the row's keys in tiles of 32. Scores are computed kKeysPerWarp keys at a time (one
// key per lane group, 16-byte loads) and handed so that lane l holds the score of key tile + l; then
// the online softmax folds the tile into a running max, sum and per-class sums (lane l keeps classes
// l and l + 32), all rescaled when the max grows.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
row_mass_forward_kernel(RowMassProblem p, float* mass, float* lse) {
  using Layout = RowLayout<T, kHeadDim>;
  constexpr int kLanesPerKey = Layout::kLanesPerKey;
  constexpr int kKeysPerWarp = Layout::kKeysPerWarp;

  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (item >= static_cast<int64_t>(p.batch) * p.num_q_heads * p.num_rows) return;  // whole warp
  const int lane = threadIdx.x % kWarpSize;
  const int group = lane / kLanesPerKey;
  const int sub = lane % kLanesPerKey;
  const RowItem<T, kHeadDim> r(p, item);

  float running_max = -INFINITY;
  float running_sum = 0.f;
  float class_sum[kClassesPerLane] = {};
  if (r.row >= 0) {
    float q_frag[Layout::kElemsPerLane];
    Layout::load(r.q_row, sub, q_frag);
    for (int tile = 0; tile < r.key_end; tile += kWarpSize) {
      // Step s: group g scores key tile + s * kKeysPerWarp + g; lane l = s * kKeysPerWarp + g takes it.
      float my_dot = 0.f;
      for (int step = 0; step < kWarpSize / kKeysPerWarp; ++step) {
        const int key = tile + step * kKeysPerWarp + group;
        float partial = 0.f;
        if (key < r.key_end) {
          float k_frag[Layout::kElemsPerLane];
          Layout::load(r.keys + static_cast<int64_t>(key) * kHeadDim, sub, k_frag);
          partial = dot(q_frag, k_frag);
        }
        const float key_dot = __shfl_sync(kFullMask, group_sum<kLanesPerKey>(partial),
                                          (lane % kKeysPerWarp) * kLanesPerKey);
        if (lane / kKeysPerWarp == step) my_dot = key_dot;
      }
      const int key = tile + lane;
      const bool visible = key < r.key_end && (r.key_real == nullptr || r.key_real[key]);
      const float score = visible ? my_dot * p.scale : -INFINITY;
      const float new_max = fmaxf(running_max, warp_max(score));
      if (new_max == -INFINITY) continue;  // nothing visible so far (same on every lane)
      const float rescale = expf(running_max - new_max);
      const float prob = visible ? expf(score - new_max) : 0.f;
      running_sum = running_sum * rescale + group_sum<kWarpSize>(prob);
#pragma unroll
      for (int i = 0; i < kClassesPerLane; ++i) class_sum[i] *= rescale;
      // Add the labelled keys' probabilities in lane order: deterministic, cost ∝ labelled keys.
      const int key_label = visible ? static_cast<int>(r.key_class[key]) : -1;
      unsigned labelled = __ballot_sync(kFullMask, key_label >= 0);
      while (labelled != 0) {
        const int source = __ffs(labelled) - 1;
        labelled &= labelled - 1;
        const int label = __shfl_sync(kFullMask, key_label, source);
        const float label_prob = __shfl_sync(kFullMask, prob, source);
#pragma unroll
        for (int i = 0; i < kClassesPerLane; ++i) {
          if (label == lane + i * kWarpSize) class_sum[i] += label_prob;
        }
      }
      running_max = new_max;
    }
  }

  const bool sees_a_key = running_sum > 0.f;
  float* row_mass = mass + item * p.num_classes;
#pragma unroll
  for (int i = 0; i < kClassesPerLane; ++i) {
    const int label = lane + i * kWarpSize;
    if (label < p.num_classes) row_mass[label] = sees_a_key ? class_sum[i] / running_sum : 0.f;
  }
  if (lane == 0) lse[item] = sees_a_key ? running_max + logf(running_sum) : -INFINITY;
}

}  // namespace
}  // namespace detail

cudaError_t row_mass_forward(const RowMassProblem& problem, float* mass, float* lse, cudaStream_t stream) {
  using namespace detail;
  const int64_t num_items = static_cast<int64_t>(problem.batch) * problem.num_q_heads * problem.num_rows;
  if (num_items == 0) return cudaSuccess;
  const unsigned num_blocks = static_cast<unsigned>((num_items + kWarpsPerBlock - 1) / kWarpsPerBlock);
  return dispatch(problem, [&](auto config) {
    using Config = decltype(config);
    row_mass_forward_kernel<typename Config::Elem, Config::kDim>
        <<<num_blocks, kWarpsPerBlock * kWarpSize, 0, stream>>>(problem, mass, lse);
  });
}

}  // namespace abft

// Device helpers shared by the row-mass kernels: 16-byte vector loads, the lane layout of a head-dim
// row across a warp, warp reductions, and the dtype / head-dim dispatch.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "row_mass.h"

namespace abft {
namespace detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;
constexpr int kClassesPerLane = kMaxNumClasses / kWarpSize;
static_assert(kMaxNumClasses % kWarpSize == 0, "class sums are spread evenly over the lanes");

// One 16-byte load or store of T, converted to or from float.
template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int kSize = 4;
  __device__ static void load(const float* src, float* dst) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
  }
  __device__ static void store(float* dst, const float* src) {
    *reinterpret_cast<float4*>(dst) = make_float4(src[0], src[1], src[2], src[3]);
  }
};

__device__ inline float2 to_float2(__half2 x) { return __half22float2(x); }
__device__ inline float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
__device__ inline void from_floats(float a, float b, __half2* out) { *out = __floats2half2_rn(a, b); }
__device__ inline void from_floats(float a, float b, __nv_bfloat162* out) { *out = __floats2bfloat162_rn(a, b); }

// fp16 and bf16: 8 elements, read as 4 pairs.
template <typename Half, typename Half2>
struct Vec16Of16Bit {
  static constexpr int kSize = 8;
  union Raw {
    uint4 bits;
    Half2 pairs[4];
  };
  __device__ static void load(const Half* src, float* dst) {
    Raw raw;
    raw.bits = *reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 pair = to_float2(raw.pairs[i]);
      dst[2 * i] = pair.x;
      dst[2 * i + 1] = pair.y;
    }
  }
  __device__ static void store(Half* dst, const float* src) {
    Raw raw;
#pragma unroll
    for (int i = 0; i < 4; ++i) from_floats(src[2 * i], src[2 * i + 1], &raw.pairs[i]);
    *reinterpret_cast<uint4*>(dst) = raw.bits;
  }
};

template <>
struct Vec16<__half> : Vec16Of16Bit<__half, __half2> {};
template <>
struct Vec16<__nv_bfloat16> : Vec16Of16Bit<__nv_bfloat16, __nv_bfloat162> {};

constexpr int largest_power_of_two_dividing(int n, int limit) {
  int p = 1;
  while (p < limit && n % (2 * p) == 0) p *= 2;
  return p;
}

// How a warp holds head-dim rows: a group of kLanesPerKey consecutive lanes holds one row, lane `sub`
// of the group holding the 16-byte vectors sub, sub + kLanesPerKey, ... (so a group's loads of a row
// are contiguous); the warp's kKeysPerWarp groups hold kKeysPerWarp different keys at a time.
template <typename T, int kHeadDim>
struct RowLayout {
  static constexpr int kVec = Vec16<T>::kSize;
  static_assert(kHeadDim % kVec == 0, "a head-dim row is a whole number of 16-byte vectors");
  static constexpr int kVecsPerRow = kHeadDim / kVec;
  static constexpr int kLanesPerKey = largest_power_of_two_dividing(kVecsPerRow, kWarpSize);
  static constexpr int kVecsPerLane = kVecsPerRow / kLanesPerKey;
  static constexpr int kKeysPerWarp = kWarpSize / kLanesPerKey;
  static constexpr int kElemsPerLane = kVecsPerLane * kVec;

  // Element offset in the row of this lane's element e (0 <= e < kElemsPerLane).
  __device__ static int element_offset(int sub, int e) {
    return ((e / kVec) * kLanesPerKey + sub) * kVec + e % kVec;
  }

  __device__ static void load(const T* row, int sub, float (&frag)[kElemsPerLane]) {
#pragma unroll
    for (int v = 0; v < kVecsPerLane; ++v) Vec16<T>::load(row + (v * kLanesPerKey + sub) * kVec, frag + v * kVec);
  }

  __device__ static void store(T* row, int sub, const float (&frag)[kElemsPerLane]) {
#pragma unroll
    for (int v = 0; v < kVecsPerLane; ++v) Vec16<T>::store(row + (v * kLanesPerKey + sub) * kVec, frag + v * kVec);
  }
};

template <int kElems>
__device__ inline float dot(const float (&a)[kElems], const float (&b)[kElems]) {
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < kElems; ++e) sum = fmaf(a[e], b[e], sum);
  return sum;
}

// Sum over each aligned group of kLanes lanes; every lane of the group gets the same bits.
template <int kLanes>
__device__ inline float group_sum(float x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ inline float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// The keys [0, key_end) that row `row` can see, before padding.
__device__ inline int key_end_of_row(int64_t row, int seq_len, bool causal) {
  return causal ? static_cast<int>(row) + 1 : seq_len;
}

// What a warp of the forward or grad_q kernel works on: one (batch, q head, slot) item, the row it
// selects (-1 = empty slot) and pointers to that row's query and to its batch's keys and metadata.
template <typename T, int kHeadDim>
struct RowItem {
  int64_t item;
  int batch, head, kv_head, slot;
  int64_t row;
  const T* q_row;              // valid when row >= 0
  const T* keys;               // [seq_len, kHeadDim] of the row's KV head
  const int64_t* key_class;    // [seq_len]
  const bool* key_real;        // [seq_len], or nullptr when nothing is padded
  int key_end;                 // keys [0, key_end) can be visible (causality)

  __device__ RowItem(const RowMassProblem& p, int64_t warp_item) : item(warp_item) {
    slot = static_cast<int>(item % p.num_rows);
    head = static_cast<int>((item / p.num_rows) % p.num_q_heads);
    batch = static_cast<int>(item / (static_cast<int64_t>(p.num_rows) * p.num_q_heads));
    kv_head = head / (p.num_q_heads / p.num_kv_heads);
    row = p.query_rows[static_cast<int64_t>(batch) * p.num_rows + slot];
    const int64_t batch_offset = static_cast<int64_t>(batch) * p.seq_len;
    q_row = row < 0 ? nullptr
                    : static_cast<const T*>(p.q) +
                          ((static_cast<int64_t>(batch) * p.num_q_heads + head) * p.seq_len + row) * kHeadDim;
    keys = static_cast<const T*>(p.k) +
           (static_cast<int64_t>(batch) * p.num_kv_heads + kv_head) * p.seq_len * kHeadDim;
    key_class = p.key_class + batch_offset;
    key_real = p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + batch_offset;
    key_end = row < 0 ? 0 : key_end_of_row(row, p.seq_len, p.causal);
  }
};

template <typename T, int kHeadDim>
struct KernelConfig {
  using Elem = T;
  static constexpr int kDim = kHeadDim;
};

template <typename T, typename Launch>
cudaError_t dispatch_head_dim(int head_dim, Launch launch) {
  static_assert(sizeof(kSupportedHeadDims) / sizeof(int) == 2, "keep this switch in sync with row_mass.h");
  switch (head_dim) {
    case 64: launch(KernelConfig<T, 64>{}); break;
    case 128: launch(KernelConfig<T, 128>{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Calls launch(KernelConfig<T, D>{}) for the problem's dtype and head dim.
template <typename Launch>
cudaError_t dispatch(const RowMassProblem& problem, Launch launch) {
  if (problem.num_classes < 1 || problem.num_classes > kMaxNumClasses) return cudaErrorInvalidValue;
  switch (problem.dtype) {
    case DType::kFloat32: return dispatch_head_dim<float>(problem.head_dim, launch);
    case DType::kFloat16: return dispatch_head_dim<__half>(problem.head_dim, launch);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(problem.head_dim, launch);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace abft

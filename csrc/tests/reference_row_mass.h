// CPU reference of the row masses and their gradient, in double and plain C++ (no CUDA, no torch).
// test_row_mass.cpp checks the CUDA kernels against it on a GPU machine; tests/test_cuda_extension.py
// checks it against abft_kernels' own reference (through ctypes), so the chain holds without a GPU.
//
// Layouts as in row_mass.h: q [B, Hq, N, D], k [B, Hkv, N, D], query_rows [B, R] (-1 = empty slot),
// key_class [B, N] (-1 = not a label), key_padding_mask [B, N] (1 = real key) or null.
#pragma once

#include <cstdint>

extern "C" {

// mass: [B, Hq, R, C].
void reference_row_mass_forward(const float* q, const float* k, const int64_t* query_rows, const int64_t* key_class,
                                const uint8_t* key_padding_mask, int batch, int num_q_heads, int num_kv_heads,
                                int seq_len, int head_dim, int num_rows, int num_classes, int causal, double scale,
                                double* mass);

// grad_mass: [B, Hq, R, C]. grad_q: [B, Hq, N, D] (slots sharing a row add up); grad_k: [B, Hkv, N, D].
void reference_row_mass_backward(const float* q, const float* k, const int64_t* query_rows, const int64_t* key_class,
                                 const uint8_t* key_padding_mask, int batch, int num_q_heads, int num_kv_heads,
                                 int seq_len, int head_dim, int num_rows, int num_classes, int causal, double scale,
                                 const double* grad_mass, double* grad_q, double* grad_k);
}

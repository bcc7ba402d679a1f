// Straightforward loops over (batch, head, slot, key); see reference_row_mass.h.
#include "reference_row_mass.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Problem {
  const float* q;
  const float* k;
  const int64_t* query_rows;
  const int64_t* key_class;
  const uint8_t* key_padding_mask;
  int batch, num_q_heads, num_kv_heads, seq_len, head_dim, num_rows, num_classes;
  bool causal;
  double scale;

  const float* q_row(int b, int h, int64_t row) const {
    return q + ((static_cast<int64_t>(b) * num_q_heads + h) * seq_len + row) * head_dim;
  }
  const float* k_row(int b, int h, int key) const {
    const int kv_head = h / (num_q_heads / num_kv_heads);
    return k + ((static_cast<int64_t>(b) * num_kv_heads + kv_head) * seq_len + key) * head_dim;
  }
  bool visible(int b, int64_t row, int key) const {
    return (!causal || key <= row) &&
           (key_padding_mask == nullptr || key_padding_mask[static_cast<int64_t>(b) * seq_len + key] != 0);
  }
  int64_t key_label(int b, int key) const { return key_class[static_cast<int64_t>(b) * seq_len + key]; }
};

// Softmax of row `row` (>= 0) of head h over the keys it sees; all zero if it sees none.
std::vector<double> row_probs(const Problem& p, int b, int h, int64_t row) {
  std::vector<double> probs(p.seq_len, 0.0);
  std::vector<double> scores(p.seq_len, -INFINITY);
  double max_score = -INFINITY;
  for (int key = 0; key < p.seq_len; ++key) {
    if (!p.visible(b, row, key)) continue;
    double dot = 0.0;
    for (int d = 0; d < p.head_dim; ++d) dot += static_cast<double>(p.q_row(b, h, row)[d]) * p.k_row(b, h, key)[d];
    scores[key] = p.scale * dot;
    max_score = std::max(max_score, scores[key]);
  }
  if (max_score == -INFINITY) return probs;
  double sum = 0.0;
  for (int key = 0; key < p.seq_len; ++key) {
    if (scores[key] == -INFINITY) continue;
    probs[key] = std::exp(scores[key] - max_score);
    sum += probs[key];
  }
  for (double& prob : probs) prob /= sum;
  return probs;
}

std::vector<double> class_masses(const Problem& p, int b, const std::vector<double>& probs) {
  std::vector<double> masses(p.num_classes, 0.0);
  for (int key = 0; key < p.seq_len; ++key) {
    if (p.key_label(b, key) >= 0) masses[p.key_label(b, key)] += probs[key];
  }
  return masses;
}

}  // namespace

extern "C" {

void reference_row_mass_forward(const float* q, const float* k, const int64_t* query_rows, const int64_t* key_class,
                                const uint8_t* key_padding_mask, int batch, int num_q_heads, int num_kv_heads,
                                int seq_len, int head_dim, int num_rows, int num_classes, int causal, double scale,
                                double* mass) {
  const Problem p{q, k, query_rows, key_class, key_padding_mask, batch, num_q_heads, num_kv_heads,
                  seq_len, head_dim, num_rows, num_classes, causal != 0, scale};
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < num_q_heads; ++h) {
      for (int slot = 0; slot < num_rows; ++slot) {
        double* out = mass + ((static_cast<int64_t>(b) * num_q_heads + h) * num_rows + slot) * num_classes;
        const int64_t row = query_rows[static_cast<int64_t>(b) * num_rows + slot];
        std::fill(out, out + num_classes, 0.0);
        if (row < 0) continue;
        const std::vector<double> masses = class_masses(p, b, row_probs(p, b, h, row));
        std::copy(masses.begin(), masses.end(), out);
      }
    }
  }
}

void reference_row_mass_backward(const float* q, const float* k, const int64_t* query_rows, const int64_t* key_class,
                                 const uint8_t* key_padding_mask, int batch, int num_q_heads, int num_kv_heads,
                                 int seq_len, int head_dim, int num_rows, int num_classes, int causal, double scale,
                                 const double* grad_mass, double* grad_q, double* grad_k) {
  const Problem p{q, k, query_rows, key_class, key_padding_mask, batch, num_q_heads, num_kv_heads,
                  seq_len, head_dim, num_rows, num_classes, causal != 0, scale};
  std::fill(grad_q, grad_q + static_cast<int64_t>(batch) * num_q_heads * seq_len * head_dim, 0.0);
  std::fill(grad_k, grad_k + static_cast<int64_t>(batch) * num_kv_heads * seq_len * head_dim, 0.0);
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < num_q_heads; ++h) {
      const int kv_head = h / (num_q_heads / num_kv_heads);
      for (int slot = 0; slot < num_rows; ++slot) {
        const int64_t row = query_rows[static_cast<int64_t>(b) * num_rows + slot];
        if (row < 0) continue;
        const double* grad = grad_mass + ((static_cast<int64_t>(b) * num_q_heads + h) * num_rows + slot) * num_classes;
        const std::vector<double> probs = row_probs(p, b, h, row);
        const std::vector<double> masses = class_masses(p, b, probs);
        double delta = 0.0;
        for (int c = 0; c < num_classes; ++c) delta += grad[c] * masses[c];
        double* dq = grad_q + ((static_cast<int64_t>(b) * num_q_heads + h) * seq_len + row) * head_dim;
        for (int key = 0; key < seq_len; ++key) {
          if (probs[key] == 0.0) continue;
          const int64_t label = p.key_label(b, key);
          const double grad_score = probs[key] * ((label >= 0 ? grad[label] : 0.0) - delta);
          double* dk = grad_k + ((static_cast<int64_t>(b) * num_kv_heads + kv_head) * seq_len + key) * head_dim;
          for (int d = 0; d < head_dim; ++d) {
            dq[d] += scale * grad_score * p.k_row(b, h, key)[d];
            dk[d] += scale * grad_score * p.q_row(b, h, row)[d];
          }
        }
      }
    }
  }
}

}  // extern "C"

// Fused cross-entropy (CUDA twin of fastrob/triton/cross_entropy.py). Torch-free device code.
//
// Per row b of logits z [B, C] (row-major) with label y and smoothing e,
// q = (1 - e) onehot(y) + e / C, p = exp(z - lse):
//   forward:          lse = logsumexp(z) (online, one pass), loss = lse - (1 - e) z_y - (e / C) sum z
//   backward:         dz = p (gl + gs) - q gl          (gs = dL/dlse, nullptr meaning 0)
//   double backward:  for V = dL/d(dz), s = gl + gs:
//                     d_z = s p (V - p.V),  d_gl = p.V - q.V,  d_gs = p.V
// Per-row values are float32; dz and d_z are rounded to the storage type once.
#pragma once

#include "kernels/common.cuh"

namespace fastrob {

struct CrossEntropyRow {
  const int64_t* target;
  float smoothing;
  int64_t cols;
};

__device__ __forceinline__ float cross_entropy_target(const CrossEntropyRow& r, int64_t col, int64_t y) {
  return (col == y ? 1.f - r.smoothing : 0.f) + r.smoothing / static_cast<float>(r.cols);
}

// One block per row: each thread keeps an online (max, sum of exp) over its columns, then the
// block combines them: max first, each thread rescales its sum to it, then one block sum.
template <typename T>
__global__ void cross_entropy_forward_kernel(const T* __restrict__ z, CrossEntropyRow r, float* __restrict__ loss,
                                             float* __restrict__ lse) {
  __shared__ float scratch[64];
  const int64_t b = blockIdx.x;
  const T* row = z + b * r.cols;
  float m = -INFINITY, s = 0.f, total = 0.f;
  for (int64_t j = threadIdx.x; j < r.cols; j += blockDim.x) {
    const float x = to_float(row[j]);
    if (x > m) {
      s = s * __expf(m - x) + 1.f;  // exp(-inf) = 0 on the first column
      m = x;
    } else if (x != -INFINITY) {
      // x <= m; a -inf column adds exp(-inf) = 0, and skipping it avoids __expf(-inf - -inf) = NaN
      // while this thread's m is still -inf (a row of masked logits)
      s += __expf(x - m);
    }
    total += x;
  }
  const float m_row = block_max(m, scratch);
  float sums[2] = {m == -INFINITY ? 0.f : s * __expf(m - m_row), total};
  block_sum(sums, scratch);
  if (threadIdx.x == 0) {
    const float l = m_row + __logf(sums[0]);
    const float z_y = to_float(row[r.target[b]]);
    lse[b] = l;
    // without smoothing the sum of the logits is not part of the loss: 0 * (-inf) would be NaN
    const float smooth = r.smoothing > 0.f ? r.smoothing / static_cast<float>(r.cols) * sums[1] : 0.f;
    loss[b] = l - (1.f - r.smoothing) * z_y - smooth;
  }
}

// Elementwise over all rows * cols elements.
template <typename T>
__global__ void cross_entropy_backward_kernel(const T* __restrict__ z, CrossEntropyRow r, const float* __restrict__ lse,
                                              const float* __restrict__ gl, const float* __restrict__ gs,
                                              T* __restrict__ dz, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t b = i / r.cols, col = i % r.cols;
  const float g = gl[b], scale = gs ? g + gs[b] : g;
  const float p = __expf(to_float(z[i]) - lse[b]);
  dz[i] = from_float<T>(p * scale - cross_entropy_target(r, col, r.target[b]) * g);
}

// One block per row, two passes: p.V and sum V, then d_z (which needs p.V).
template <typename T>
__global__ void cross_entropy_double_backward_kernel(const T* __restrict__ z, CrossEntropyRow r,
                                                     const float* __restrict__ lse, const float* __restrict__ gl,
                                                     const float* __restrict__ gs, const T* __restrict__ v,
                                                     T* __restrict__ d_z, float* __restrict__ d_gl,
                                                     float* __restrict__ d_gs) {
  __shared__ float scratch[64];
  const int64_t b = blockIdx.x, base = b * r.cols;
  const float l = lse[b], scale = gs ? gl[b] + gs[b] : gl[b];
  float sums[2] = {0.f, 0.f};  // p.V, sum V
  for (int64_t j = threadIdx.x; j < r.cols; j += blockDim.x) {
    const float vj = to_float(v[base + j]);
    sums[0] += __expf(to_float(z[base + j]) - l) * vj;
    sums[1] += vj;
  }
  block_sum(sums, scratch);
  const float p_dot_v = sums[0];
  for (int64_t j = threadIdx.x; j < r.cols; j += blockDim.x) {
    const float p = __expf(to_float(z[base + j]) - l);
    d_z[base + j] = from_float<T>(scale * p * (to_float(v[base + j]) - p_dot_v));
  }
  if (threadIdx.x == 0) {
    const float q_dot_v = (1.f - r.smoothing) * to_float(v[base + r.target[b]]) +
                          r.smoothing / static_cast<float>(r.cols) * sums[1];
    d_gl[b] = p_dot_v - q_dot_v;
    d_gs[b] = p_dot_v;
  }
}

}  // namespace fastrob

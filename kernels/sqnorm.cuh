// The squared-norm reduction of gradient penalties (CUDA twin of fastrob/triton/sqnorm.py).
// Torch-free device code. For g as [rows, cols] (row-major) and per-row incoming gradients go:
//   forward:          s[m]    = sum_n g[m, n]^2
//   backward:         dg      = 2 * go[m] * g
//   double backward:  for V = dL/d(dg):  d_g = 2 * go[m] * V,  d_go[m] = 2 * sum_n g[m, n] V[m, n]
// Sums accumulate in float32 and per-row results are float32; elementwise results are rounded to
// the storage type once.
#pragma once

#include "kernels/common.cuh"

namespace fastrob {

// One block per row.
template <typename T>
__global__ void sqnorm_forward_kernel(const T* __restrict__ g, float* __restrict__ out, int64_t cols) {
  __shared__ float scratch[32];
  const T* row = g + static_cast<int64_t>(blockIdx.x) * cols;
  float acc[1] = {0.f};
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float v = to_float(row[j]);
    acc[0] += v * v;
  }
  block_sum(acc, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = acc[0];
}

// Elementwise over all rows * cols elements.
template <typename T>
__global__ void sqnorm_backward_kernel(const T* __restrict__ g, const float* __restrict__ go, T* __restrict__ dg,
                                       int64_t n, int64_t cols) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dg[i] = from_float<T>(2.f * go[i / cols] * to_float(g[i]));
}

// One block per row: both outputs from one read of g and V.
template <typename T>
__global__ void sqnorm_double_backward_kernel(const T* __restrict__ g, const float* __restrict__ go,
                                              const T* __restrict__ v, T* __restrict__ d_g,
                                              float* __restrict__ d_go, int64_t cols) {
  __shared__ float scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  const float scale = 2.f * go[blockIdx.x];
  float acc[1] = {0.f};
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float vj = to_float(v[base + j]);
    acc[0] += to_float(g[base + j]) * vj;
    d_g[base + j] = from_float<T>(scale * vj);
  }
  block_sum(acc, scratch);
  if (threadIdx.x == 0) d_go[blockIdx.x] = 2.f * acc[0];
}

}  // namespace fastrob

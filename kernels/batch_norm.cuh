// Fused batch norm with a fused double backward (CUDA twin of fastrob/triton/batch_norm.py).
// Torch-free device code.
//
// x is [N, C, S] stored densely (NCHW: strides (C S, S, 1); channels_last: (S C, 1, C)), M = N S
// elements per channel; r = 1 / sqrt(var + eps) (var biased), xhat = (x - mean) r, w = 1 and b = 0
// when absent. Every pass: a split reduction (grid: channel blocks x row splits; partial sums go
// to part[split][k][c]), a per-channel finalize, and one element-wise pass
// out = k_a a + k_b b + k_xhat xhat + k_1 with per-channel coefficients coef[4 o + j][c].
//   forward:          shifted sums of (x - K), K = the channel's first element; y = w xhat + b
//   backward:         A = sum(gy) / M, B = sum(gy xhat) / M;  gx = w r (gy - A - B xhat),
//                     gw = sum(gy xhat), gb = sum(gy)
//   double backward:  V = dL/d(gx), gw', gb'; Abar = mean(V), Cv = mean(V xhat), D = mean(V gy):
//                     d_gy = w r V + (gw' - w r Cv) xhat + gb' - w r Abar
//                     d_x  = r (gw' - w r Cv) gy - w r^2 B V + [w r^2 (3 B Cv + A Abar - D) - r gw' B] xhat
//                            + r (w r (B Abar + Cv A) - gw' A)
//                     d_w  = r (sum(V gy) - sum(gy) Abar - sum(gy xhat) Cv)
// Arithmetic and per-channel values in float32; element-wise results rounded to T once.
#pragma once

#include "kernels/common.cuh"

namespace fastrob {

constexpr int kBnSums = 5;  // partial sums per split and channel in the scratch buffer

struct BatchNormGeometry {
  int64_t c, s, rows;    // channels, spatial size, rows = N S per channel
  int64_t sn, sc, ss;    // strides of n, c, s in the dense layout
  int64_t chunk;         // rows per split
};

// Reduction: blockDim = (channels per block, row lanes); block (blockIdx.x, blockIdx.y) sums
// the channels of its block over rows [blockIdx.y * chunk, + chunk).
// MODE 0: sum(x - K), sum((x - K)^2); 1: sum(gy), sum(gy xhat); 2: those and sum(V), sum(V xhat), sum(V gy).
template <typename T, int MODE>
__global__ void batch_norm_reduce_kernel(const T* __restrict__ x, const T* __restrict__ gy, const T* __restrict__ v,
                                         const float* __restrict__ mean, const float* __restrict__ invstd,
                                         float* __restrict__ part, BatchNormGeometry g) {
  constexpr int K = MODE == 2 ? 5 : 2;
  extern __shared__ float smem[];  // [K][blockDim.y][blockDim.x]
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c < g.c;
  float acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0.f;
  if (active) {
    const float ref = MODE == 0 ? to_float(x[c * g.sc]) : mean[c];
    const float r = MODE == 0 ? 1.f : invstd[c];
    const int64_t start = static_cast<int64_t>(blockIdx.y) * g.chunk;
    const int64_t end = start + g.chunk < g.rows ? start + g.chunk : g.rows;
    for (int64_t m = start + threadIdx.y; m < end; m += blockDim.y) {
      const int64_t i = (m / g.s) * g.sn + (m % g.s) * g.ss + c * g.sc;
      const float d = to_float(x[i]) - ref;
      if (MODE == 0) {
        acc[0] += d;
        acc[1] += d * d;
      } else {
        const float xhat = d * r, gyi = to_float(gy[i]);
        acc[0] += gyi;
        acc[1] += gyi * xhat;
        if (MODE == 2) {
          const float vi = to_float(v[i]);
          acc[K > 2 ? 2 : 0] += vi;
          acc[K > 3 ? 3 : 0] += vi * xhat;
          acc[K > 4 ? 4 : 0] += vi * gyi;
        }
      }
    }
  }
  const int lanes = blockDim.x * blockDim.y, me = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int k = 0; k < K; ++k) smem[k * lanes + me] = acc[k];
  __syncthreads();
  // tree over row lanes (blockDim.y is a power of two)
  for (int half = blockDim.y / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
#pragma unroll
      for (int k = 0; k < K; ++k) smem[k * lanes + me] += smem[k * lanes + me + half * blockDim.x];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      part[(static_cast<int64_t>(blockIdx.y) * kBnSums + k) * g.c + c] = smem[k * lanes + threadIdx.x];
    }
  }
}

__device__ __forceinline__ float batch_norm_split_sum(const float* part, int k, int64_t c, int64_t channels,
                                                      int splits) {
  float s = 0.f;
  for (int i = 0; i < splits; ++i) s += part[(static_cast<int64_t>(i) * kBnSums + k) * channels + c];
  return s;
}

// Finalizes: one thread per channel.
template <typename T>
__global__ void batch_norm_forward_finalize_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                                   const float* __restrict__ b, const float* __restrict__ part,
                                                   float* __restrict__ coef, float* __restrict__ mean,
                                                   float* __restrict__ invstd, BatchNormGeometry g, int splits,
                                                   float eps) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.c) return;
  const float m = static_cast<float>(g.rows);
  const float d_mean = batch_norm_split_sum(part, 0, c, g.c, splits) / m;
  const float var = fmaxf(batch_norm_split_sum(part, 1, c, g.c, splits) / m - d_mean * d_mean, 0.f);
  mean[c] = to_float(x[c * g.sc]) + d_mean;
  invstd[c] = rsqrtf(var + eps);
  coef[2 * g.c + c] = w ? w[c] : 1.f;
  coef[3 * g.c + c] = b ? b[c] : 0.f;
}

__global__ void batch_norm_backward_finalize_kernel(const float* __restrict__ w, const float* __restrict__ invstd,
                                                    const float* __restrict__ part, float* __restrict__ coef,
                                                    float* __restrict__ gw, float* __restrict__ gb, BatchNormGeometry g,
                                                    int splits) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.c) return;
  const float m = static_cast<float>(g.rows);
  const float s_gy = batch_norm_split_sum(part, 0, c, g.c, splits);
  const float s_gyx = batch_norm_split_sum(part, 1, c, g.c, splits);
  const float wr = (w ? w[c] : 1.f) * invstd[c];
  gb[c] = s_gy;
  gw[c] = s_gyx;
  coef[c] = wr;
  coef[2 * g.c + c] = -wr * s_gyx / m;
  coef[3 * g.c + c] = -wr * s_gy / m;
}

__global__ void batch_norm_double_backward_finalize_kernel(const float* __restrict__ w,
                                                           const float* __restrict__ invstd,
                                                           const float* __restrict__ ggw, const float* __restrict__ ggb,
                                                           const float* __restrict__ part, float* __restrict__ coef,
                                                           float* __restrict__ d_w, BatchNormGeometry g, int splits) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.c) return;
  const int64_t C = g.c;
  const float m = static_cast<float>(g.rows);
  const float s_gy = batch_norm_split_sum(part, 0, c, C, splits), s_gyx = batch_norm_split_sum(part, 1, c, C, splits);
  const float s_v = batch_norm_split_sum(part, 2, c, C, splits), s_vx = batch_norm_split_sum(part, 3, c, C, splits);
  const float s_vgy = batch_norm_split_sum(part, 4, c, C, splits);
  const float a = s_gy / m, b = s_gyx / m, a_bar = s_v / m, cv = s_vx / m, d = s_vgy / m;
  const float r = invstd[c], wr = (w ? w[c] : 1.f) * r, gw1 = ggw[c];
  if (w && d_w) d_w[c] = r * (s_vgy - s_gy * a_bar - s_gyx * cv);
  const float c5 = gw1 - wr * cv;
  coef[c] = r * c5;  // d_x
  coef[C + c] = -wr * r * b;
  coef[2 * C + c] = wr * r * (3.f * b * cv + a * a_bar - d) - r * gw1 * b;
  coef[3 * C + c] = r * (wr * (b * a_bar + cv * a) - gw1 * a);
  coef[4 * C + c] = 0.f;  // d_gy
  coef[5 * C + c] = wr;
  coef[6 * C + c] = c5;
  coef[7 * C + c] = ggb[c] - wr * a_bar;
}

// Element-wise over all elements; flat index i has channel (i / stride_c) % C.
template <typename T>
__global__ void batch_norm_apply_kernel(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                                        const float* __restrict__ mean, const float* __restrict__ invstd,
                                        const float* __restrict__ coef, T* __restrict__ out0, T* __restrict__ out1,
                                        int64_t n, int64_t stride_c, int64_t channels) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t c = (i / stride_c) % channels, C = channels;
  const float xhat = (to_float(x[i]) - mean[c]) * invstd[c];
  float o0 = coef[2 * C + c] * xhat + coef[3 * C + c];
  float o1 = out1 ? coef[6 * C + c] * xhat + coef[7 * C + c] : 0.f;
  if (a) {
    const float ai = to_float(a[i]);
    o0 += coef[c] * ai;
    o1 += coef[4 * C + c] * ai;
  }
  if (b) {
    const float bi = to_float(b[i]);
    o0 += coef[C + c] * bi;
    o1 += coef[5 * C + c] * bi;
  }
  out0[i] = from_float<T>(o0);
  if (out1) out1[i] = from_float<T>(o1);
}

}  // namespace fastrob

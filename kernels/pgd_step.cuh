// The fused PGD step (CUDA twin of fastrob/triton/pgd_step.py). Torch-free device code.
//
// For each sample b (eps_b, alpha_b per sample or shared), with d0 = x_adv - x_orig:
//   Linf: out = clamp(x_orig + clamp(d0 + alpha_b * sign(grad), -eps_b, eps_b), lower, upper)
//   L2:   s = alpha_b / ||grad_b||_2 (0 where the gradient is 0), delta = d0 + s * grad,
//         f = min(1, eps_b / ||delta||_2), out = clamp(x_orig + f * delta, lower, upper)
// All arithmetic is float32; the result is rounded to the storage type once.
#pragma once

#include "kernels/common.cuh"

namespace fastrob {

struct StepParams {
  const float* eps_per_sample;    // [B] or nullptr: then `eps` applies to every sample
  const float* alpha_per_sample;  // [B] or nullptr: then `alpha` applies to every sample
  float eps, alpha, lower, upper;
};

__device__ __forceinline__ float sample_eps(const StepParams& p, int64_t b) {
  return p.eps_per_sample ? p.eps_per_sample[b] : p.eps;
}
__device__ __forceinline__ float sample_alpha(const StepParams& p, int64_t b) {
  return p.alpha_per_sample ? p.alpha_per_sample[b] : p.alpha;
}

__device__ __forceinline__ float clampf(float v, float lo, float hi) { return fminf(fmaxf(v, lo), hi); }

// One thread per VEC elements; `per_sample` is a multiple of VEC, so a pack never straddles samples.
template <typename T, int VEC>
__global__ void pgd_step_linf_kernel(const T* __restrict__ x_adv, const T* __restrict__ grad,
                                     const T* __restrict__ x_orig, T* __restrict__ out, StepParams p,
                                     int64_t n_total, int64_t per_sample) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= n_total) return;
  const int64_t b = i / per_sample;
  const float eps = sample_eps(p, b), alpha = sample_alpha(p, b);
  const Pack<T, VEC> xa = load_pack<T, VEC>(x_adv, i), g = load_pack<T, VEC>(grad, i),
                     xo = load_pack<T, VEC>(x_orig, i);
  Pack<T, VEC> r;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float gk = to_float(g.v[k]), o = to_float(xo.v[k]);
    const float sign = gk > 0.f ? 1.f : (gk < 0.f ? -1.f : 0.f);
    const float delta = clampf(to_float(xa.v[k]) + alpha * sign - o, -eps, eps);
    r.v[k] = from_float<T>(clampf(o + delta, p.lower, p.upper));
  }
  store_pack<T, VEC>(out, i, r);
}

// L2, whole sample in registers: one block per sample, each thread holds ITEMS elements of each
// input, so every input is read from memory exactly once. Used when per_sample <= THREADS * ITEMS.
template <typename T, int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS)
    pgd_step_l2_sample_kernel(const T* __restrict__ x_adv, const T* __restrict__ grad,
                              const T* __restrict__ x_orig, T* __restrict__ out, StepParams p,
                              int64_t per_sample) {
  __shared__ float scratch[96];
  const int64_t b = blockIdx.x, base = b * per_sample;
  float g[ITEMS], d[ITEMS], o[ITEMS];
  float gg[1] = {0.f};
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(k) * THREADS;
    const bool in = j < per_sample;
    g[k] = in ? to_float(grad[base + j]) : 0.f;
    o[k] = in ? to_float(x_orig[base + j]) : 0.f;
    d[k] = in ? to_float(x_adv[base + j]) - o[k] : 0.f;
    gg[0] += g[k] * g[k];
  }
  block_sum(gg, scratch);
  const float s = gg[0] > 0.f ? sample_alpha(p, b) * rsqrtf(gg[0]) : 0.f;
  float dd[1] = {0.f};
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    d[k] += s * g[k];
    dd[0] += d[k] * d[k];
  }
  block_sum(dd, scratch);
  const float eps = sample_eps(p, b), norm = sqrtf(dd[0]);
  const float f = norm > eps ? eps / norm : 1.f;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(k) * THREADS;
    if (j < per_sample) out[base + j] = from_float<T>(clampf(o[k] + f * d[k], p.lower, p.upper));
  }
}

// L2 for samples too large for one block's registers, in two passes over `chunk`-sized pieces.
// Pass 1 writes, per (sample, chunk), the partial sums of g.g, d0.g and d0.d0 to `partials`
// ([B, n_chunks, 3]); pass 2 combines them, using
//   ||d0 + s g||^2 = d0.d0 + 2 s d0.g + s^2 g.g,
// so the delta norm needs no third pass.
template <typename T>
__global__ void pgd_step_l2_partials_kernel(const T* __restrict__ x_adv, const T* __restrict__ grad,
                                            const T* __restrict__ x_orig, float* __restrict__ partials,
                                            int64_t per_sample, int64_t chunk, int64_t n_chunks) {
  __shared__ float scratch[96];
  const int64_t b = blockIdx.x / n_chunks, c = blockIdx.x % n_chunks;
  const int64_t start = c * chunk, stop = min(start + chunk, per_sample), base = b * per_sample;
  float sums[3] = {0.f, 0.f, 0.f};  // g.g, d0.g, d0.d0
  for (int64_t j = start + threadIdx.x; j < stop; j += blockDim.x) {
    const float g = to_float(grad[base + j]), d = to_float(x_adv[base + j]) - to_float(x_orig[base + j]);
    sums[0] += g * g;
    sums[1] += d * g;
    sums[2] += d * d;
  }
  block_sum(sums, scratch);
  if (threadIdx.x < 3) partials[(b * n_chunks + c) * 3 + threadIdx.x] = sums[threadIdx.x];
}

template <typename T>
__global__ void pgd_step_l2_apply_kernel(const T* __restrict__ x_adv, const T* __restrict__ grad,
                                         const T* __restrict__ x_orig, T* __restrict__ out,
                                         const float* __restrict__ partials, StepParams p, int64_t per_sample,
                                         int64_t chunk, int64_t n_chunks) {
  __shared__ float scratch[96];
  const int64_t b = blockIdx.x / n_chunks, c = blockIdx.x % n_chunks;
  float sums[3] = {0.f, 0.f, 0.f};
  for (int64_t k = threadIdx.x; k < n_chunks; k += blockDim.x) {
#pragma unroll
    for (int m = 0; m < 3; ++m) sums[m] += partials[(b * n_chunks + k) * 3 + m];
  }
  block_sum(sums, scratch);
  const float gg = sums[0], dg = sums[1], dd = sums[2];
  const float s = gg > 0.f ? sample_alpha(p, b) * rsqrtf(gg) : 0.f;
  const float norm = sqrtf(fmaxf(dd + 2.f * s * dg + s * s * gg, 0.f)), eps = sample_eps(p, b);
  const float f = norm > eps ? eps / norm : 1.f;
  const int64_t start = c * chunk, stop = min(start + chunk, per_sample), base = b * per_sample;
  for (int64_t j = start + threadIdx.x; j < stop; j += blockDim.x) {
    const float g = to_float(grad[base + j]), o = to_float(x_orig[base + j]);
    const float d = to_float(x_adv[base + j]) - o + s * g;
    out[base + j] = from_float<T>(clampf(o + f * d, p.lower, p.upper));
  }
}

}  // namespace fastrob

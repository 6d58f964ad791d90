// Fused bias + activation (CUDA twin of fastrob/triton/bias_act.py). Torch-free device code.
//
// With u = x + b[c] (c = (i / stride_c) % channels for memory index i; b = 0 without bias):
//   forward:          y = f(u)
//   backward:         dx = dy f'(u)
//   double backward:  for V = dL/d(dx):  d_dy = V f'(u),  d_x = V dy f''(u)
// Activations (codes as fastrob.ops.bias_act.ACTIVATIONS), f, f', f'':
//   0 relu        max(u, 0), [u > 0], 0
//   1 softplus    t = beta u; t > threshold: (u, 1, 0); else log(1 + e^t) / beta, s, beta s (1 - s); s = sigmoid(t)
//   2 gelu        u Phi, Phi + u phi, phi (2 - u^2)          (erf form)
//   3 silu        u s, s (1 + u (1 - s)), s (1 - s) (2 + u (1 - 2 s)); s = sigmoid(u)
//   4 half_huber  0 | u^2 / (2 d) | u - d / 2;  clamp(u / d, 0, 1);  [0 < u < d] / d
//   5 gelu_tanh   t = k (u + a u^3), T = tanh(t), S = 1 - T^2, t' = k (1 + 3 a u^2)  (k = sqrt(2 / pi), a = 0.044715):
//                 u (1 + T) / 2,  (1 + T) / 2 + u S t' / 2,  S (t' + 3 k a u^2 - u T t'^2)
//   6 sigmoid     s, s (1 - s), s (1 - s) (1 - 2 s)
//   7 hardswish   0 | u (u + 3) / 6 | u;  0 | (2 u + 3) / 6 on [-3, 3] | 1;  1/3 on (-3, 3) (torch's conventions)
// Arithmetic in float32, rounded to the storage type once.
#pragma once

#include "kernels/common.cuh"

namespace fastrob {

struct ActParams {
  const void* bias;  // storage type T, [channels], or nullptr
  int64_t stride_c, channels;
  int act;
  float beta, threshold, d;
};

struct ActValues {
  float f, f1, f2;
};

__device__ __forceinline__ float sigmoidf(float t) { return 1.f / (1.f + __expf(-t)); }

__device__ __forceinline__ ActValues activation(float u, const ActParams& p) {
  switch (p.act) {
    case 0: return {fmaxf(u, 0.f), u > 0.f ? 1.f : 0.f, 0.f};
    case 1: {
      const float t = p.beta * u;
      if (t > p.threshold) return {u, 1.f, 0.f};
      const float s = sigmoidf(t);
      // log(1 + e^t) = max(t, 0) + log1p(e^-|t|): no overflow for large t
      return {(fmaxf(t, 0.f) + log1pf(__expf(-fabsf(t)))) / p.beta, s, p.beta * s * (1.f - s)};
    }
    case 2: {
      const float cdf = 0.5f * (1.f + erff(u * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * __expf(-0.5f * u * u);
      return {u * cdf, cdf + u * pdf, pdf * (2.f - u * u)};
    }
    case 3: {
      const float s = sigmoidf(u);
      return {u * s, s * (1.f + u * (1.f - s)), s * (1.f - s) * (2.f + u * (1.f - 2.f * s))};
    }
    case 4: {
      const float f = u <= 0.f ? 0.f : (u <= p.d ? u * u / (2.f * p.d) : u - 0.5f * p.d);
      return {f, fminf(fmaxf(u / p.d, 0.f), 1.f), (u > 0.f && u < p.d) ? 1.f / p.d : 0.f};
    }
    case 5: {
      const float k = 0.79788456080286536f, ka = k * 0.044715f, u2 = u * u;
      // sech^2 = 4 e / (1 + e)^2, e = exp(-2 |t|): no cancellation where tanh^2 is near 1
      const float t = k * u + ka * u2 * u, e = expf(-2.f * fabsf(t));
      const float th = copysignf((1.f - e) / (1.f + e), t), sech2 = 4.f * e / ((1.f + e) * (1.f + e));
      const float dt = k + 3.f * ka * u2;
      return {0.5f * u * (1.f + th), 0.5f * (1.f + th) + 0.5f * u * sech2 * dt,
              sech2 * (dt + 3.f * ka * u2 - u * th * dt * dt)};
    }
    case 6: {
      const float s = sigmoidf(u), f1 = s * (1.f - s);
      return {s, f1, f1 * (1.f - 2.f * s)};
    }
    default: {
      if (u < -3.f) return {0.f, 0.f, 0.f};
      if (u > 3.f) return {u, 1.f, 0.f};
      return {u * (u + 3.f) / 6.f, (2.f * u + 3.f) / 6.f, (u > -3.f && u < 3.f) ? 1.f / 3.f : 0.f};
    }
  }
}

template <typename T>
__device__ __forceinline__ float biased(const T* x, int64_t i, const ActParams& p) {
  float u = to_float(x[i]);
  if (p.bias) u += to_float(static_cast<const T*>(p.bias)[(i / p.stride_c) % p.channels]);
  return u;
}

template <typename T>
__global__ void bias_act_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, ActParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = from_float<T>(activation(biased(x, i, p), p).f);
}

template <typename T>
__global__ void bias_act_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                         int64_t n, ActParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dx[i] = from_float<T>(to_float(dy[i]) * activation(biased(x, i, p), p).f1);
}

template <typename T>
__global__ void bias_act_double_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                const T* __restrict__ v, T* __restrict__ d_dy, T* __restrict__ d_x,
                                                int64_t n, ActParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const ActValues a = activation(biased(x, i, p), p);
  const float vi = to_float(v[i]);
  d_dy[i] = from_float<T>(vi * a.f1);
  d_x[i] = from_float<T>(vi * to_float(dy[i]) * a.f2);
}

}  // namespace fastrob

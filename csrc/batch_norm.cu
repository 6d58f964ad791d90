// Launchers of the fused batch norm; device code in kernels/batch_norm.cuh. Per-channel vectors
// (weight, bias, mean, invstd, gradients, the scratch buffer) are float32 whatever the storage dtype.
#include "csrc/launch_utils.h"
#include "csrc/launchers.h"
#include "kernels/batch_norm.cuh"

namespace fastrob {
namespace {

constexpr int kThreads = 256;

// Channels per reduction block: 32 adjacent channels (coalesced) for channels_last, 1 for NCHW,
// as fastrob.ops.batch_norm._CHANNEL_BLOCK assumes when it picks the number of splits.
BatchNormGeometry batch_norm_geometry(int64_t n, int64_t c, int64_t s, bool channels_last, int splits, dim3* block,
                                      dim3* grid) {
  BatchNormGeometry g{c, s, n * s, channels_last ? s * c : c * s, channels_last ? 1 : s, channels_last ? c : 1, 0};
  const int width = channels_last ? 32 : 1;
  *block = dim3(width, kThreads / width);
  const int64_t per_split = (g.rows + splits - 1) / splits;
  g.chunk = per_split > 0 ? per_split : 1;
  const int64_t used = (g.rows + g.chunk - 1) / g.chunk;
  *grid = dim3(static_cast<unsigned>((c + width - 1) / width), static_cast<unsigned>(used));
  return g;
}

template <typename T, int MODE>
int reduce(const T* x, const T* gy, const T* v, const float* mean, const float* invstd, float* part, int64_t n,
           int64_t c, int64_t s, bool channels_last, int splits, cudaStream_t stream, BatchNormGeometry* geom) {
  dim3 block, grid;
  *geom = batch_norm_geometry(n, c, s, channels_last, splits, &block, &grid);
  const size_t shared = (MODE == 2 ? 5 : 2) * kThreads * sizeof(float);
  batch_norm_reduce_kernel<T, MODE><<<grid, block, shared, stream>>>(x, gy, v, mean, invstd, part, *geom);
  return static_cast<int>(grid.y);
}

template <typename T>
void apply(const T* x, const T* a, const T* b, const float* mean, const float* invstd, const float* coef, T* out0,
           T* out1, int64_t numel, int64_t c, int64_t s, bool channels_last, cudaStream_t stream) {
  batch_norm_apply_kernel<T><<<blocks_for(numel, kThreads), kThreads, 0, stream>>>(
      x, a, b, mean, invstd, coef, out0, out1, numel, channels_last ? 1 : s, c);
}

}  // namespace

void batch_norm_forward(uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, uintptr_t mean, uintptr_t invstd,
                        uintptr_t work, int64_t n, int64_t c, int64_t s, bool channels_last, int splits, double eps,
                        int dtype, int device, uintptr_t stream) {
  if (n * c * s == 0) return;
  with_storage_type(dtype, device, "fastrob._C.batch_norm_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto st = reinterpret_cast<cudaStream_t>(stream);
    float* part = reinterpret_cast<float*>(work);
    float* coef = part + static_cast<int64_t>(splits) * kBnSums * c;
    BatchNormGeometry g;
    const int used = reduce<T, 0>(reinterpret_cast<const T*>(x), nullptr, nullptr, nullptr, nullptr, part, n, c, s,
                                  channels_last, splits, st, &g);
    batch_norm_forward_finalize_kernel<T><<<blocks_for(c, kThreads), kThreads, 0, st>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(b), part,
        coef, reinterpret_cast<float*>(mean), reinterpret_cast<float*>(invstd), g, used, static_cast<float>(eps));
    apply<T>(reinterpret_cast<const T*>(x), nullptr, nullptr, reinterpret_cast<const float*>(mean),
             reinterpret_cast<const float*>(invstd), coef, reinterpret_cast<T*>(y), nullptr, n * c * s, c, s,
             channels_last, st);
  });
}

void batch_norm_backward(uintptr_t gy, uintptr_t x, uintptr_t w, uintptr_t mean, uintptr_t invstd, uintptr_t gx,
                         uintptr_t gw, uintptr_t gb, uintptr_t work, int64_t n, int64_t c, int64_t s,
                         bool channels_last, int splits, int dtype, int device, uintptr_t stream) {
  if (n * c * s == 0) return;
  with_storage_type(dtype, device, "fastrob._C.batch_norm_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto st = reinterpret_cast<cudaStream_t>(stream);
    float* part = reinterpret_cast<float*>(work);
    float* coef = part + static_cast<int64_t>(splits) * kBnSums * c;
    const float* mu = reinterpret_cast<const float*>(mean);
    const float* r = reinterpret_cast<const float*>(invstd);
    BatchNormGeometry g;
    const int used = reduce<T, 1>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(gy), nullptr, mu, r,
                                  part, n, c, s, channels_last, splits, st, &g);
    batch_norm_backward_finalize_kernel<<<blocks_for(c, kThreads), kThreads, 0, st>>>(
        reinterpret_cast<const float*>(w), r, part, coef, reinterpret_cast<float*>(gw), reinterpret_cast<float*>(gb),
        g, used);
    apply<T>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(gy), nullptr, mu, r, coef,
             reinterpret_cast<T*>(gx), nullptr, n * c * s, c, s, channels_last, st);
  });
}

void batch_norm_double_backward(uintptr_t gy, uintptr_t x, uintptr_t w, uintptr_t mean, uintptr_t invstd, uintptr_t ggx,
                                uintptr_t ggw, uintptr_t ggb, uintptr_t d_gy, uintptr_t d_x, uintptr_t d_w,
                                uintptr_t work, int64_t n, int64_t c, int64_t s, bool channels_last, int splits,
                                int dtype, int device, uintptr_t stream) {
  if (n * c * s == 0) return;
  with_storage_type(dtype, device, "fastrob._C.batch_norm_double_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto st = reinterpret_cast<cudaStream_t>(stream);
    float* part = reinterpret_cast<float*>(work);
    float* coef = part + static_cast<int64_t>(splits) * kBnSums * c;
    const float* mu = reinterpret_cast<const float*>(mean);
    const float* r = reinterpret_cast<const float*>(invstd);
    BatchNormGeometry g;
    const int used = reduce<T, 2>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(gy),
                                  reinterpret_cast<const T*>(ggx), mu, r, part, n, c, s, channels_last, splits, st,
                                  &g);
    batch_norm_double_backward_finalize_kernel<<<blocks_for(c, kThreads), kThreads, 0, st>>>(
        reinterpret_cast<const float*>(w), r, reinterpret_cast<const float*>(ggw),
        reinterpret_cast<const float*>(ggb), part, coef, reinterpret_cast<float*>(d_w), g, used);
    apply<T>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(gy), reinterpret_cast<const T*>(ggx), mu, r,
             coef, reinterpret_cast<T*>(d_x), reinterpret_cast<T*>(d_gy), n * c * s, c, s, channels_last, st);
  });
}

void batch_norm_eval(uintptr_t x, uintptr_t mean, uintptr_t invstd, uintptr_t coef, uintptr_t y, int64_t n, int64_t c,
                     int64_t s, bool channels_last, int dtype, int device, uintptr_t stream) {
  if (n * c * s == 0) return;
  with_storage_type(dtype, device, "fastrob._C.batch_norm_eval", [&](auto tag) {
    using T = typename decltype(tag)::type;
    apply<T>(reinterpret_cast<const T*>(x), nullptr, nullptr, reinterpret_cast<const float*>(mean),
             reinterpret_cast<const float*>(invstd), reinterpret_cast<const float*>(coef), reinterpret_cast<T*>(y),
             nullptr, n * c * s, c, s, channels_last, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace fastrob

// Launchers of the fused bias + activation; device code in kernels/bias_act.cuh.
#include "csrc/launch_utils.h"
#include "csrc/launchers.h"
#include "kernels/bias_act.cuh"

namespace fastrob {
namespace {

constexpr int kThreads = 256;

ActParams act_params(uintptr_t bias, int64_t stride_c, int64_t channels, int act, double beta, double threshold,
                     double d) {
  return ActParams{reinterpret_cast<const void*>(bias), stride_c, channels, act, static_cast<float>(beta),
                   static_cast<float>(threshold), static_cast<float>(d)};
}

}  // namespace

void bias_act_forward(uintptr_t x, uintptr_t bias, uintptr_t y, int64_t n, int64_t stride_c, int64_t channels,
                      int act, double beta, double threshold, double d, int dtype, int device, uintptr_t stream) {
  if (n == 0) return;
  const ActParams p = act_params(bias, stride_c, channels, act, beta, threshold, d);
  with_storage_type(dtype, device, "fastrob._C.bias_act_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_act_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<T*>(y), n, p);
  });
}

void bias_act_backward(uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dx, int64_t n, int64_t stride_c,
                       int64_t channels, int act, double beta, double threshold, double d, int dtype, int device,
                       uintptr_t stream) {
  if (n == 0) return;
  const ActParams p = act_params(bias, stride_c, channels, act, beta, threshold, d);
  with_storage_type(dtype, device, "fastrob._C.bias_act_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_act_backward_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(x), reinterpret_cast<T*>(dx), n, p);
  });
}

void bias_act_double_backward(uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t v, uintptr_t d_dy, uintptr_t d_x,
                              int64_t n, int64_t stride_c, int64_t channels, int act, double beta, double threshold,
                              double d, int dtype, int device, uintptr_t stream) {
  if (n == 0) return;
  const ActParams p = act_params(bias, stride_c, channels, act, beta, threshold, d);
  with_storage_type(dtype, device, "fastrob._C.bias_act_double_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    bias_act_double_backward_kernel<T>
        <<<blocks_for(n, kThreads), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
            reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(v),
            reinterpret_cast<T*>(d_dy), reinterpret_cast<T*>(d_x), n, p);
  });
}

}  // namespace fastrob

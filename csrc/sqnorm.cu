// Launchers of the squared-norm reduction; device code in kernels/sqnorm.cuh.
#include "csrc/launch_utils.h"
#include "csrc/launchers.h"
#include "kernels/sqnorm.cuh"

namespace fastrob {
namespace {
constexpr int kThreads = 256;
}  // namespace

void sqnorm_forward(uintptr_t g, uintptr_t out, int64_t rows, int64_t cols, int dtype, int device,
                    uintptr_t stream) {
  if (rows == 0) return;
  with_storage_type(dtype, device, "fastrob._C.sqnorm_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    sqnorm_forward_kernel<T><<<rows, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(g), reinterpret_cast<float*>(out), cols);
  });
}

void sqnorm_backward(uintptr_t g, uintptr_t go, uintptr_t dg, int64_t rows, int64_t cols, int dtype, int device,
                     uintptr_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  with_storage_type(dtype, device, "fastrob._C.sqnorm_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    sqnorm_backward_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(g), reinterpret_cast<const float*>(go), reinterpret_cast<T*>(dg), n, cols);
  });
}

void sqnorm_double_backward(uintptr_t g, uintptr_t go, uintptr_t v, uintptr_t d_g, uintptr_t d_go, int64_t rows,
                            int64_t cols, int dtype, int device, uintptr_t stream) {
  if (rows == 0) return;
  with_storage_type(dtype, device, "fastrob._C.sqnorm_double_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    sqnorm_double_backward_kernel<T><<<rows, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(g), reinterpret_cast<const float*>(go), reinterpret_cast<const T*>(v),
        reinterpret_cast<T*>(d_g), reinterpret_cast<float*>(d_go), cols);
  });
}

}  // namespace fastrob

// Launchers of the fused cross-entropy; device code in kernels/cross_entropy.cuh.
#include "csrc/launch_utils.h"
#include "csrc/launchers.h"
#include "kernels/cross_entropy.cuh"

namespace fastrob {
namespace {

constexpr int kThreads = 256;

// Row kernels: a warp for narrow rows (10 classes), up to 256 threads for wide ones.
int row_threads(int64_t cols) { return cols <= 32 ? 32 : cols <= 128 ? 64 : cols <= 512 ? 128 : kThreads; }

CrossEntropyRow cross_entropy_row(uintptr_t target, double smoothing, int64_t cols) {
  return CrossEntropyRow{reinterpret_cast<const int64_t*>(target), static_cast<float>(smoothing), cols};
}

}  // namespace

void cross_entropy_forward(uintptr_t z, uintptr_t target, uintptr_t loss, uintptr_t lse, int64_t rows, int64_t cols,
                           double smoothing, int dtype, int device, uintptr_t stream) {
  if (rows == 0) return;
  with_storage_type(dtype, device, "fastrob._C.cross_entropy_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    cross_entropy_forward_kernel<T><<<rows, row_threads(cols), 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(z), cross_entropy_row(target, smoothing, cols), reinterpret_cast<float*>(loss),
        reinterpret_cast<float*>(lse));
  });
}

void cross_entropy_backward(uintptr_t z, uintptr_t target, uintptr_t lse, uintptr_t gl, uintptr_t gs, uintptr_t dz,
                            int64_t rows, int64_t cols, double smoothing, int dtype, int device, uintptr_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  with_storage_type(dtype, device, "fastrob._C.cross_entropy_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    cross_entropy_backward_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(z), cross_entropy_row(target, smoothing, cols), reinterpret_cast<const float*>(lse),
        reinterpret_cast<const float*>(gl), reinterpret_cast<const float*>(gs), reinterpret_cast<T*>(dz), n);
  });
}

void cross_entropy_double_backward(uintptr_t z, uintptr_t target, uintptr_t lse, uintptr_t gl, uintptr_t gs,
                                   uintptr_t v, uintptr_t d_z, uintptr_t d_gl, uintptr_t d_gs, int64_t rows,
                                   int64_t cols, double smoothing, int dtype, int device, uintptr_t stream) {
  if (rows == 0) return;
  with_storage_type(dtype, device, "fastrob._C.cross_entropy_double_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    cross_entropy_double_backward_kernel<T><<<rows, row_threads(cols), 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(z), cross_entropy_row(target, smoothing, cols), reinterpret_cast<const float*>(lse),
        reinterpret_cast<const float*>(gl), reinterpret_cast<const float*>(gs), reinterpret_cast<const T*>(v),
        reinterpret_cast<T*>(d_z), reinterpret_cast<float*>(d_gl), reinterpret_cast<float*>(d_gs));
  });
}

}  // namespace fastrob

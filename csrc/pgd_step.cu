// Launchers for the fused PGD step; device code in kernels/pgd_step.cuh.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "csrc/launch_utils.h"
#include "csrc/launchers.h"
#include "kernels/pgd_step.cuh"

namespace fastrob {
namespace {

// Samples of up to this many elements are stepped by one block holding them in registers.
constexpr int64_t kMaxSampleInRegisters = 16384;
// Larger samples are reduced in chunks of this many elements (two-pass path).
constexpr int64_t kL2Chunk = 8192;
constexpr int kThreads = 256;

StepParams params(const PgdStepArgs& a) {
  return StepParams{reinterpret_cast<const float*>(a.eps_per_sample),
                    reinterpret_cast<const float*>(a.alpha_per_sample),
                    static_cast<float>(a.eps), static_cast<float>(a.alpha),
                    static_cast<float>(a.lower), static_cast<float>(a.upper)};
}

bool aligned(uintptr_t p, size_t bytes) { return p % bytes == 0; }

template <typename T>
void linf(const PgdStepArgs& a) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t n = a.batch * a.per_sample;
  const bool vectorize = a.per_sample % kVec == 0 && aligned(a.x_adv, 16) && aligned(a.grad, 16) &&
                         aligned(a.x_orig, 16) && aligned(a.out, 16);
  const int vec = vectorize ? kVec : 1;
  const int64_t blocks = (n / vec + kThreads - 1) / kThreads;
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const T* xa = reinterpret_cast<const T*>(a.x_adv);
  const T* g = reinterpret_cast<const T*>(a.grad);
  const T* xo = reinterpret_cast<const T*>(a.x_orig);
  T* out = reinterpret_cast<T*>(a.out);
  if (vectorize)
    pgd_step_linf_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(xa, g, xo, out, params(a), n, a.per_sample);
  else
    pgd_step_linf_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(xa, g, xo, out, params(a), n, a.per_sample);
}

template <typename T>
void l2(const PgdStepArgs& a) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const T* xa = reinterpret_cast<const T*>(a.x_adv);
  const T* g = reinterpret_cast<const T*>(a.grad);
  const T* xo = reinterpret_cast<const T*>(a.x_orig);
  T* out = reinterpret_cast<T*>(a.out);
  const StepParams p = params(a);
  if (a.per_sample <= 1024) {
    pgd_step_l2_sample_kernel<T, 256, 4><<<a.batch, 256, 0, stream>>>(xa, g, xo, out, p, a.per_sample);
  } else if (a.per_sample <= 4096) {
    pgd_step_l2_sample_kernel<T, 256, 16><<<a.batch, 256, 0, stream>>>(xa, g, xo, out, p, a.per_sample);
  } else if (a.per_sample <= kMaxSampleInRegisters) {
    pgd_step_l2_sample_kernel<T, 512, 32><<<a.batch, 512, 0, stream>>>(xa, g, xo, out, p, a.per_sample);
  } else {
    const int64_t n_chunks = (a.per_sample + kL2Chunk - 1) / kL2Chunk, blocks = a.batch * n_chunks;
    float* partials = reinterpret_cast<float*>(a.workspace);
    pgd_step_l2_partials_kernel<T><<<blocks, kThreads, 0, stream>>>(xa, g, xo, partials, a.per_sample, kL2Chunk,
                                                                   n_chunks);
    pgd_step_l2_apply_kernel<T><<<blocks, kThreads, 0, stream>>>(xa, g, xo, out, partials, p, a.per_sample,
                                                                kL2Chunk, n_chunks);
  }
}

template <typename T> struct LinfFn { static void run(const PgdStepArgs& a) { linf<T>(a); } };
template <typename T> struct L2Fn { static void run(const PgdStepArgs& a) { l2<T>(a); } };

template <template <typename> class Fn>
void dispatch(const PgdStepArgs& a, const char* name) {
  if (a.batch == 0 || a.per_sample == 0) return;
  with_storage_type(a.dtype, a.device, name, [&](auto tag) { Fn<typename decltype(tag)::type>::run(a); });
}

}  // namespace

void pgd_step_linf(const PgdStepArgs& a) { dispatch<LinfFn>(a, "fastrob._C.pgd_step_linf"); }
void pgd_step_l2(const PgdStepArgs& a) { dispatch<L2Fn>(a, "fastrob._C.pgd_step_l2"); }

int64_t pgd_step_l2_workspace_floats(int64_t batch, int64_t per_sample) {
  if (per_sample <= kMaxSampleInRegisters) return 0;
  return batch * ((per_sample + kL2Chunk - 1) / kL2Chunk) * 3;
}

}  // namespace fastrob

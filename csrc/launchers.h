// Host-side launchers of fastrob._C. Torch-free: tensors arrive as device pointers, sizes and the
// CUDA stream; the Python side (fastrob/ops/) checks devices, dtypes and layouts before calling.
#pragma once

#include <cstdint>
#include <string>

namespace fastrob {

// Storage dtypes, numbered as in fastrob/ops/_common.py (_CUDA_DTYPE_CODES; tests/test_kernel_names.py).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One PGD step over a batch stored densely with the batch dimension outermost (contiguous or
// channels_last): sample b occupies elements [b * per_sample, (b + 1) * per_sample).
struct PgdStepArgs {
  uintptr_t x_adv, grad, x_orig, out;  // device pointers, all of `dtype`
  uintptr_t eps_per_sample;            // float32 [batch] on the device, or 0: use `eps`
  uintptr_t alpha_per_sample;          // float32 [batch] on the device, or 0: use `alpha`
  double eps, alpha, lower, upper;
  int64_t batch, per_sample;
  int dtype, device;
  uintptr_t stream;     // cudaStream_t of the caller (torch's current stream)
  uintptr_t workspace;  // float32 scratch of pgd_step_l2_workspace_floats() elements, or 0 if that is 0
};

void pgd_step_linf(const PgdStepArgs& a);
void pgd_step_l2(const PgdStepArgs& a);
// float32 elements of scratch the L2 step needs (0 when each sample fits one block's registers).
int64_t pgd_step_l2_workspace_floats(int64_t batch, int64_t per_sample);

// The differentiable ops (fastrob/ops/sqnorm.py, cross_entropy.py, bias_act.py): pointers and sizes
// first, then the storage dtype of the first tensor, the device index and the stream. Per-row
// values (norms, losses, logsumexps, their gradients) are float32 whatever the storage dtype.
void sqnorm_forward(uintptr_t g, uintptr_t out, int64_t rows, int64_t cols, int dtype, int device,
                    uintptr_t stream);
void sqnorm_backward(uintptr_t g, uintptr_t go, uintptr_t dg, int64_t rows, int64_t cols, int dtype, int device,
                     uintptr_t stream);
void sqnorm_double_backward(uintptr_t g, uintptr_t go, uintptr_t v, uintptr_t d_g, uintptr_t d_go, int64_t rows,
                            int64_t cols, int dtype, int device, uintptr_t stream);
void cross_entropy_forward(uintptr_t z, uintptr_t target, uintptr_t loss, uintptr_t lse, int64_t rows, int64_t cols,
                           double smoothing, int dtype, int device, uintptr_t stream);
void cross_entropy_backward(uintptr_t z, uintptr_t target, uintptr_t lse, uintptr_t gl, uintptr_t gs, uintptr_t dz,
                            int64_t rows, int64_t cols, double smoothing, int dtype, int device, uintptr_t stream);
void cross_entropy_double_backward(uintptr_t z, uintptr_t target, uintptr_t lse, uintptr_t gl, uintptr_t gs,
                                   uintptr_t v, uintptr_t d_z, uintptr_t d_gl, uintptr_t d_gs, int64_t rows,
                                   int64_t cols, double smoothing, int dtype, int device, uintptr_t stream);
// act: the activation code of fastrob.ops.bias_act.ACTIVATIONS; bias may be 0 (no bias).
void bias_act_forward(uintptr_t x, uintptr_t bias, uintptr_t y, int64_t n, int64_t stride_c, int64_t channels,
                      int act, double beta, double threshold, double d, int dtype, int device, uintptr_t stream);
void bias_act_backward(uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dx, int64_t n, int64_t stride_c,
                       int64_t channels, int act, double beta, double threshold, double d, int dtype, int device,
                       uintptr_t stream);
void bias_act_double_backward(uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t v, uintptr_t d_dy, uintptr_t d_x,
                              int64_t n, int64_t stride_c, int64_t channels, int act, double beta, double threshold,
                              double d, int dtype, int device, uintptr_t stream);
// Batch norm (fastrob/ops/batch_norm.py) over x [n, c, s] stored densely (NCHW or channels_last):
// per-channel vectors and `work` ((splits * 5 + 8) * c floats of scratch) are float32; w, b, d_w
// may be 0 (absent).
void batch_norm_forward(uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, uintptr_t mean, uintptr_t invstd,
                        uintptr_t work, int64_t n, int64_t c, int64_t s, bool channels_last, int splits, double eps,
                        int dtype, int device, uintptr_t stream);
void batch_norm_backward(uintptr_t gy, uintptr_t x, uintptr_t w, uintptr_t mean, uintptr_t invstd, uintptr_t gx,
                         uintptr_t gw, uintptr_t gb, uintptr_t work, int64_t n, int64_t c, int64_t s,
                         bool channels_last, int splits, int dtype, int device, uintptr_t stream);
void batch_norm_double_backward(uintptr_t gy, uintptr_t x, uintptr_t w, uintptr_t mean, uintptr_t invstd, uintptr_t ggx,
                                uintptr_t ggw, uintptr_t ggb, uintptr_t d_gy, uintptr_t d_x, uintptr_t d_w,
                                uintptr_t work, int64_t n, int64_t c, int64_t s, bool channels_last, int splits,
                                int dtype, int device, uintptr_t stream);
void batch_norm_eval(uintptr_t x, uintptr_t mean, uintptr_t invstd, uintptr_t coef, uintptr_t y, int64_t n, int64_t c,
                     int64_t s, bool channels_last, int dtype, int device, uintptr_t stream);

// Raises std::runtime_error naming `what` if `status` is an error.
void check_cuda(int status, const char* what);

}  // namespace fastrob

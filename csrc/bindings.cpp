// pybind11 module fastrob._C: torch-free bindings of the CUDA launchers (docs/kernels.md, "Building the CUDA extension").
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "csrc/launchers.h"

namespace py = pybind11;

namespace fastrob {

void check_cuda(int status, const char* what) {
  if (status != cudaSuccess) {
    auto err = static_cast<cudaError_t>(status);
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

}  // namespace fastrob

namespace {

// (count, message): count is -1 and message says why when the runtime cannot see a GPU.
py::tuple device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset the runtime's last error so it is not reported by a later call
    return py::make_tuple(-1, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
  }
  return py::make_tuple(n, std::string());
}

int driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrob's CUDA kernels (torch-free; pointers, sizes and streams come from fastrob/ops)";
  m.attr("cuda_runtime_version") = CUDART_VERSION;  // the runtime it was compiled and statically linked with
  m.def("driver_version", &driver_version, "CUDA driver version (0 when no driver is installed)");
  m.def("device_count", &device_count, "(number of CUDA devices, or -1 and the runtime's reason)");
  m.def("pgd_step_l2_workspace_floats", &fastrob::pgd_step_l2_workspace_floats, py::arg("batch"),
        py::arg("per_sample"));
  const char* step_doc = "One fused PGD step; see kernels/pgd_step.cuh for the math and fastrob.ops.pgd_step for use.";
  auto bind_step = [&](const char* name, void (*fn)(const fastrob::PgdStepArgs&)) {
    m.def(
        name,
        [fn](uintptr_t x_adv, uintptr_t grad, uintptr_t x_orig, uintptr_t out, uintptr_t eps_per_sample,
             uintptr_t alpha_per_sample, double eps, double alpha, double lower, double upper, int64_t batch,
             int64_t per_sample, int dtype, int device, uintptr_t stream, uintptr_t workspace) {
          fn(fastrob::PgdStepArgs{x_adv, grad, x_orig, out, eps_per_sample, alpha_per_sample, eps, alpha, lower,
                                  upper, batch, per_sample, dtype, device, stream, workspace});
        },
        step_doc, py::arg("x_adv"), py::arg("grad"), py::arg("x_orig"), py::arg("out"), py::arg("eps_per_sample"),
        py::arg("alpha_per_sample"), py::arg("eps"), py::arg("alpha"), py::arg("lower"), py::arg("upper"),
        py::arg("batch"), py::arg("per_sample"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        py::arg("workspace"));
  };
  bind_step("pgd_step_linf", &fastrob::pgd_step_linf);
  bind_step("pgd_step_l2", &fastrob::pgd_step_l2);

  // The differentiable ops: see kernels/<op>.cuh for the math and fastrob/ops/<op>.py for use.
  m.def("sqnorm_forward", &fastrob::sqnorm_forward, py::arg("g"), py::arg("out"), py::arg("rows"), py::arg("cols"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("sqnorm_backward", &fastrob::sqnorm_backward, py::arg("g"), py::arg("go"), py::arg("dg"), py::arg("rows"),
        py::arg("cols"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("sqnorm_double_backward", &fastrob::sqnorm_double_backward, py::arg("g"), py::arg("go"), py::arg("v"),
        py::arg("d_g"), py::arg("d_go"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("cross_entropy_forward", &fastrob::cross_entropy_forward, py::arg("z"), py::arg("target"), py::arg("loss"),
        py::arg("lse"), py::arg("rows"), py::arg("cols"), py::arg("smoothing"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("cross_entropy_backward", &fastrob::cross_entropy_backward, py::arg("z"), py::arg("target"), py::arg("lse"),
        py::arg("gl"), py::arg("gs"), py::arg("dz"), py::arg("rows"), py::arg("cols"), py::arg("smoothing"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("cross_entropy_double_backward", &fastrob::cross_entropy_double_backward, py::arg("z"), py::arg("target"),
        py::arg("lse"), py::arg("gl"), py::arg("gs"), py::arg("v"), py::arg("d_z"), py::arg("d_gl"), py::arg("d_gs"),
        py::arg("rows"), py::arg("cols"), py::arg("smoothing"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("bias_act_forward", &fastrob::bias_act_forward, py::arg("x"), py::arg("bias"), py::arg("y"),
        py::arg("n"), py::arg("stride_c"), py::arg("channels"), py::arg("act"), py::arg("beta"),
        py::arg("threshold"), py::arg("d"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("bias_act_backward", &fastrob::bias_act_backward, py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("dx"),
        py::arg("n"), py::arg("stride_c"), py::arg("channels"), py::arg("act"), py::arg("beta"),
        py::arg("threshold"), py::arg("d"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("bias_act_double_backward", &fastrob::bias_act_double_backward, py::arg("dy"), py::arg("x"), py::arg("bias"),
        py::arg("v"), py::arg("d_dy"), py::arg("d_x"), py::arg("n"), py::arg("stride_c"), py::arg("channels"), py::arg("act"), py::arg("beta"),
        py::arg("threshold"), py::arg("d"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("batch_norm_forward", &fastrob::batch_norm_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"),
        py::arg("mean"), py::arg("invstd"), py::arg("work"), py::arg("n"), py::arg("c"), py::arg("s"),
        py::arg("channels_last"), py::arg("splits"), py::arg("eps"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("batch_norm_backward", &fastrob::batch_norm_backward, py::arg("gy"), py::arg("x"), py::arg("w"),
        py::arg("mean"), py::arg("invstd"), py::arg("gx"), py::arg("gw"), py::arg("gb"), py::arg("work"), py::arg("n"),
        py::arg("c"), py::arg("s"), py::arg("channels_last"), py::arg("splits"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("batch_norm_double_backward", &fastrob::batch_norm_double_backward, py::arg("gy"), py::arg("x"), py::arg("w"),
        py::arg("mean"), py::arg("invstd"), py::arg("ggx"), py::arg("ggw"), py::arg("ggb"), py::arg("d_gy"),
        py::arg("d_x"), py::arg("d_w"), py::arg("work"), py::arg("n"), py::arg("c"), py::arg("s"),
        py::arg("channels_last"), py::arg("splits"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("batch_norm_eval", &fastrob::batch_norm_eval, py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("coef"),
        py::arg("y"), py::arg("n"), py::arg("c"), py::arg("s"), py::arg("channels_last"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"));
}

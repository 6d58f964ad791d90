// Host-side helpers shared by the launchers in csrc/*.cu: device guard and storage-dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "csrc/launchers.h"

namespace fastrob {

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0, device_ = 0;
};

template <typename T> struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the storage type numbered `dtype` (launchers.h, enum DType) with
// `device` current, then raises if the launch failed: one switch for every launcher.
template <typename F>
void with_storage_type(int dtype, int device, const char* name, F&& f) {
  DeviceGuard guard(device);
  switch (dtype) {
    case kFloat32: f(TypeTag<float>{}); break;
    case kFloat16: f(TypeTag<__half>{}); break;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: throw std::runtime_error(std::string(name) + ": unsupported dtype code " + std::to_string(dtype));
  }
  check_cuda(cudaGetLastError(), name);
}

inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace fastrob

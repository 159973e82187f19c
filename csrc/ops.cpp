// Schemas of the fused ops (torch.ops.amaml_ext.*) and their CPU implementations.
// The CUDA implementations are registered in cuda/kernels_cuda.cu.
#include <torch/library.h>

#include "ops.h"

namespace amaml {

TORCH_LIBRARY(amaml_ext, m) {
  m.def("stage_combine(Tensor y, Tensor[] stages, float[] coeffs, float h, Tensor(a!) out) -> ()");
  m.def(
      "dopri5_finish(Tensor y0, Tensor[] stages, float h, float rtol, float atol, "
      "Tensor(a!) y1, Tensor(b!) err, Tensor(c!) err_norm) -> ()");
  m.def(
      "dopri5_dense(Tensor y0, Tensor y1, Tensor[] stages, float h, float[] thetas, "
      "int first_row, Tensor(a!) trajectory) -> ()");
  m.def("heun_update(Tensor lam, Tensor a, Tensor? b, float h, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(amaml_ext, CPU, m) {
  m.impl("stage_combine", &stage_combine_op<CpuBackend>);
  m.impl("dopri5_finish", &dopri5_finish_op<CpuBackend>);
  m.impl("dopri5_dense", &dopri5_dense_op<CpuBackend>);
  m.impl("heun_update", &heun_update_op<CpuBackend>);
}

}  // namespace amaml

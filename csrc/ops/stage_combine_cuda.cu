// CUDA kernel of stage_combine (schema, checks, CPU kernel and registration: stage_combine.cpp).
#include <ATen/Dispatch.h>

#include "ops/cuda_common.cuh"

namespace amaml {
namespace {

template <typename T, int S, int V>
__global__ void stage_combine_kernel(const T* y, StageRefs<T> st, T h, T* out, int64_t n) {
  const int64_t packs = n / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t p = gid; p < packs; p += stride) {
    Pack<T, V> acc;
    const Pack<T, V> k0 = load<T, V>(st.k[0], p);
#pragma unroll
    for (int v = 0; v < V; ++v) acc.v[v] = st.coeff[0] * k0.v[v];
#pragma unroll
    for (int j = 1; j < S; ++j) {
      const Pack<T, V> kj = load<T, V>(st.k[j], p);
#pragma unroll
      for (int v = 0; v < V; ++v) acc.v[v] += st.coeff[j] * kj.v[v];
    }
    const Pack<T, V> yv = load<T, V>(y, p);
    Pack<T, V> o;
#pragma unroll
    for (int v = 0; v < V; ++v) o.v[v] = yv.v[v] + h * acc.v[v];
    store<T, V>(out, p, o);
  }
  for (int64_t i = packs * V + gid; i < n; i += stride) {
    out[i] = y[i] + h * weighted_stage_sum<T, S>(st, i);
  }
}

template <typename T, int V>
void launch_combine(const T* y, const StageRefs<T>& st, T h, T* out, int64_t n) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t grid = grid_for(std::max<int64_t>(n / V, 1));
  switch (st.count) {
#define AMAML_CASE(S)                                                                    \
  case S:                                                                                \
    stage_combine_kernel<T, S, V><<<grid, kThreads, 0, stream>>>(y, st, h, out, n);      \
    break;
    AMAML_CASE(1) AMAML_CASE(2) AMAML_CASE(3) AMAML_CASE(4) AMAML_CASE(5) AMAML_CASE(6)
    AMAML_CASE(7)
#undef AMAML_CASE
    default: TORCH_CHECK(false, "amaml_ext: unsupported stage count ", st.count);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void stage_combine_cuda(const at::Tensor& y, const std::vector<at::Tensor>& k,
                        c10::ArrayRef<double> coeffs, double h, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(y.device());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "amaml_stage_combine_cuda", [&] {
    using T = scalar_t;
    const auto st = detail::make_refs<T>(k, coeffs.data(), k.size());
    const T* yp = y.data_ptr<T>();
    T* op = out.data_ptr<T>();
    if (aligned16(yp) && aligned16(op) && refs_aligned(st))
      launch_combine<T, vec_width<T>()>(yp, st, static_cast<T>(h), op, y.numel());
    else
      launch_combine<T, 1>(yp, st, static_cast<T>(h), op, y.numel());
  });
}

}  // namespace amaml

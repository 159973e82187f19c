// CUDA kernel of dopri5_dense (schema, checks, CPU kernel and registration: dopri5_dense.cpp).
// Each thread computes the polynomial pieces of its elements once and writes up to kMaxThetas
// rows from them.
#include <ATen/Dispatch.h>

#include "ops/cuda_common.cuh"

namespace amaml {
namespace {

constexpr int kMaxThetas = 32;  // rows written per launch

// dense_coeffs / dense_poly: kernel_math.h (shared with the CPU kernel).
template <typename T>
__device__ __forceinline__ T dense_eval(const DenseCoeffs<T>& p, T theta) {
  // theta == 1 is the step's end point: return y1 itself, not a rounded reconstruction.
  if (theta == T(1)) return p.y1;
  return dense_poly<T>(p.y0, p.ydiff, p.bspl, p.r4, p.r5, theta, T(1) - theta);
}

template <typename T>
struct Thetas {
  T v[kMaxThetas];
  int count;
};

template <typename T, int V>
__global__ void dopri5_dense_kernel(const T* y0, const T* y1, StageRefs<T> dense, const T* k1,
                                    const T* k7, T h, Thetas<T> th, T* rows, int64_t n) {
  const int64_t packs = n / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t p = gid; p < packs; p += stride) {
    DenseCoeffs<T> c[V];
#pragma unroll
    for (int v = 0; v < V; ++v) c[v] = dense_coeffs<T>(y0, y1, dense, k1, k7, h, p * V + v);
    for (int r = 0; r < th.count; ++r) {
      Pack<T, V> o;
#pragma unroll
      for (int v = 0; v < V; ++v) o.v[v] = dense_eval<T>(c[v], th.v[r]);
      store<T, V>(rows + static_cast<int64_t>(r) * n, p, o);
    }
  }
  for (int64_t i = packs * V + gid; i < n; i += stride) {
    const auto c = dense_coeffs<T>(y0, y1, dense, k1, k7, h, i);
    for (int r = 0; r < th.count; ++r) rows[static_cast<int64_t>(r) * n + i] = dense_eval<T>(c, th.v[r]);
  }
}

}  // namespace

void dopri5_dense_cuda(const at::Tensor& y0, const at::Tensor& y1, const std::vector<at::Tensor>& k,
                       double h, c10::ArrayRef<double> thetas, at::Tensor& rows) {
  const c10::cuda::CUDAGuard guard(y0.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = y0.numel();
  AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "amaml_dopri5_dense_cuda", [&] {
    using T = scalar_t;
    constexpr int V = vec_width<T>();
    const auto dense = detail::make_dopri5_refs<T>(k, dopri5::d_nz, dopri5::kErrStages);
    const T* y0p = y0.data_ptr<T>();
    const T* y1p = y1.data_ptr<T>();
    const T* k1 = k[0].data_ptr<T>();
    const T* k7 = k[6].data_ptr<T>();
    T* out = rows.data_ptr<T>();
    const bool vec = n % V == 0 && aligned16(y0p) && aligned16(y1p) && aligned16(out) && refs_aligned(dense);
    const int64_t grid = grid_for(vec ? n / V : n);
    for (size_t start = 0; start < thetas.size(); start += kMaxThetas) {
      Thetas<T> th{};
      th.count = static_cast<int>(std::min<size_t>(kMaxThetas, thetas.size() - start));
      for (int r = 0; r < th.count; ++r) th.v[r] = static_cast<T>(thetas[start + r]);
      T* dst = out + static_cast<int64_t>(start) * n;
      if (vec)
        dopri5_dense_kernel<T, V><<<grid, kThreads, 0, stream>>>(y0p, y1p, dense, k1, k7, static_cast<T>(h), th, dst, n);
      else
        dopri5_dense_kernel<T, 1><<<grid, kThreads, 0, stream>>>(y0p, y1p, dense, k1, k7, static_cast<T>(h), th, dst, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace amaml

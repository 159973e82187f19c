// CUDA kernel of dopri5_finish (schema, checks, CPU kernel and registration: dopri5_finish.cpp):
// y1, err and per-row partial sums of the squared scaled errors in one kernel, then one block
// per row adds that row's partial sums in a fixed order (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "ops/cuda_common.cuh"

namespace amaml {
namespace {

template <typename T>
__device__ __forceinline__ double block_sum(double x) {
  __shared__ double buf[kThreads];
  buf[threadIdx.x] = x;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

template <typename T, int V>
__global__ void dopri5_finish_kernel(const T* y0, StageRefs<T> sol, StageRefs<T> est, T h,
                                     T rtol, T atol, T* y1, T* err, int64_t d,
                                     double* partial) {
  const int64_t row = blockIdx.y;
  const int64_t base = row * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double acc = 0.0;
  if (V > 1) {
    // V > 1 only when d % V == 0 and all pointers are aligned, so row starts stay aligned.
    const int64_t packs = d / V;
    const int64_t pbase = base / V;
    for (int64_t p = gid; p < packs; p += stride) {
      const Pack<T, V> y0v = load<T, V>(y0, pbase + p);
      Pack<T, V> s, e;
      {
        const Pack<T, V> k0 = load<T, V>(sol.k[0], pbase + p);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          s.v[v] = sol.coeff[0] * k0.v[v];
          e.v[v] = est.coeff[0] * k0.v[v];
        }
      }
      // sol.k[j] == est.k[j] for j < kSolStages: each stage is loaded once for both sums.
#pragma unroll
      for (int j = 1; j < dopri5::kErrStages; ++j) {
        const Pack<T, V> kj = load<T, V>(est.k[j], pbase + p);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (j < dopri5::kSolStages) s.v[v] += sol.coeff[j] * kj.v[v];
          e.v[v] += est.coeff[j] * kj.v[v];
        }
      }
      Pack<T, V> y1v, errv;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        y1v.v[v] = y0v.v[v] + h * s.v[v];
        errv.v[v] = h * e.v[v];
        const T a0 = fabs(y0v.v[v]);
        const T a1 = fabs(y1v.v[v]);
        const T r = errv.v[v] / (atol + rtol * (a0 > a1 ? a0 : a1));
        acc += static_cast<double>(r * r);
      }
      store<T, V>(y1, pbase + p, y1v);
      store<T, V>(err, pbase + p, errv);
    }
  } else {
    for (int64_t i = gid; i < d; i += stride)
      acc += static_cast<double>(finish_element<T>(y0, sol, est, h, rtol, atol, y1, err, base + i));
  }
  const double total = block_sum<T>(acc);
  if (threadIdx.x == 0) partial[row * gridDim.x + blockIdx.x] = total;
}

// One block per row adds the row's partial sums in a fixed order (deterministic).
template <typename T>
__global__ void rms_from_partials_kernel(const double* partial, int64_t per_row, int64_t d,
                                         T* norm) {
  const int64_t row = blockIdx.x;
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < per_row; j += blockDim.x) s += partial[row * per_row + j];
  const double total = block_sum<T>(s);
  if (threadIdx.x == 0) norm[row] = static_cast<T>(sqrt(total / static_cast<double>(d)));
}

}  // namespace

void dopri5_finish_cuda(const at::Tensor& y0, const std::vector<at::Tensor>& k, double h,
                        double rtol, double atol, at::Tensor& y1, at::Tensor& err,
                        at::Tensor& err_norm) {
  const c10::cuda::CUDAGuard guard(y0.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = y0.dim() == 2 ? y0.size(0) : 1;
  const int64_t d = y0.numel() / rows;
  AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "amaml_dopri5_finish_cuda", [&] {
    using T = scalar_t;
    constexpr int V = vec_width<T>();
    const auto sol = detail::make_dopri5_refs<T>(k, dopri5::b_nz, dopri5::kSolStages);
    const auto est = detail::make_dopri5_refs<T>(k, dopri5::e_nz, dopri5::kErrStages);
    const T* y0p = y0.data_ptr<T>();
    T* y1p = y1.data_ptr<T>();
    T* errp = err.data_ptr<T>();
    const bool vec = d % V == 0 && aligned16(y0p) && aligned16(y1p) && aligned16(errp) &&
                     refs_aligned(est);
    const int64_t work = vec ? d / V : d;
    const int64_t want = std::max<int64_t>(1, (sm_count() * 16 + rows - 1) / rows);
    const int64_t bx = std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, want));
    TORCH_CHECK(rows <= 65535, "amaml_ext.dopri5_finish: at most 65535 tasks per call on CUDA, got ", rows);
    at::Tensor partial = at::empty({rows, bx}, y0.options().dtype(at::kDouble));
    const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(rows));
    const T ht = static_cast<T>(h), rt = static_cast<T>(rtol), at_ = static_cast<T>(atol);
    if (vec)
      dopri5_finish_kernel<T, V><<<grid, kThreads, 0, stream>>>(y0p, sol, est, ht, rt, at_, y1p, errp, d, partial.data_ptr<double>());
    else
      dopri5_finish_kernel<T, 1><<<grid, kThreads, 0, stream>>>(y0p, sol, est, ht, rt, at_, y1p, errp, d, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    rms_from_partials_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        partial.data_ptr<double>(), bx, d, err_norm.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace amaml

// CUDA kernels of the fused ops: grid-stride loops, 16-byte vector loads and stores where
// every pointer is aligned (a scalar path otherwise), launched on the current stream.
// The per-element arithmetic matches kernel_math.h term for term.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../ops.h"

namespace amaml {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxThetas = 32;  // rows written per dense-output launch

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p, int64_t pack_index) {
  return reinterpret_cast<const Pack<T, V>*>(p)[pack_index];
}
template <typename T, int V>
__device__ __forceinline__ void store(T* p, int64_t pack_index, const Pack<T, V>& x) {
  reinterpret_cast<Pack<T, V>*>(p)[pack_index] = x;
}

int sm_count() {
  static std::vector<int> cache;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (cache.size() <= static_cast<size_t>(dev)) cache.resize(dev + 1, 0);
  if (cache[dev] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev], cudaDevAttrMultiProcessorCount, dev));
  }
  return cache[dev];
}

int64_t grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(sm_count()) * 16));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
bool refs_aligned(const StageRefs<T>& st) {
  for (int j = 0; j < st.count; ++j)
    if (!aligned16(st.k[j])) return false;
  return true;
}

// ---- stage combination -------------------------------------------------------------------

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

// ---- DOPRI5 finish: y1, err and per-row sum of squared scaled errors --------------------

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
      acc += static_cast<double>(
          dopri5_finish_element<T>(y0, sol, est, h, rtol, atol, y1, err, base + i));
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

// ---- DOPRI5 dense output -----------------------------------------------------------------

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
    for (int v = 0; v < V; ++v) c[v] = dopri5_dense_coeffs<T>(y0, y1, dense, k1, k7, h, p * V + v);
    for (int r = 0; r < th.count; ++r) {
      Pack<T, V> o;
#pragma unroll
      for (int v = 0; v < V; ++v) o.v[v] = dopri5_dense_eval<T>(c[v], th.v[r]);
      store<T, V>(rows + static_cast<int64_t>(r) * n, p, o);
    }
  }
  for (int64_t i = packs * V + gid; i < n; i += stride) {
    const auto c = dopri5_dense_coeffs<T>(y0, y1, dense, k1, k7, h, i);
    for (int r = 0; r < th.count; ++r) rows[static_cast<int64_t>(r) * n + i] = dopri5_dense_eval<T>(c, th.v[r]);
  }
}

// ---- Heun adjoint update -----------------------------------------------------------------

template <typename T, int V, bool kCorrector>
__global__ void heun_kernel(const T* lam, const T* a, const T* b, T h, T* out, int64_t n) {
  const int64_t packs = n / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t p = gid; p < packs; p += stride) {
    const Pack<T, V> lv = load<T, V>(lam, p);
    const Pack<T, V> av = load<T, V>(a, p);
    Pack<T, V> o;
    if (kCorrector) {
      const Pack<T, V> bv = load<T, V>(b, p);
#pragma unroll
      for (int v = 0; v < V; ++v) o.v[v] = heun_element<T>(lv.v[v], av.v[v], bv.v[v], h);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) o.v[v] = heun_element<T>(lv.v[v], av.v[v], h);
    }
    store<T, V>(out, p, o);
  }
  for (int64_t i = packs * V + gid; i < n; i += stride) {
    out[i] = kCorrector ? heun_element<T>(lam[i], a[i], b[i], h) : heun_element<T>(lam[i], a[i], h);
  }
}

template <typename T, int V>
void launch_heun(const T* lam, const T* a, const T* b, T h, T* out, int64_t n, int64_t grid) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (b)
    heun_kernel<T, V, true><<<grid, kThreads, 0, stream>>>(lam, a, b, h, out, n);
  else
    heun_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(lam, a, b, h, out, n);
}

}  // namespace

struct CudaBackend {
  static void stage_combine(const at::Tensor& y, const std::vector<at::Tensor>& k,
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

  static void dopri5_finish(const at::Tensor& y0, const std::vector<at::Tensor>& k, double h,
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

  static void dopri5_dense(const at::Tensor& y0, const at::Tensor& y1,
                           const std::vector<at::Tensor>& k, double h,
                           c10::ArrayRef<double> thetas, at::Tensor& rows) {
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

  static void heun_update(const at::Tensor& lam, const at::Tensor& a, const at::Tensor* b,
                          double h, at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(lam.device());
    const int64_t n = lam.numel();
    AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "amaml_heun_update_cuda", [&] {
      using T = scalar_t;
      constexpr int V = vec_width<T>();
      const T* lp = lam.data_ptr<T>();
      const T* ap = a.data_ptr<T>();
      const T* bp = b ? b->data_ptr<T>() : nullptr;
      T* op = out.data_ptr<T>();
      const bool vec = aligned16(lp) && aligned16(ap) && aligned16(op) && (bp == nullptr || aligned16(bp));
      const int64_t grid = grid_for(vec ? n / V : n);
      const T hh = static_cast<T>(b ? 0.5 * h : h);
if (vec) launch_heun<T, V>(lp, ap, bp, hh, op, n, grid);
      else launch_heun<T, 1>(lp, ap, bp, hh, op, n, grid);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

TORCH_LIBRARY_IMPL(amaml_ext, CUDA, m) {
  m.impl("stage_combine", &stage_combine_op<CudaBackend>);
  m.impl("dopri5_finish", &dopri5_finish_op<CudaBackend>);
  m.impl("dopri5_dense", &dopri5_dense_op<CudaBackend>);
  m.impl("heun_update", &heun_update_op<CudaBackend>);
}

}  // namespace amaml

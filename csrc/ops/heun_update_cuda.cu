// CUDA kernel of heun_update (schema, checks, CPU kernel and registration: heun_update.cpp).
#include <ATen/Dispatch.h>

#include "ops/cuda_common.cuh"

namespace amaml {
namespace {

// h is h/2 for the corrector (with b), h for the predictor, as in heun_update.cpp.
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
      for (int v = 0; v < V; ++v) o.v[v] = lv.v[v] + h * (av.v[v] + bv.v[v]);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) o.v[v] = lv.v[v] + h * av.v[v];
    }
    store<T, V>(out, p, o);
  }
  for (int64_t i = packs * V + gid; i < n; i += stride) {
    out[i] = kCorrector ? lam[i] + h * (a[i] + b[i]) : lam[i] + h * a[i];
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

void heun_update_cuda(const at::Tensor& lam, const at::Tensor& a, const at::Tensor* b, double h,
                      at::Tensor& out) {
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

}  // namespace amaml

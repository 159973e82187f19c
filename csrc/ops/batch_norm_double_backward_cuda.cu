// CUDA kernel of batch_norm_double_backward (the formulas, schema, checks, CPU kernel and
// registration: batch_norm_double_backward.cpp). One block per channel (grid-strided over the
// channels): the five per-channel sums in double, reduced in shared memory, then the coefficients
// (spelled as the CPU kernel's) and one element-wise pass over the channel.
#include <ATen/Dispatch.h>

#include "ops/cuda_common.cuh"

namespace amaml {
namespace {

constexpr int kSums = 5;

template <typename T>
__global__ void bn_dd_kernel(int64_t N, int64_t C, int64_t L, const T* x, const T* w, const T* mean,
                             const T* invstd, const T* gy, const T* ggx, const T* ggw, const T* ggb, T* gx,
                             T* gw, T* ggy) {
  using A = double;
  __shared__ A buf[kSums][kThreads];
  __shared__ T coef[8];
  const int64_t M = N * L;
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    const A mu = mean[c], s = invstd[c];
    A acc[kSums] = {0, 0, 0, 0, 0};  // sums of g, g (x-mu), ggx, ggx (x-mu), ggx g
    for (int64_t e = threadIdx.x; e < M; e += blockDim.x) {
      const int64_t i = ((e / L) * C + c) * L + e % L;
      const A g = gy[i], xc = static_cast<A>(x[i]) - mu;
      acc[0] += g;
      acc[1] += g * xc;
      if (ggx) {
        const A q = ggx[i];
        acc[2] += q;
        acc[3] += q * xc;
        acc[4] += q * g;
      }
    }
#pragma unroll
    for (int j = 0; j < kSums; ++j) buf[j][threadIdx.x] = acc[j];
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) {
#pragma unroll
        for (int j = 0; j < kSums; ++j) buf[j][threadIdx.x] += buf[j][threadIdx.x + half];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      const A Mf = static_cast<A>(M);
      const A wc = w ? static_cast<A>(w[c]) : A(1);
      const A gbar = buf[0][0] / Mf, qbar = buf[2][0] / Mf, Am = s * buf[1][0] / Mf, Qm = s * buf[3][0] / Mf;
      const A K = buf[4][0] - Mf * gbar * qbar - Mf * Am * Qm;
      const A ggwc = ggw ? static_cast<A>(ggw[c]) : A(0);
      const A ggbc = ggb ? static_cast<A>(ggb[c]) : A(0);
      const A ws = wc * s, ws2 = ws * s;
      const A p = ggwc * s - ws2 * Qm, q = -ws2 * Am;
      coef[0] = static_cast<T>(p);
      coef[1] = static_cast<T>(q);
      coef[2] = static_cast<T>((-ws2 * K / Mf - p * Am - q * Qm) * s);
      coef[3] = static_cast<T>(-p * gbar - q * qbar);
      coef[4] = static_cast<T>(ws);
      coef[5] = static_cast<T>((ggwc - ws * Qm) * s);
      coef[6] = static_cast<T>(ggbc - ws * qbar);
      coef[7] = static_cast<T>(mu);
      gw[c] = static_cast<T>(s * K);
    }
    __syncthreads();
    const T ap = coef[0], aq = coef[1], ax = coef[2], a0 = coef[3];
    const T bq = coef[4], bx = coef[5], b0 = coef[6], mut = coef[7];
    for (int64_t e = threadIdx.x; e < M; e += blockDim.x) {
      const int64_t i = ((e / L) * C + c) * L + e % L;
      const T xc = x[i] - mut;
      if (ggx) {
        gx[i] = ap * gy[i] + aq * ggx[i] + ax * xc + a0;
        ggy[i] = bq * ggx[i] + bx * xc + b0;
      } else {
        gx[i] = ap * gy[i] + ax * xc + a0;
        ggy[i] = bx * xc + b0;
      }
    }
    __syncthreads();  // coef and buf are reused by the next channel
  }
}

}  // namespace

void batch_norm_double_backward_cuda(const at::Tensor& x, const at::Tensor* w, const at::Tensor& mean,
                                     const at::Tensor& invstd, const at::Tensor& gy, const at::Tensor* ggx,
                                     const at::Tensor* ggw, const at::Tensor* ggb, at::Tensor& gx,
                                     at::Tensor& gw, at::Tensor& ggy) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "amaml_batch_norm_double_backward_cuda", [&] {
    using T = scalar_t;
    auto ptr = [](const at::Tensor* t) -> const T* { return t ? t->data_ptr<T>() : nullptr; };
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(C, 65535));
    bn_dd_kernel<T><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        N, C, L, x.data_ptr<T>(), ptr(w), mean.data_ptr<T>(), invstd.data_ptr<T>(), gy.data_ptr<T>(),
        ptr(ggx), ptr(ggw), ptr(ggb), gx.data_ptr<T>(), gw.data_ptr<T>(), ggy.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace amaml

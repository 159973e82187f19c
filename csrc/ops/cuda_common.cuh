// What the CUDA kernels of the fused ops (ops/<op>_cuda.cu) share: grid-stride loops of
// kThreads threads, 16-byte vector loads and stores (used where every pointer is aligned; a
// scalar path otherwise), and the grid size for the current device. Kernels are launched on the
// current stream. Each kernel's per-element arithmetic follows its CPU kernel (ops/<op>.cpp)
// term for term, so that the two agree to rounding.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/kernel_math.h"

namespace amaml {

constexpr int kThreads = 256;

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

inline int sm_count() {
  static std::vector<int> cache;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (cache.size() <= static_cast<size_t>(dev)) cache.resize(dev + 1, 0);
  if (cache[dev] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev], cudaDevAttrMultiProcessorCount, dev));
  }
  return cache[dev];
}

inline int64_t grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(sm_count()) * 16));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

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

}  // namespace amaml

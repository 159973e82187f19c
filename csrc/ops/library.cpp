// The operator library torch.ops.amaml_ext. Each fused op adds itself to it from its own files:
//
//   ops/<op>.cpp       schema (TORCH_LIBRARY_FRAGMENT), argument checks, CPU kernel, and the
//                      registrations: CPU, and in CUDA builds (AMAML_WITH_CUDA) CUDA
//   ops/<op>_cuda.cu   CUDA kernel <op>_cuda, called by <op>.cpp with checked, contiguous
//                      arguments (not <op>.cu: both files would compile to <op>.o)
//
// with the shared pieces in ops/op.h (checks), ops/kernel_math.h (stage sums, both devices),
// ops/cuda_common.cuh (CUDA launch helpers) and ops/calls.h (typed calls for C++ callers). The
// build finds both files through the globs of csrc/sources.txt.
#include <torch/library.h>

TORCH_LIBRARY(amaml_ext, m) {}

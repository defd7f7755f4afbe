// Marks functions shared by the CPU (gcc) and CUDA (nvcc) builds of a kernel.
#pragma once

#if defined(__CUDACC__)
#define LA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LA_HOST_DEVICE inline
#endif

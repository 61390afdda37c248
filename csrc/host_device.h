// SEMU_HD marks the small math functions that the CPU kernels and the CUDA kernels share, so one definition
// serves both (nvcc compiles them for host and device; a plain C++ compiler sees ordinary inline functions).
#pragma once

#ifdef __CUDACC__
#define SEMU_HD __host__ __device__
#else
#define SEMU_HD
#endif

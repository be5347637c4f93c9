// Shared by the kernels in kernels/*.cu: numerically stable activations and the
// thread -> (sequence, unit) mapping. Plain CUDA C++ using only what the tests' host
// emulation header (tests/cuda_emulation/cuda_host.h) also defines, so the tests can
// build the same sources on the host.
#pragma once

#ifndef FL_DYNAMIC_SHARED  // the host emulation defines its own
#define FL_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

__device__ __forceinline__ float fl_exp(float x) { return expf(x); }
__device__ __forceinline__ double fl_exp(double x) { return exp(x); }
__device__ __forceinline__ float fl_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double fl_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float fl_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double fl_abs(double x) { return fabs(x); }

// exp(-|x|) never overflows; NaN stays NaN.
template <typename T>
__device__ __forceinline__ T fl_sigmoid(T x) {
    const T e = fl_exp(-fl_abs(x));
    return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// One thread per (sequence b, hidden unit j) of a (B, H) state; false past the end.
__device__ __forceinline__ bool fl_element(int batch, int hidden, long long* n, int* b, int* j) {
    *n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (*n >= (long long)batch * hidden) return false;
    *b = (int)(*n / hidden);
    *j = (int)(*n % hidden);
    return true;
}

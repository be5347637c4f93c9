// Shared by lstm_forward.cu and lstm_backward.cu: numerically stable activations and the
// thread -> (sequence, unit) mapping. Plain CUDA C++ with no CUDA-only intrinsics, so
// the tests can build the same sources on the host with a small emulation header.
#pragma once

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

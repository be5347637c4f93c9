// Shared by the kernels in kernels/*.cu (both cells): numerically stable activations and the
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

// The cell update of one unit of one sequence, shared by the per-step and persistent
// kernels. Forward: pre-activations (bias included) of gates i, f, g, o -> activated
// gates, new cell state c and output h.
template <typename T>
__device__ __forceinline__ void fl_cell_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev, T* ig, T* fg,
                                                T* gg, T* og, T* c, T* h) {
    *ig = fl_sigmoid(pre_i);
    *fg = fl_sigmoid(pre_f);
    *gg = fl_tanh(pre_g);
    *og = fl_sigmoid(pre_o);
    *c = *fg * c_prev + *ig * *gg;
    *h = *og * fl_tanh(*c);
}

// Backward: activated gates, the cell state after (c_t) and before (c_before) the step,
// dh = dL/dh_t and dc = dL/dc_t from later steps -> gradients of the four
// pre-activations (da[0..3], stride `stride` apart) and dL/dc_{t-1}, returned.
template <typename T>
__device__ __forceinline__ T fl_cell_backward(T ig, T fg, T gg, T og, T c_t, T c_before, T dh, T dc, T* da,
                                              long long stride) {
    const T tc = fl_tanh(c_t);
    const T dct = dc + dh * og * (T(1) - tc * tc);
    da[0] = dct * gg * ig * (T(1) - ig);
    da[stride] = dct * c_before * fg * (T(1) - fg);
    da[2 * stride] = dct * ig * (T(1) - gg * gg);
    da[3 * stride] = dh * tc * og * (T(1) - og);
    return dct * fg;
}

// One thread per (sequence b, hidden unit j) of a (B, H) state; false past the end.
__device__ __forceinline__ bool fl_element(int batch, int hidden, long long* n, int* b, int* j) {
    *n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (*n >= (long long)batch * hidden) return false;
    *b = (int)(*n / hidden);
    *j = (int)(*n % hidden);
    return true;
}

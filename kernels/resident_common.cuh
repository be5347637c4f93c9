// What the block-resident kernels of both cells share (lstm_resident.cu, gru_resident.cu):
// the interleaved layout of the vectors every product thread reads, and the products of a
// block's sequences with W_hh held in shared memory. See lstm_resident.cu for the scheme.
#pragma once
#include "rnn_common.cuh"

#define FL_RESIDENT_GROUP 4  // RESIDENT_GROUP in cupy_backend.py: sequences per product pass
// Elements of the next step's projection a forward thread loads: a block has at least
// rows * H threads (resident_plan), so rows * 4H elements are at most 4 a thread.
#define FL_RESIDENT_PREFETCH 4

// The FL_RESIDENT_GROUP values at p (16-byte aligned) into q.
__device__ __forceinline__ void fl_load_group(const float* p, float* q) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    q[0] = v.x;
    q[1] = v.y;
    q[2] = v.z;
    q[3] = v.w;
}
__device__ __forceinline__ void fl_load_group(const double* p, double* q) {
    const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
    q[0] = a.x;
    q[1] = a.y;
    q[2] = b.x;
    q[3] = b.y;
}

// Index of (sequence r, element k) in a vector of `width` elements per sequence, kept
// interleaved by groups of sequences.
__device__ __forceinline__ int fl_interleaved(int r, int k, int width) {
    return ((r / FL_RESIDENT_GROUP) * width + k) * FL_RESIDENT_GROUP + r % FL_RESIDENT_GROUP;
}

// out[r * out_stride + o] = sum_{m < count} w[(m0 + m) * w_stride + o] * vec(r, m0 + m) for
// the block's sequences r < mine, where vec(r, m) = v[fl_interleaved(r, m, width)]: one
// output o per calling thread, a group of FL_RESIDENT_GROUP sequences per pass over w,
// then the sequences left over one at a time (a block of one sequence does a quarter of
// the multiply-adds a group would). With an addend (forward: the step's input
// projection), out = (addend[r * out_stride + o] + sum) + bias, the order the other time
// loops add them in; its loads are issued before the sum (out may be the addend: each
// thread reads its own elements before it writes them).
template <typename T>
__device__ __forceinline__ void fl_resident_products(const T* w, int w_stride, const T* v, int width, int m0,
                                                     int count, int o, int mine, T* out, int out_stride,
                                                     const T* addend = nullptr, T bias = T(0)) {
    int g = 0;
    for (; g + FL_RESIDENT_GROUP <= mine; g += FL_RESIDENT_GROUP) {
        T acc[FL_RESIDENT_GROUP], add[FL_RESIDENT_GROUP];
#pragma unroll
        for (int q = 0; q < FL_RESIDENT_GROUP; ++q) {
            acc[q] = T(0);
            add[q] = addend != nullptr ? addend[(long long)(g + q) * out_stride + o] : T(0);
        }
        const T* vg = v + (g / FL_RESIDENT_GROUP) * width * FL_RESIDENT_GROUP;
#pragma unroll 4
        for (int m = m0; m < m0 + count; ++m) {
            const T wm = w[m * w_stride + o];
            T x[FL_RESIDENT_GROUP];
            fl_load_group(vg + m * FL_RESIDENT_GROUP, x);
#pragma unroll
            for (int q = 0; q < FL_RESIDENT_GROUP; ++q) acc[q] += wm * x[q];
        }
#pragma unroll
        for (int q = 0; q < FL_RESIDENT_GROUP; ++q)
            out[(g + q) * out_stride + o] = addend != nullptr ? add[q] + acc[q] + bias : acc[q];
    }
    for (; g < mine; ++g) {
        const T add = addend != nullptr ? addend[(long long)g * out_stride + o] : T(0);
        const T* vg = v + (g / FL_RESIDENT_GROUP) * width * FL_RESIDENT_GROUP + g % FL_RESIDENT_GROUP;
        T acc = T(0);
#pragma unroll 4
        for (int m = m0; m < m0 + count; ++m) acc += w[m * w_stride + o] * vg[m * FL_RESIDENT_GROUP];
        out[g * out_stride + o] = addend != nullptr ? add + acc + bias : acc;
    }
}

__device__ __forceinline__ int fl_padded(int rows) {
    return (rows + FL_RESIDENT_GROUP - 1) / FL_RESIDENT_GROUP * FL_RESIDENT_GROUP;
}

// The block's sequences' lengths into shared memory; padding sequences get 0 (never active).
__device__ __forceinline__ void fl_load_lengths(long long* length, const long long* lengths, int b0, int mine,
                                                int padded) {
    for (int r = threadIdx.x; r < padded; r += blockDim.x) length[r] = r < mine ? lengths[b0 + r] : 0;
}

// The next step's input projection (`inputs` elements from `step`, the block's rows): each
// thread loads its elements into registers before the step's products, so that their
// latency is off the chain of steps, and stores them to shared memory after the update.
template <typename T>
__device__ __forceinline__ void fl_prefetch(const T* step, int inputs, bool more, T* next) {
#pragma unroll
    for (int q = 0; q < FL_RESIDENT_PREFETCH; ++q) {
        const int e = threadIdx.x + q * blockDim.x;
        next[q] = more && e < inputs ? step[e] : T(0);
    }
}

template <typename T>
__device__ __forceinline__ void fl_store_prefetched(const T* next, int inputs, bool more, T* pre_next) {
#pragma unroll
    for (int q = 0; q < FL_RESIDENT_PREFETCH; ++q) {
        const int e = threadIdx.x + q * blockDim.x;
        if (more && e < inputs) pre_next[e] = next[q];
    }
}

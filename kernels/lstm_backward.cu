// Backward kernels for one LSTM layer and direction.
//
// lstm_backward_step: one time step, one thread per (sequence, hidden unit). It reads the
// activated gates saved by the forward, turns dh_t (from step t+1, plus dy_t) into the
// gradient of the four gate pre-activations and carries dc back through the forget gate.
// Afterwards cuBLAS adds d_gates W_hh into dh_out (beta = 1); this kernel puts there the
// part that does not go through the weights: dh_t itself for a sequence that is past its
// length at step t (its state was carried, so its gradient passes through), else zero.
//
// column_sum: deterministic column sums (bias gradient) without atomics: each thread sums
// its column over a fixed chunk of rows in order; a second launch sums the chunks in order.
#include "rnn_common.cuh"

template <typename T>
__global__ void lstm_backward_step(const int batch, const int hidden, const int t,
                                   const T* __restrict__ gates,     // (B, 4H) activated i, f, g, o
                                   const T* __restrict__ c_t,       // (B, H) cell state after step t
                                   const T* __restrict__ c_before,  // (B, H) cell state before it
                                   const T* __restrict__ dy,        // (B, H) dL/dy_t
                                   const T* __restrict__ dh_in,     // (B, H) dL/dh_t from step t+1
                                   T* __restrict__ dh_out,          // (B, H) pass-through to step t-1
                                   T* dc,                           // (B, H) in: from t+1, out: to t-1
                                   T* __restrict__ d_gates,         // (B, 4H) out
                                   const long long* __restrict__ lengths) {
    long long n;
    int b, j;
    if (!fl_element(batch, hidden, &n, &b, &j)) return;
    T* da = d_gates + (long long)b * 4 * hidden;
    if (t >= lengths[b]) {
        da[j] = da[hidden + j] = da[2 * hidden + j] = da[3 * hidden + j] = T(0);
        dh_out[n] = dh_in[n];
        return;
    }
    const T* a = gates + (long long)b * 4 * hidden;
    dc[n] = fl_cell_backward(a[j], a[hidden + j], a[2 * hidden + j], a[3 * hidden + j], c_t[n], c_before[n],
                             dh_in[n] + dy[n], dc[n], da + j, hidden);
    dh_out[n] = T(0);
}

template <typename T>
__global__ void column_sum(const long long rows, const int cols, const long long rows_per_chunk,
                           const T* __restrict__ a,      // (rows, cols)
                           T* __restrict__ partial) {    // (chunks, cols); chunk = blockIdx.y
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    const long long first = (long long)blockIdx.y * rows_per_chunk;
    const long long last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
    T sum = T(0);
    for (long long r = first; r < last; ++r) sum += a[r * cols + col];
    partial[(long long)blockIdx.y * cols + col] = sum;
}

#define FL_INSTANTIATE_BACKWARD(T)                                                              \
    template __global__ void lstm_backward_step<T>(int, int, int, const T*, const T*, const T*, \
                                                   const T*, const T*, T*, T*, T*,               \
                                                   const long long*);                            \
    template __global__ void column_sum<T>(long long, int, long long, const T*, T*);
FL_INSTANTIATE_BACKWARD(float)
FL_INSTANTIATE_BACKWARD(double)

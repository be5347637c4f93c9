// Block-resident kernels: the whole time loop of one LSTM layer and direction in one
// launch, for hidden sizes whose recurrent weights fit one block's shared memory.
//
// Sequences are independent of each other, so each block takes a few sequences and all
// hidden units: it copies W_hh into shared memory once and keeps the state of its
// sequences there, and a step needs only block barriers. The persistent kernels
// (lstm_persistent.cu) split the units over blocks instead, which must then exchange h
// through L2 with a grid-wide barrier every step, and read W through L1 -- several
// microseconds a step where the hidden size is small. Any number of blocks may run here,
// resident at once or not. Sums run in a fixed order: results are bit-identical run to run.
//
// Threads: one per gate row j (< 4H) computes its row's recurrent products for
// FL_RESIDENT_GROUP sequences at a time, the rest one by one (backward: one per quarter
// of the rows and unit), and one per (sequence, unit) updates the cell; the host launches
// max(4H, rows * H) threads, rounded up to whole warps (resident_plan).
//
// Shared memory (dynamic, laid out identically by the host's resident_plan), with
// `padded` = sequences per block rounded up to FL_RESIDENT_GROUP. A vector that every
// product thread reads (h forward, the gate gradients backward) is kept interleaved by
// groups of sequences -- [group][k][FL_RESIDENT_GROUP] -- so that one 16-byte load gives
// a group's values of one k:
//   forward:  long long length[padded]; T w[H][4H] (W_hh transposed: consecutive rows j
//             are consecutive banks); T h[padded * H] interleaved; T c[padded][H];
//             T pre[2][padded][4H]: the step's input projection, turned into its
//             pre-activations in place, and the next step's projection, loaded while
//             this step runs (its load latency is off the chain of steps)
//   backward: long long length[padded]; T w[4H][H] (W_hh as it is: consecutive units k
//             are consecutive banks); T da[padded * 4H] interleaved;
//             T partial[4][padded][H]; T dh_carried[padded][H]; T dc[padded][H]
#include "resident_common.cuh"

template <typename T, bool Training>
__global__ void __launch_bounds__(1024)
    lstm_forward_resident(const int steps, const int batch, const int hidden, const int rows, const int reverse,
                          T* gates,                    // (steps, B, 4H): x W_ih^T in; Training: activated gates out
                          const T* __restrict__ bias,  // (4H) b_ih + b_hh
                          const T* __restrict__ w_hh,  // (4H, H)
                          const T* __restrict__ h0, const T* __restrict__ c0,  // (B, H)
                          T* __restrict__ h_states, T* __restrict__ c_states,  // Training: (steps, B, H)
                          T* __restrict__ y,                                   // (steps, B, H)
                          T* __restrict__ h_n, T* __restrict__ c_n,            // (B, H)
                          const long long* __restrict__ lengths) {             // (B)
    FL_DYNAMIC_SHARED(shared_bytes);
    const int four_h = 4 * hidden, padded = fl_padded(rows), b0 = blockIdx.x * rows;
    const int mine = batch - b0 < rows ? batch - b0 : rows;  // this block's sequences
    long long* length = reinterpret_cast<long long*>(shared_bytes);
    T* w = reinterpret_cast<T*>(length + padded);
    T* h = w + four_h * hidden;
    T* c = h + padded * hidden;
    T* pre = c + padded * hidden;           // this step's
    T* pre_next = pre + padded * four_h;  // the next step's
    const int inputs = mine * four_h;       // projection elements of a step: the block's rows are contiguous
    for (int e = threadIdx.x; e < inputs; e += blockDim.x)
        pre[e] = gates[((long long)(reverse ? steps - 1 : 0) * batch + b0) * four_h + e];
    for (int i = threadIdx.x; i < four_h * hidden; i += blockDim.x)  // i = k * 4H + j
        w[i] = w_hh[(long long)(i % four_h) * hidden + i / four_h];
    for (int i = threadIdx.x; i < padded * hidden; i += blockDim.x) {
        const int r = i / hidden, k = i % hidden;
        const long long n = (long long)(b0 + r) * hidden + k;
        h[fl_interleaved(r, k, hidden)] = r < mine ? h0[n] : T(0);  // padding sequences stay zero
        c[i] = r < mine ? c0[n] : T(0);
    }
    fl_load_lengths(length, lengths, b0, mine, padded);
    __syncthreads();
    const long long plane = (long long)batch * hidden;
    const int j = threadIdx.x;  // the gate row whose products this thread computes
    const T bias_j = j < four_h ? bias[j] : T(0);
    const int r = threadIdx.x / hidden, u = threadIdx.x % hidden;  // the cell this thread updates
    const bool updates = r < mine;
    const long long n = (long long)(b0 + r) * hidden + u;
    for (int s = 0; s < steps; ++s) {
        const int t = reverse ? steps - 1 - s : s;
        T* step_gates = gates + ((long long)t * batch + b0) * four_h;  // row r of this block: + r * 4H
        // the next step's projection: loads issued now, stored to shared memory after the products
        T next[FL_RESIDENT_PREFETCH];
        const bool more = s + 1 < steps;
        const int t_next = more ? (reverse ? t - 1 : t + 1) : t;
        const T* next_gates = gates + ((long long)t_next * batch + b0) * four_h;
        fl_prefetch(next_gates, inputs, more, next);
        if (j < four_h)  // pre = (x W_ih^T + h W_hh^T) + b, in place
            fl_resident_products(w, four_h, h, hidden, 0, hidden, j, mine, pre, four_h, pre, bias_j);
        __syncthreads();
        if (updates) {
            const int i = r * hidden + u, hi = fl_interleaved(r, u, hidden);
            const T c_prev = c[i];
            T c_new, h_new;
            if (t >= length[r]) {  // past this sequence's end: carry the state, output zero
                c_new = c_prev;
                h_new = h[hi];
                y[t * plane + n] = T(0);
            } else {
                const T* p = pre + r * four_h;
                T ig, fg, gg, og;
                fl_cell_forward(p[u], p[hidden + u], p[2 * hidden + u], p[3 * hidden + u], c_prev, &ig, &fg, &gg, &og,
                                &c_new, &h_new);
                y[t * plane + n] = h_new;
                if (Training) {
                    T* a = step_gates + (long long)r * four_h;
                    a[u] = ig;
                    a[hidden + u] = fg;
                    a[2 * hidden + u] = gg;
                    a[3 * hidden + u] = og;
                }
            }
            c[i] = c_new;
            h[hi] = h_new;
            if (Training) {
                h_states[t * plane + n] = h_new;
                c_states[t * plane + n] = c_new;
            }
        }
        fl_store_prefetched(next, inputs, more, pre_next);
        __syncthreads();
        T* done = pre;
        pre = pre_next;
        pre_next = done;
    }
    if (updates) {
        h_n[n] = h[fl_interleaved(r, u, hidden)];
        c_n[n] = c[r * hidden + u];
    }
}

template <typename T>
__global__ void __launch_bounds__(1024)
    lstm_backward_resident(const int steps, const int batch, const int hidden, const int rows, const int reverse,
                           const T* __restrict__ gates,     // (steps, B, 4H) activated i, f, g, o
                           const T* __restrict__ c_states,  // (steps, B, H) cell after each step
                           const T* __restrict__ c0,        // (B, H)
                           const T* __restrict__ dy,        // (steps, B, H)
                           const T* __restrict__ w_hh,      // (4H, H)
                           const T* __restrict__ dh_n, const T* __restrict__ dc_n,  // (B, H)
                           T* __restrict__ d_gates,                                 // (steps, B, 4H) out
                           T* __restrict__ dh0, T* __restrict__ dc0,                // (B, H) out
                           const long long* __restrict__ lengths) {
    FL_DYNAMIC_SHARED(shared_bytes);
    const int four_h = 4 * hidden, padded = fl_padded(rows), b0 = blockIdx.x * rows;
    const int mine = batch - b0 < rows ? batch - b0 : rows;
    long long* length = reinterpret_cast<long long*>(shared_bytes);
    T* w = reinterpret_cast<T*>(length + padded);
    T* da = w + four_h * hidden;
    T* partial = da + padded * four_h;
    T* dh_carried = partial + 4 * padded * hidden;  // the part of dh that skipped W_hh
    T* dc = dh_carried + padded * hidden;
    for (int i = threadIdx.x; i < four_h * hidden; i += blockDim.x) w[i] = w_hh[i];
    for (int i = threadIdx.x; i < padded * four_h; i += blockDim.x) da[i] = T(0);  // padding sequences stay zero
    for (int i = threadIdx.x; i < padded * hidden; i += blockDim.x) {
        const int r = i / hidden;
        const long long n = (long long)(b0 + r) * hidden + i % hidden;
        dh_carried[i] = r < mine ? dh_n[n] : T(0);
        dc[i] = r < mine ? dc_n[n] : T(0);
    }
    fl_load_lengths(length, lengths, b0, mine, padded);
    __syncthreads();
    const long long plane = (long long)batch * hidden;
    // dh_prev[k] = sum_j da[j] W_hh[j][k]: this thread sums the rows j of quarter `part` for unit k
    const int part = threadIdx.x / hidden, k = threadIdx.x % hidden;
    const int r = threadIdx.x / hidden, u = threadIdx.x % hidden;  // the cell this thread updates
    const bool updates = r < mine;
    const long long n = (long long)(b0 + r) * hidden + u;
    const int i = r * hidden + u;
    for (int s = steps - 1; s >= -1; --s) {  // s = -1: only the products of step 0, for dh0
        if (s < steps - 1 && part < 4)
            fl_resident_products(w, hidden, da, four_h, part * hidden, hidden, k, mine, partial + part * padded * hidden,
                                 hidden);
        if (s < 0) break;
        const int t = reverse ? steps - 1 - s : s;
        // this step's inputs do not depend on the products: loads in flight across the barrier
        // (issued before the products they would hide more of their latency; not yet measured)
        T a[4], c_t = T(0), c_before = T(0), dy_t = T(0);
        if (updates) {
            const T* a_row = gates + ((long long)t * batch + b0 + r) * four_h;
#pragma unroll
            for (int g = 0; g < 4; ++g) a[g] = a_row[g * hidden + u];
            c_t = c_states[t * plane + n];
            c_before = s == 0 ? c0[n] : c_states[(reverse ? t + 1 : t - 1) * plane + n];
            dy_t = dy[t * plane + n];
        }
        __syncthreads();
        if (updates) {
            T dh_in = dh_carried[i];
            if (s < steps - 1)  // the later step's gate gradients through W_hh, quarters in order
                dh_in += ((partial[i] + partial[padded * hidden + i]) + partial[2 * padded * hidden + i]) +
                         partial[3 * padded * hidden + i];
            T* dg = d_gates + ((long long)t * batch + b0 + r) * four_h;
            T d[4] = {T(0), T(0), T(0), T(0)};
            if (t >= length[r]) {  // the state was carried: its gradient passes through
                dh_carried[i] = dh_in;
            } else {
                dc[i] = fl_cell_backward(a[0], a[1], a[2], a[3], c_t, c_before, dh_in + dy_t, dc[i], d, 1);
                dh_carried[i] = T(0);
            }
#pragma unroll
            for (int g = 0; g < 4; ++g) {
                da[fl_interleaved(r, g * hidden + u, four_h)] = d[g];
                dg[g * hidden + u] = d[g];
            }
        }
        __syncthreads();
    }
    __syncthreads();
    if (updates) {
        dh0[n] = dh_carried[i] + (((partial[i] + partial[padded * hidden + i]) + partial[2 * padded * hidden + i]) +
                                  partial[3 * padded * hidden + i]);
        dc0[n] = dc[i];
    }
}

#define FL_INSTANTIATE_RESIDENT(T)                                                                  \
    template __global__ void lstm_forward_resident<T, true>(int, int, int, int, int, T*, const T*,  \
        const T*, const T*, const T*, T*, T*, T*, T*, T*, const long long*);                        \
    template __global__ void lstm_forward_resident<T, false>(int, int, int, int, int, T*, const T*, \
        const T*, const T*, const T*, T*, T*, T*, T*, T*, const long long*);                        \
    template __global__ void lstm_backward_resident<T>(int, int, int, int, int, const T*, const T*, \
        const T*, const T*, const T*, const T*, const T*, T*, T*, T*, const long long*);
FL_INSTANTIATE_RESIDENT(float)
FL_INSTANTIATE_RESIDENT(double)

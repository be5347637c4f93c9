// Block-resident kernels for the GRU (reset_after, torch's and cuDNN's convention): the whole
// time loop of one layer and direction in one launch, W_hh in shared memory; the scheme,
// threads and interleaved layouts are lstm_resident.cu's (resident_common.cuh). Cho's
// convention (reset_after = false) multiplies W_hn by r * h, a second product after a
// barrier each step; it runs the per-step kernels (gru_forward.cu), not these.
//
// Threads: one per gate row j (< 3H) computes its row's recurrent products (rows of r and z
// add the step's input projection and both biases in place; rows of n go to hn, as
// W_hn h + b_hn stays inside the reset), one per (sequence, unit) updates the state.
//
// Shared memory (laid out identically by the host's resident_shared_bytes, gates = 3):
//   forward:  long long length[padded]; T w[H][3H] (W_hh transposed); T h[padded * H]
//             interleaved; T hn[padded][H]; T pre[2][padded][3H] (this step's projection,
//             turned into r and z pre-activations in place, and the next step's)
//   backward: long long length[padded]; T w[3H][H]; T da[padded * 3H] interleaved (the
//             gradient of h W_hh^T + b_hh); T partial[3][padded][H]; T dh_carried[padded][H]
#include "resident_common.cuh"

template <typename T, bool Training>
__global__ void __launch_bounds__(1024)
    gru_forward_resident(const int steps, const int batch, const int hidden, const int rows, const int reverse,
                         T* gates,                    // (steps, B, 3H): x W_ih^T in; Training: activated r, z, n out
                         const T* __restrict__ b_ih,  // (3H)
                         const T* __restrict__ b_hh,  // (3H)
                         const T* __restrict__ w_hh,  // (3H, H)
                         const T* __restrict__ h0,    // (B, H)
                         T* __restrict__ h_states,    // Training: (steps, B, H)
                         T* __restrict__ hidden_n,    // Training: (steps, B, H) W_hn h + b_hn
                         T* __restrict__ y,           // (steps, B, H)
                         T* __restrict__ h_n,         // (B, H)
                         const long long* __restrict__ lengths) {
    FL_DYNAMIC_SHARED(shared_bytes);
    const int three_h = 3 * hidden, two_h = 2 * hidden, padded = fl_padded(rows), b0 = blockIdx.x * rows;
    const int mine = batch - b0 < rows ? batch - b0 : rows;  // this block's sequences
    long long* length = reinterpret_cast<long long*>(shared_bytes);
    T* w = reinterpret_cast<T*>(length + padded);
    T* h = w + three_h * hidden;
    T* hn = h + padded * hidden;
    T* pre = hn + padded * hidden;           // this step's
    T* pre_next = pre + padded * three_h;  // the next step's
    const int inputs = mine * three_h;
    for (int e = threadIdx.x; e < inputs; e += blockDim.x)
        pre[e] = gates[((long long)(reverse ? steps - 1 : 0) * batch + b0) * three_h + e];
    for (int i = threadIdx.x; i < three_h * hidden; i += blockDim.x)  // i = k * 3H + j
        w[i] = w_hh[(long long)(i % three_h) * hidden + i / three_h];
    for (int i = threadIdx.x; i < padded * hidden; i += blockDim.x) {
        const int r = i / hidden, k = i % hidden;
        h[fl_interleaved(r, k, hidden)] = r < mine ? h0[(long long)(b0 + r) * hidden + k] : T(0);
    }
    fl_load_lengths(length, lengths, b0, mine, padded);
    __syncthreads();
    const long long plane = (long long)batch * hidden;
    const int j = threadIdx.x;  // the gate row whose products this thread computes
    const T bias_j = j < two_h ? b_ih[j] + b_hh[j] : T(0);
    const int r = threadIdx.x / hidden, u = threadIdx.x % hidden;  // the state this thread updates
    const bool updates = r < mine;
    const long long n = (long long)(b0 + r) * hidden + u;
    const T b_in = b_ih[two_h + u % hidden], b_hn = b_hh[two_h + u % hidden];
    for (int s = 0; s < steps; ++s) {
        const int t = reverse ? steps - 1 - s : s;
        T* step_gates = gates + ((long long)t * batch + b0) * three_h;
        T next[FL_RESIDENT_PREFETCH];
        const bool more = s + 1 < steps;
        const int t_next = more ? (reverse ? t - 1 : t + 1) : t;
        const T* next_gates = gates + ((long long)t_next * batch + b0) * three_h;
        fl_prefetch(next_gates, inputs, more, next);
        if (j < two_h)  // r and z: pre = (x W_ih^T + h W_hh^T) + (b_ih + b_hh), in place
            fl_resident_products(w, three_h, h, hidden, 0, hidden, j, mine, pre, three_h, pre, bias_j);
        else if (j < three_h)  // n: hn = h W_hn^T (b_hn added below)
            fl_resident_products(w + two_h, three_h, h, hidden, 0, hidden, j - two_h, mine, hn, hidden);
        __syncthreads();
        if (updates) {
            const int hi = fl_interleaved(r, u, hidden);
            const T h_prev = h[hi];
            T h_new;
            if (t >= length[r]) {  // past this sequence's end: carry the state, output zero
                h_new = h_prev;
                y[t * plane + n] = T(0);
            } else {
                const T* p = pre + r * three_h;
                const T rg = fl_sigmoid(p[u]), zg = fl_sigmoid(p[hidden + u]);
                const T hnv = hn[r * hidden + u] + b_hn;
                const T ng = fl_tanh(p[two_h + u] + b_in + rg * hnv);
                h_new = (T(1) - zg) * ng + zg * h_prev;
                y[t * plane + n] = h_new;
                if (Training) {
                    T* a = step_gates + (long long)r * three_h;
                    a[u] = rg;
                    a[hidden + u] = zg;
                    a[two_h + u] = ng;
                    hidden_n[t * plane + n] = hnv;
                }
            }
            h[hi] = h_new;
            if (Training) h_states[t * plane + n] = h_new;
        }
        fl_store_prefetched(next, inputs, more, pre_next);
        __syncthreads();
        T* done = pre;
        pre = pre_next;
        pre_next = done;
    }
    if (updates) h_n[n] = h[fl_interleaved(r, u, hidden)];
}

template <typename T>
__global__ void __launch_bounds__(1024)
    gru_backward_resident(const int steps, const int batch, const int hidden, const int rows, const int reverse,
                          const T* __restrict__ gates,     // (steps, B, 3H) activated r, z, n
                          const T* __restrict__ hidden_n,  // (steps, B, H) W_hn h + b_hn
                          const T* __restrict__ h_states,  // (steps, B, H) state after each step
                          const T* __restrict__ h0,        // (B, H)
                          const T* __restrict__ dy,        // (steps, B, H)
                          const T* __restrict__ w_hh,      // (3H, H)
                          const T* __restrict__ dh_n,      // (B, H)
                          T* __restrict__ d_in,            // (steps, B, 3H) out: input side
                          T* __restrict__ d_hid,           // (steps, B, 3H) out: h W_hh^T + b_hh
                          T* __restrict__ dh0,             // (B, H) out
                          const long long* __restrict__ lengths) {
    FL_DYNAMIC_SHARED(shared_bytes);
    const int three_h = 3 * hidden, padded = fl_padded(rows), b0 = blockIdx.x * rows;
    const int mine = batch - b0 < rows ? batch - b0 : rows;
    long long* length = reinterpret_cast<long long*>(shared_bytes);
    T* w = reinterpret_cast<T*>(length + padded);
    T* da = w + three_h * hidden;
    T* partial = da + padded * three_h;
    T* dh_carried = partial + 3 * padded * hidden;  // the part of dh that skipped W_hh
    for (int i = threadIdx.x; i < three_h * hidden; i += blockDim.x) w[i] = w_hh[i];
    for (int i = threadIdx.x; i < padded * three_h; i += blockDim.x) da[i] = T(0);  // padding sequences stay zero
    for (int i = threadIdx.x; i < padded * hidden; i += blockDim.x) {
        const int r = i / hidden;
        dh_carried[i] = r < mine ? dh_n[(long long)(b0 + r) * hidden + i % hidden] : T(0);
    }
    fl_load_lengths(length, lengths, b0, mine, padded);
    __syncthreads();
    const long long plane = (long long)batch * hidden;
    // dh_prev[k] = sum_j da[j] W_hh[j][k]: this thread sums the rows j of gate `part` for unit k
    const int part = threadIdx.x / hidden, k = threadIdx.x % hidden;
    const int r = threadIdx.x / hidden, u = threadIdx.x % hidden;  // the state this thread updates
    const bool updates = r < mine;
    const long long n = (long long)(b0 + r) * hidden + u;
    const int i = r * hidden + u;
    for (int s = steps - 1; s >= -1; --s) {  // s = -1: only the products of step 0, for dh0
        if (s < steps - 1 && part < 3)
            fl_resident_products(w, hidden, da, three_h, part * hidden, hidden, k, mine,
                                 partial + part * padded * hidden, hidden);
        if (s < 0) break;
        const int t = reverse ? steps - 1 - s : s;
        T a[3], hnv = T(0), h_before = T(0), dy_t = T(0);
        if (updates) {
            const T* a_row = gates + ((long long)t * batch + b0 + r) * three_h;
#pragma unroll
            for (int g = 0; g < 3; ++g) a[g] = a_row[g * hidden + u];
            hnv = hidden_n[t * plane + n];
            h_before = s == 0 ? h0[n] : h_states[(reverse ? t + 1 : t - 1) * plane + n];
            dy_t = dy[t * plane + n];
        }
        __syncthreads();
        if (updates) {
            T dh_in = dh_carried[i];
            if (s < steps - 1)  // the later step's gradients through W_hh, gates in order
                dh_in += (partial[i] + partial[padded * hidden + i]) + partial[2 * padded * hidden + i];
            const long long row = ((long long)t * batch + b0 + r) * three_h;
            T di[3] = {T(0), T(0), T(0)}, dg[3] = {T(0), T(0), T(0)};
            if (t >= length[r]) {  // the state was carried: its gradient passes through
                dh_carried[i] = dh_in;
            } else {
                const T dh = dh_in + dy_t, rg = a[0], zg = a[1], ng = a[2];
                di[2] = dh * (T(1) - zg) * (T(1) - ng * ng);
                di[1] = dh * (h_before - ng) * zg * (T(1) - zg);
                di[0] = di[2] * hnv * rg * (T(1) - rg);
                dg[0] = di[0];
                dg[1] = di[1];
                dg[2] = di[2] * rg;
                dh_carried[i] = dh * zg;
            }
#pragma unroll
            for (int g = 0; g < 3; ++g) {
                da[fl_interleaved(r, g * hidden + u, three_h)] = dg[g];
                d_in[row + g * hidden + u] = di[g];
                d_hid[row + g * hidden + u] = dg[g];
            }
        }
        __syncthreads();
    }
    __syncthreads();
    if (updates)
        dh0[n] = dh_carried[i] + ((partial[i] + partial[padded * hidden + i]) + partial[2 * padded * hidden + i]);
}

#define FL_INSTANTIATE_GRU_RESIDENT(T)                                                               \
    template __global__ void gru_forward_resident<T, true>(int, int, int, int, int, T*, const T*,    \
        const T*, const T*, const T*, T*, T*, T*, T*, const long long*);                             \
    template __global__ void gru_forward_resident<T, false>(int, int, int, int, int, T*, const T*,   \
        const T*, const T*, const T*, T*, T*, T*, T*, const long long*);                             \
    template __global__ void gru_backward_resident<T>(int, int, int, int, int, const T*, const T*,   \
        const T*, const T*, const T*, const T*, const T*, T*, T*, T*, const long long*);
FL_INSTANTIATE_GRU_RESIDENT(float)
FL_INSTANTIATE_GRU_RESIDENT(double)

// Backward pointwise kernels for one time step of one GRU layer and direction, one thread
// per (sequence, hidden unit). They turn dh_t (from step t+1, plus dy_t while the sequence
// runs) into the gradients of the gate pre-activations: d_in (B, 3H), those of the input
// side x W_ih^T + b_ih, which for r and z are the recurrent side's too. Afterwards cuBLAS
// adds the recurrent products' share of dh_{t-1} into dh_out (beta = 1); these kernels put
// there the part that does not go through W_hh: dh_t z, or all of dh_t for a sequence past
// its length at step t (its state was carried, so its gradient passes through).
//
// reset_after: gru_backward_step also writes d_hid (B, 3H), the gradient of h W_hh^T + b_hh
// (r and z as d_in, n as dn r); then dh_out += d_hid W_hh.
// Cho: gru_backward_new_step (dn, dz; dh_t kept), cuBLAS d_reset_h = dn W_hn, then
// gru_backward_reset_step (dr through r h; dh_out = dh_t z + d_reset_h r), then
// dh_out += d_in[:, r and z] W_hr,hz.
#include "rnn_common.cuh"

template <typename T>
__global__ void gru_backward_step(const int batch, const int hidden, const int t,
                                  const T* __restrict__ gates,      // (B, 3H) activated r, z, n
                                  const T* __restrict__ hidden_n,   // (B, H) W_hn h + b_hn
                                  const T* __restrict__ h_before,   // (B, H) state before step t
                                  const T* __restrict__ dy,         // (B, H) dL/dy_t
                                  const T* __restrict__ dh_in,      // (B, H) dL/dh_t from step t+1
                                  T* __restrict__ dh_out,           // (B, H) to step t-1 (before the GEMM)
                                  T* __restrict__ d_in,             // (B, 3H) out
                                  T* __restrict__ d_hid,            // (B, 3H) out
                                  const long long* __restrict__ lengths) {
    long long n;
    int b, j;
    if (!fl_element(batch, hidden, &n, &b, &j)) return;
    const long long row = (long long)b * 3 * hidden;
    T* di = d_in + row;
    T* dg = d_hid + row;
    if (t >= lengths[b]) {
        di[j] = di[hidden + j] = di[2 * hidden + j] = T(0);
        dg[j] = dg[hidden + j] = dg[2 * hidden + j] = T(0);
        dh_out[n] = dh_in[n];
        return;
    }
    const T* a = gates + row;
    const T r = a[j], z = a[hidden + j], nn = a[2 * hidden + j];
    const T dh = dh_in[n] + dy[n];
    const T dn = dh * (T(1) - z) * (T(1) - nn * nn);
    const T dz = dh * (h_before[n] - nn) * z * (T(1) - z);
    const T dr = dn * hidden_n[n] * r * (T(1) - r);
    di[j] = dg[j] = dr;
    di[hidden + j] = dg[hidden + j] = dz;
    di[2 * hidden + j] = dn;
    dg[2 * hidden + j] = dn * r;
    dh_out[n] = dh * z;
}

template <typename T>
__global__ void gru_backward_new_step(const int batch, const int hidden, const int t,
                                      const T* __restrict__ gates,     // (B, 3H) activated r, z, n
                                      const T* __restrict__ h_before,  // (B, H)
                                      const T* __restrict__ dy, const T* __restrict__ dh_in,  // (B, H)
                                      T* __restrict__ dh_t,            // (B, H) out: dL/dh_t
                                      T* __restrict__ d_in,            // (B, 3H) out: z and n (r: 0)
                                      const long long* __restrict__ lengths) {
    long long n;
    int b, j;
    if (!fl_element(batch, hidden, &n, &b, &j)) return;
    const long long row = (long long)b * 3 * hidden;
    T* di = d_in + row;
    if (t >= lengths[b]) {
        di[j] = di[hidden + j] = di[2 * hidden + j] = T(0);
        dh_t[n] = dh_in[n];
        return;
    }
    const T* a = gates + row;
    const T z = a[hidden + j], nn = a[2 * hidden + j];
    const T dh = dh_in[n] + dy[n];
    dh_t[n] = dh;
    di[hidden + j] = dh * (h_before[n] - nn) * z * (T(1) - z);
    di[2 * hidden + j] = dh * (T(1) - z) * (T(1) - nn * nn);
}

template <typename T>
__global__ void gru_backward_reset_step(const int batch, const int hidden, const int t,
                                        const T* __restrict__ gates,      // (B, 3H) activated r, z, n
                                        const T* __restrict__ h_before,   // (B, H)
                                        const T* __restrict__ d_reset_h,  // (B, H) dL/d(r h)
                                        const T* __restrict__ dh_t,       // (B, H)
                                        T* __restrict__ dh_out,           // (B, H) before the GEMM
                                        T* __restrict__ d_in,             // (B, 3H) out: r
                                        const long long* __restrict__ lengths) {
    long long n;
    int b, j;
    if (!fl_element(batch, hidden, &n, &b, &j)) return;
    if (t >= lengths[b]) {  // d_in was zeroed by gru_backward_new_step
        dh_out[n] = dh_t[n];
        return;
    }
    const long long row = (long long)b * 3 * hidden;
    const T r = gates[row + j], z = gates[row + hidden + j];
    d_in[row + j] = d_reset_h[n] * h_before[n] * r * (T(1) - r);
    dh_out[n] = dh_t[n] * z + d_reset_h[n] * r;
}

#define FL_INSTANTIATE_GRU_BACKWARD(T)                                                                  \
    template __global__ void gru_backward_step<T>(int, int, int, const T*, const T*, const T*, const T*, \
                                                  const T*, T*, T*, T*, const long long*);               \
    template __global__ void gru_backward_new_step<T>(int, int, int, const T*, const T*, const T*,       \
                                                      const T*, T*, T*, const long long*);               \
    template __global__ void gru_backward_reset_step<T>(int, int, int, const T*, const T*, const T*,     \
                                                        const T*, T*, T*, const long long*);
FL_INSTANTIATE_GRU_BACKWARD(float)
FL_INSTANTIATE_GRU_BACKWARD(double)

// Forward pointwise kernels for one time step of one GRU layer and direction (torch.nn.GRU's
// gate order r, z, n; h' = (1 - z) n + z h). One thread per (sequence, hidden unit). `gates`
// is this step's (B, 3H) slice of the input projection x W_ih^T (no bias), precomputed for
// all steps by one GEMM; a kernel that activates a gate writes it back there (for the
// backward, and for the next phase). A sequence past its length (t >= lengths[b]) carries
// its state and outputs zero.
//
// reset_after (torch, cuDNN): n = tanh(x_n + b_in + r (W_hn h + b_hn)). cuBLAS first writes
// rec = h_{t-1} W_hh^T (B, 3H); gru_forward_step then does the whole cell.
//
// Cho et al. (reset_after = false): n = tanh(x_n + b_in + W_hn (r h) + b_hn). W_hn needs r of
// every unit first, so a step is two GEMMs and two kernels: cuBLAS writes rec = h_{t-1}
// W_hr,hz^T (B, 2H), gru_reset_step activates r and z and writes r h; cuBLAS writes
// rec_n = (r h) W_hn^T (B, H), gru_new_step activates n and updates h.
#include "rnn_common.cuh"

template <typename T, bool Training>
__global__ void gru_forward_step(const int batch, const int hidden, const int t,
                                 T* __restrict__ gates,             // (B, 3H) this step
                                 const T* __restrict__ rec,         // (B, 3H) h_{t-1} W_hh^T
                                 const T* __restrict__ b_ih,        // (3H)
                                 const T* __restrict__ b_hh,        // (3H)
                                 const T* h_prev,                   // (B, H); may alias h_out
                                 T* h_out,                          // (B, H)
                                 T* __restrict__ y,                 // (B, H) this step's output
                                 T* __restrict__ hidden_n,          // (B, H) W_hn h + b_hn (Training)
                                 const long long* __restrict__ lengths) {  // (B)
    long long n;
    int b, j;
    if (!fl_element(batch, hidden, &n, &b, &j)) return;
    if (t >= lengths[b]) {
        h_out[n] = h_prev[n];
        y[n] = T(0);  // hidden_n stays unwritten: the backward reads it only where the sequence runs
        return;
    }
    T* a = gates + (long long)b * 3 * hidden;
    const T* g = rec + (long long)b * 3 * hidden;
    const T r = fl_sigmoid(a[j] + b_ih[j] + (g[j] + b_hh[j]));
    const T z = fl_sigmoid(a[hidden + j] + b_ih[hidden + j] + (g[hidden + j] + b_hh[hidden + j]));
    const T hn = g[2 * hidden + j] + b_hh[2 * hidden + j];
    const T nn = fl_tanh(a[2 * hidden + j] + b_ih[2 * hidden + j] + r * hn);
    const T h = (T(1) - z) * nn + z * h_prev[n];
    h_out[n] = h;
    y[n] = h;
    if (Training) {
        a[j] = r;
        a[hidden + j] = z;
        a[2 * hidden + j] = nn;
        hidden_n[n] = hn;
    }
}

// Cho's first phase: r and z (activated into gates) and reset_h = r h_{t-1}; zero past the end.
template <typename T>
__global__ void gru_reset_step(const int batch, const int hidden, const int t,
                               T* __restrict__ gates,           // (B, 3H) this step
                               const T* __restrict__ rec,       // (B, 2H) h_{t-1} W_hr,hz^T
                               const T* __restrict__ b_ih, const T* __restrict__ b_hh,  // (3H)
                               const T* __restrict__ h_prev,    // (B, H)
                               T* __restrict__ reset_h,         // (B, H) out
                               const long long* __restrict__ lengths) {
    long long n;
    int b, j;
    if (!fl_element(batch, hidden, &n, &b, &j)) return;
    if (t >= lengths[b]) {
        reset_h[n] = T(0);  // its n is computed and not used: keep it finite
        return;
    }
    T* a = gates + (long long)b * 3 * hidden;
    const T* g = rec + (long long)b * 2 * hidden;
    const T r = fl_sigmoid(a[j] + b_ih[j] + (g[j] + b_hh[j]));
    a[j] = r;
    a[hidden + j] = fl_sigmoid(a[hidden + j] + b_ih[hidden + j] + (g[hidden + j] + b_hh[hidden + j]));
    reset_h[n] = r * h_prev[n];
}

// Cho's second phase: n from rec_n = (r h) W_hn^T, and the new state.
template <typename T, bool Training>
__global__ void gru_new_step(const int batch, const int hidden, const int t,
                             T* __restrict__ gates,             // (B, 3H) this step, r and z activated
                             const T* __restrict__ rec_n,       // (B, H)
                             const T* __restrict__ b_ih, const T* __restrict__ b_hh,  // (3H)
                             const T* h_prev,                   // (B, H); may alias h_out
                             T* h_out, T* __restrict__ y,       // (B, H)
                             const long long* __restrict__ lengths) {
    long long n;
    int b, j;
    if (!fl_element(batch, hidden, &n, &b, &j)) return;
    if (t >= lengths[b]) {
        h_out[n] = h_prev[n];
        y[n] = T(0);
        return;
    }
    T* a = gates + (long long)b * 3 * hidden;
    const T z = a[hidden + j];
    const T nn = fl_tanh(a[2 * hidden + j] + b_ih[2 * hidden + j] + (rec_n[n] + b_hh[2 * hidden + j]));
    const T h = (T(1) - z) * nn + z * h_prev[n];
    h_out[n] = h;
    y[n] = h;
    if (Training) a[2 * hidden + j] = nn;
}

#define FL_INSTANTIATE_GRU_FORWARD(T, TRAINING)                                                      \
    template __global__ void gru_forward_step<T, TRAINING>(int, int, int, T*, const T*, const T*,   \
                                                           const T*, const T*, T*, T*, T*,          \
                                                           const long long*);                       \
    template __global__ void gru_new_step<T, TRAINING>(int, int, int, T*, const T*, const T*,       \
                                                       const T*, const T*, T*, T*, const long long*);
FL_INSTANTIATE_GRU_FORWARD(float, true)
FL_INSTANTIATE_GRU_FORWARD(float, false)
FL_INSTANTIATE_GRU_FORWARD(double, true)
FL_INSTANTIATE_GRU_FORWARD(double, false)
template __global__ void gru_reset_step<float>(int, int, int, float*, const float*, const float*, const float*,
                                               const float*, float*, const long long*);
template __global__ void gru_reset_step<double>(int, int, int, double*, const double*, const double*, const double*,
                                                const double*, double*, const long long*);

// Forward pointwise kernel for one time step of one LSTM layer and direction.
//
// Before it runs, cuBLAS has accumulated the recurrent GEMM h_{t-1} W_hh^T into this
// step's slice of the precomputed input projection (beta = 1), so `gates` holds every
// pre-activation but the bias. One thread per (sequence, hidden unit) computes all four
// gates (order i, f, g, o, as in torch.nn.LSTM), the new cell and hidden state, and,
// when Training, writes the activated gates back over the pre-activations for backward.
// A sequence past its length (t >= lengths[b]) carries its state and outputs zero.
#include "rnn_common.cuh"

template <typename T, bool Training>
__global__ void lstm_forward_step(const int batch, const int hidden, const int t,
                                  T* __restrict__ gates,            // (B, 4H) this step
                                  const T* __restrict__ bias,       // (4H) b_ih + b_hh
                                  const T* h_prev, const T* c_prev, // (B, H); may alias h_out / c_out
                                  T* h_out, T* c_out,               // (B, H)
                                  T* __restrict__ y,                // (B, H) this step's output
                                  const long long* __restrict__ lengths) {  // (B)
    long long n;
    int b, j;
    if (!fl_element(batch, hidden, &n, &b, &j)) return;
    if (t >= lengths[b]) {
        h_out[n] = h_prev[n];
        c_out[n] = c_prev[n];
        y[n] = T(0);
        return;
    }
    T* a = gates + (long long)b * 4 * hidden;
    T ig, fg, gg, og, c, h;
    fl_cell_forward(a[j] + bias[j], a[hidden + j] + bias[hidden + j], a[2 * hidden + j] + bias[2 * hidden + j],
                    a[3 * hidden + j] + bias[3 * hidden + j], c_prev[n], &ig, &fg, &gg, &og, &c, &h);
    c_out[n] = c;
    h_out[n] = h;
    y[n] = h;
    if (Training) {
        a[j] = ig;
        a[hidden + j] = fg;
        a[2 * hidden + j] = gg;
        a[3 * hidden + j] = og;
    }
}

#define FL_INSTANTIATE_FORWARD(T, TRAINING)                                                   \
    template __global__ void lstm_forward_step<T, TRAINING>(int, int, int, T*, const T*,     \
                                                            const T*, const T*, T*, T*, T*,  \
                                                            const long long*);
FL_INSTANTIATE_FORWARD(float, true)
FL_INSTANTIATE_FORWARD(float, false)
FL_INSTANTIATE_FORWARD(double, true)
FL_INSTANTIATE_FORWARD(double, false)

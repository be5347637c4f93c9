// The CUDA kernels of kernels/*.cu built for the host (see cuda_host.h), with C entry
// points that take the launch shape, for the tests to call through ctypes.
#include "cuda_host.h"
#include "lstm_forward.cu"
#include "lstm_backward.cu"
#include "lstm_persistent.cu"
#include "lstm_resident.cu"
#include "gru_forward.cu"
#include "gru_backward.cu"
#include "gru_resident.cu"

#define FL_ENTRY_POINTS(T, SUFFIX)                                                                 \
    extern "C" void forward_step_##SUFFIX(unsigned grid, unsigned block, int training, int batch,  \
                                          int hidden, int t, T* gates, const T* bias,              \
                                          const T* h_prev, const T* c_prev, T* h_out, T* c_out,    \
                                          T* y, const long long* lengths) {                        \
        fl_dim3 g = {grid, 1, 1}, b = {block, 1, 1};                                               \
        if (training)                                                                              \
            fl_launch(g, b, lstm_forward_step<T, true>, batch, hidden, t, gates, bias, h_prev,     \
                      c_prev, h_out, c_out, y, lengths);                                           \
        else                                                                                       \
            fl_launch(g, b, lstm_forward_step<T, false>, batch, hidden, t, gates, bias, h_prev,    \
                      c_prev, h_out, c_out, y, lengths);                                           \
    }                                                                                              \
    extern "C" void backward_step_##SUFFIX(unsigned grid, unsigned block, int batch, int hidden,   \
                                           int t, const T* gates, const T* c_t,                    \
                                           const T* c_before, const T* dy, const T* dh_in,         \
                                           T* dh_out, T* dc, T* d_gates,                           \
                                           const long long* lengths) {                             \
        fl_dim3 g = {grid, 1, 1}, b = {block, 1, 1};                                               \
        fl_launch(g, b, lstm_backward_step<T>, batch, hidden, t, gates, c_t, c_before, dy, dh_in,  \
                  dh_out, dc, d_gates, lengths);                                                   \
    }                                                                                              \
    extern "C" void column_sum_##SUFFIX(unsigned grid_x, unsigned grid_y, unsigned block,          \
                                        long long rows, int cols, long long rows_per_chunk,        \
                                        const T* a, T* partial) {                                  \
        fl_dim3 g = {grid_x, grid_y, 1}, b = {block, 1, 1};                                        \
        fl_launch(g, b, column_sum<T>, rows, cols, rows_per_chunk, a, partial);                    \
    }                                                                                              \
    extern "C" void forward_persistent_##SUFFIX(                                                   \
        unsigned grid, unsigned block, unsigned long long shared_bytes, int training, int steps,   \
        int batch, int hidden, int units, int reverse, int tile_k, T* gates, const T* bias,        \
        const T* w_hh, const T* h0, const T* c0, T* h_states, T* c_states, T* y, T* h_n, T* c_n,   \
        const long long* lengths, unsigned int* barrier) {                                         \
        if (training)                                                                              \
            fl_launch_threads(grid, block, shared_bytes, lstm_forward_persistent<T, true>, steps,  \
                              batch, hidden, units, reverse, tile_k, gates, bias, w_hh, h0, c0,    \
                              h_states, c_states, y, h_n, c_n, lengths, barrier);                  \
        else                                                                                       \
            fl_launch_threads(grid, block, shared_bytes, lstm_forward_persistent<T, false>, steps, \
                              batch, hidden, units, reverse, tile_k, gates, bias, w_hh, h0, c0,    \
                              h_states, c_states, y, h_n, c_n, lengths, barrier);                  \
    }                                                                                              \
    extern "C" void backward_persistent_##SUFFIX(                                                  \
        unsigned grid, unsigned block, unsigned long long shared_bytes, int steps, int batch,      \
        int hidden, int units, int reverse, int tile_k, const T* gates, const T* c_states,         \
        const T* c0, const T* dy, const T* w_hh_t, const T* dh_n, const T* dc_n, T* d_gates,       \
        T* dh0, T* dc0, const long long* lengths, unsigned int* barrier) {                         \
        fl_launch_threads(grid, block, shared_bytes, lstm_backward_persistent<T>, steps, batch,    \
                          hidden, units, reverse, tile_k, gates, c_states, c0, dy, w_hh_t, dh_n,   \
                          dc_n, d_gates, dh0, dc0, lengths, barrier);                              \
    }                                                                                              \
    extern "C" void forward_resident_##SUFFIX(                                                     \
        unsigned grid, unsigned block, unsigned long long shared_bytes, int training, int steps,   \
        int batch, int hidden, int rows, int reverse, T* gates, const T* bias, const T* w_hh,      \
        const T* h0, const T* c0, T* h_states, T* c_states, T* y, T* h_n, T* c_n,                  \
        const long long* lengths) {                                                                \
        if (training)                                                                              \
            fl_launch_threads(grid, block, shared_bytes, lstm_forward_resident<T, true>, steps,    \
                              batch, hidden, rows, reverse, gates, bias, w_hh, h0, c0, h_states,   \
                              c_states, y, h_n, c_n, lengths);                                     \
        else                                                                                       \
            fl_launch_threads(grid, block, shared_bytes, lstm_forward_resident<T, false>, steps,   \
                              batch, hidden, rows, reverse, gates, bias, w_hh, h0, c0, h_states,   \
                              c_states, y, h_n, c_n, lengths);                                     \
    }                                                                                              \
    extern "C" void backward_resident_##SUFFIX(                                                    \
        unsigned grid, unsigned block, unsigned long long shared_bytes, int steps, int batch,      \
        int hidden, int rows, int reverse, const T* gates, const T* c_states, const T* c0,         \
        const T* dy, const T* w_hh, const T* dh_n, const T* dc_n, T* d_gates, T* dh0, T* dc0,      \
        const long long* lengths) {                                                                \
        fl_launch_threads(grid, block, shared_bytes, lstm_backward_resident<T>, steps, batch,      \
                          hidden, rows, reverse, gates, c_states, c0, dy, w_hh, dh_n, dc_n,        \
                          d_gates, dh0, dc0, lengths);                                             \
    }

FL_ENTRY_POINTS(float, f32)
FL_ENTRY_POINTS(double, f64)

// The GRU's per-step kernels: (grid, block[, training], the kernel's arguments).
#define FL_ONE_THREAD_PER_ELEMENT(NAME, KERNEL, SUFFIX, PARAMS, ARGS)                               \
    extern "C" void NAME##_##SUFFIX(unsigned grid, unsigned block, FL_UNPAREN PARAMS) {             \
        fl_dim3 g = {grid, 1, 1}, b = {block, 1, 1};                                                \
        fl_launch(g, b, KERNEL, FL_UNPAREN ARGS);                                                   \
    }
#define FL_TRAINING_SWITCH(NAME, KERNEL, SUFFIX, T, PARAMS, ARGS)                                   \
    extern "C" void NAME##_##SUFFIX(unsigned grid, unsigned block, int training, FL_UNPAREN PARAMS) { \
        fl_dim3 g = {grid, 1, 1}, b = {block, 1, 1};                                                \
        if (training)                                                                               \
            fl_launch(g, b, KERNEL<T, true>, FL_UNPAREN ARGS);                                      \
        else                                                                                        \
            fl_launch(g, b, KERNEL<T, false>, FL_UNPAREN ARGS);                                     \
    }
#define FL_UNPAREN(...) __VA_ARGS__

#define FL_GRU_ENTRY_POINTS(T, SUFFIX)                                                              \
    FL_TRAINING_SWITCH(gru_forward_step, gru_forward_step, SUFFIX, T,                               \
        (int batch, int hidden, int t, T* gates, const T* rec, const T* b_ih, const T* b_hh,        \
         const T* h_prev, T* h_out, T* y, T* hidden_n, const long long* lengths),                   \
        (batch, hidden, t, gates, rec, b_ih, b_hh, h_prev, h_out, y, hidden_n, lengths))            \
    FL_ONE_THREAD_PER_ELEMENT(gru_reset_step, gru_reset_step<T>, SUFFIX,                            \
        (int batch, int hidden, int t, T* gates, const T* rec, const T* b_ih, const T* b_hh,        \
         const T* h_prev, T* reset_h, const long long* lengths),                                    \
        (batch, hidden, t, gates, rec, b_ih, b_hh, h_prev, reset_h, lengths))                       \
    FL_TRAINING_SWITCH(gru_new_step, gru_new_step, SUFFIX, T,                                       \
        (int batch, int hidden, int t, T* gates, const T* rec_n, const T* b_ih, const T* b_hh,      \
         const T* h_prev, T* h_out, T* y, const long long* lengths),                                \
        (batch, hidden, t, gates, rec_n, b_ih, b_hh, h_prev, h_out, y, lengths))                    \
    FL_ONE_THREAD_PER_ELEMENT(gru_backward_step, gru_backward_step<T>, SUFFIX,                      \
        (int batch, int hidden, int t, const T* gates, const T* hidden_n, const T* h_before,        \
         const T* dy, const T* dh_in, T* dh_out, T* d_in, T* d_hid, const long long* lengths),      \
        (batch, hidden, t, gates, hidden_n, h_before, dy, dh_in, dh_out, d_in, d_hid, lengths))     \
    FL_ONE_THREAD_PER_ELEMENT(gru_backward_new_step, gru_backward_new_step<T>, SUFFIX,              \
        (int batch, int hidden, int t, const T* gates, const T* h_before, const T* dy,              \
         const T* dh_in, T* dh_t, T* d_in, const long long* lengths),                               \
        (batch, hidden, t, gates, h_before, dy, dh_in, dh_t, d_in, lengths))                        \
    FL_ONE_THREAD_PER_ELEMENT(gru_backward_reset_step, gru_backward_reset_step<T>, SUFFIX,          \
        (int batch, int hidden, int t, const T* gates, const T* h_before, const T* d_reset_h,       \
         const T* dh_t, T* dh_out, T* d_in, const long long* lengths),                              \
        (batch, hidden, t, gates, h_before, d_reset_h, dh_t, dh_out, d_in, lengths))

FL_GRU_ENTRY_POINTS(float, f32)
FL_GRU_ENTRY_POINTS(double, f64)

#define FL_GRU_RESIDENT_ENTRY_POINTS(T, SUFFIX)                                                     \
    extern "C" void gru_forward_resident_##SUFFIX(                                                  \
        unsigned grid, unsigned block, unsigned long long shared_bytes, int training, int steps,    \
        int batch, int hidden, int rows, int reverse, T* gates, const T* b_ih, const T* b_hh,       \
        const T* w_hh, const T* h0, T* h_states, T* hidden_n, T* y, T* h_n,                         \
        const long long* lengths) {                                                                 \
        if (training)                                                                               \
            fl_launch_threads(grid, block, shared_bytes, gru_forward_resident<T, true>, steps, batch, \
                              hidden, rows, reverse, gates, b_ih, b_hh, w_hh, h0, h_states,         \
                              hidden_n, y, h_n, lengths);                                           \
        else                                                                                        \
            fl_launch_threads(grid, block, shared_bytes, gru_forward_resident<T, false>, steps,     \
                              batch, hidden, rows, reverse, gates, b_ih, b_hh, w_hh, h0, h_states,  \
                              hidden_n, y, h_n, lengths);                                           \
    }                                                                                               \
    extern "C" void gru_backward_resident_##SUFFIX(                                                 \
        unsigned grid, unsigned block, unsigned long long shared_bytes, int steps, int batch,       \
        int hidden, int rows, int reverse, const T* gates, const T* hidden_n, const T* h_states,    \
        const T* h0, const T* dy, const T* w_hh, const T* dh_n, T* d_in, T* d_hid, T* dh0,          \
        const long long* lengths) {                                                                 \
        fl_launch_threads(grid, block, shared_bytes, gru_backward_resident<T>, steps, batch, hidden, \
                          rows, reverse, gates, hidden_n, h_states, h0, dy, w_hh, dh_n, d_in,       \
                          d_hid, dh0, lengths);                                                     \
    }

FL_GRU_RESIDENT_ENTRY_POINTS(float, f32)
FL_GRU_RESIDENT_ENTRY_POINTS(double, f64)

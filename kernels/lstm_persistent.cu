// Persistent kernels: the whole time loop of one LSTM layer and direction in one launch.
//
// The per-step path (lstm_forward.cu, lstm_backward.cu) launches a cuBLAS GEMM and a
// pointwise kernel per step from Python, and on a GPU that host work (tens of
// microseconds a step) costs more than the step itself. Here each block owns `units`
// hidden units: it computes their four gates' recurrent products itself (its rows of
// W_hh, read through L1), keeps their cell state in shared memory for the whole
// sequence, and only h (forward) or the gate gradients (backward) go through global
// memory to the other blocks, with one grid-wide barrier per step. The host launches at
// most one block per multiprocessor, so every block is resident and the barrier cannot
// deadlock. Sums run in a fixed order: results are bit-identical run to run.
//
// Shared memory (dynamic, laid out identically by the host's persistent_plan):
//   long long row_base[rows]       offset of each owned row in W (-1: past the end)
//   T result[batch * rows]         the block's matrix-vector products of this step
//   T own[2][batch * units]        forward: c (and a spare); backward: dh carried, dc
//   T tile[batch * (tile_k + 1)]   a k-tile of the shared input (padded: no bank conflicts),
//                                  and after the last k-tile the split-k partial sums of
//                                  the register tiles (slices * tiles * 16, if split)
#include "rnn_common.cuh"

#define FL_LOADS_IN_FLIGHT 4  // 16-byte loads a thread issues before it waits for the first
#define FL_MAX_SLICES 64      // split-k slices per register tile at most (more would idle in the sum)

// Threads per block the host launches at most (persistent_threads in cupy_backend.py):
// 16 warps for float32, whose kernels fit 128 registers a thread; 8 for float64.
template <typename T>
struct FlThreads {
    static const int max = 512;
};
template <>
struct FlThreads<double> {
    static const int max = 256;
};

// Grid-wide barrier; state[0] counts arrivals, state[1] is the generation (both start 0).
// A grid of one block needs only the block barrier (it orders the block's global writes
// before its later reads too), not three atomic round trips to L2.
__device__ __forceinline__ void fl_grid_barrier(unsigned int* state) {
    if (gridDim.x == 1) {
        __syncthreads();
        return;
    }
    __threadfence();  // this thread's writes are visible device-wide before it arrives
    __syncthreads();
    if (threadIdx.x == 0) {
        volatile unsigned int* generation = state + 1;
        const unsigned int seen = *generation;
        __threadfence();
        if (atomicAdd(state, 1u) == gridDim.x - 1) {
            atomicExch(state, 0u);
            __threadfence();
            atomicAdd(state + 1, 1u);
        } else {
            while (*generation == seen) __nanosleep(32);
        }
        __threadfence();
    }
    __syncthreads();
}

// 16 bytes of T, the widest load a thread issues, and how to spill one into shared memory.
template <typename T>
struct FlVector;
template <>
struct FlVector<float> {
    typedef float4 type;
};
template <>
struct FlVector<double> {
    typedef double2 type;
};
__device__ __forceinline__ void fl_store(float* dst, const float4& v) {
    dst[0] = v.x;
    dst[1] = v.y;
    dst[2] = v.z;
    dst[3] = v.w;
}
__device__ __forceinline__ void fl_store(double* dst, const double2& v) {
    dst[0] = v.x;
    dst[1] = v.y;
}
__device__ __forceinline__ void fl_store(float* dst, const float& v) { *dst = v; }
__device__ __forceinline__ void fl_store(double* dst, const double& v) { *dst = v; }

// tile[b * stride + k] = in[b * k_total + k0 + k] for b < batch, k < width, in units of V
// (T, or 16-byte vectors of T). The rows were written by other blocks, so they come from
// L2 (__ldcg), whose latency would stall the block on every element if each thread had
// one load in flight at a time: each issues FL_LOADS_IN_FLIGHT before storing any.
template <typename T, typename V>
__device__ __forceinline__ void fl_load_tile_as(const T* in, int batch, int k_total, int k0, int width, T* tile,
                                                int stride) {
    const int per_load = sizeof(V) / sizeof(T);
    const int loads_per_row = width / per_load;
    const int count = batch * loads_per_row;
    for (int i0 = threadIdx.x; i0 < count; i0 += blockDim.x * FL_LOADS_IN_FLIGHT) {
        V v[FL_LOADS_IN_FLIGHT];
#pragma unroll
        for (int q = 0; q < FL_LOADS_IN_FLIGHT; ++q) {
            const int i = i0 + q * blockDim.x;
            if (i < count) {
                const T* row = in + (long long)(i / loads_per_row) * k_total + k0;
                v[q] = __ldcg(reinterpret_cast<const V*>(row) + i % loads_per_row);
            }
        }
#pragma unroll
        for (int q = 0; q < FL_LOADS_IN_FLIGHT; ++q) {
            const int i = i0 + q * blockDim.x;
            if (i < count) fl_store(tile + (i / loads_per_row) * stride + (i % loads_per_row) * per_load, v[q]);
        }
    }
}

template <typename T>
__device__ void fl_load_tile(const T* in, int batch, int k_total, int k0, int width, T* tile, int stride) {
    typedef typename FlVector<T>::type V;
    const int per_load = sizeof(V) / sizeof(T);
    const bool aligned = k_total % per_load == 0 && k0 % per_load == 0 && width % per_load == 0 &&
                         reinterpret_cast<unsigned long long>(in) % sizeof(V) == 0;
    if (aligned)
        fl_load_tile_as<T, V>(in, batch, k_total, k0, width, tile, stride);
    else
        fl_load_tile_as<T, T>(in, batch, k_total, k0, width, tile, stride);
}

// Register tiles of the block's matrix-vector product: a thread accumulates FL_TILE x
// FL_TILE results (FL_TILE sequences x FL_TILE rows), loading FL_TILE inputs and FL_TILE
// weights per k for FL_TILE^2 multiply-adds. Sequence i of tile (mb, mr) is
// mb + i * tiles_b (strided, so that a warp's tiles read distinct shared-memory banks),
// row r is mr + r * tiles_r.
#define FL_TILE 4

struct FlTiling {
    int tiles_b, tiles_r, tiles, slices;
    __device__ FlTiling(int batch, int rows) {
        tiles_b = (batch + FL_TILE - 1) / FL_TILE;
        tiles_r = (rows + FL_TILE - 1) / FL_TILE;
        tiles = tiles_b * tiles_r;
        slices = blockDim.x / tiles;  // the host keeps tiles <= blockDim.x
        if (slices > FL_MAX_SLICES) slices = FL_MAX_SLICES;
    }
};

// result[b * rows + j] = sum_k in[b * k_total + k] * w[row_base[j] + k] for every sequence b
// and owned row j (0 where row_base[j] < 0). `in` was written by other blocks of this
// launch: it is read through L2 (__ldcg), never from a stale L1 line; w is read-only and
// stays in L1 from step to step. Threads beyond one per register tile split k into
// interleaved slices whose partial sums are then added in a fixed order (deterministic).
template <typename T>
__device__ void fl_block_matvec(const int batch, const int rows, const int k_total, const int tile_k,
                                const T* in, const T* __restrict__ w, const long long* row_base,
                                T* tile, T* partial, T* result) {
    const FlTiling tiling(batch, rows);
    const int m = threadIdx.x % tiling.tiles, slice = threadIdx.x / tiling.tiles;
    const int mb = m / tiling.tiles_r, mr = m % tiling.tiles_r;
    const bool active = slice < tiling.slices;
    const int stride = tile_k + 1;
    // Out-of-range sequences and rows read valid memory (the last sequence, row 0 of w);
    // their sums are never stored.
    int tile_row[FL_TILE];
    const T* w_row[FL_TILE];
#pragma unroll
    for (int i = 0; i < FL_TILE; ++i) {
        const int b = mb + i * tiling.tiles_b;
        tile_row[i] = (b < batch ? b : batch - 1) * stride;
        const int j = mr + i * tiling.tiles_r;
        w_row[i] = w + (j < rows && row_base[j] >= 0 ? row_base[j] : 0);
    }
    T acc[FL_TILE][FL_TILE];
#pragma unroll
    for (int i = 0; i < FL_TILE; ++i)
#pragma unroll
        for (int r = 0; r < FL_TILE; ++r) acc[i][r] = T(0);
    for (int k0 = 0; k0 < k_total; k0 += tile_k) {
        const int width = k_total - k0 < tile_k ? k_total - k0 : tile_k;
        fl_load_tile(in, batch, k_total, k0, width, tile, stride);
        __syncthreads();
        if (active) {
#pragma unroll 2
            for (int k = slice; k < width; k += tiling.slices) {
                T x[FL_TILE], weight[FL_TILE];
#pragma unroll
                for (int i = 0; i < FL_TILE; ++i) x[i] = tile[tile_row[i] + k];
#pragma unroll
                for (int r = 0; r < FL_TILE; ++r) weight[r] = __ldg(w_row[r] + k0 + k);
#pragma unroll
                for (int i = 0; i < FL_TILE; ++i)
#pragma unroll
                    for (int r = 0; r < FL_TILE; ++r) acc[i][r] += x[i] * weight[r];
            }
        }
        __syncthreads();
    }
    if (tiling.slices == 1) {
        if (active) {
#pragma unroll
            for (int i = 0; i < FL_TILE; ++i)
#pragma unroll
                for (int r = 0; r < FL_TILE; ++r) {
                    const int b = mb + i * tiling.tiles_b, j = mr + r * tiling.tiles_r;
                    if (b < batch && j < rows) result[b * rows + j] = row_base[j] >= 0 ? acc[i][r] : T(0);
                }
        }
    } else {
        if (active) {
            T* mine = partial + (slice * tiling.tiles + m) * FL_TILE * FL_TILE;
#pragma unroll
            for (int i = 0; i < FL_TILE; ++i)
#pragma unroll
                for (int r = 0; r < FL_TILE; ++r) mine[i * FL_TILE + r] = acc[i][r];
        }
        __syncthreads();
        for (int o = threadIdx.x; o < batch * rows; o += blockDim.x) {
            const int b = o / rows, j = o % rows;
            const int tile_index = (b % tiling.tiles_b) * tiling.tiles_r + j % tiling.tiles_r;
            const int element = (b / tiling.tiles_b) * FL_TILE + j / tiling.tiles_r;
            T sum = T(0);
            if (row_base[j] >= 0)
                for (int s = 0; s < tiling.slices; ++s)
                    sum += partial[(s * tiling.tiles + tile_index) * FL_TILE * FL_TILE + element];
            result[o] = sum;
        }
    }
    __syncthreads();
}

// The shared-memory layout above, carved out of the dynamic allocation.
template <typename T>
struct FlShared {
    long long* row_base;
    T *result, *own0, *own1, *partial, *tile;
    __device__ FlShared(unsigned char* base, int batch, int rows, int units) {
        row_base = reinterpret_cast<long long*>(base);
        result = reinterpret_cast<T*>(row_base + rows);
        own0 = result + batch * rows;
        own1 = own0 + batch * units;
        tile = partial = own1 + batch * units;  // the partial sums reuse the tile's memory
    }
};

template <typename T, bool Training>
__global__ void __launch_bounds__(FlThreads<T>::max)
    lstm_forward_persistent(const int steps, const int batch, const int hidden, const int units, const int reverse,
                            const int tile_k,
                            T* gates,                    // (steps, B, 4H): x W_ih^T in; Training: activated gates out
                            const T* __restrict__ bias,  // (4H) b_ih + b_hh
                            const T* __restrict__ w_hh,  // (4H, H)
                            const T* h0, const T* c0,    // (B, H)
                            T* h_states,                 // Training: (steps, B, H); else (2, B, H) ping-pong
                            T* c_states,                 // Training: (steps, B, H); else unused
                            T* __restrict__ y,           // (steps, B, H)
                            T* __restrict__ h_n, T* __restrict__ c_n,  // (B, H)
                            const long long* __restrict__ lengths,     // (B)
                            unsigned int* barrier) {                   // 2 words, zero
    FL_DYNAMIC_SHARED(shared_bytes);
    const int rows = 4 * units, unit0 = blockIdx.x * units;
    FlShared<T> sh(shared_bytes, batch, rows, units);
    for (int j = threadIdx.x; j < rows; j += blockDim.x) {  // row j = gate j / units, unit j % units
        const int unit = unit0 + j % units;
        sh.row_base[j] = unit < hidden ? ((long long)(j / units) * hidden + unit) * hidden : -1;
    }
    for (int i = threadIdx.x; i < batch * units; i += blockDim.x) {
        const int unit = unit0 + i % units;
        sh.own0[i] = unit < hidden ? c0[(long long)(i / units) * hidden + unit] : T(0);
    }
    __syncthreads();
    const long long plane = (long long)batch * hidden;
    const T* h_prev = h0;
    for (int s = 0; s < steps; ++s) {
        const int t = reverse ? steps - 1 - s : s;
        fl_block_matvec(batch, rows, hidden, tile_k, h_prev, w_hh, sh.row_base, sh.tile, sh.partial, sh.result);
        T* h_out = h_states + (Training ? t : (s & 1)) * plane;
        for (int i = threadIdx.x; i < batch * units; i += blockDim.x) {
            const int b = i / units, u = i % units, unit = unit0 + u;
            if (unit >= hidden) continue;
            const long long n = (long long)b * hidden + unit;
            const T c_prev = sh.own0[i];
            T c, h;
            if (t >= lengths[b]) {  // past this sequence's end: carry the state, output zero
                c = c_prev;
                h = __ldcg(h_prev + n);
                y[t * plane + n] = T(0);
            } else {
                T* a = gates + (t * plane + (long long)b * hidden) * 4;
                const T* r = sh.result + b * rows;
                T ig, fg, gg, og;
                fl_cell_forward(a[unit] + r[u] + bias[unit], a[hidden + unit] + r[units + u] + bias[hidden + unit],
                                a[2 * hidden + unit] + r[2 * units + u] + bias[2 * hidden + unit],
                                a[3 * hidden + unit] + r[3 * units + u] + bias[3 * hidden + unit], c_prev, &ig, &fg,
                                &gg, &og, &c, &h);
                y[t * plane + n] = h;
                if (Training) {
                    a[unit] = ig;
                    a[hidden + unit] = fg;
                    a[2 * hidden + unit] = gg;
                    a[3 * hidden + unit] = og;
                }
            }
            sh.own0[i] = c;
            h_out[n] = h;
            if (Training) c_states[t * plane + n] = c;
        }
        fl_grid_barrier(barrier);
        h_prev = h_out;
    }
    for (int i = threadIdx.x; i < batch * units; i += blockDim.x) {
        const int unit = unit0 + i % units;
        if (unit >= hidden) continue;
        const long long n = (long long)(i / units) * hidden + unit;
        h_n[n] = __ldcg(h_prev + n);
        c_n[n] = sh.own0[i];
    }
}

template <typename T>
__global__ void __launch_bounds__(FlThreads<T>::max)
    lstm_backward_persistent(const int steps, const int batch, const int hidden, const int units, const int reverse,
                             const int tile_k,
                             const T* __restrict__ gates,     // (steps, B, 4H) activated i, f, g, o
                             const T* __restrict__ c_states,  // (steps, B, H) cell after each step
                             const T* __restrict__ c0,        // (B, H)
                             const T* __restrict__ dy,        // (steps, B, H)
                             const T* __restrict__ w_hh_t,    // (H, 4H): W_hh transposed
                             const T* __restrict__ dh_n, const T* __restrict__ dc_n,  // (B, H)
                             T* d_gates,                      // (steps, B, 4H) out
                             T* __restrict__ dh0, T* __restrict__ dc0,                // (B, H) out
                             const long long* __restrict__ lengths, unsigned int* barrier) {
    FL_DYNAMIC_SHARED(shared_bytes);
    const int unit0 = blockIdx.x * units, four_h = 4 * hidden;
    FlShared<T> sh(shared_bytes, batch, units, units);
    T *dh_carried = sh.own0, *dc = sh.own1;  // dh_carried: the part of dh that skipped W_hh
    for (int j = threadIdx.x; j < units; j += blockDim.x)
        sh.row_base[j] = unit0 + j < hidden ? (long long)(unit0 + j) * four_h : -1;
    for (int i = threadIdx.x; i < batch * units; i += blockDim.x) {
        const int unit = unit0 + i % units;
        const long long n = (long long)(i / units) * hidden + unit;
        dh_carried[i] = unit < hidden ? dh_n[n] : T(0);
        dc[i] = unit < hidden ? dc_n[n] : T(0);
        sh.result[i] = T(0);  // no later step: nothing comes through W_hh yet
    }
    __syncthreads();
    const long long plane = (long long)batch * hidden;
    const T* d_later = nullptr;  // gate gradients of the step processed just before (later in the sequence)
    for (int s = steps - 1; s >= 0; --s) {
        const int t = reverse ? steps - 1 - s : s;
        if (d_later)
            fl_block_matvec(batch, units, four_h, tile_k, d_later, w_hh_t, sh.row_base, sh.tile, sh.partial, sh.result);
        const T* c_before = s == 0 ? c0 : c_states + (reverse ? t + 1 : t - 1) * plane;
        T* d_step = d_gates + t * plane * 4;
        for (int i = threadIdx.x; i < batch * units; i += blockDim.x) {
            const int b = i / units, u = i % units, unit = unit0 + u;
            if (unit >= hidden) continue;
            const long long n = (long long)b * hidden + unit;
            T* da = d_step + (long long)b * four_h;
            const T dh_in = dh_carried[i] + sh.result[b * units + u];
            if (t >= lengths[b]) {  // the state was carried: its gradient passes through
                da[unit] = da[hidden + unit] = da[2 * hidden + unit] = da[3 * hidden + unit] = T(0);
                dh_carried[i] = dh_in;
                continue;
            }
            const T* a = gates + (t * plane + (long long)b * hidden) * 4;
            dc[i] = fl_cell_backward(a[unit], a[hidden + unit], a[2 * hidden + unit], a[3 * hidden + unit],
                                     c_states[t * plane + n], c_before[n], dh_in + dy[t * plane + n], dc[i],
                                     da + unit, hidden);
            dh_carried[i] = T(0);
        }
        fl_grid_barrier(barrier);
        d_later = d_step;
    }
    fl_block_matvec(batch, units, four_h, tile_k, d_later, w_hh_t, sh.row_base, sh.tile, sh.partial, sh.result);
    for (int i = threadIdx.x; i < batch * units; i += blockDim.x) {
        const int b = i / units, unit = unit0 + i % units;
        if (unit >= hidden) continue;
        const long long n = (long long)b * hidden + unit;
        dh0[n] = dh_carried[i] + sh.result[b * units + i % units];
        dc0[n] = dc[i];
    }
}

#define FL_INSTANTIATE_PERSISTENT(T)                                                                  \
    template __global__ void lstm_forward_persistent<T, true>(int, int, int, int, int, int, T*,      \
        const T*, const T*, const T*, const T*, T*, T*, T*, T*, T*, const long long*, unsigned int*); \
    template __global__ void lstm_forward_persistent<T, false>(int, int, int, int, int, int, T*,     \
        const T*, const T*, const T*, const T*, T*, T*, T*, T*, T*, const long long*, unsigned int*); \
    template __global__ void lstm_backward_persistent<T>(int, int, int, int, int, int, const T*,     \
        const T*, const T*, const T*, const T*, const T*, const T*, T*, T*, T*, const long long*,     \
        unsigned int*);
FL_INSTANTIATE_PERSISTENT(float)
FL_INSTANTIATE_PERSISTENT(double)

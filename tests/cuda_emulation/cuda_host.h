// Host emulation of the little of CUDA that kernels/*.cu use, so that the tests can
// compile the very same kernel sources with the system C++ compiler and run them on
// the CPU: qualifiers become nothing; fl_launch loops over blocks and threads (kernels
// without shared memory or barriers); fl_launch_threads runs every CUDA thread as a
// host thread, with dynamic shared memory per block, __syncthreads as a per-block
// barrier and the atomics, fences and cache-hinted loads of the persistent kernels.
#pragma once
#include <math.h>

#include <barrier>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct fl_dim3 {
    unsigned x, y, z;
};
static thread_local fl_dim3 threadIdx, blockIdx, blockDim, gridDim;
static thread_local unsigned char* fl_shared_memory;
static thread_local std::barrier<>* fl_block_barrier;

#define FL_DYNAMIC_SHARED(name) unsigned char* name = fl_shared_memory

inline void __syncthreads() { fl_block_barrier->arrive_and_wait(); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline unsigned atomicAdd(unsigned* address, unsigned value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
inline unsigned atomicExch(unsigned* address, unsigned value) {
    return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
}
struct float4 {
    float x, y, z, w;
};
struct double2 {
    double x, y;
};
template <typename T>
inline T __ldcg(const T* address) {  // another block's write: read scalars as atomics
    if constexpr (std::is_arithmetic_v<T>) {
        T value;
        __atomic_load(address, &value, __ATOMIC_SEQ_CST);
        return value;
    } else {  // vectors: ordered by the grid barrier's fences
        return *address;
    }
}
template <typename T>
inline T __ldg(const T* address) {
    return *address;
}

template <typename Kernel, typename... Args>
void fl_launch(fl_dim3 grid, fl_dim3 block, Kernel kernel, Args... args) {
    gridDim = grid;
    blockDim = block;
    for (blockIdx.z = 0; blockIdx.z < grid.z; ++blockIdx.z)
        for (blockIdx.y = 0; blockIdx.y < grid.y; ++blockIdx.y)
            for (blockIdx.x = 0; blockIdx.x < grid.x; ++blockIdx.x)
                for (threadIdx.z = 0; threadIdx.z < block.z; ++threadIdx.z)
                    for (threadIdx.y = 0; threadIdx.y < block.y; ++threadIdx.y)
                        for (threadIdx.x = 0; threadIdx.x < block.x; ++threadIdx.x) kernel(args...);
}

// One host thread per CUDA thread (1-D grids and blocks): for kernels that use shared
// memory, __syncthreads and grid-wide barriers. Shared memory starts as garbage (0xA5),
// as on a GPU: a kernel that reads what it did not write shows it.
template <typename Kernel, typename... Args>
void fl_launch_threads(unsigned grid, unsigned block, size_t shared_bytes, Kernel kernel, Args... args) {
    std::vector<std::unique_ptr<std::barrier<>>> barriers;
    std::vector<std::vector<unsigned char>> shared;
    for (unsigned b = 0; b < grid; ++b) {
        barriers.emplace_back(new std::barrier<>(block));
        shared.emplace_back(shared_bytes + 16, (unsigned char)0xA5);
    }
    std::vector<std::thread> threads;
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([&, b, t] {
                gridDim = {grid, 1, 1};
                blockDim = {block, 1, 1};
                blockIdx = {b, 0, 0};
                threadIdx = {t, 0, 0};
                fl_block_barrier = barriers[b].get();
                fl_shared_memory = shared[b].data();
                kernel(args...);
            });
    for (auto& thread : threads) thread.join();
}

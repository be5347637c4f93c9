// Host emulation of the little of CUDA that kernels/*.cu use, so that the tests can
// compile the very same kernel sources with the system C++ compiler and run them on
// the CPU: qualifiers become nothing, and a launch loops over blocks and threads.
// Only for kernels without shared memory or synchronisation (all of ours).
#pragma once
#include <math.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct fl_dim3 {
    unsigned x, y, z;
};
static fl_dim3 threadIdx, blockIdx, blockDim, gridDim;

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

// A stand-in for libcublas with the five functions fastlstm/backends/cublas_api.py binds,
// for testing that binding's argument types and order on a machine without a GPU:
// column-major GEMMs on host pointers (as cuBLAS's on device pointers), and the stream,
// workspace and pointer mode last set, readable back. Setting the stream resets the
// workspace to the default (null here), as cuBLAS's does. Status codes as cuBLAS's:
// 0 success, 1 not initialized (a null handle), 7 invalid value.
#include <stddef.h>

static void* stream_set;
static void* workspace_set;
static size_t workspace_bytes_set;
static int pointer_mode_set = -1;

void* fake_cublas_stream(void) { return stream_set; }
void* fake_cublas_workspace(void) { return workspace_set; }
size_t fake_cublas_workspace_bytes(void) { return workspace_bytes_set; }
int fake_cublas_pointer_mode(void) { return pointer_mode_set; }

int cublasSetStream_v2(void* handle, void* stream) {
    if (!handle) return 1;
    stream_set = stream;
    workspace_set = NULL;
    workspace_bytes_set = 0;
    return 0;
}

int cublasSetWorkspace_v2(void* handle, void* workspace, size_t bytes) {
    if (!handle) return 1;
    workspace_set = workspace;
    workspace_bytes_set = bytes;
    return 0;
}

int cublasSetPointerMode_v2(void* handle, int mode) {
    if (!handle) return 1;
    pointer_mode_set = mode;
    return 0;
}

#define FAKE_GEMM(NAME, T)                                                                              \
    int NAME(void* handle, int transa, int transb, int m, int n, int k, const T* alpha, const T* a,     \
             int lda, const T* b, int ldb, const T* beta, T* c, int ldc) {                              \
        if (!handle) return 1;                                                                          \
        if (m < 0 || n < 0 || k < 0 || ldc < (m > 1 ? m : 1) || lda < 1 || ldb < 1) return 7;          \
        for (int j = 0; j < n; ++j)                                                                     \
            for (int i = 0; i < m; ++i) {                                                               \
                T sum = 0;                                                                              \
                for (int p = 0; p < k; ++p) {                                                           \
                    const T x = transa ? a[p + (size_t)i * lda] : a[i + (size_t)p * lda];               \
                    const T y = transb ? b[j + (size_t)p * ldb] : b[p + (size_t)j * ldb];               \
                    sum += x * y;                                                                       \
                }                                                                                       \
                T* out = c + i + (size_t)j * ldc;                                                       \
                *out = *alpha * sum + (*beta == 0 ? 0 : *beta * *out);                                  \
            }                                                                                           \
        return 0;                                                                                       \
    }

FAKE_GEMM(cublasSgemm_v2, float)
FAKE_GEMM(cublasDgemm_v2, double)

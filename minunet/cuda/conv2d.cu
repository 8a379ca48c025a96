// conv2d.cu -- 2-D convolution on the GPU: the forward pass and both gradients, as a ladder
// of four kernels per pass that compute the same numbers ever faster.
//
// Letters (those of cuDNN and of the implicit-GEMM literature, used in every .cu file and in
// minunet/cuda/ops.py):
//
//     x       (N, C, H, W)    batch N, input channels C, input height H and width W
//     weight  (K, C, R, S)    output channels K, kernel height R and width S
//     y       (N, K, P, Q)    output height P and width Q
//
// with lower-case letters for indices (n, c, h, w, k, r, s, p, q). The host compiles this
// file once per element type, defining MINUNET_SCALAR as float or double.
//
// Output pixel (p, q) reads, through tap (r, s), the input pixel
//
//     h = p * stride_h - pad_h + r * dilation_h
//     w = q * stride_w - pad_w + s * dilation_w           (zero when outside the input).
//
// pad_h / pad_w are the top / left padding: the bottom / right padding is implied by P and
// Q, which the host computes (minunet.shapes), so asymmetric "same" padding is no special case.
//
// Each pass is a matrix product C = A B ("implicit GEMM": the matrices are never stored):
//
//   pass              C (rows x cols)          shared dimension ("depth")    A and B
//   forward           K x (N, P, Q)            taps (c, r, s)                weight, im2col(x)
//   input gradient    C x (N, H, W)            (k, r, s)                     weight^T, grad_out
//   weight gradient   K x (c, r, s)            pixels (n, p, q)              grad_out, im2col^T
//
// The input gradient is also the forward pass of a transposed convolution.
//
// The ladder (the `algorithm` of minunet.cuda.ops), each rung a kernel per pass:
//
//   naive      one thread per output element, straight from the definition
//   tiled      16 x 16 threads share 16 x 16 tiles of A and B in shared memory
//   blocked    a 64 x 64 block tile, each thread a 4 x 4 sub-tile held in registers, the
//              tap decomposition read from a precomputed table (no division in the loop);
//              the weight gradient splits its long depth over blocks (split-K)
//   pipelined  blocked + double buffering (the next tiles are fetched while the current ones
//              are multiplied) + vectorised (float4) shared-memory reads
//
// and the U-Net's 2x2 stride-2 up-convolution has its own kernels (up_conv2x2_*).
//
// Every thread *gathers* what it needs and writes its own outputs: no atomics, and the result
// is the same on every run. Indices are int: each tensor must hold fewer than 2^31 elements.

#ifndef MINUNET_SCALAR
#define MINUNET_SCALAR float
#endif
typedef MINUNET_SCALAR scalar_t;

// ---------------------------------------------------------------------------------------
// Geometry shared by all kernels
// ---------------------------------------------------------------------------------------

// Every convolution kernel of this file receives the same fifteen sizes, in this order.
#define CONV_SIZES                                                                       \
    int N, int C, int H, int W, int K, int R, int S, int P, int Q, int stride_h,         \
        int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w
#define CONV_FROM_SIZES                                                                  \
    Conv { N, C, H, W, K, R, S, P, Q, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w }

struct Conv {
    int N, C, H, W, K, R, S, P, Q;
    int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

// x[n, c, h, w] for the input pixel that tap (r, s) of output pixel (p, q) reads; zero in the
// padding. This is one entry of the "im2col" matrix, computed on the fly.
__device__ __forceinline__ scalar_t input_at(const scalar_t* x, const Conv& g, int n, int c,
                                             int p, int q, int r, int s) {
    int h = p * g.stride_h - g.pad_h + r * g.dilation_h;
    int w = q * g.stride_w - g.pad_w + s * g.dilation_w;
    if (h < 0 || h >= g.H || w < 0 || w >= g.W) return 0;
    return x[((n * g.C + c) * g.H + h) * g.W + w];
}

// The output index o whose tap t reads input index i (solving i = o*stride - pad + t*dilation
// for o), or -1 when there is none: o must be a whole number inside the output.
__device__ __forceinline__ int output_index_reading(int i, int t, int stride, int pad,
                                                    int dilation, int out_size) {
    int shifted = i + pad - t * dilation;
    if (shifted < 0 || shifted % stride != 0) return -1;
    int o = shifted / stride;
    return o < out_size ? o : -1;
}

// grad_out[n, k, p, q] for the output pixel whose tap (r, s) read input pixel (h, w); zero
// when no output pixel did. Gathering these is the input gradient (the transpose).
__device__ __forceinline__ scalar_t grad_out_at(const scalar_t* grad_out, const Conv& g, int n,
                                                int k, int h, int w, int r, int s) {
    int p = output_index_reading(h, r, g.stride_h, g.pad_h, g.dilation_h, g.P);
    int q = output_index_reading(w, s, g.stride_w, g.pad_w, g.dilation_w, g.Q);
    if (p < 0 || q < 0) return 0;
    return grad_out[((n * g.K + k) * g.P + p) * g.Q + q];
}

// ---------------------------------------------------------------------------------------
// Rung 1, naive: one thread per output element, launched on a 1-D grid
// ---------------------------------------------------------------------------------------

// y = conv(x, weight) + bias, bias (K,) (zeros when there is none). One thread per element of
// y: y[n, k, p, q] = bias[k] + sum_{c, r, s} weight[k, c, r, s] * x[n, c, h, w].
extern "C" __global__ void conv2d_forward_naive(const scalar_t* __restrict__ x,
                                                const scalar_t* __restrict__ weight,
                                                const scalar_t* __restrict__ bias,
                                                scalar_t* __restrict__ y, CONV_SIZES) {
    const Conv g = CONV_FROM_SIZES;
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= g.N * g.K * g.P * g.Q) return;
    int q = index % g.Q;
    int p = (index / g.Q) % g.P;
    int k = (index / (g.Q * g.P)) % g.K;
    int n = index / (g.Q * g.P * g.K);

    scalar_t sum = bias[k];
    for (int c = 0; c < g.C; ++c)
        for (int r = 0; r < g.R; ++r)
            for (int s = 0; s < g.S; ++s)
                sum += weight[((k * g.C + c) * g.R + r) * g.S + s] *
                       input_at(x, g, n, c, p, q, r, s);
    y[index] = sum;
}

// grad_x = dL/dx, given grad_out = dL/dy (N, K, P, Q); plus bias (C,), which is zero for a
// gradient and the layer's bias when this serves as a transposed convolution. One thread per
// input pixel gathers every (output pixel, tap) pair that read it:
// grad_x[n, c, h, w] = sum_{k, r, s} weight[k, c, r, s] * grad_out[n, k, p, q].
extern "C" __global__ void conv2d_input_grad_naive(const scalar_t* __restrict__ grad_out,
                                                   const scalar_t* __restrict__ weight,
                                                   const scalar_t* __restrict__ bias,
                                                   scalar_t* __restrict__ grad_x, CONV_SIZES) {
    const Conv g = CONV_FROM_SIZES;
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= g.N * g.C * g.H * g.W) return;
    int w = index % g.W;
    int h = (index / g.W) % g.H;
    int c = (index / (g.W * g.H)) % g.C;
    int n = index / (g.W * g.H * g.C);

    scalar_t sum = bias[c];
    for (int k = 0; k < g.K; ++k)
        for (int r = 0; r < g.R; ++r)
            for (int s = 0; s < g.S; ++s)
                sum += weight[((k * g.C + c) * g.R + r) * g.S + s] *
                       grad_out_at(grad_out, g, n, k, h, w, r, s);
    grad_x[index] = sum;
}

// grad_weight = dL/dweight (K, C, R, S). One thread per weight sums, over the batch and every
// output pixel, grad_out[n, k, p, q] * x[n, c, h, w].
extern "C" __global__ void conv2d_weight_grad_naive(const scalar_t* __restrict__ grad_out,
                                                    const scalar_t* __restrict__ x,
                                                    scalar_t* __restrict__ grad_weight,
                                                    CONV_SIZES) {
    const Conv g = CONV_FROM_SIZES;
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= g.K * g.C * g.R * g.S) return;
    int s = index % g.S;
    int r = (index / g.S) % g.R;
    int c = (index / (g.S * g.R)) % g.C;
    int k = index / (g.S * g.R * g.C);

    scalar_t sum = 0;
    for (int n = 0; n < g.N; ++n)
        for (int p = 0; p < g.P; ++p)
            for (int q = 0; q < g.Q; ++q)
                sum += grad_out[((n * g.K + k) * g.P + p) * g.Q + q] *
                       input_at(x, g, n, c, p, q, r, s);
    grad_weight[index] = sum;
}

// ---------------------------------------------------------------------------------------
// Rung 2, tiled: each pass as a matrix product over shared-memory tiles
// ---------------------------------------------------------------------------------------
//
// A block of TILE x TILE threads computes a TILE x TILE tile of C. It walks along the depth in
// steps of TILE; at each step every thread copies one entry of A and one of B into shared
// memory, the block waits until both tiles are complete, and each thread then reads a row of
// the A tile and a column of the B tile. Each entry of A and B is thus read from global memory
// by one thread per block instead of TILE threads.
//
// A "problem" struct says how to read entry (row, d) of A and (d, col) of B straight from the
// tensors, and where entry (row, col) of C goes. Its a() and b() decompose the indices with
// division and modulo on every call: the price the next rung removes.

#define TILE 16

template <class Problem>
__device__ void tiled_matmul(const Problem& m) {
    __shared__ scalar_t a_tile[TILE][TILE];
    __shared__ scalar_t b_tile[TILE][TILE];
    const int ty = threadIdx.y, tx = threadIdx.x;
    const int row = blockIdx.y * TILE + ty;  // of C and A
    const int col = blockIdx.x * TILE + tx;  // of C and B
    const int rows = m.rows(), cols = m.cols(), depth = m.depth();

    scalar_t sum = 0;
    for (int d0 = 0; d0 < depth; d0 += TILE) {
        // Threads outside the matrices load zeros, so the inner loop needs no bounds checks.
        a_tile[ty][tx] = (row < rows && d0 + tx < depth) ? m.a(row, d0 + tx) : scalar_t(0);
        b_tile[ty][tx] = (d0 + ty < depth && col < cols) ? m.b(d0 + ty, col) : scalar_t(0);
        __syncthreads();  // both tiles are complete before anyone reads them
        for (int d = 0; d < TILE; ++d) sum += a_tile[ty][d] * b_tile[d][tx];
        __syncthreads();  // everyone is done reading before the next step overwrites them
    }
    if (row < rows && col < cols) m.store(row, col, sum);
}

// Forward: A[k, (c, r, s)] = weight, B[(c, r, s), (n, p, q)] = im2col(x),
// y[n, k, p, q] = C[k, (n, p, q)] + bias[k].
struct ForwardProblem {
    Conv g;
    const scalar_t* x;
    const scalar_t* weight;
    const scalar_t* bias;
    scalar_t* y;
    __device__ int rows() const { return g.K; }
    __device__ int cols() const { return g.N * g.P * g.Q; }
    __device__ int depth() const { return g.C * g.R * g.S; }
    __device__ scalar_t a(int k, int tap) const { return weight[k * depth() + tap]; }
    __device__ scalar_t b(int tap, int pixel) const {
        int s = tap % g.S, r = (tap / g.S) % g.R, c = tap / (g.S * g.R);
        int q = pixel % g.Q, p = (pixel / g.Q) % g.P, n = pixel / (g.Q * g.P);
        return input_at(x, g, n, c, p, q, r, s);
    }
    __device__ void store(int k, int pixel, scalar_t sum) const {
        int plane = g.P * g.Q, n = pixel / plane;
        y[(n * g.K + k) * plane + pixel % plane] = sum + bias[k];
    }
};

// Input gradient: A[c, (k, r, s)] = weight[k, c, r, s]; B[(k, r, s), (n, h, w)] = grad_out at
// the output pixel whose tap (r, s) read (h, w), or zero; grad_x = C + bias[c].
struct InputGradProblem {
    Conv g;
    const scalar_t* grad_out;
    const scalar_t* weight;
    const scalar_t* bias;
    scalar_t* grad_x;
    __device__ int rows() const { return g.C; }
    __device__ int cols() const { return g.N * g.H * g.W; }
    __device__ int depth() const { return g.K * g.R * g.S; }
    __device__ scalar_t a(int c, int d) const {
        int taps = g.R * g.S, k = d / taps;
        return weight[(k * g.C + c) * taps + d % taps];
    }
    __device__ scalar_t b(int d, int pixel) const {
        int s = d % g.S, r = (d / g.S) % g.R, k = d / (g.S * g.R);
        int w = pixel % g.W, h = (pixel / g.W) % g.H, n = pixel / (g.W * g.H);
        return grad_out_at(grad_out, g, n, k, h, w, r, s);
    }
    __device__ void store(int c, int pixel, scalar_t sum) const {
        int plane = g.H * g.W, n = pixel / plane;
        grad_x[(n * g.C + c) * plane + pixel % plane] = sum + bias[c];
    }
};

// Weight gradient: A[k, (n, p, q)] = grad_out; B[(n, p, q), (c, r, s)] = im2col(x)^T;
// grad_weight[k, c, r, s] = C[k, (c, r, s)].
struct WeightGradProblem {
    Conv g;
    const scalar_t* grad_out;
    const scalar_t* x;
    scalar_t* grad_weight;
    __device__ int rows() const { return g.K; }
    __device__ int cols() const { return g.C * g.R * g.S; }
    __device__ int depth() const { return g.N * g.P * g.Q; }
    __device__ scalar_t a(int k, int pixel) const {
        int plane = g.P * g.Q, n = pixel / plane;
        return grad_out[(n * g.K + k) * plane + pixel % plane];
    }
    __device__ scalar_t b(int pixel, int tap) const {
        int s = tap % g.S, r = (tap / g.S) % g.R, c = tap / (g.S * g.R);
        int q = pixel % g.Q, p = (pixel / g.Q) % g.P, n = pixel / (g.Q * g.P);
        return input_at(x, g, n, c, p, q, r, s);
    }
    __device__ void store(int k, int tap, scalar_t sum) const {
        grad_weight[k * cols() + tap] = sum;
    }
};

// Launched on a 2-D grid of TILE x TILE blocks: blockIdx.x over C's columns, blockIdx.y over
// its rows (at most 65535 row tiles, i.e. about a million channels: never a limit here).

extern "C" __global__ void conv2d_forward_tiled(const scalar_t* __restrict__ x,
                                                const scalar_t* __restrict__ weight,
                                                const scalar_t* __restrict__ bias,
                                                scalar_t* __restrict__ y, CONV_SIZES) {
    tiled_matmul(ForwardProblem{CONV_FROM_SIZES, x, weight, bias, y});
}

extern "C" __global__ void conv2d_input_grad_tiled(const scalar_t* __restrict__ grad_out,
                                                   const scalar_t* __restrict__ weight,
                                                   const scalar_t* __restrict__ bias,
                                                   scalar_t* __restrict__ grad_x, CONV_SIZES) {
    tiled_matmul(InputGradProblem{CONV_FROM_SIZES, grad_out, weight, bias, grad_x});
}

extern "C" __global__ void conv2d_weight_grad_tiled(const scalar_t* __restrict__ grad_out,
                                                    const scalar_t* __restrict__ x,
                                                    scalar_t* __restrict__ grad_weight,
                                                    CONV_SIZES) {
    tiled_matmul(WeightGradProblem{CONV_FROM_SIZES, grad_out, x, grad_weight});
}

// ---------------------------------------------------------------------------------------
// Rungs 3 and 4, blocked and pipelined: register blocking over a tap table
// ---------------------------------------------------------------------------------------
//
// In the tiled kernel each multiply-add costs two shared-memory reads. Here a block of
// BLOCKED_THREADS threads computes a BLOCK_ROWS x BLOCK_COLS tile of C and each thread owns a
// THREAD_ROWS x THREAD_COLS sub-tile of it, accumulated in registers: at each depth index a
// thread reads 4 values of A and 4 of B from shared memory and does 16 multiply-adds.
//
// Loading: per step of BLOCK_DEPTH along the depth, each thread fetches the same A_LOADS
// entries of the A tile and B_LOADS of the B tile (same row of A or column of B, same offset
// in the step). A "loader" keeps what does not change (its row or column, decomposed once
// before the loop) and walks along the depth, either through the tap table the host builds
// (depth index -> struct Tap) or with a cursor that carries (n, p, q) forward. No division or
// modulo is left in the loop (except by a stride > 1 in the input gradient).
//
// Split-K: blockIdx.z takes the slice [z * split_depth, (z + 1) * split_depth) of the depth.
// The weight gradient has a long depth (every pixel of the batch) and a small C, so the host
// gives it several slices; their partial products go to a workspace, which conv2d_sum_splits
// adds up in a fixed order: deterministic, no atomics.
//
// Pipelined adds double buffering: two copies of each shared tile; while the block multiplies
// one, the next step's entries are already on their way from global memory into registers and
// go to the other copy, so one barrier per step suffices. Its fragment reads from shared
// memory are vectorised (one float4 instead of four floats). Global loads stay scalar: the
// im2col columns start at any pixel, rarely on a 16-byte boundary.

#define BLOCK_ROWS 64
#define BLOCK_COLS 64
#define BLOCK_DEPTH 8
#define THREAD_ROWS 4
#define THREAD_COLS 4
#define BLOCKED_THREADS 256

static_assert(BLOCKED_THREADS == (BLOCK_ROWS / THREAD_ROWS) * (BLOCK_COLS / THREAD_COLS),
              "one thread per sub-tile");
static_assert(THREAD_ROWS == 4 && THREAD_COLS == 4, "fragments are read four at a time");
const int A_LOADS = BLOCK_ROWS * BLOCK_DEPTH / BLOCKED_THREADS;  // entries of A per thread
const int B_LOADS = BLOCK_DEPTH * BLOCK_COLS / BLOCKED_THREADS;  // entries of B per thread

// One entry of the tap table, for depth index d = (c, r, s) of the forward pass or
// d = (k, r, s) of the input gradient (built by minunet.cuda.ops._tap_table).
struct __align__(16) Tap {  // one 16-byte load
    int offset;         // forward: c*H*W + dh*W + dw into x; input gradient: k*P*Q into grad_out
    int dh, dw;         // r * dilation_h, s * dilation_w
    int weight_offset;  // input gradient: k*C*R*S + r*S + s into the weight (forward: 0)
};

// Four consecutive values from shared memory: one 16-byte load when vectorised (the tiles are
// 16-byte aligned and every fragment starts at a multiple of four), else four loads.
__device__ __forceinline__ void read_four(const float* from, float* to) {
    float4 v = *reinterpret_cast<const float4*>(from);
    to[0] = v.x, to[1] = v.y, to[2] = v.z, to[3] = v.w;
}
__device__ __forceinline__ void read_four(const double* from, double* to) {
    double2 u = reinterpret_cast<const double2*>(from)[0];
    double2 v = reinterpret_cast<const double2*>(from)[1];
    to[0] = u.x, to[1] = u.y, to[2] = v.x, to[3] = v.y;
}
template <bool kVectorised>
__device__ __forceinline__ void read_fragment(const scalar_t* from, scalar_t* to) {
    if (kVectorised) {
        read_four(from, to);
    } else {
        for (int i = 0; i < 4; ++i) to[i] = from[i];
    }
}

// acc += (the thread's 4 rows of the A tile) x (its 4 columns of the B tile).
template <bool kVectorised>
__device__ __forceinline__ void multiply_tiles(const scalar_t (*a_tile)[BLOCK_ROWS],
                                               const scalar_t (*b_tile)[BLOCK_COLS],
                                               scalar_t (*acc)[THREAD_COLS], int ty, int tx) {
#pragma unroll
    for (int d = 0; d < BLOCK_DEPTH; ++d) {
        scalar_t a[THREAD_ROWS], b[THREAD_COLS];
        read_fragment<kVectorised>(&a_tile[d][ty * THREAD_ROWS], a);
        read_fragment<kVectorised>(&b_tile[d][tx * THREAD_COLS], b);
#pragma unroll
        for (int i = 0; i < THREAD_ROWS; ++i)
#pragma unroll
            for (int j = 0; j < THREAD_COLS; ++j) acc[i][j] += a[i] * b[j];
    }
}

// The next step's entries of A and B, from global memory into registers.
template <class Problem>
__device__ __forceinline__ void fetch_step(const Problem& m, typename Problem::ALoader* a_load,
                                           typename Problem::BLoader* b_load, scalar_t* a_next,
                                           scalar_t* b_next) {
    for (int j = 0; j < A_LOADS; ++j) a_next[j] = a_load[j].next(m);
    for (int j = 0; j < B_LOADS; ++j) b_next[j] = b_load[j].next(m);
}

// Thread t's entries j of a step: A tile element i = t + j * BLOCKED_THREADS sits at
// (row i / BLOCK_DEPTH, depth i % BLOCK_DEPTH). B tile element i sits at (depth i /
// BLOCK_COLS, column i % BLOCK_COLS), or at (i % BLOCK_DEPTH, i / BLOCK_DEPTH) when B is
// contiguous along the depth (the weight gradients, whose depth runs over pixels): either
// way consecutive threads read neighbouring addresses, so a warp's loads coalesce.
__device__ __forceinline__ int b_depth(bool along_depth, int i) {
    return along_depth ? i % BLOCK_DEPTH : i / BLOCK_COLS;
}
__device__ __forceinline__ int b_column(bool along_depth, int i) {
    return along_depth ? i / BLOCK_DEPTH : i % BLOCK_COLS;
}

// A is stored transposed (depth-major), so a thread's 4 rows are contiguous.
__device__ __forceinline__ void store_step(scalar_t (*a_tile)[BLOCK_ROWS],
                                           scalar_t (*b_tile)[BLOCK_COLS],
                                           const scalar_t* a_next, const scalar_t* b_next,
                                           bool b_along_depth) {
    const int t = threadIdx.x;
    for (int j = 0; j < A_LOADS; ++j) {
        int i = t + j * BLOCKED_THREADS;
        a_tile[i % BLOCK_DEPTH][i / BLOCK_DEPTH] = a_next[j];
    }
    for (int j = 0; j < B_LOADS; ++j) {
        int i = t + j * BLOCKED_THREADS;
        b_tile[b_depth(b_along_depth, i)][b_column(b_along_depth, i)] = b_next[j];
    }
}

// C[tile] = A B over the depth slice of blockIdx.z; launched with BLOCKED_THREADS threads per
// block on a grid (column tiles, row tiles, depth slices).
template <class Problem, bool kPipelined>
__device__ void blocked_matmul(const Problem& m) {
    __shared__ __align__(16) scalar_t a_tile[2][BLOCK_DEPTH][BLOCK_ROWS];
    __shared__ __align__(16) scalar_t b_tile[2][BLOCK_DEPTH][BLOCK_COLS];
    const int t = threadIdx.x;
    const int ty = t / (BLOCK_COLS / THREAD_COLS), tx = t % (BLOCK_COLS / THREAD_COLS);
    const int row0 = blockIdx.y * BLOCK_ROWS, col0 = blockIdx.x * BLOCK_COLS;
    const int d_begin = blockIdx.z * m.split_depth;
    const int d_end = m.depth() < d_begin + m.split_depth ? m.depth() : d_begin + m.split_depth;

    typename Problem::ALoader a_load[A_LOADS];
    typename Problem::BLoader b_load[B_LOADS];
    for (int j = 0; j < A_LOADS; ++j) {
        int i = t + j * BLOCKED_THREADS;
        a_load[j] = m.a_loader(row0 + i / BLOCK_DEPTH, d_begin + i % BLOCK_DEPTH, d_end);
    }
    for (int j = 0; j < B_LOADS; ++j) {
        int i = t + j * BLOCKED_THREADS;
        b_load[j] = m.b_loader(d_begin + b_depth(Problem::b_along_depth, i),
                               col0 + b_column(Problem::b_along_depth, i), d_end);
    }

    scalar_t acc[THREAD_ROWS][THREAD_COLS];
    for (int i = 0; i < THREAD_ROWS; ++i)
        for (int j = 0; j < THREAD_COLS; ++j) acc[i][j] = 0;
    scalar_t a_next[A_LOADS], b_next[B_LOADS];

    const int steps = (d_end - d_begin + BLOCK_DEPTH - 1) / BLOCK_DEPTH;
    if (steps > 0) {  // the same for every thread of the block
        fetch_step(m, a_load, b_load, a_next, b_next);
        store_step(a_tile[0], b_tile[0], a_next, b_next, Problem::b_along_depth);
        __syncthreads();  // the first tiles are complete
    }
    for (int step = 0; step < steps; ++step) {
        const bool more = step + 1 < steps;
        if (kPipelined) {
            const int current = step & 1;
            if (more) fetch_step(m, a_load, b_load, a_next, b_next);  // in flight during ...
            multiply_tiles<true>(a_tile[current], b_tile[current], acc, ty, tx);  // ... this
            if (more)
                store_step(a_tile[current ^ 1], b_tile[current ^ 1], a_next, b_next,
                           Problem::b_along_depth);
            __syncthreads();  // the other copy is complete, and nobody reads this one any more
        } else {
            multiply_tiles<false>(a_tile[0], b_tile[0], acc, ty, tx);
            __syncthreads();  // everyone is done reading the tiles
            if (more) {
                fetch_step(m, a_load, b_load, a_next, b_next);
                store_step(a_tile[0], b_tile[0], a_next, b_next, Problem::b_along_depth);
            }
            __syncthreads();  // the next tiles are complete
        }
    }

    for (int i = 0; i < THREAD_ROWS; ++i) {
        const int row = row0 + ty * THREAD_ROWS + i;
        for (int j = 0; j < THREAD_COLS; ++j) {
            const int col = col0 + tx * THREAD_COLS + j;
            if (row < m.rows() && col < m.cols()) m.store(row, col, acc[i][j]);
        }
    }
}

// Forward: A[k, d] = weight[k, d] with d = (c, r, s); B[d, (n, p, q)] = im2col(x) through the
// tap table; y[n, k, p, q] = C + bias[k], then max(., 0) if `relu` (the layer's activation,
// fused into the epilogue).
struct ForwardBlocked {
    static const bool b_along_depth = false;  // see store_step
    Conv g;
    const scalar_t* x;
    const scalar_t* weight;
    const scalar_t* bias;
    const Tap* taps;
    scalar_t* y;
    int relu;
    int split_depth;
    __device__ int rows() const { return g.K; }
    __device__ int cols() const { return g.N * g.P * g.Q; }
    __device__ int depth() const { return g.C * g.R * g.S; }

    struct ALoader {  // along row k of the weight
        int row_offset, d, d_end;  // row_offset < 0: the row is outside C
        __device__ scalar_t next(const ForwardBlocked& m) {
            scalar_t v = row_offset >= 0 && d < d_end ? m.weight[row_offset + d] : scalar_t(0);
            d += BLOCK_DEPTH;
            return v;
        }
    };
    __device__ ALoader a_loader(int k, int d, int d_end) const {
        return ALoader{k < g.K ? k * depth() : -1, d, d_end};
    }

    struct BLoader {  // down column (n, p, q) of im2col(x)
        bool inside;     // the column is inside C
        int origin;      // index into x of (n, 0, h0, w0), which may lie in the padding
        int h0, w0, d, d_end;
        __device__ scalar_t next(const ForwardBlocked& m) {
            scalar_t v = 0;
            if (inside && d < d_end) {
                const Tap tap = m.taps[d];
                const int h = h0 + tap.dh, w = w0 + tap.dw;
                if (h >= 0 && h < m.g.H && w >= 0 && w < m.g.W) v = m.x[origin + tap.offset];
            }
            d += BLOCK_DEPTH;
            return v;
        }
    };
    __device__ BLoader b_loader(int d, int pixel, int d_end) const {
        const int q = pixel % g.Q, p = (pixel / g.Q) % g.P, n = pixel / (g.Q * g.P);
        const int h0 = p * g.stride_h - g.pad_h, w0 = q * g.stride_w - g.pad_w;
        return BLoader{pixel < cols(), n * g.C * g.H * g.W + h0 * g.W + w0, h0, w0, d, d_end};
    }

    __device__ void store(int k, int pixel, scalar_t sum) const {
        const int plane = g.P * g.Q, n = pixel / plane;
        scalar_t v = sum + bias[k];
        y[(n * g.K + k) * plane + pixel % plane] = relu && v < 0 ? scalar_t(0) : v;
    }
};

// Input gradient: A[c, d] = weight[k, c, r, s] with d = (k, r, s); B[d, (n, h, w)] = grad_out
// at the output pixel whose tap (r, s) read (h, w), or zero; grad_x = C + bias[c].
struct InputGradBlocked {
    static const bool b_along_depth = false;  // see store_step
    Conv g;
    const scalar_t* grad_out;
    const scalar_t* weight;
    const scalar_t* bias;
    const Tap* taps;
    scalar_t* grad_x;
    int split_depth;
    __device__ int rows() const { return g.C; }
    __device__ int cols() const { return g.N * g.H * g.W; }
    __device__ int depth() const { return g.K * g.R * g.S; }

    struct ALoader {  // column c of every (k, r, s) slice of the weight
        int c_offset, d, d_end;  // c_offset = c*R*S, or < 0 outside C
        __device__ scalar_t next(const InputGradBlocked& m) {
            scalar_t v = c_offset >= 0 && d < d_end
                             ? m.weight[m.taps[d].weight_offset + c_offset] : scalar_t(0);
            d += BLOCK_DEPTH;
            return v;
        }
    };
    __device__ ALoader a_loader(int c, int d, int d_end) const {
        return ALoader{c < g.C ? c * g.R * g.S : -1, d, d_end};
    }

    struct BLoader {  // the output pixels that read input pixel (n, h, w)
        bool inside;
        int origin;  // index into grad_out of (n, 0, 0, 0)
        int h_padded, w_padded, d, d_end;
        __device__ scalar_t next(const InputGradBlocked& m) {
            scalar_t v = 0;
            if (inside && d < d_end) {
                const Tap tap = m.taps[d];
                int p = h_padded - tap.dh, q = w_padded - tap.dw;  // times the stride
                bool hit = p >= 0 && q >= 0;
                if (m.g.stride_h > 1) hit = hit && p % m.g.stride_h == 0, p /= m.g.stride_h;
                if (m.g.stride_w > 1) hit = hit && q % m.g.stride_w == 0, q /= m.g.stride_w;
                if (hit && p < m.g.P && q < m.g.Q)
                    v = m.grad_out[origin + tap.offset + p * m.g.Q + q];
            }
            d += BLOCK_DEPTH;
            return v;
        }
    };
    __device__ BLoader b_loader(int d, int pixel, int d_end) const {
        const int w = pixel % g.W, h = (pixel / g.W) % g.H, n = pixel / (g.W * g.H);
        return BLoader{pixel < cols(), n * g.K * g.P * g.Q, h + g.pad_h, w + g.pad_w, d, d_end};
    }

    __device__ void store(int c, int pixel, scalar_t sum) const {
        const int plane = g.H * g.W, n = pixel / plane;
        grad_x[(n * g.C + c) * plane + pixel % plane] = sum + bias[c];
    }
};

// Steps a pixel index (n, p, q) of an (N, ., P, Q) tensor forward by BLOCK_DEPTH: the
// weight gradients walk their depth (every pixel of the batch) with it instead of dividing.
struct PixelCursor {
    int n, p, q;
    __device__ static PixelCursor at(int pixel, int P, int Q) {
        return PixelCursor{pixel / (P * Q), (pixel / Q) % P, pixel % Q};
    }
    __device__ void advance(int P, int Q) {
        q += BLOCK_DEPTH;
        while (q >= Q) {
            q -= Q;
            if (++p == P) p = 0, ++n;
        }
    }
};

// Weight gradient: A[k, (n, p, q)] = grad_out; B[(n, p, q), (c, r, s)] = im2col(x)^T;
// C goes to slice blockIdx.z of the workspace (K, C*R*S) per depth slice.
struct WeightGradBlocked {
    static const bool b_along_depth = true;  // see store_step
    Conv g;
    const scalar_t* grad_out;
    const scalar_t* x;
    scalar_t* workspace;
    int split_depth;
    __device__ int rows() const { return g.K; }
    __device__ int cols() const { return g.C * g.R * g.S; }
    __device__ int depth() const { return g.N * g.P * g.Q; }

    struct ALoader {  // row k of grad_out, pixel after pixel
        bool inside;
        int k, d, d_end;
        PixelCursor at;
        __device__ scalar_t next(const WeightGradBlocked& m) {
            const Conv& g = m.g;
            scalar_t v = inside && d < d_end
                             ? m.grad_out[((at.n * g.K + k) * g.P + at.p) * g.Q + at.q]
                             : scalar_t(0);
            d += BLOCK_DEPTH;
            at.advance(g.P, g.Q);
            return v;
        }
    };
    __device__ ALoader a_loader(int k, int d, int d_end) const {
        return ALoader{k < g.K, k, d, d_end, PixelCursor::at(d, g.P, g.Q)};
    }

    struct BLoader {  // tap (c, r, s) of im2col(x), pixel after pixel
        bool inside;
        int c, dh, dw, d, d_end;
        PixelCursor at;
        __device__ scalar_t next(const WeightGradBlocked& m) {
            const Conv& g = m.g;
            scalar_t v = 0;
            if (inside && d < d_end) {
                const int h = at.p * g.stride_h - g.pad_h + dh;
                const int w = at.q * g.stride_w - g.pad_w + dw;
                if (h >= 0 && h < g.H && w >= 0 && w < g.W)
                    v = m.x[((at.n * g.C + c) * g.H + h) * g.W + w];
            }
            d += BLOCK_DEPTH;
            at.advance(g.P, g.Q);
            return v;
        }
    };
    __device__ BLoader b_loader(int d, int tap, int d_end) const {
        const int s = tap % g.S, r = (tap / g.S) % g.R, c = tap / (g.S * g.R);
        return BLoader{tap < cols(), c, r * g.dilation_h, s * g.dilation_w, d, d_end,
                       PixelCursor::at(d, g.P, g.Q)};
    }

    __device__ void store(int k, int tap, scalar_t sum) const {
        workspace[(blockIdx.z * rows() + k) * cols() + tap] = sum;
    }
};

// out[i] = workspace[0, i] + workspace[1, i] + ... + workspace[splits-1, i], always in this
// order: the split-K reduction. One thread per element of out (count elements).
extern "C" __global__ void conv2d_sum_splits(const scalar_t* __restrict__ workspace,
                                             scalar_t* __restrict__ out, int splits, int count) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    scalar_t sum = 0;
    for (int z = 0; z < splits; ++z) sum += workspace[z * count + i];
    out[i] = sum;
}

// ---------------------------------------------------------------------------------------
// The U-Net's up-convolution: 2x2 kernel, stride 2, no padding
// ---------------------------------------------------------------------------------------
//
// A transposed convolution x (N, C, H, W) -> y (N, K, 2H, 2W) with weight (C, K, 2, 2): every
// output pixel (2h + a, 2w + b) receives exactly one tap, (a, b), of exactly one input pixel
// (h, w). So the layer is four independent 1x1 convolutions, one per tap, which interleave
// in the output. As one matrix product: rows (k, a, b) = 4K, columns (n, h, w), depth c:
//     y[n, k, 2h + a, 2w + b] = bias[k] + sum_c weight[c, (k, a, b)] * x[n, c, h, w].
// Run as a general transposed convolution it would gather through 2x2 taps of which three
// quarters never hit (the "zero-stuffed" input); here nothing multiplies a zero. The sizes are
// N, C, H, W, K of this layer (not of the convolution it transposes).

#define UP_SIZES int N, int C, int H, int W, int K
#define UP_FROM_SIZES Up { N, C, H, W, K }

struct Up {
    int N, C, H, W, K;
};

// (n, k, 2h + a, 2w + b) of the (N, K, 2H, 2W) output, for row (k, a, b) = 4k + 2a + b.
__device__ __forceinline__ int up_index(const Up& u, int n, int row, int h, int w) {
    const int k = row >> 2, a = (row >> 1) & 1, b = row & 1;
    return ((n * u.K + k) * 2 * u.H + 2 * h + a) * 2 * u.W + 2 * w + b;
}

// Forward: A[(k, a, b), c] = weight[c, k, a, b]; B[c, (n, h, w)] = x.
struct UpForward {
    static const bool b_along_depth = false;  // see store_step
    Up u;
    const scalar_t* x;
    const scalar_t* weight;
    const scalar_t* bias;
    scalar_t* y;
    int split_depth;
    __device__ int rows() const { return 4 * u.K; }
    __device__ int cols() const { return u.N * u.H * u.W; }
    __device__ int depth() const { return u.C; }

    struct ALoader {  // weight[c, row] for c = d, d + BLOCK_DEPTH, ...
        bool inside;
        int offset, d, d_end;
        __device__ scalar_t next(const UpForward& m) {
            scalar_t v = inside && d < d_end ? m.weight[offset] : scalar_t(0);
            offset += BLOCK_DEPTH * m.rows();
            d += BLOCK_DEPTH;
            return v;
        }
    };
    __device__ ALoader a_loader(int row, int d, int d_end) const {
        return ALoader{row < rows(), d * rows() + row, d, d_end};
    }

    struct BLoader {  // x[n, c, h, w] for c = d, d + BLOCK_DEPTH, ...
        bool inside;
        int offset, d, d_end;
        __device__ scalar_t next(const UpForward& m) {
            scalar_t v = inside && d < d_end ? m.x[offset] : scalar_t(0);
            offset += BLOCK_DEPTH * m.u.H * m.u.W;
            d += BLOCK_DEPTH;
            return v;
        }
    };
    __device__ BLoader b_loader(int d, int pixel, int d_end) const {
        const int plane = u.H * u.W, n = pixel / plane;
        return BLoader{pixel < cols(), (n * u.C + d) * plane + pixel % plane, d, d_end};
    }

    __device__ void store(int row, int pixel, scalar_t sum) const {
        const int w = pixel % u.W, h = (pixel / u.W) % u.H, n = pixel / (u.W * u.H);
        y[up_index(u, n, row, h, w)] = sum + bias[row >> 2];
    }
};

// Input gradient: A[c, (k, a, b)] = weight[c, k, a, b]; B[(k, a, b), (n, h, w)] =
// grad_out[n, k, 2h + a, 2w + b].
struct UpInputGrad {
    static const bool b_along_depth = false;  // see store_step
    Up u;
    const scalar_t* grad_out;
    const scalar_t* weight;
    scalar_t* grad_x;
    int split_depth;
    __device__ int rows() const { return u.C; }
    __device__ int cols() const { return u.N * u.H * u.W; }
    __device__ int depth() const { return 4 * u.K; }

    struct ALoader {  // row c of the weight viewed as (C, 4K)
        bool inside;
        int offset, d, d_end;
        __device__ scalar_t next(const UpInputGrad& m) {
            scalar_t v = inside && d < d_end ? m.weight[offset + d] : scalar_t(0);
            d += BLOCK_DEPTH;
            return v;
        }
    };
    __device__ ALoader a_loader(int c, int d, int d_end) const {
        return ALoader{c < u.C, c * depth(), d, d_end};
    }

    struct BLoader {  // the four output pixels of input pixel (n, h, w), every channel k
        bool inside;
        int n, h, w, d, d_end;
        __device__ scalar_t next(const UpInputGrad& m) {
            scalar_t v = inside && d < d_end ? m.grad_out[up_index(m.u, n, d, h, w)] : scalar_t(0);
            d += BLOCK_DEPTH;
            return v;
        }
    };
    __device__ BLoader b_loader(int d, int pixel, int d_end) const {
        return BLoader{pixel < cols(), pixel / (u.H * u.W), (pixel / u.W) % u.H, pixel % u.W,
                       d, d_end};
    }

    __device__ void store(int c, int pixel, scalar_t sum) const {
        const int plane = u.H * u.W, n = pixel / plane;
        grad_x[(n * u.C + c) * plane + pixel % plane] = sum;
    }
};

// Weight gradient: A[c, (n, h, w)] = x; B[(n, h, w), (k, a, b)] = grad_out[n, k, 2h+a, 2w+b];
// C (C, 4K) goes to slice blockIdx.z of the workspace.
struct UpWeightGrad {
    static const bool b_along_depth = true;  // see store_step
    Up u;
    const scalar_t* grad_out;
    const scalar_t* x;
    scalar_t* workspace;
    int split_depth;
    __device__ int rows() const { return u.C; }
    __device__ int cols() const { return 4 * u.K; }
    __device__ int depth() const { return u.N * u.H * u.W; }

    struct ALoader {  // x[n, c, h, w], pixel after pixel
        bool inside;
        int c, d, d_end;
        PixelCursor at;  // (n, h, w)
        __device__ scalar_t next(const UpWeightGrad& m) {
            const Up& u = m.u;
            scalar_t v = inside && d < d_end ? m.x[((at.n * u.C + c) * u.H + at.p) * u.W + at.q]
                                             : scalar_t(0);
            d += BLOCK_DEPTH;
            at.advance(u.H, u.W);
            return v;
        }
    };
    __device__ ALoader a_loader(int c, int d, int d_end) const {
        return ALoader{c < u.C, c, d, d_end, PixelCursor::at(d, u.H, u.W)};
    }

    struct BLoader {  // grad_out at tap (k, a, b) of input pixel (n, h, w), pixel after pixel
        bool inside;
        int row, d, d_end;
        PixelCursor at;
        __device__ scalar_t next(const UpWeightGrad& m) {
            scalar_t v = inside && d < d_end ? m.grad_out[up_index(m.u, at.n, row, at.p, at.q)]
                                             : scalar_t(0);
            d += BLOCK_DEPTH;
            at.advance(m.u.H, m.u.W);
            return v;
        }
    };
    __device__ BLoader b_loader(int d, int row, int d_end) const {
        return BLoader{row < cols(), row, d, d_end, PixelCursor::at(d, u.H, u.W)};
    }

    __device__ void store(int c, int row, scalar_t sum) const {
        workspace[(blockIdx.z * rows() + c) * cols() + row] = sum;
    }
};

// --- The kernels of rungs 3 and 4 ------------------------------------------------------------
// Launched with BLOCKED_THREADS threads per block on a grid (ceil(cols / BLOCK_COLS),
// ceil(rows / BLOCK_ROWS), depth slices); `taps` is the host's tap table of the pass. Only the
// weight gradients take several depth slices (split_depth < depth); they write a workspace of
// (slices, rows, cols), which is the gradient itself when there is one slice.

extern "C" __global__ void conv2d_forward_blocked(const scalar_t* __restrict__ x,
        const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
        const int* __restrict__ taps, scalar_t* __restrict__ y, int relu, CONV_SIZES) {
    const Conv g = CONV_FROM_SIZES;
    const Tap* tap_table = reinterpret_cast<const Tap*>(taps);
    blocked_matmul<ForwardBlocked, false>(
        ForwardBlocked{g, x, weight, bias, tap_table, y, relu, g.C * g.R * g.S});
}

extern "C" __global__ void conv2d_input_grad_blocked(const scalar_t* __restrict__ grad_out,
        const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
        const int* __restrict__ taps, scalar_t* __restrict__ grad_x, CONV_SIZES) {
    const Conv g = CONV_FROM_SIZES;
    const Tap* tap_table = reinterpret_cast<const Tap*>(taps);
    blocked_matmul<InputGradBlocked, false>(
        InputGradBlocked{g, grad_out, weight, bias, tap_table, grad_x, g.K * g.R * g.S});
}

extern "C" __global__ void conv2d_weight_grad_blocked(const scalar_t* __restrict__ grad_out,
        const scalar_t* __restrict__ x, scalar_t* __restrict__ workspace, int split_depth,
        CONV_SIZES) {
    blocked_matmul<WeightGradBlocked, false>(
        WeightGradBlocked{CONV_FROM_SIZES, grad_out, x, workspace, split_depth});
}

extern "C" __global__ void up_conv2x2_forward_blocked(const scalar_t* __restrict__ x,
        const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
        scalar_t* __restrict__ y, UP_SIZES) {
    blocked_matmul<UpForward, false>(UpForward{UP_FROM_SIZES, x, weight, bias, y, C});
}

extern "C" __global__ void up_conv2x2_input_grad_blocked(const scalar_t* __restrict__ grad_out,
        const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_x, UP_SIZES) {
    blocked_matmul<UpInputGrad, false>(
        UpInputGrad{UP_FROM_SIZES, grad_out, weight, grad_x, 4 * K});
}

extern "C" __global__ void up_conv2x2_weight_grad_blocked(const scalar_t* __restrict__ grad_out,
        const scalar_t* __restrict__ x, scalar_t* __restrict__ workspace, int split_depth,
        UP_SIZES) {
    blocked_matmul<UpWeightGrad, false>(
        UpWeightGrad{UP_FROM_SIZES, grad_out, x, workspace, split_depth});
}

extern "C" __global__ void conv2d_forward_pipelined(const scalar_t* __restrict__ x,
        const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
        const int* __restrict__ taps, scalar_t* __restrict__ y, int relu, CONV_SIZES) {
    const Conv g = CONV_FROM_SIZES;
    const Tap* tap_table = reinterpret_cast<const Tap*>(taps);
    blocked_matmul<ForwardBlocked, true>(
        ForwardBlocked{g, x, weight, bias, tap_table, y, relu, g.C * g.R * g.S});
}

extern "C" __global__ void conv2d_input_grad_pipelined(const scalar_t* __restrict__ grad_out,
        const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
        const int* __restrict__ taps, scalar_t* __restrict__ grad_x, CONV_SIZES) {
    const Conv g = CONV_FROM_SIZES;
    const Tap* tap_table = reinterpret_cast<const Tap*>(taps);
    blocked_matmul<InputGradBlocked, true>(
        InputGradBlocked{g, grad_out, weight, bias, tap_table, grad_x, g.K * g.R * g.S});
}

extern "C" __global__ void conv2d_weight_grad_pipelined(const scalar_t* __restrict__ grad_out,
        const scalar_t* __restrict__ x, scalar_t* __restrict__ workspace, int split_depth,
        CONV_SIZES) {
    blocked_matmul<WeightGradBlocked, true>(
        WeightGradBlocked{CONV_FROM_SIZES, grad_out, x, workspace, split_depth});
}

extern "C" __global__ void up_conv2x2_forward_pipelined(const scalar_t* __restrict__ x,
        const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
        scalar_t* __restrict__ y, UP_SIZES) {
    blocked_matmul<UpForward, true>(UpForward{UP_FROM_SIZES, x, weight, bias, y, C});
}

extern "C" __global__ void up_conv2x2_input_grad_pipelined(const scalar_t* __restrict__ grad_out,
        const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_x, UP_SIZES) {
    blocked_matmul<UpInputGrad, true>(
        UpInputGrad{UP_FROM_SIZES, grad_out, weight, grad_x, 4 * K});
}

extern "C" __global__ void up_conv2x2_weight_grad_pipelined(const scalar_t* __restrict__ grad_out,
        const scalar_t* __restrict__ x, scalar_t* __restrict__ workspace, int split_depth,
        UP_SIZES) {
    blocked_matmul<UpWeightGrad, true>(
        UpWeightGrad{UP_FROM_SIZES, grad_out, x, workspace, split_depth});
}

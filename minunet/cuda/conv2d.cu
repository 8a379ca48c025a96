// conv2d.cu -- 2-D convolution on the GPU: the forward pass and both gradients.
//
// Layout as in PyTorch: tensors are NCHW, the weight is (C_out, C_in, kH, kW). The host
// compiles this file once per element type, defining MINUNET_SCALAR as float or double.
//
// Output pixel (oh, ow) of a convolution reads, through tap (kh, kw), the input pixel
//
//     ih = oh * stride_h - pad_top  + kh * dilation_h
//     iw = ow * stride_w - pad_left + kw * dilation_w        (zero when outside the input).
//
// Only the top/left padding appears: the bottom/right padding is implied by the output size,
// which the host computes (minunet.shapes), so asymmetric "same" padding needs no special case.
//
// Three passes, each in two versions that compute the same numbers:
//
//   pass                 naive (one thread per output)      tiled (shared-memory GEMM)
//   forward              conv2d_forward_naive               conv2d_forward_tiled
//   input gradient       conv2d_input_grad_naive            conv2d_input_grad_tiled
//   weight gradient      conv2d_weight_grad_naive           conv2d_weight_grad_tiled
//
// The input gradient is also the forward pass of a transposed convolution.
// Every thread *gathers* what it needs and writes one value: no atomics, and the result is
// the same on every run. Indices are int: each tensor must hold fewer than 2^31 elements.

#ifndef MINUNET_SCALAR
#define MINUNET_SCALAR float
#endif
typedef MINUNET_SCALAR scalar_t;

// ---------------------------------------------------------------------------------------
// Geometry shared by all six kernels
// ---------------------------------------------------------------------------------------

// Every kernel of this file receives the same fifteen sizes, in this order.
#define CONV_SIZES                                                                    \
    int batch, int in_channels, int in_h, int in_w, int out_channels, int kernel_h,   \
    int kernel_w, int out_h, int out_w, int stride_h, int stride_w, int pad_top,      \
    int pad_left, int dilation_h, int dilation_w
#define CONV_FROM_SIZES                                                               \
    Conv{batch, in_channels, in_h, in_w, out_channels, kernel_h, kernel_w, out_h,     \
         out_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w}

struct Conv {
    int batch, in_channels, in_h, in_w;
    int out_channels, kernel_h, kernel_w, out_h, out_w;
    int stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
};

// x[n, ci, ih, iw] for the input pixel that tap (kh, kw) of output pixel (oh, ow) reads;
// zero in the padding. This is one entry of the "im2col" matrix, computed on the fly.
__device__ __forceinline__ scalar_t input_at(const scalar_t* x, const Conv& c, int n, int ci,
                                             int oh, int ow, int kh, int kw) {
    int ih = oh * c.stride_h - c.pad_top + kh * c.dilation_h;
    int iw = ow * c.stride_w - c.pad_left + kw * c.dilation_w;
    if (ih < 0 || ih >= c.in_h || iw < 0 || iw >= c.in_w) return 0;
    return x[((n * c.in_channels + ci) * c.in_h + ih) * c.in_w + iw];
}

// The output index o whose tap k reads input index i (solving i = o*stride - pad + k*dilation
// for o), or -1 when there is none: o must be a whole number inside the output.
__device__ __forceinline__ int output_index_reading(int i, int k, int stride, int pad,
                                                    int dilation, int out_size) {
    int t = i + pad - k * dilation;
    if (t < 0 || t % stride != 0) return -1;
    int o = t / stride;
    return o < out_size ? o : -1;
}

// grad_out[n, co, oh, ow] for the output pixel whose tap (kh, kw) read input pixel (ih, iw);
// zero when no output pixel did. Gathering these is the input gradient (the transpose).
__device__ __forceinline__ scalar_t grad_out_at(const scalar_t* grad_out, const Conv& c, int n,
                                                int co, int ih, int iw, int kh, int kw) {
    int oh = output_index_reading(ih, kh, c.stride_h, c.pad_top, c.dilation_h, c.out_h);
    int ow = output_index_reading(iw, kw, c.stride_w, c.pad_left, c.dilation_w, c.out_w);
    if (oh < 0 || ow < 0) return 0;
    return grad_out[((n * c.out_channels + co) * c.out_h + oh) * c.out_w + ow];
}

// ---------------------------------------------------------------------------------------
// Naive kernels: one thread per output element, launched on a 1-D grid
// ---------------------------------------------------------------------------------------

// y = conv(x, weight) + bias.  x: (N, C_in, H, W), y: (N, C_out, H_out, W_out).
// One thread per element of y: y[n, co, oh, ow] = bias[co] + sum_{ci, kh, kw}
// weight[co, ci, kh, kw] * x[n, ci, ih, iw].  bias: (C_out,), zeros when there is none.
extern "C" __global__ void conv2d_forward_naive(const scalar_t* __restrict__ x,
                                                const scalar_t* __restrict__ weight,
                                                const scalar_t* __restrict__ bias,
                                                scalar_t* __restrict__ y, CONV_SIZES) {
    const Conv c = CONV_FROM_SIZES;
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= c.batch * c.out_channels * c.out_h * c.out_w) return;
    int ow = index % c.out_w;
    int oh = (index / c.out_w) % c.out_h;
    int co = (index / (c.out_w * c.out_h)) % c.out_channels;
    int n = index / (c.out_w * c.out_h * c.out_channels);

    scalar_t sum = bias[co];
    for (int ci = 0; ci < c.in_channels; ++ci)
        for (int kh = 0; kh < c.kernel_h; ++kh)
            for (int kw = 0; kw < c.kernel_w; ++kw)
                sum += weight[((co * c.in_channels + ci) * c.kernel_h + kh) * c.kernel_w + kw] *
                       input_at(x, c, n, ci, oh, ow, kh, kw);
    y[index] = sum;
}

// grad_x = dL/dx, given grad_out = dL/dy (N, C_out, H_out, W_out); plus bias (C_in,), which
// is zero for a gradient and the layer's bias when this serves as a transposed convolution.
// One thread per input pixel gathers every (output pixel, tap) pair that read it:
// grad_x[n, ci, ih, iw] = sum_{co, kh, kw} weight[co, ci, kh, kw] * grad_out[n, co, oh, ow].
extern "C" __global__ void conv2d_input_grad_naive(const scalar_t* __restrict__ grad_out,
                                                   const scalar_t* __restrict__ weight,
                                                   const scalar_t* __restrict__ bias,
                                                   scalar_t* __restrict__ grad_x, CONV_SIZES) {
    const Conv c = CONV_FROM_SIZES;
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= c.batch * c.in_channels * c.in_h * c.in_w) return;
    int iw = index % c.in_w;
    int ih = (index / c.in_w) % c.in_h;
    int ci = (index / (c.in_w * c.in_h)) % c.in_channels;
    int n = index / (c.in_w * c.in_h * c.in_channels);

    scalar_t sum = bias[ci];
    for (int co = 0; co < c.out_channels; ++co)
        for (int kh = 0; kh < c.kernel_h; ++kh)
            for (int kw = 0; kw < c.kernel_w; ++kw)
                sum += weight[((co * c.in_channels + ci) * c.kernel_h + kh) * c.kernel_w + kw] *
                       grad_out_at(grad_out, c, n, co, ih, iw, kh, kw);
    grad_x[index] = sum;
}

// grad_weight = dL/dweight (C_out, C_in, kH, kW). One thread per weight sums, over the batch
// and every output pixel, grad_out[n, co, oh, ow] * x[n, ci, ih, iw].
extern "C" __global__ void conv2d_weight_grad_naive(const scalar_t* __restrict__ grad_out,
                                                    const scalar_t* __restrict__ x,
                                                    scalar_t* __restrict__ grad_weight,
                                                    CONV_SIZES) {
    const Conv c = CONV_FROM_SIZES;
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= c.out_channels * c.in_channels * c.kernel_h * c.kernel_w) return;
    int kw = index % c.kernel_w;
    int kh = (index / c.kernel_w) % c.kernel_h;
    int ci = (index / (c.kernel_w * c.kernel_h)) % c.in_channels;
    int co = index / (c.kernel_w * c.kernel_h * c.in_channels);

    scalar_t sum = 0;
    for (int n = 0; n < c.batch; ++n)
        for (int oh = 0; oh < c.out_h; ++oh)
            for (int ow = 0; ow < c.out_w; ++ow)
                sum += grad_out[((n * c.out_channels + co) * c.out_h + oh) * c.out_w + ow] *
                       input_at(x, c, n, ci, oh, ow, kh, kw);
    grad_weight[index] = sum;
}

// ---------------------------------------------------------------------------------------
// Tiled kernels: each pass is a matrix product C = A B ("implicit GEMM")
// ---------------------------------------------------------------------------------------
//
// A block of TILE x TILE threads computes a TILE x TILE tile of C. It walks along the shared
// dimension in steps of TILE; at each step every thread copies one entry of A and one of B into
// shared memory, the block waits until both tiles are complete, and each thread then reads a
// row of the A tile and a column of the B tile. Each entry of A and B is thus read from global
// memory by one thread per block instead of TILE threads.
//
// The matrices are never stored: a "problem" struct says how to read entry (row, k) of A and
// (k, col) of B straight from the tensors, and where entry (row, col) of C goes.

#define TILE 16

template <class Problem>
__device__ void tiled_matmul(const Problem& p) {
    __shared__ scalar_t a_tile[TILE][TILE];
    __shared__ scalar_t b_tile[TILE][TILE];
    const int ty = threadIdx.y, tx = threadIdx.x;
    const int row = blockIdx.y * TILE + ty;  // of C and A
    const int col = blockIdx.x * TILE + tx;  // of C and B
    const int rows = p.rows(), cols = p.cols(), depth = p.depth();

    scalar_t sum = 0;
    for (int k0 = 0; k0 < depth; k0 += TILE) {
        // Threads outside the matrices load zeros, so the inner loop needs no bounds checks.
        a_tile[ty][tx] = (row < rows && k0 + tx < depth) ? p.a(row, k0 + tx) : scalar_t(0);
        b_tile[ty][tx] = (k0 + ty < depth && col < cols) ? p.b(k0 + ty, col) : scalar_t(0);
        __syncthreads();  // both tiles are complete before anyone reads them
        for (int k = 0; k < TILE; ++k) sum += a_tile[ty][k] * b_tile[k][tx];
        __syncthreads();  // everyone is done reading before the next step overwrites them
    }
    if (row < rows && col < cols) p.store(row, col, sum);
}

// Forward: rows = output channels co, columns = output pixels (n, oh, ow),
// shared dimension = taps (ci, kh, kw).  A = weight viewed as (C_out, C_in*kH*kW);
// B = the im2col matrix of x;  y[n, co, oh, ow] = C[co, (n, oh, ow)] + bias[co].
struct ForwardProblem {
    Conv c;
    const scalar_t* x;
    const scalar_t* weight;
    const scalar_t* bias;
    scalar_t* y;
    __device__ int rows() const { return c.out_channels; }
    __device__ int cols() const { return c.batch * c.out_h * c.out_w; }
    __device__ int depth() const { return c.in_channels * c.kernel_h * c.kernel_w; }
    __device__ scalar_t a(int co, int tap) const { return weight[co * depth() + tap]; }
    __device__ scalar_t b(int tap, int pixel) const {
        int kw = tap % c.kernel_w, kh = (tap / c.kernel_w) % c.kernel_h;
        int ci = tap / (c.kernel_w * c.kernel_h);
        int ow = pixel % c.out_w, oh = (pixel / c.out_w) % c.out_h;
        int n = pixel / (c.out_w * c.out_h);
        return input_at(x, c, n, ci, oh, ow, kh, kw);
    }
    __device__ void store(int co, int pixel, scalar_t sum) const {
        int plane = c.out_h * c.out_w;
        int n = pixel / plane;
        y[(n * c.out_channels + co) * plane + pixel % plane] = sum + bias[co];
    }
};

// Input gradient: rows = input channels ci, columns = input pixels (n, ih, iw),
// shared dimension = (co, kh, kw).  A[ci, (co, kh, kw)] = weight[co, ci, kh, kw];
// B[(co, kh, kw), (n, ih, iw)] = grad_out at the output pixel whose tap (kh, kw) read
// (ih, iw), or zero.  grad_x[n, ci, ih, iw] = C[ci, (n, ih, iw)] + bias[ci].
struct InputGradProblem {
    Conv c;
    const scalar_t* grad_out;
    const scalar_t* weight;
    const scalar_t* bias;
    scalar_t* grad_x;
    __device__ int rows() const { return c.in_channels; }
    __device__ int cols() const { return c.batch * c.in_h * c.in_w; }
    __device__ int depth() const { return c.out_channels * c.kernel_h * c.kernel_w; }
    __device__ scalar_t a(int ci, int k) const {
        int taps = c.kernel_h * c.kernel_w;
        int co = k / taps;
        return weight[(co * c.in_channels + ci) * taps + k % taps];
    }
    __device__ scalar_t b(int k, int pixel) const {
        int kw = k % c.kernel_w, kh = (k / c.kernel_w) % c.kernel_h;
        int co = k / (c.kernel_w * c.kernel_h);
        int iw = pixel % c.in_w, ih = (pixel / c.in_w) % c.in_h;
        int n = pixel / (c.in_w * c.in_h);
        return grad_out_at(grad_out, c, n, co, ih, iw, kh, kw);
    }
    __device__ void store(int ci, int pixel, scalar_t sum) const {
        int plane = c.in_h * c.in_w;
        int n = pixel / plane;
        grad_x[(n * c.in_channels + ci) * plane + pixel % plane] = sum + bias[ci];
    }
};

// Weight gradient: rows = output channels co, columns = taps (ci, kh, kw),
// shared dimension = output pixels (n, oh, ow).  A[co, (n, oh, ow)] = grad_out[n, co, oh, ow];
// B = the transposed im2col matrix of x;  grad_weight[co, ci, kh, kw] = C[co, (ci, kh, kw)].
struct WeightGradProblem {
    Conv c;
    const scalar_t* grad_out;
    const scalar_t* x;
    scalar_t* grad_weight;
    __device__ int rows() const { return c.out_channels; }
    __device__ int cols() const { return c.in_channels * c.kernel_h * c.kernel_w; }
    __device__ int depth() const { return c.batch * c.out_h * c.out_w; }
    __device__ scalar_t a(int co, int pixel) const {
        int plane = c.out_h * c.out_w;
        int n = pixel / plane;
        return grad_out[(n * c.out_channels + co) * plane + pixel % plane];
    }
    __device__ scalar_t b(int pixel, int tap) const {
        int kw = tap % c.kernel_w, kh = (tap / c.kernel_w) % c.kernel_h;
        int ci = tap / (c.kernel_w * c.kernel_h);
        int ow = pixel % c.out_w, oh = (pixel / c.out_w) % c.out_h;
        int n = pixel / (c.out_w * c.out_h);
        return input_at(x, c, n, ci, oh, ow, kh, kw);
    }
    __device__ void store(int co, int tap, scalar_t sum) const {
        grad_weight[co * cols() + tap] = sum;
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

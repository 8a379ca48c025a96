// max_pool2d.cu -- 2-D max-pooling on the GPU, forward and backward.
//
// Letters as in conv2d.cu: x (N, C, H, W) is viewed as `planes` = N*C independent H x W
// images, y (N, C, P, Q); the window is R x S. Window (p, q) covers the input rows
// p*stride_h - pad_h ... + R - 1 (and likewise for columns); padding never wins (the host
// checks that padding <= window/2, so every window holds at least one real pixel).
//
// Tie rule: the FIRST maximum in row-major window order wins (a later equal value does not
// replace it), and the first NaN wins over any number (the output is NaN, as in PyTorch).
// The forward pass saves the winner's position (h*W + w) in `argmax`, so that the backward
// pass can *gather*: each input pixel sums the gradients of the windows that chose it, in a
// fixed order, without atomics.
// The element type is MINUNET_SCALAR (float or double); tensors have fewer than 2^31 elements.

#ifndef MINUNET_SCALAR
#define MINUNET_SCALAR float
#endif
typedef MINUNET_SCALAR scalar_t;

// One thread per output element y[plane, p, q].
extern "C" __global__ void max_pool2d_forward(const scalar_t* __restrict__ x,
                                              scalar_t* __restrict__ y,
                                              int* __restrict__ argmax, int planes, int H,
                                              int W, int P, int Q, int R, int S, int stride_h,
                                              int stride_w, int pad_h, int pad_w) {
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= planes * P * Q) return;
    int q = index % Q;
    int p = (index / Q) % P;
    int plane = index / (Q * P);
    const scalar_t* image = x + plane * H * W;

    int best = -1;  // position of the maximum so far; -1 until a real pixel is seen
    scalar_t best_value = 0;
    for (int r = 0; r < R; ++r) {
        int h = p * stride_h - pad_h + r;
        if (h < 0 || h >= H) continue;
        for (int s = 0; s < S; ++s) {
            int w = q * stride_w - pad_w + s;
            if (w < 0 || w >= W) continue;
            scalar_t value = image[h * W + w];
            if (best < 0 || value > best_value || (isnan(value) && !isnan(best_value))) {
                best = h * W + w;
                best_value = value;
            }
        }
    }
    y[index] = best_value;
    argmax[index] = best;
}

// One thread per input pixel x[plane, h, w]: the windows containing it are those with
//   p*stride_h - pad_h <= h <= p*stride_h - pad_h + R - 1,
// i.e. p from ceil((h + pad_h - R + 1) / stride_h) to floor((h + pad_h) / stride_h).
extern "C" __global__ void max_pool2d_backward(const scalar_t* __restrict__ grad_out,
                                               const int* __restrict__ argmax,
                                               scalar_t* __restrict__ grad_x, int planes,
                                               int H, int W, int P, int Q, int R, int S,
                                               int stride_h, int stride_w, int pad_h,
                                               int pad_w) {
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= planes * H * W) return;
    int w = index % W;
    int h = (index / W) % H;
    int plane = index / (W * H);

    int first_row = h + pad_h - R + 1, first_col = w + pad_w - S + 1;
    int p_begin = first_row <= 0 ? 0 : (first_row + stride_h - 1) / stride_h;
    int q_begin = first_col <= 0 ? 0 : (first_col + stride_w - 1) / stride_w;
    int p_end = (h + pad_h) / stride_h + 1, q_end = (w + pad_w) / stride_w + 1;
    if (p_end > P) p_end = P;
    if (q_end > Q) q_end = Q;

    const int me = h * W + w;
    const int offset = plane * P * Q;
    scalar_t sum = 0;
    for (int p = p_begin; p < p_end; ++p)
        for (int q = q_begin; q < q_end; ++q)
            if (argmax[offset + p * Q + q] == me) sum += grad_out[offset + p * Q + q];
    grad_x[index] = sum;
}

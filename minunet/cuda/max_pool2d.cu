// max_pool2d.cu -- 2-D max-pooling on the GPU, forward and backward.
//
// x is viewed as `planes` = N*C independent (H, W) images. Window (oh, ow) covers the input
// rows oh*stride_h - pad_top ... + kernel_h - 1 (and likewise for columns); padding never wins
// (the host checks that padding <= kernel/2, so every window holds at least one real pixel).
//
// Tie rule: the FIRST maximum in row-major window order wins (a later equal value does not
// replace it), and the first NaN wins over any number (the output is NaN, as in PyTorch).
// The forward pass saves the winner's position (ih*W + iw) in `argmax`, so that the backward
// pass can *gather*: each input pixel sums the gradients of the windows that chose it, in a
// fixed order, without atomics.
// The element type is MINUNET_SCALAR (float or double); tensors have fewer than 2^31 elements.

#ifndef MINUNET_SCALAR
#define MINUNET_SCALAR float
#endif
typedef MINUNET_SCALAR scalar_t;

// One thread per output element y[plane, oh, ow].
extern "C" __global__ void max_pool2d_forward(const scalar_t* __restrict__ x,
                                              scalar_t* __restrict__ y,
                                              int* __restrict__ argmax, int planes, int in_h,
                                              int in_w, int out_h, int out_w, int kernel_h,
                                              int kernel_w, int stride_h, int stride_w,
                                              int pad_top, int pad_left) {
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= planes * out_h * out_w) return;
    int ow = index % out_w;
    int oh = (index / out_w) % out_h;
    int plane = index / (out_w * out_h);
    const scalar_t* image = x + plane * in_h * in_w;

    int best = -1;  // position of the maximum so far; -1 until a real pixel is seen
    scalar_t best_value = 0;
    for (int kh = 0; kh < kernel_h; ++kh) {
        int ih = oh * stride_h - pad_top + kh;
        if (ih < 0 || ih >= in_h) continue;
        for (int kw = 0; kw < kernel_w; ++kw) {
            int iw = ow * stride_w - pad_left + kw;
            if (iw < 0 || iw >= in_w) continue;
            scalar_t value = image[ih * in_w + iw];
            if (best < 0 || value > best_value || (isnan(value) && !isnan(best_value))) {
                best = ih * in_w + iw;
                best_value = value;
            }
        }
    }
    y[index] = best_value;
    argmax[index] = best;
}

// One thread per input pixel x[plane, ih, iw]: the windows containing it are those with
//   oh*stride_h - pad_top <= ih <= oh*stride_h - pad_top + kernel_h - 1,
// i.e. oh from ceil((ih + pad_top - kernel_h + 1) / stride_h) to floor((ih + pad_top) / stride_h).
extern "C" __global__ void max_pool2d_backward(const scalar_t* __restrict__ grad_out,
                                               const int* __restrict__ argmax,
                                               scalar_t* __restrict__ grad_x, int planes,
                                               int in_h, int in_w, int out_h, int out_w,
                                               int kernel_h, int kernel_w, int stride_h,
                                               int stride_w, int pad_top, int pad_left) {
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= planes * in_h * in_w) return;
    int iw = index % in_w;
    int ih = (index / in_w) % in_h;
    int plane = index / (in_w * in_h);

    int first_row = ih + pad_top - kernel_h + 1, first_col = iw + pad_left - kernel_w + 1;
    int oh_begin = first_row <= 0 ? 0 : (first_row + stride_h - 1) / stride_h;
    int ow_begin = first_col <= 0 ? 0 : (first_col + stride_w - 1) / stride_w;
    int oh_end = (ih + pad_top) / stride_h + 1, ow_end = (iw + pad_left) / stride_w + 1;
    if (oh_end > out_h) oh_end = out_h;
    if (ow_end > out_w) ow_end = out_w;

    const int me = ih * in_w + iw;
    const int offset = plane * out_h * out_w;
    scalar_t sum = 0;
    for (int oh = oh_begin; oh < oh_end; ++oh)
        for (int ow = ow_begin; ow < ow_end; ++ow)
            if (argmax[offset + oh * out_w + ow] == me) sum += grad_out[offset + oh * out_w + ow];
    grad_x[index] = sum;
}

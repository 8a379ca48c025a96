// softmax_cross_entropy.cu -- the pixel-wise weighted loss of the U-Net paper, forward and
// backward in one pass, one thread per pixel.
//
// Letters as in conv2d.cu: logits (N, K, HW) with K classes (the output channels of the last
// convolution) and HW = H*W pixels, target (N, HW) int in [0, K), weight (N, HW). For pixel
// (n, i) with target t and weight w:
//
//   log_softmax_k = logits_k - logsumexp_j(logits_j)     (computed after subtracting the max,
//                                                          so exp never overflows)
//   pixel_loss    = scale * w * (-log_softmax_t)
//   grad_logits_k = scale * w * (softmax_k - [k == t])
//
// `scale` is the normalisation (for a mean over pixels, 1 / (N*HW)); the loss is the sum of
// pixel_loss (see reduction.cu). Tensors have fewer than 2^31 elements of MINUNET_SCALAR.

#ifndef MINUNET_SCALAR
#define MINUNET_SCALAR float
#endif
typedef MINUNET_SCALAR scalar_t;

extern "C" __global__ void softmax_cross_entropy(const scalar_t* __restrict__ logits,
                                                 const int* __restrict__ target,
                                                 const scalar_t* __restrict__ weight,
                                                 scalar_t* __restrict__ pixel_loss,
                                                 scalar_t* __restrict__ grad_logits, int N,
                                                 int K, int HW, scalar_t scale) {
    int index = blockIdx.x * blockDim.x + threadIdx.x;  // pixel (n, i)
    if (index >= N * HW) return;
    int n = index / HW, i = index % HW;
    const scalar_t* z = logits + n * K * HW + i;  // class k lives at z[k * HW]
    scalar_t* dz = grad_logits + n * K * HW + i;

    scalar_t largest = z[0];
    for (int k = 1; k < K; ++k) largest = z[k * HW] > largest ? z[k * HW] : largest;
    scalar_t total = 0;
    for (int k = 0; k < K; ++k) total += exp(z[k * HW] - largest);
    const scalar_t log_total = log(total);

    const int t = target[index];
    if (t < 0 || t >= K) {  // a label the host did not check (that would wait for the GPU):
        pixel_loss[index] = nan("");  // NaN, which the loss then shows, and no stray read
        for (int k = 0; k < K; ++k) dz[k * HW] = nan("");
        return;
    }
    const scalar_t w = scale * weight[index];
    pixel_loss[index] = w * (largest + log_total - z[t * HW]);
    for (int k = 0; k < K; ++k) {
        scalar_t softmax = exp(z[k * HW] - largest - log_total);
        dz[k * HW] = w * (softmax - (k == t ? scalar_t(1) : scalar_t(0)));
    }
}

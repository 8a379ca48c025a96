// softmax_cross_entropy.cu -- the pixel-wise weighted loss of the U-Net paper, forward and
// backward in one pass, one thread per pixel.
//
// logits (N, K, P) with K classes and P = H*W pixels, target (N, P) int in [0, K),
// weight (N, P). For pixel (n, p) with target t and weight w:
//
//   log_softmax_k = logits_k - logsumexp_j(logits_j)     (computed after subtracting the max,
//                                                          so exp never overflows)
//   pixel_loss    = scale * w * (-log_softmax_t)
//   grad_logits_k = scale * w * (softmax_k - [k == t])
//
// `scale` is the normalisation (for a mean over pixels, 1 / (N*P)); the loss is the sum of
// pixel_loss (see reduction.cu). Tensors have fewer than 2^31 elements of MINUNET_SCALAR.

#ifndef MINUNET_SCALAR
#define MINUNET_SCALAR float
#endif
typedef MINUNET_SCALAR scalar_t;

extern "C" __global__ void softmax_cross_entropy(const scalar_t* __restrict__ logits,
                                                 const int* __restrict__ target,
                                                 const scalar_t* __restrict__ weight,
                                                 scalar_t* __restrict__ pixel_loss,
                                                 scalar_t* __restrict__ grad_logits,
                                                 int batch, int classes, int pixels,
                                                 scalar_t scale) {
    int index = blockIdx.x * blockDim.x + threadIdx.x;  // pixel (n, p)
    if (index >= batch * pixels) return;
    int n = index / pixels, p = index % pixels;
    const scalar_t* z = logits + n * classes * pixels + p;  // class k lives at z[k * pixels]
    scalar_t* dz = grad_logits + n * classes * pixels + p;

    scalar_t largest = z[0];
    for (int k = 1; k < classes; ++k) largest = z[k * pixels] > largest ? z[k * pixels] : largest;
    scalar_t total = 0;
    for (int k = 0; k < classes; ++k) total += exp(z[k * pixels] - largest);
    const scalar_t log_total = log(total);

    const int t = target[index];
    if (t < 0 || t >= classes) {  // a label the host did not check (that would wait for the
        pixel_loss[index] = nan("");  // GPU): NaN, which the loss then shows, and no stray read
        for (int k = 0; k < classes; ++k) dz[k * pixels] = nan("");
        return;
    }
    const scalar_t w = scale * weight[index];
    pixel_loss[index] = w * (largest + log_total - z[t * pixels]);
    for (int k = 0; k < classes; ++k) {
        scalar_t softmax = exp(z[k * pixels] - largest - log_total);
        dz[k * pixels] = w * (softmax - (k == t ? scalar_t(1) : scalar_t(0)));
    }
}

// reduction.cu -- per-channel sums, the bias gradient of a convolution (and, with one
// channel, the total of a loss).
//
// x is (N, C, HW) with HW = H*W pixels (letters as in conv2d.cu); out[c] = sum over n and i
// of x[n, c, i]. One block per channel: each of its SUM_THREADS threads adds up a strided
// share of the channel, then the block halves the number of partial sums until one is left.
// The order of the additions is fixed, so the result is the same on every run (unlike
// atomicAdd). Launch with blockDim.x == SUM_THREADS (a power of two) and gridDim.x == C.

#ifndef MINUNET_SCALAR
#define MINUNET_SCALAR float
#endif
typedef MINUNET_SCALAR scalar_t;

#define SUM_THREADS 256

extern "C" __global__ void channel_sum(const scalar_t* __restrict__ x,
                                       scalar_t* __restrict__ out, int N, int C, int HW) {
    __shared__ scalar_t partial[SUM_THREADS];
    const int c = blockIdx.x, t = threadIdx.x;

    scalar_t sum = 0;
    for (int i = t; i < N * HW; i += SUM_THREADS) {
        int n = i / HW;
        sum += x[(n * C + c) * HW + i % HW];
    }
    partial[t] = sum;
    __syncthreads();  // every partial sum is written

    // Tree: 256 -> 128 -> ... -> 1 partial sums; thread t adds in the one half a block away.
    for (int half = SUM_THREADS / 2; half > 0; half /= 2) {
        if (t < half) partial[t] += partial[t + half];
        __syncthreads();  // this level is complete before the next one reads it
    }
    if (t == 0) out[c] = partial[0];
}

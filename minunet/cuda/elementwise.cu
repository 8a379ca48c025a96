// elementwise.cu -- the rectified linear unit and its gradient, one thread per element.
//
// Arrays are flat and contiguous with `size` < 2^31 elements of type MINUNET_SCALAR.

#ifndef MINUNET_SCALAR
#define MINUNET_SCALAR float
#endif
typedef MINUNET_SCALAR scalar_t;

// y = max(x, 0); NaN stays NaN, as in PyTorch. y may be x itself (an in-place ReLU), so
// the pointers are not declared __restrict__.
extern "C" __global__ void relu_forward(const scalar_t* x, scalar_t* y, int size) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < size) y[i] = x[i] <= 0 ? scalar_t(0) : x[i];
}

// grad_x = grad_out where x > 0, else 0 (the derivative at 0 is taken to be 0, and a NaN in
// x lets the gradient through, both as in PyTorch).
extern "C" __global__ void relu_backward(const scalar_t* __restrict__ grad_out,
                                         const scalar_t* __restrict__ x,
                                         scalar_t* __restrict__ grad_x, int size) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < size) grad_x[i] = x[i] <= 0 ? scalar_t(0) : grad_out[i];
}

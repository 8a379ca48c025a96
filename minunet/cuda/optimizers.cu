// optimizers.cu -- parameter updates of SGD with momentum and of Adam, one thread per weight.
//
// Both update `param` and their state IN PLACE (that is what an optimizer step is), and follow
// PyTorch's torch.optim formulas exactly, so that the two can be compared step by step.
// Arrays are flat and contiguous with `size` < 2^31 elements of MINUNET_SCALAR.

#ifndef MINUNET_SCALAR
#define MINUNET_SCALAR float
#endif
typedef MINUNET_SCALAR scalar_t;

// g = grad + weight_decay * param;   velocity = momentum * velocity + g;
// param -= lr * velocity.            (velocity starts at zero)
extern "C" __global__ void sgd_momentum_update(scalar_t* __restrict__ param,
                                               const scalar_t* __restrict__ grad,
                                               scalar_t* __restrict__ velocity, int size,
                                               scalar_t lr, scalar_t momentum,
                                               scalar_t weight_decay) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= size) return;
    scalar_t g = grad[i] + weight_decay * param[i];
    scalar_t v = momentum * velocity[i] + g;
    velocity[i] = v;
    param[i] -= lr * v;
}

// Adam (Kingma & Ba 2015) at step t >= 1, with the host passing
// bias_correction1 = 1 - beta1^t and bias_correction2 = 1 - beta2^t:
//   g = grad + weight_decay * param
//   m = beta1 * m + (1 - beta1) * g;      v = beta2 * v + (1 - beta2) * g^2
//   param -= (lr / bias_correction1) * m / (sqrt(v) / sqrt(bias_correction2) + eps)
extern "C" __global__ void adam_update(scalar_t* __restrict__ param,
                                       const scalar_t* __restrict__ grad,
                                       scalar_t* __restrict__ m, scalar_t* __restrict__ v,
                                       int size, scalar_t lr, scalar_t beta1, scalar_t beta2,
                                       scalar_t eps, scalar_t weight_decay,
                                       scalar_t bias_correction1, scalar_t bias_correction2) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= size) return;
    scalar_t g = grad[i] + weight_decay * param[i];
    scalar_t m_i = beta1 * m[i] + (1 - beta1) * g;
    scalar_t v_i = beta2 * v[i] + (1 - beta2) * g * g;
    m[i] = m_i;
    v[i] = v_i;
    param[i] -= (lr / bias_correction1) * m_i / (sqrt(v_i) / sqrt(bias_correction2) + eps);
}

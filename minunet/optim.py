"""Optimisers: SGD with momentum (the paper's choice, momentum 0.99) and Adam.

Both follow PyTorch's update rules exactly, so that a minunet training run and a PyTorch run
from the same weights on the same data produce the same weights. Updates happen in place on
each :class:`minunet.nn.Parameter`'s ``data`` array: in NumPy, or on the GPU (CuPy arrays)
by the kernels of ``minunet/cuda/optimizers.cu``, one launch per parameter.

``state_dict()`` returns a flat dict of hyper-parameters (Python numbers) and per-parameter
state arrays keyed ``"<name>.<index>"`` (index into the parameter list), which
``numpy.savez`` can store as it is; ``load_state_dict`` restores it to resume training.
"""

from __future__ import annotations

import functools

import numpy as np

from minunet.backend import get_array_module, is_cupy_array, to_device
from minunet.cuda import ops
from minunet.functional import threads
from minunet.nn import Parameter


class Optimizer:
    """Common bookkeeping: the parameter list, per-parameter state arrays, (de)serialisation.

    Subclasses list their scalar settings in ``_hyperparameters`` and the names of their
    per-parameter arrays in ``_state_names``; ``self.state[name][i]`` is the array for
    parameter ``i`` (``None`` until the first step creates it).
    """

    _hyperparameters: tuple[str, ...] = ()
    _state_names: tuple[str, ...] = ()

    def __init__(self, params, lr: float, weight_decay: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("params is empty: pass net.parameters()")
        for p in self.params:
            if not isinstance(p, Parameter):
                raise TypeError(f"params must be minunet.nn.Parameter objects, got {type(p)}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.step_count = 0
        self.state = {name: [None] * len(self.params) for name in self._state_names}

    def zero_grad(self) -> None:
        """Set every parameter's gradient to zero."""
        def zero(run):
            for p in self.params[run]:
                p.grad[...] = 0

        self._by_runs(zero)

    def _by_runs(self, work) -> None:
        """``work(run)`` for runs of consecutive parameters: on the CPU one run per thread
        BLAS would use, of about equal size, at once (every update is a pass over memory
        that NumPy makes on one core); on the GPU one run of all."""
        if is_cupy_array(self.params[0].data):
            work(slice(None))
            return
        sizes = [p.data.size for p in self.params]
        runs = threads.runs_by_size(sizes, threads.pass_shares(sum(sizes)))
        threads.run_at_once(functools.partial(work, run) for run in runs)

    def _gradient(self, p: Parameter):
        """dL/dp plus the L2 term ``weight_decay * p`` (PyTorch's ``weight_decay``)."""
        return p.grad + self.weight_decay * p.data if self.weight_decay else p.grad

    def step(self) -> None:
        """One update of every parameter from its current ``.grad``."""
        self.step_count += 1

        def update(run):
            for index in range(len(self.params))[run]:
                self._update(index, self.params[index])

        self._by_runs(update)

    def _update(self, index: int, p: Parameter) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        state = {name: getattr(self, name) for name in ("step_count", *self._hyperparameters)}
        for name, arrays in self.state.items():
            for index, array in enumerate(arrays):
                if array is not None:
                    state[f"{name}.{index}"] = array.copy()
        return state

    def load_state_dict(self, state: dict) -> None:
        for name in ("step_count", *self._hyperparameters):
            if name not in state:
                raise ValueError(f"optimizer state is missing {name!r}")
        known = {f"{name}.{i}" for name in self._state_names for i in range(len(self.params))}
        unexpected = sorted(set(state) - known - {"step_count", *self._hyperparameters})
        if unexpected:
            raise ValueError(f"optimizer state has unexpected keys {unexpected} "
                             f"(does it belong to a different network?)")
        new_state = {name: [None] * len(self.params) for name in self._state_names}
        for name in self._state_names:
            for index, p in enumerate(self.params):
                value = state.get(f"{name}.{index}")
                if value is None:
                    continue
                value = value if is_cupy_array(value) else np.asarray(value)
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {name}.{index} has shape "
                                     f"{tuple(value.shape)}, parameter has {tuple(p.shape)}")
                device = "numpy" if get_array_module(p.data) is np else "cupy"
                new_state[name][index] = to_device(value, device).astype(p.data.dtype,
                                                                        copy=True)
        self.step_count = int(state["step_count"])
        for name in self._hyperparameters:
            value = state[name]
            setattr(self, name, tuple(float(v) for v in value) if np.ndim(value) else float(value))
        self.state = new_state


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, PyTorch's rule (no dampening)::

        g = grad + weight_decay * p
        v = g                      on the first step
        v = momentum * v + g       afterwards
        p = p - lr * v

    The U-Net paper trains with momentum 0.99 and batch size 1, "such that a large number of
    the previously seen training samples determine the update in the current optimization
    step".
    """

    _hyperparameters = ("lr", "momentum", "weight_decay")
    _state_names = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.99, weight_decay: float = 0.0):
        super().__init__(params, lr, weight_decay)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)

    def _update(self, index, p):
        if is_cupy_array(p.data):
            self._update_on_gpu(index, p)
            return
        direction = self._gradient(p)
        if self.momentum:
            buffers = self.state["momentum_buffer"]
            if buffers[index] is None:
                buffers[index] = direction.copy()
            else:
                buffers[index] *= self.momentum
                buffers[index] += direction
            direction = buffers[index]
        p.data -= self.lr * direction

    def _update_on_gpu(self, index, p):
        """The same rule in one kernel: ``v = momentum*v + g`` from ``v = 0`` gives PyTorch's
        first step ``v = g`` exactly. Without momentum ``v`` is a scratch array."""
        buffers = self.state["momentum_buffer"]
        velocity = buffers[index]
        if velocity is None:
            velocity = get_array_module(p.data).zeros_like(p.data)
            if self.momentum:
                buffers[index] = velocity
        ops.sgd_momentum_update(p.data, p.grad, velocity, self.lr, self.momentum,
                                self.weight_decay)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015), PyTorch's rule; ``weight_decay`` is the L2 form (not AdamW)::

        g = grad + weight_decay * p
        m = beta1 * m + (1 - beta1) * g            (m, v start at 0)
        v = beta2 * v + (1 - beta2) * g**2
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    """

    _hyperparameters = ("lr", "betas", "eps", "weight_decay")
    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr, weight_decay)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)

    def _update(self, index, p):
        xp = get_array_module(p.data)
        beta1, beta2 = self.betas
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        if m[index] is None:
            m[index], v[index] = xp.zeros_like(p.data), xp.zeros_like(p.data)
        if is_cupy_array(p.data):
            ops.adam_update(p.data, p.grad, m[index], v[index], self.step_count, self.lr,
                            beta1, beta2, self.eps, self.weight_decay)
            return
        grad = self._gradient(p)
        m[index] += (1 - beta1) * (grad - m[index])  # = beta1*m + (1-beta1)*g, as torch's lerp
        v[index] *= beta2
        v[index] += (1 - beta2) * grad * grad
        t = self.step_count
        step_size = self.lr / (1 - beta1**t)
        denominator = xp.sqrt(v[index]) / (1 - beta2**t) ** 0.5 + self.eps
        p.data -= step_size * (m[index] / denominator)

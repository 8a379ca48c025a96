"""Layers with parameters, a forward pass and a hand-written backward pass.

Every layer is a small class in the style of cs231n and "Deep Learning from Scratch":

* ``forward(x)`` computes the output and keeps (caches) what the backward pass will need;
* ``backward(grad_out)`` takes dL/d(output), **adds** dL/d(parameter) into each parameter's
  ``.grad`` and returns dL/d(input).

There is no autograd engine: a network calls its layers' ``backward`` in the reverse order of
their ``forward`` (see :meth:`minunet.UNet.backward`). A layer therefore serves one forward
call at a time: calling ``forward`` twice before ``backward`` overwrites the cache. And
``backward`` lets the cache go once it has used it, as PyTorch frees a graph's saved tensors:
the feature maps of the layers already done are returned to memory while the backward pass
goes on (a third of the peak memory of the paper's training step), and a second
``backward`` needs a new ``forward`` first.

All arrays are NCHW. Layers work on NumPy or CuPy arrays alike: the array library is taken
from the arrays (:func:`minunet.backend.get_array_module`) and the kernels of
:mod:`minunet.functional` dispatch on the array type.

Parameter names follow PyTorch (``conv1.weight``, ``bn1.running_mean``, ...), so that a
minunet network and :class:`minunet.torch_reference.TorchUNet` share one state-dict layout.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from minunet import functional as F
from minunet import shapes
from minunet.backend import get_array_module, is_cupy_array, to_device
from minunet.checks import float_dtype
from minunet.functional import threads


def he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: float, dtype) -> np.ndarray:
    """He initialisation (He et al. 2015, used by the U-Net paper): ``N(0, 2 / fan_in)``.

    The paper: "a Gaussian distribution with a standard deviation of sqrt(2/N), where N
    denotes the number of incoming nodes of one neuron". Drawn in float64, then cast, so that
    a float32 and a float64 network with the same seed hold the same (rounded) weights.
    """
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)


def _rng(seed) -> np.random.Generator:
    """A Generator from a seed, or the Generator itself (so a network can share one)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


class Parameter:
    """A trainable array and its gradient.

    ``data`` and ``grad`` have the same shape, dtype and device. Backward passes *add* into
    ``grad`` (so gradients of several losses accumulate); :meth:`Module.zero_grad` resets it.
    """

    def __init__(self, data):
        self.data = data
        self.grad = get_array_module(data).zeros_like(data)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class: finds its parameters, buffers and sub-layers among its attributes.

    Attributes holding a :class:`Parameter` are parameters, attributes holding a
    :class:`Module` are children, and the names listed in ``_buffer_names`` are buffers
    (arrays that are saved but not trained, such as BatchNorm's running statistics).
    Names are dotted paths in attribute-definition order, as in PyTorch.
    """

    _buffer_names: tuple[str, ...] = ()

    def __init__(self):
        self.training = True

    # --- the two passes ---------------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError

    def backward(self, grad_out):
        raise NotImplementedError

    def __call__(self, *inputs):
        return self.forward(*inputs)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape for an input of ``input_shape`` (default: unchanged)."""
        return tuple(input_shape)

    # --- traversal -------------------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def modules(self):
        """This module and all its descendants, depth first."""
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix: str = ""):
        """``(dotted name, Parameter)`` pairs of this module and its descendants."""
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = ""):
        for name in self._buffer_names:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(prefix + name + ".")

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad[...] = 0

    # --- modes -----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Training mode (batch statistics, dropout on) for this module and its children."""
        for module in self.modules():
            module.training = mode
        return self

    def eval(self):
        """Evaluation mode (running statistics, dropout off)."""
        return self.train(False)

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Copies of all parameters and buffers, keyed by dotted name (PyTorch's layout)."""
        state = {name: p.data.copy() for name, p in self.named_parameters()}
        state.update({name: b.copy() for name, b in self.named_buffers()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays (NumPy, CuPy, or anything ``np.asarray`` takes) into the parameters and
        buffers, in place and cast to their dtype. Keys must match exactly; shapes too."""
        targets = {name: p.data for name, p in self.named_parameters()}
        targets.update(dict(self.named_buffers()))
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets))
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the network: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        sources = {}
        for name, target in targets.items():
            source = state[name]
            sources[name] = source if is_cupy_array(source) else np.asarray(source)
            if tuple(sources[name].shape) != tuple(target.shape):
                raise ValueError(
                    f"state dict entry {name!r} has shape {tuple(sources[name].shape)}, "
                    f"the network expects {tuple(target.shape)}"
                )
        for name, target in targets.items():
            device = "numpy" if get_array_module(target) is np else "cupy"
            target[...] = to_device(sources[name], device)

    def to(self, device: str):
        """Move every parameter (data and grad) and buffer to ``"numpy"`` or ``"cupy"``."""
        for module in self.modules():
            for value in vars(module).values():
                if isinstance(value, Parameter):
                    value.data = to_device(value.data, device)
                    value.grad = to_device(value.grad, device)
            for name in module._buffer_names:
                setattr(module, name, to_device(getattr(module, name), device))
            module._clear_cache()
        return self

    def _clear_cache(self) -> None:
        """Forget what forward cached (it may live on the other device)."""

    def _take_cache(self, cache):
        """``cache`` (what forward kept, passed in by backward), forgotten by the layer: the
        caller holds the last reference, and the memory goes when its backward is done."""
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        self._clear_cache()
        return cache


class ModuleList(Module):
    """A list of modules, named ``0``, ``1``, ... in state dicts (like ``torch.nn.ModuleList``)."""

    def __init__(self, modules):
        super().__init__()
        self._items = list(modules)

    def named_children(self):
        for index, module in enumerate(self._items):
            yield str(index), module

    def __getitem__(self, index: int) -> Module:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)


class _ConvolutionLayer(Module):
    """What Conv2d and ConvTranspose2d share: a weight, an optional bias, a cached input, and
    a forward/backward kernel pair from :mod:`minunet.functional` that each layer calls with
    its own geometry (:meth:`_kernel`, :meth:`_kernel_backward`)."""

    def __init__(self, weight, out_channels: int, bias: bool):
        super().__init__()
        self.weight = Parameter(weight)
        self.bias = Parameter(np.zeros(out_channels, weight.dtype)) if bias else None
        self._x = None

    def _kernel(self, x, weight, bias):
        """The layer's forward kernel, called with the layer's geometry."""
        raise NotImplementedError

    def _kernel_backward(self, grad_out, x, weight, input_gradient):
        """The layer's backward kernel: ``(grad_x, grad_weight, grad_bias)``, grad_x None
        unless ``input_gradient``."""
        raise NotImplementedError

    def forward(self, x):
        self._x = x
        return self._kernel(x, self.weight.data, None if self.bias is None else self.bias.data)

    def backward(self, grad_out, input_gradient: bool = True):
        """Add the parameters' gradients to their ``.grad`` and return dL/dx, or, with
        ``input_gradient=False``, None: nothing is computed for an input that is the data
        (a network's first layer, in training)."""
        x = self._take_cache(self._x)
        grad_x, grad_w, grad_b = self._kernel_backward(grad_out, x, self.weight.data,
                                                       input_gradient)
        self.weight.grad += grad_w
        if self.bias is not None:
            self.bias.grad += grad_b
        return grad_x

    def _clear_cache(self):
        self._x = None


class Conv2d(_ConvolutionLayer):
    """2-D convolution (cross-correlation, as in PyTorch), stride 1.

    Shapes: x (N, C_in, H, W) -> (N, C_out, H', W'), weight (C_out, C_in, kh, kw),
    bias (C_out,); ``H' = H + p_top + p_bottom - kh + 1``.
    He initialisation with fan-in ``N = C_in * kh * kw``; bias zero.
    ``padding``: int, pair, ``"valid"`` or ``"same"``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=0,
                 bias: bool = True, dtype="float32", seed=None):
        kh, kw = shapes.pair(kernel_size, "kernel_size", minimum=1)
        weight = he_normal(_rng(seed), (out_channels, in_channels, kh, kw),
                           in_channels * kh * kw, float_dtype(dtype))
        super().__init__(weight, out_channels, bias)
        self.kernel_size = (kh, kw)
        self.padding = padding
        self._pads = shapes.resolve_padding(padding, (kh, kw), (1, 1), (1, 1))

    def _kernel(self, x, weight, bias):
        return F.conv2d(x, weight, bias, padding=self.padding)

    def _kernel_backward(self, grad_out, x, weight, input_gradient):
        return F.conv2d_backward(grad_out, x, weight, padding=self.padding,
                                 input_gradient=input_gradient)

    def output_shape(self, input_shape):
        n, _, h, w = input_shape
        hw = shapes.conv2d_output_shape((h, w), self.kernel_size, (1, 1), self._pads, (1, 1))
        return (n, self.weight.shape[0], *hw)


class ConvTranspose2d(_ConvolutionLayer):
    """2-D transposed convolution (the U-Net's "up-convolution"), no padding.

    Shapes: x (N, C_in, H, W) -> (N, C_out, (H-1)*s + kh, (W-1)*s + kw),
    weight (C_in, C_out, kh, kw) (PyTorch's layout), bias (C_out,).

    He initialisation. The fan-in of a transposed convolution is the number of input values
    that one output value sums: each output pixel meets on average ``kh*kw / (sh*sw)`` kernel
    taps in each of the ``C_in`` channels, so ``N = C_in * kh * kw / (sh * sw)``. For the
    U-Net's 2x2 kernel with stride 2 every output pixel sees exactly one tap per channel and
    ``N = C_in``. (PyTorch's default initialiser uses ``C_out * kh * kw`` instead, reading the
    weight's second axis as fan-in; that is not the number of incoming nodes.)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=2, stride=2,
                 bias: bool = True, dtype="float32", seed=None):
        kh, kw = shapes.pair(kernel_size, "kernel_size", minimum=1)
        sh, sw = shapes.pair(stride, "stride", minimum=1)
        fan_in = in_channels * kh * kw / (sh * sw)
        weight = he_normal(_rng(seed), (in_channels, out_channels, kh, kw), fan_in,
                           float_dtype(dtype))
        super().__init__(weight, out_channels, bias)
        self.kernel_size = (kh, kw)
        self.stride = (sh, sw)

    def _kernel(self, x, weight, bias):
        return F.conv_transpose2d(x, weight, bias, stride=self.stride)

    def _kernel_backward(self, grad_out, x, weight, input_gradient):
        return F.conv_transpose2d_backward(grad_out, x, weight, stride=self.stride,
                                           input_gradient=input_gradient)

    def output_shape(self, input_shape):
        n, _, h, w = input_shape
        hw = shapes.conv_transpose2d_output_shape((h, w), self.kernel_size, self.stride,
                                                  (0, 0), (0, 0), (1, 1))
        return (n, self.weight.shape[1], *hw)


class MaxPool2d(Module):
    """Max-pooling, ``kernel_size`` x ``kernel_size`` windows, stride = kernel size by default.

    The tie rule (which of equal maxima receives the gradient) is the kernel's, see
    :func:`minunet.functional.max_pool2d_backward`. In the U-Net the pool follows a ReLU, so
    ties happen only between zeros, whose gradient the ReLU blocks anyway.
    """

    def __init__(self, kernel_size=2, stride=None):
        super().__init__()
        self.kernel_size = shapes.pair(kernel_size, "kernel_size", minimum=1)
        self.stride = self.kernel_size if stride is None else shapes.pair(stride, "stride",
                                                                           minimum=1)
        self._x = None
        self._winners = None

    def forward(self, x):
        # The winners' positions are kept so that backward need not search the windows again.
        self._x = x
        out, self._winners = F.max_pool2d(x, self.kernel_size, self.stride, return_indices=True)
        return out

    def backward(self, grad_out):
        winners = self._winners
        x = self._take_cache(self._x)
        return F.max_pool2d_backward(grad_out, x, self.kernel_size, self.stride, indices=winners)

    def output_shape(self, input_shape):
        n, c, h, w = input_shape
        return (n, c, *shapes.pool2d_output_shape((h, w), self.kernel_size, self.stride, (0, 0)))

    def _clear_cache(self):
        self._x = None
        self._winners = None


class ReLU(Module):
    """``y = max(x, 0)``; ``dL/dx = dL/dy * [x > 0]`` (the derivative at 0 is taken as 0,
    as in PyTorch). Keeps its output for backward (``y > 0`` exactly where ``x > 0``).

    With ``inplace=True`` the output overwrites the input (as PyTorch's ``inplace``): for
    a ReLU whose input nothing else keeps, such as the fresh output of a convolution.
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self._y = None

    def forward(self, x):
        self._y = F.relu(x, out=x if self.inplace else None)
        return self._y

    def backward(self, grad_out, out=None):
        """dL/dx in a new array, or in ``out``: ``grad_out`` itself where the caller has no
        further use for it (as :class:`DoubleConv` with the gradients it makes itself)."""
        return F.relu_backward(grad_out, self._take_cache(self._y), out=out)

    def _clear_cache(self):
        self._y = None


class Dropout(Module):
    """Inverted dropout: in training mode each value is zeroed with probability ``p`` and the
    survivors are scaled by ``1/(1-p)``, so evaluation mode is the identity.

    The mask is drawn from a seeded NumPy generator on the host and then moved to the array's
    device, so a given seed drops the same units on the CPU and on the GPU.
    ``backward`` applies the same mask and scale.
    """

    def __init__(self, p: float = 0.5, seed=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self._rng = _rng(seed)
        self._scale = None  # mask / (1 - p), or None when dropout was inactive

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._scale = None
            return x
        keep = self._rng.random(x.shape) >= self.p
        xp = get_array_module(x)
        scale = (keep / (1.0 - self.p)).astype(x.dtype)
        self._scale = scale if xp is np else to_device(scale, "cupy")
        return x * self._scale

    def backward(self, grad_out):
        return grad_out if self._scale is None else grad_out * self._scale

    def _clear_cache(self):
        self._scale = None


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) for each channel (Ioffe & Szegedy 2015).

    Training mode, with ``M = N*H*W`` values per channel::

        mu = mean(x),  var = mean((x - mu)^2)           (biased, used to normalise)
        x_hat = (x - mu) / sqrt(var + eps),  y = gamma * x_hat + beta
        running_mean <- (1 - momentum) * running_mean + momentum * mu
        running_var  <- (1 - momentum) * running_var  + momentum * var * M / (M - 1)

    (the running variance is unbiased, as in PyTorch). Evaluation mode normalises with the
    running statistics instead. Backward in training mode, with ``g = dL/dy``::

        dL/dgamma = sum(g * x_hat),  dL/dbeta = sum(g)
        dL/dx = gamma / sqrt(var + eps) * (g - mean(g) - x_hat * mean(g * x_hat))

    (the two mean terms are the gradient flowing through mu and var). In evaluation mode the
    statistics are constants and ``dL/dx = gamma / sqrt(running_var + eps) * g``.
    """

    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 dtype="float32"):
        super().__init__()
        dtype = float_dtype(dtype)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.weight = Parameter(np.ones(num_features, dtype))
        self.bias = Parameter(np.zeros(num_features, dtype))
        self.running_mean = np.zeros(num_features, dtype)
        self.running_var = np.ones(num_features, dtype)
        self.num_batches_tracked = np.zeros((), np.int64)
        self._cache = None

    @staticmethod
    def _per_channel(v):
        """View a (C,) vector as (1, C, 1, 1) so it broadcasts over NCHW."""
        return v.reshape(1, -1, 1, 1)

    def forward(self, x):
        xp = get_array_module(x)
        if x.ndim != 4 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"BatchNorm2d expects (N, {self.weight.shape[0]}, H, W), got {tuple(x.shape)}"
            )
        if self.training:
            count = x.shape[0] * x.shape[2] * x.shape[3]
            if count < 2:
                raise ValueError("BatchNorm2d in training mode needs more than one value per "
                                 f"channel, got input shape {tuple(x.shape)}")
            mean = x.mean(axis=(0, 2, 3))
            var = ((x - self._per_channel(mean)) ** 2).mean(axis=(0, 2, 3))
            m = self.momentum
            self.running_mean = (1 - m) * self.running_mean + m * mean
            self.running_var = (1 - m) * self.running_var + m * var * (count / (count - 1))
            self.running_mean = self.running_mean.astype(x.dtype)
            self.running_var = self.running_var.astype(x.dtype)
            self.num_batches_tracked += 1  # in place: stays a 0-d array
        else:
            mean, var = self.running_mean, self.running_var
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        x_hat = (x - self._per_channel(mean)) * self._per_channel(inv_std)
        self._cache = (x_hat, inv_std, self.training)
        return x_hat * self._per_channel(self.weight.data) + self._per_channel(self.bias.data)

    def backward(self, grad_out):
        x_hat, inv_std, batch_statistics = self._take_cache(self._cache)
        self.weight.grad += (grad_out * x_hat).sum(axis=(0, 2, 3))
        self.bias.grad += grad_out.sum(axis=(0, 2, 3))
        scale = self._per_channel(self.weight.data * inv_std)
        if not batch_statistics:
            return grad_out * scale
        mean_g = grad_out.mean(axis=(0, 2, 3), keepdims=True)
        mean_g_xhat = (grad_out * x_hat).mean(axis=(0, 2, 3), keepdims=True)
        return scale * (grad_out - mean_g - x_hat * mean_g_xhat)

    def _clear_cache(self):
        self._cache = None


class CropConcat(Module):
    """The U-Net's skip connection: crop the contracting path's feature map ``skip`` to the
    size of the up-sampled map ``up`` and stack the two along channels.

    forward(skip (N, C_s, H_s, W_s), up (N, C_u, H, W)) -> (N, C_s + C_u, H, W), skip first.

    The crop is centred; when ``H_s - H`` is odd the window starts ``floor((H_s - H) / 2)``
    rows from the top, so the extra row is removed at the bottom (and the extra column at the
    right), the same as :func:`minunet.torch_reference.center_crop`.

    backward(grad) -> (grad_skip, grad_up): the first ``C_s`` channels of ``grad`` belong to
    the skip, zero-padded back to (H_s, W_s) (pixels outside the window did not reach the
    output, so their gradient is zero); the remaining ``C_u`` channels belong to ``up``.
    """

    def __init__(self):
        super().__init__()
        self._cache = None

    @staticmethod
    def crop_window(skip_hw, up_hw) -> tuple[slice, slice]:
        """Row and column slices of the centred crop (raises if ``up`` is the larger)."""
        slices = []
        for skip_size, up_size, axis in zip(skip_hw, up_hw, ("height", "width"), strict=True):
            if up_size > skip_size:
                raise ValueError(f"cannot crop a skip {axis} of {skip_size} to {up_size}")
            start = (skip_size - up_size) // 2
            slices.append(slice(start, start + up_size))
        return tuple(slices)

    def forward(self, skip, up):
        if skip.shape[0] != up.shape[0]:
            raise ValueError(f"batch sizes differ: skip {skip.shape}, up {up.shape}")
        xp = get_array_module(skip, up)
        rows, cols = self.crop_window(skip.shape[2:], up.shape[2:])
        self._cache = (skip.shape, skip.dtype)
        parts = (skip[:, :, rows, cols], up)
        if xp is not np:
            return xp.concatenate(parts, axis=1)
        out = np.empty((up.shape[0], skip.shape[1] + up.shape[1], *up.shape[2:]),
                       dtype=np.result_type(*parts))

        def copy(channels):  # a run of the output's channels, from either part
            start = 0
            for part in parts:
                first = max(channels.start, start)
                last = min(channels.stop, start + part.shape[1])
                if first < last:
                    out[:, first:last] = part[:, first - start : last - start]
                start += part.shape[1]

        threads.run_at_once(functools.partial(copy, run)
                            for run in threads.split(out.shape[1], threads.pass_shares(out.size)))
        return out

    def backward(self, grad_out):
        skip_shape, skip_dtype = self._take_cache(self._cache)
        xp = get_array_module(grad_out)
        skip_channels = skip_shape[1]
        rows, cols = self.crop_window(skip_shape[2:], grad_out.shape[2:])
        grad_skip = xp.zeros(skip_shape, dtype=skip_dtype)
        grad_skip[:, :, rows, cols] = grad_out[:, :skip_channels]
        grad_up = grad_out[:, skip_channels:]
        return grad_skip, grad_up

    def output_shape(self, skip_shape, up_shape=None):
        return (up_shape[0], skip_shape[1] + up_shape[1], *up_shape[2:])

    def _clear_cache(self):
        self._cache = None


class DoubleConv(Module):
    """One U-Net level: (3x3 conv -> [BatchNorm] -> ReLU) twice.

    ``padding="valid"`` shrinks each side by 2 pixels in total, ``"same"`` keeps the size.
    """

    def __init__(self, in_channels: int, out_channels: int, padding: str = "valid",
                 batch_norm: bool = False, dtype="float32", seed=None):
        super().__init__()
        rng = _rng(seed)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding, dtype=dtype, seed=rng)
        if batch_norm:
            self.bn1 = BatchNorm2d(out_channels, dtype=dtype)
        # In place: a convolution's or BatchNorm's output is a fresh array that neither
        # keeps for its backward pass.
        self.relu1 = ReLU(inplace=True)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding, dtype=dtype, seed=rng)
        if batch_norm:
            self.bn2 = BatchNorm2d(out_channels, dtype=dtype)
        self.relu2 = ReLU(inplace=True)

    def layers(self) -> list[tuple[str, Module]]:
        """The sub-layers in forward order."""
        return list(self.named_children())

    def forward(self, x):
        for _, layer in self.layers():
            x = layer.forward(x)
        return x

    def backward(self, grad_out, overwrite: bool = False, input_gradient: bool = True):
        """dL/dx of the block. ``overwrite=True`` says the caller has no further use for
        ``grad_out`` (the U-Net passes gradients it made itself), so the block may write
        over it; by default the caller's array is left as it was. With
        ``input_gradient=False`` the first convolution skips dL/dx and None is returned."""
        # Reverse order: relu2, [bn2], conv2, relu1, [bn1], conv1. After the first layer every
        # gradient is a fresh array of this block's own that nothing else holds, so a ReLU
        # writes its result over it instead of into a new array.
        layers = [layer for _, layer in reversed(self.layers())]
        for index, layer in enumerate(layers[:-1]):
            # ... and only contiguous ones, the only kind the GPU kernel writes into.
            writable = (index > 0 or overwrite) and grad_out.flags.c_contiguous
            if isinstance(layer, ReLU) and writable:
                grad_out = layer.backward(grad_out, out=grad_out)
            else:
                grad_out = layer.backward(grad_out)
        return layers[-1].backward(grad_out, input_gradient=input_gradient)  # conv1

    def output_shape(self, input_shape):
        for _, layer in self.layers():
            input_shape = layer.output_shape(input_shape)
        return input_shape

"""The U-Net of Ronneberger, Fischer & Brox (2015), with its backward pass written out.

The network has ``depth`` resolution levels. Level ``l`` works with ``C_l = base * 2**l``
channels (paper: depth 5, 64 ... 1024)::

    contracting path (encoder)            expanding path (decoder)
    x -> encoder[0] ----- skip 0 ------> crop+concat -> decoder[0] -> head (1x1) -> logits
           | max-pool 2x2                        ^ upconv[0] (2x2, stride 2)
         encoder[1] ----- skip 1 ------> crop+concat -> decoder[1]
           | ...                                 ^ ...
         encoder[depth-1]  (bottom) -> dropout --+

Each ``encoder[l]`` / ``decoder[l]`` is a :class:`minunet.nn.DoubleConv` (two 3x3 convs, each
followed by optional BatchNorm and a ReLU). With ``padding="valid"`` (the paper) every conv
trims a 1-pixel border, so the output is smaller than the input (572 -> 388) and the skip
maps are centre-cropped before concatenation; with ``padding="same"`` sizes are preserved.

:meth:`UNet.backward` is the chain rule applied by hand, level by level; the only place
where two gradients meet is the skip connection, where the gradient coming back through
the crop is *added* to the gradient coming back through the max-pool.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from minunet import shapes
from minunet.backend import available_memory_bytes, get_array_module
from minunet.checks import float_dtype
from minunet.functional.process import without_huge_pages
from minunet.nn import (
    Conv2d,
    ConvTranspose2d,
    CropConcat,
    DoubleConv,
    Dropout,
    MaxPool2d,
    Module,
    ModuleList,
)

PADDING_MODES = ("valid", "same")


def unet_parameter_count(in_channels: int = 1, num_classes: int = 2, depth: int = 5,
                         base_channels: int = 64, batch_norm: bool = False) -> int:
    """Number of trainable values of ``UNet(...)`` with these arguments, from the
    architecture alone (nothing is allocated; the paper's network: 31,030,658)."""
    channels = [base_channels * 2**level for level in range(depth)]

    def double_conv(c_in, c_out):
        convs = c_out * c_in * 9 + c_out + c_out * c_out * 9 + c_out
        return convs + (4 * c_out if batch_norm else 0)  # BatchNorm: a scale and a shift

    encoder = sum(double_conv(in_channels if level == 0 else channels[level - 1],
                              channels[level]) for level in range(depth))
    upconv = sum(channels[level + 1] * channels[level] * 4 + channels[level]
                 for level in range(depth - 1))
    decoder = sum(double_conv(2 * channels[level], channels[level]) for level in range(depth - 1))
    head = channels[0] * num_classes + num_classes
    return encoder + upconv + decoder + head


def require_memory(needed: int, what: str, device: str = "numpy") -> None:
    """Raise ``MemoryError`` saying what needs how much, unless ``needed`` bytes are
    available on ``device`` (see :func:`minunet.backend.available_memory_bytes`)."""
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise MemoryError(f"{what} need about {needed / 2**30:.1f} GiB but only "
                          f"{available / 2**30:.1f} GiB of memory are available")


@dataclasses.dataclass
class UNetSummary:
    """The numbers behind :meth:`UNet.summary`.

    ``rows``: one dict per layer output, in forward order, with keys ``layer`` (dotted name),
    ``type``, ``output_shape`` (tuple), ``params`` (int) and ``bytes`` (size of the output).
    ``activation_bytes`` is the sum of ``bytes`` over all rows: the memory that one forward
    pass's outputs take (the backward pass keeps about this much alive).
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    rows: list[dict]
    total_params: int
    receptive_field: int
    activation_bytes: int
    dtype: str

    def __str__(self) -> str:
        width = max(len(row["layer"]) for row in self.rows) + 2
        lines = [f"{'layer':<{width}}{'type':<17}{'output shape':<24}{'params':>12}",
                 "-" * (width + 53)]
        for row in self.rows:
            shape = "x".join(str(n) for n in row["output_shape"])
            lines.append(f"{row['layer']:<{width}}{row['type']:<17}{shape:<24}"
                         f"{row['params']:>12,}")
        lines += [
            "-" * (width + 53),
            f"input {'x'.join(map(str, self.input_shape))}  ->  "
            f"output {'x'.join(map(str, self.output_shape))}",
            f"total parameters: {self.total_params:,}",
            f"receptive field: {self.receptive_field} x {self.receptive_field} pixels",
            f"activations ({self.dtype}): {self.activation_bytes:,} bytes "
            f"({self.activation_bytes / 2**20:.1f} MiB)",
        ]
        return "\n".join(lines)


class UNet(Module):
    """U-Net for pixel-wise classification.

    Parameters
    ----------
    in_channels : channels of the input image (1 for grey-scale microscopy).
    num_classes : channels of the output logits (2 in the paper: cell / border-background).
    depth : number of resolution levels (paper: 5).
    base_channels : channels of the top level, doubled at every level down (paper: 64).
    padding : ``"valid"`` (paper; output smaller than input) or ``"same"`` (output = input).
    dtype : ``"float32"`` (default) or ``"float64"`` (for gradient checks).
    batch_norm : BatchNorm after every 3x3 conv, before its ReLU (not in the paper).
    dropout : probability of the dropout applied to the bottom level's output, "the end of
        the contracting path" in the paper; 0 disables it.
    seed : seed of the He initialisation and of the dropout masks (``None``: random).

    Input (N, in_channels, H, W) -> logits (N, num_classes, H_out, W_out), with
    ``H_out = output_size(H)``.

    Parameter names (``state_dict`` keys) are PyTorch's for the same modules, identical to
    :class:`minunet.torch_reference.TorchUNet`: ``encoder.{l}.conv1.weight``,
    ``encoder.{l}.bn1.running_mean`` (with ``batch_norm``), ``upconv.{l}.weight``,
    ``decoder.{l}.conv2.bias``, ``head.weight``, ... with level ``l = 0`` at the top.
    Every 3x3 conv keeps its bias also with ``batch_norm`` (the BatchNorm then makes that bias
    inert; its gradient is zero up to rounding), as the PyTorch twin does.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, depth: int = 5,
                 base_channels: int = 64, padding: str = "valid", dtype="float32",
                 batch_norm: bool = False, dropout: float = 0.0, seed: int | None = None):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("depth", depth), ("base_channels", base_channels)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        dtype = float_dtype(dtype)
        weights = unet_parameter_count(in_channels, num_classes, depth, base_channels,
                                       batch_norm)
        require_memory(weights * dtype.itemsize,
                       f"the {weights:,} weights of a U-Net with depth={depth} and "
                       f"base_channels={base_channels}")
        self.config = {
            "in_channels": int(in_channels), "num_classes": int(num_classes),
            "depth": int(depth), "base_channels": int(base_channels), "padding": padding,
            "dtype": dtype.name, "batch_norm": bool(batch_norm), "dropout": float(dropout),
            "seed": None if seed is None else int(seed),
        }
        self.depth = int(depth)
        self.padding = padding
        self.dtype = dtype
        channels = [base_channels * 2**level for level in range(depth)]
        self.channels = channels
        # One generator for the whole network: weights are drawn layer by layer in the order
        # below, so a seed fixes every weight.
        rng = np.random.default_rng(seed)

        def double_conv(c_in, c_out):
            return DoubleConv(c_in, c_out, padding, batch_norm, dtype, seed=rng)

        self.encoder = ModuleList(
            double_conv(in_channels if level == 0 else channels[level - 1], channels[level])
            for level in range(depth)
        )
        # Layers without parameters still get one instance per use: each caches its input.
        self.pool = ModuleList(MaxPool2d(2) for _ in range(depth - 1))
        self.dropout = Dropout(dropout, seed=rng.spawn(1)[0])
        self.upconv = ModuleList(
            ConvTranspose2d(channels[level + 1], channels[level], 2, 2, dtype=dtype, seed=rng)
            for level in range(depth - 1)
        )
        self.crop_concat = ModuleList(CropConcat() for _ in range(depth - 1))
        self.decoder = ModuleList(double_conv(2 * channels[level], channels[level])
                                  for level in range(depth - 1))
        self.head = Conv2d(channels[0], num_classes, 1, dtype=dtype, seed=rng)

    # --- shape arithmetic (all of it lives in minunet.shapes) ---------------------------------
    def output_size(self, n: int) -> int:
        """Output edge for an input edge ``n`` (572 -> 388 for the paper's network)."""
        out = shapes.unet_output_size(n, self.depth, padding=self.padding)
        if out is None:
            raise ValueError(self._size_message(n))
        return out

    def valid_input_size(self, n: int) -> int:
        """Smallest input edge ``>= n`` that this network accepts."""
        return shapes.unet_valid_input_size(n, self.depth, padding=self.padding)

    def input_size_for_output(self, n: int) -> int:
        """Smallest input edge whose output edge is at least ``n``."""
        return shapes.unet_input_size_for_output(n, self.depth, padding=self.padding)

    def receptive_field(self) -> int:
        """Edge of the input window one output pixel depends on (see
        :func:`minunet.shapes.unet_receptive_field`)."""
        return shapes.unet_receptive_field(self.depth)

    def _size_message(self, n: int) -> str:
        above = self.valid_input_size(n)
        below = [m for m in range(n - 1, 0, -1)
                 if shapes.unet_output_size(m, self.depth, padding=self.padding) is not None]
        rule = (f"sizes divisible by {2 ** (self.depth - 1)}" if self.padding == "same"
                else f"a {self.depth}-level valid U-Net needs every max-pool to see an even size")
        nearest = f"{below[0]} or {above}" if below else f"{above}"
        return f"input size {n} does not fit this U-Net ({rule}); nearest valid sizes: {nearest}"

    def check_input(self, x) -> None:
        """Raise a ValueError/TypeError that says what is wrong with input ``x``."""
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(f"input must be a 4-D array (N, {self.config['in_channels']}, H, W), "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"input has {x.shape[1]} channels, this U-Net expects "
                             f"{self.config['in_channels']} (shape (N, C, H, W))")
        if x.dtype != self.dtype:
            raise TypeError(f"input dtype is {x.dtype}, this U-Net computes in {self.dtype.name}: "
                            f"convert with x.astype('{self.dtype.name}')")
        for axis, n in (("height", x.shape[2]), ("width", x.shape[3])):
            if shapes.unet_output_size(n, self.depth, padding=self.padding) is None:
                raise ValueError(f"input {axis}: " + self._size_message(n))

    # --- forward ---------------------------------------------------------------------------
    @without_huge_pages()  # feature maps are fresh memory at every step: see that function
    def forward(self, x):
        """x (N, in_channels, H, W) -> logits (N, num_classes, H_out, W_out)."""
        self.check_input(x)
        skips = []
        h = x
        for level in range(self.depth - 1):  # contracting path
            h = self.encoder[level].forward(h)
            skips.append(h)  # kept for the skip connection
            h = self.pool[level].forward(h)
        h = self.encoder[-1].forward(h)  # bottom of the U
        h = self.dropout.forward(h)  # "drop-out layers at the end of the contracting path"
        for level in reversed(range(self.depth - 1)):  # expanding path
            up = self.upconv[level].forward(h)  # doubles the size, halves the channels
            h = self.crop_concat[level].forward(skips[level], up)
            h = self.decoder[level].forward(h)
        return self.head.forward(h)

    # --- backward, by hand -----------------------------------------------------------------
    @without_huge_pages()
    def backward(self, grad_logits, input_gradient: bool = True):
        """Back-propagate dL/d(logits); fill every parameter's ``.grad`` (accumulating) and
        return dL/dx of shape (N, in_channels, H, W), or, with ``input_gradient=False``,
        None: training needs no gradient for the images, and the first layer skips it.

        Read it bottom-up against :meth:`forward`: every forward step ``h = layer(h)``
        becomes ``grad = layer.backward(grad)`` in the reverse order.
        """
        # Head: logits = conv1x1(h_top), so grad now is dL/d(decoder[0] output).
        grad = self.head.backward(grad_logits)

        # Expanding path, from the top level (where forward ended) down to the bottom.
        # forward did:  up = upconv(h_below);  cat = [crop(skip), up];  h = decoder(cat)
        grad_skips = [None] * (self.depth - 1)
        for level in range(self.depth - 1):
            # Every gradient handed on below is an array made here for the next layer
            # alone, so a block may write over it (overwrite=True).
            grad_cat = self.decoder[level].backward(grad, overwrite=True)  # dL/d(concat.)
            # The concatenation splits the gradient: its first channels go back into the
            # cropped skip (zero outside the crop window), the rest into the up-convolution.
            grad_skips[level], grad_up = self.crop_concat[level].backward(grad_cat)
            grad = self.upconv[level].backward(grad_up)  # dL/d(output of the level below)

        # Bottom of the U: h = dropout(encoder[-1](h_pooled)).
        grad = self.dropout.backward(grad)
        grad = self.encoder[-1].backward(grad, overwrite=True)  # dL/d(pooled map, depth-2)

        # Contracting path, from the bottom up. The output e_l of encoder[l] fed two
        # branches, the max-pool and the skip connection, so dL/de_l is the SUM of the
        # gradient returning through the pool and the one returning through the crop.
        for level in reversed(range(self.depth - 1)):
            grad_e = self.pool[level].backward(grad)  # a fresh array: the sum goes into it
            grad_e += grad_skips[level]
            grad = self.encoder[level].backward(  # dL/d(input of l)
                grad_e, overwrite=True, input_gradient=input_gradient or level > 0)
        return grad

    # --- summary ---------------------------------------------------------------------------
    def _layer_shapes(self, input_shape):
        """``(name, module, output_shape)`` for every layer, in forward order (shapes only)."""
        skips = []
        shape = input_shape

        def double_conv(prefix, block, shape):
            for name, layer in block.layers():
                shape = layer.output_shape(shape)
                yield f"{prefix}.{name}", layer, shape

        for level in range(self.depth - 1):
            yield from double_conv(f"encoder.{level}", self.encoder[level], shape)
            shape = self.encoder[level].output_shape(shape)
            skips.append(shape)
            shape = self.pool[level].output_shape(shape)
            yield f"pool.{level}", self.pool[level], shape
        bottom = self.depth - 1
        yield from double_conv(f"encoder.{bottom}", self.encoder[bottom], shape)
        shape = self.encoder[bottom].output_shape(shape)
        if self.config["dropout"] > 0:
            yield "dropout", self.dropout, shape
        for level in reversed(range(self.depth - 1)):
            shape = self.upconv[level].output_shape(shape)
            yield f"upconv.{level}", self.upconv[level], shape
            shape = self.crop_concat[level].output_shape(skips[level], shape)
            yield f"crop_concat.{level}", self.crop_concat[level], shape
            yield from double_conv(f"decoder.{level}", self.decoder[level], shape)
            shape = self.decoder[level].output_shape(shape)
        yield "head", self.head, self.head.output_shape(shape)

    def summary_table(self, input_size: int = 572, batch: int = 1) -> UNetSummary:
        """Layer-by-layer shapes, parameter counts, receptive field and activation memory for
        a (batch, in_channels, input_size, input_size) input, as a :class:`UNetSummary`."""
        self.output_size(input_size)  # raises with the nearest valid sizes
        input_shape = (batch, self.config["in_channels"], input_size, input_size)
        rows = []
        for name, layer, shape in self._layer_shapes(input_shape):
            rows.append({
                "layer": name, "type": type(layer).__name__, "output_shape": tuple(shape),
                "params": sum(p.data.size for p in layer.parameters()),
                "bytes": math.prod(shape) * self.dtype.itemsize,
            })
        return UNetSummary(
            input_shape=input_shape, output_shape=rows[-1]["output_shape"], rows=rows,
            total_params=sum(p.data.size for p in self.parameters()),
            receptive_field=self.receptive_field(),
            activation_bytes=sum(row["bytes"] for row in rows), dtype=self.dtype.name,
        )

    def training_memory_bytes(self, input_size: int, batch: int,
                              optimizer_slots: int = 2, shares: int = 1) -> int:
        """Estimated peak memory (bytes) of one training step on (batch, C, input_size,
        input_size) tiles: the layers' cached outputs (the summed activations of
        :meth:`summary_table`) and half as much again for the gradients in flight, the
        largest convolution's im2col matrix, and the weights with their gradients and
        ``optimizer_slots`` more arrays of their size (Adam: 2, SGD with momentum: 1), and
        one more set of gradients for each share of the batch beyond the first
        (:class:`minunet.parallel.BatchSplit`).
        Measured peaks (tracemalloc) of small networks lie up to a factor 2 below it."""
        table = self.summary_table(input_size, batch)
        im2col = max(row["bytes"] // max(row["output_shape"][1], 1) *
                     layer.weight.data[0].size
                     for row, (_, layer, _) in zip(table.rows, self._layer_shapes(
                         table.input_shape), strict=True)
                     if isinstance(layer, Conv2d))
        weights = table.total_params * self.dtype.itemsize
        arrays_of_weights = 2 + optimizer_slots + max(shares - 1, 0)
        return 3 * table.activation_bytes // 2 + im2col + arrays_of_weights * weights

    def summary(self, input_size: int = 572, batch: int = 1) -> str:
        """The :meth:`summary_table` as a printable table."""
        return str(self.summary_table(input_size, batch))

    @property
    def device(self) -> str:
        """``"numpy"`` or ``"cupy"``: where the weights live."""
        return "numpy" if get_array_module(self.head.weight.data) is np else "cupy"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"UNet({args})"

"""The same U-Net in plain PyTorch: the oracle that minunet is checked against.

:class:`TorchUNet` is built from stock PyTorch pieces (``nn.Conv2d``, ``nn.ConvTranspose2d``,
``F.max_pool2d``, ``nn.BatchNorm2d``, ``nn.Dropout``, ``torch.cat``) and has exactly the
architecture of :class:`minunet.UNet`, with the same parameter names, so that

    torch_net.load_state_dict(minunet.serialization.to_torch_state_dict(net))

gives two networks with identical weights. Autograd then provides independent gradients for
every parameter. PyTorch is imported here and only here: the rest of minunet does not need it.

State-dict keys (shared with :class:`minunet.UNet`), for level ``l`` = 0 (top) .. depth-1
(bottom)::

    encoder.{l}.conv1.weight / .bias          3x3 conv, (C_l, C_in, 3, 3)
    encoder.{l}.bn1.{weight,bias,running_mean,running_var,num_batches_tracked}   (batch_norm)
    encoder.{l}.conv2.weight / .bias
    encoder.{l}.bn2.*                                                              (batch_norm)
    upconv.{l}.weight / .bias                 2x2 up-convolution, (C_{l+1}, C_l, 2, 2), l < depth-1
    decoder.{l}.conv1 / bn1 / conv2 / bn2     as the encoder, l < depth-1
    head.weight / .bias                       1x1 conv, (num_classes, C_0, 1, 1)

with ``C_l = base_channels * 2**l``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def center_crop(skip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central ``height x width`` window of ``skip`` (N, C, H, W).

    When ``H - height`` is odd the window starts ``floor((H - height) / 2)`` rows from the
    top, so the extra row is cut from the bottom (likewise the extra column from the right),
    the same rule as :class:`minunet.nn.CropConcat`.
    """
    top = (skip.shape[2] - height) // 2
    left = (skip.shape[3] - width) // 2
    return skip[:, :, top : top + height, left : left + width]


class TorchDoubleConv(nn.Module):
    """Two 3x3 convolutions, each followed by (optional BatchNorm and) ReLU."""

    def __init__(self, in_channels: int, out_channels: int, padding: int, batch_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=padding)
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=padding)
        if batch_norm:
            self.bn2 = nn.BatchNorm2d(out_channels)
        self.batch_norm = batch_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.batch_norm:
            x = self.bn1(x)
        x = F.relu(x)
        x = self.conv2(x)
        if self.batch_norm:
            x = self.bn2(x)
        return F.relu(x)


class TorchUNet(nn.Module):
    """U-Net of Ronneberger et al. (2015) in PyTorch; the arguments mean what they mean for
    :class:`minunet.UNet` (``dtype`` is set afterwards with ``.double()`` if needed).

    Initialisation is PyTorch's default unless ``seed`` is given, in which case the paper's
    He initialisation is used (Gaussian, std ``sqrt(2/N)`` with N the fan-in, zero biases),
    drawn from a seeded ``torch.Generator``. Tests overwrite the weights anyway.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        depth: int = 5,
        base_channels: int = 64,
        padding: str = "valid",
        batch_norm: bool = False,
        dropout: float = 0.0,
        seed: int | None = None,
    ):
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        pad = 1 if padding == "same" else 0
        channels = [base_channels * 2**level for level in range(depth)]
        self.depth = depth
        self.encoder = nn.ModuleList(
            TorchDoubleConv(in_channels if level == 0 else channels[level - 1], channels[level],
                            pad, batch_norm)
            for level in range(depth)
        )
        self.dropout = nn.Dropout(dropout)
        self.upconv = nn.ModuleList(
            nn.ConvTranspose2d(channels[level + 1], channels[level], 2, stride=2)
            for level in range(depth - 1)
        )
        self.decoder = nn.ModuleList(
            TorchDoubleConv(2 * channels[level], channels[level], pad, batch_norm)
            for level in range(depth - 1)
        )
        self.head = nn.Conv2d(channels[0], num_classes, 1)
        if seed is not None:
            self._he_init(seed)

    def _he_init(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.ConvTranspose2d):
                    c_in, _, kh, kw = module.weight.shape
                    fan_in = c_in * kh * kw / (module.stride[0] * module.stride[1])
                elif isinstance(module, nn.Conv2d):
                    fan_in = math.prod(module.weight.shape[1:])
                else:
                    continue
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
                module.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level in range(self.depth - 1):
            x = self.encoder[level](x)
            skips.append(x)
            x = F.max_pool2d(x, 2, 2)
        x = self.dropout(self.encoder[-1](x))
        for level in reversed(range(self.depth - 1)):
            up = self.upconv[level](x)
            skip = center_crop(skips[level], up.shape[2], up.shape[3])
            x = self.decoder[level](torch.cat([skip, up], dim=1))
        return self.head(x)

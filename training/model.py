"""The deeply supervised 2D U-Net of the paper's Fig. 2, built from small modules.

    python -c "from training.model import UNet, UNetConfig; print(UNet(UNetConfig()).num_parameters())"

Interface (stable; the student and the ONNX export build on it):

    UNetConfig(in_channels=1, num_classes=14, width=32, depth=5, deep_supervision=True)   # frozen
    UNet(cfg).forward(x)  # x (N, in_channels, H, W) float -> (logits (N, 14, H, W), aux (N, 14, H/2, W/2))

Both outputs are LOGITS (no softmax): the losses apply the softmax themselves and the exported
ONNX model declares `"output": "logits"`. H and W must be multiples of 2 ** (depth - 1) = 16.
With `deep_supervision=False`, `forward` still returns a pair; the second element is then the main
logits again, so callers never branch (the export keeps only the first element).

Architecture: `depth` = 5 encoder modules (the first at full resolution, the next four each
max-pool 2x2 then a ConvBlock), channels width * 2**k = 32, 64, 128, 256, 512; four decoder
modules (1x1 conv halving the channels at low resolution, x2 bilinear upsampling, concatenation
with the skip, ConvBlock); a ConvBlock is two (3x3 conv, batch norm, ReLU). A 1x1 conv head
after the last up module, and a deep-supervision 1x1 head after the second-last (H/2, 64 ch).

Parameter count at the default width: 7,241,084 (paper: 6.98 M, +3.7 %). Why: the paper does
not say how its up modules change resolution. A 2x2 transposed convolution (the classic U-Net)
gives 7.76 M (+11 %); a 1x1 convolution plus bilinear upsampling gives the count above, the
closest of the usual variants; the remaining difference is within what biases, BN parameters and
the choice of up-module convs can explain. Convolutions before BN carry no bias (BN cancels it).
Initialisation: Kaiming uniform (ReLU gain) for every convolution, as the paper states.
Only Conv, BatchNorm, ReLU, MaxPool, Resize (bilinear) and Concat: all run in onnxruntime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flare_infer.labels import NUM_CLASSES


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1  # adjacent slices as channels (2.5D) when > 1; odd, centred
    num_classes: int = NUM_CLASSES
    width: int = 32  # channels of the first module; doubled at every down module
    depth: int = 5  # encoder modules, including the full-resolution one
    deep_supervision: bool = True

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.num_classes < 2 or self.width < 1:
            raise ValueError(f"UNetConfig needs in_channels >= 1, num_classes >= 2, width >= 1; found {self}")
        if self.depth < 3:
            raise ValueError(f"UNetConfig.depth must be >= 3 (the aux head needs two up modules); found {self.depth}")

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (one halving per down module)."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict:
        return asdict(self)


class ConvBlock(nn.Sequential):
    """Two (3x3 conv, batch norm, ReLU)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Max-pool 2x2, then a ConvBlock."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.MaxPool2d(2), ConvBlock(c_in, c_out))


class Up(nn.Module):
    """1x1 conv c_in -> c_out at low resolution, x2 bilinear upsampling, concat the skip, ConvBlock."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.block = ConvBlock(2 * c_out, c_out)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(self.reduce(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))  # (N, 2 * c_out, H, W) -> (N, c_out, H, W)


class Head(nn.Conv2d):
    """1x1 conv to class logits."""

    def __init__(self, c_in: int, num_classes: int) -> None:
        super().__init__(c_in, num_classes, 1)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()) -> None:  # noqa: B008 (frozen, immutable)
        super().__init__()
        self.cfg = cfg
        chans = [cfg.width * 2**k for k in range(cfg.depth)]  # 32, 64, 128, 256, 512
        self.inc = ConvBlock(cfg.in_channels, chans[0])
        self.downs = nn.ModuleList(Down(chans[k - 1], chans[k]) for k in range(1, cfg.depth))
        self.ups = nn.ModuleList(Up(chans[k], chans[k - 1]) for k in range(cfg.depth - 1, 0, -1))
        self.head = Head(chans[0], cfg.num_classes)
        self.aux_head = Head(chans[1], cfg.num_classes) if cfg.deep_supervision else None
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.cfg.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"UNet input H, W must be multiples of {m}; found {tuple(x.shape[-2:])}: pad first")
        skips = [self.inc(x)]  # (N, w, H, W)
        for down in self.downs:
            skips.append(down(skips[-1]))  # (N, w * 2**k, H / 2**k, W / 2**k)
        y = skips.pop()
        aux = None
        for i, up in enumerate(self.ups):
            y = up(y, skips.pop())
            if i == len(self.ups) - 2 and self.aux_head is not None:
                aux = self.aux_head(y)  # (N, 14, H/2, W/2)
        logits = self.head(y)  # (N, 14, H, W)
        return logits, (aux if aux is not None else logits)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)

"""The per-clip CNNs of the released AVBERT code (docs/method.md §1): a 3D ResNet for video, a 2D ResNet for log-mels.

Both are bottleneck ResNets (1x1 -> spatial -> 1x1, expansion 4, stride on the middle conv, projection
shortcut when the shape changes) ending in global average pooling. At their default sizes they are the
paper's ResNet-50s; ``width`` and ``depths`` shrink them for the small presets. The pooled feature has
``32 * width`` channels (2048 for the visual, 1024 for the audio ResNet-50).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

EXPANSION = 4


def _conv_bn(conv: type[nn.Module], bn: type[nn.Module], cin: int, cout: int, kernel, stride, padding, eps: float) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, kernel, stride, padding, bias=False), bn(cout, eps=eps))


class Bottleneck(nn.Module):
    """``relu(branch(x) + shortcut(x))``; the shortcut is the identity when ``shortcut`` is None."""

    def __init__(self, branch: nn.Sequential, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return (self.branch(x) + identity).relu_()


# builds the branch of one bottleneck: (stage index, in channels, inner channels, out channels, stride) -> branch
BranchFn = Callable[[int, int, int, int, int], nn.Sequential]


def _stages(
    cin: int, width: int, depths: Sequence[int], strides: Sequence[int], branch: BranchFn, shortcut: Callable[[int, int, int], nn.Module]
) -> tuple[nn.Sequential, int]:
    """Bottleneck stages ``res2..res5``; stage i has inner width ``width * 2**i``. Returns (stages, out channels)."""
    stages = []
    for i, depth in enumerate(depths):
        inner = width * 2**i
        cout = inner * EXPANSION
        blocks = []
        for j in range(depth):
            stride = strides[i] if j == 0 else 1
            proj = shortcut(cin, cout, stride) if (cin != cout or stride != 1) else None
            blocks.append(Bottleneck(branch(i, cin, inner, cout, stride), proj))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages), cin


def _init(module: nn.Module, zero_init_residual: bool) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:  # each residual branch starts as zero, so every block starts as the identity
        for m in module.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.branch[-1][1].weight)


# RGB normalisation of the video input (the released AVBERT code's): x/255 -> (x - mean) / std, per channel
VIDEO_MEAN, VIDEO_STD = 0.45, 0.225


def normalize_video(x: Tensor) -> Tensor:
    """uint8 RGB ``[..., 3, F, H, W]`` -> float32 ``(x/255 - VIDEO_MEAN) / VIDEO_STD`` (the loaders hand over uint8:
    4x fewer bytes through workers, pinned memory and the host-to-device copy)."""
    return (x.float() - 255 * VIDEO_MEAN) / (255 * VIDEO_STD)


class VisualResNet(nn.Module):
    """Single-pathway 3D ResNet over RGB clips: ``[N, 3, F, H, W]`` -> ``[N, 32*width]``. uint8 input (as the
    loaders give it) is normalised here (:func:`normalize_video`), inside the CNN call, so that a recomputed chunk
    keeps only its uint8 input; a floating-point input is taken as already normalised.

    Stem: Conv3d k(5,7,7) s(2,2,2) + BN + ReLU + MaxPool3d k(1,3,3) s(1,2,2). Stage i: first conv kernel
    ``(temporal_kernels[i], 1, 1)``, then ``(1, 3, 3)`` with spatial stride ``strides[i]``, then 1x1x1.
    """

    def __init__(
        self,
        width: int = 64,
        depths: Sequence[int] = (3, 4, 6, 3),
        temporal_kernels: Sequence[int] = (1, 1, 3, 3),
        strides: Sequence[int] = (1, 2, 2, 2),
        bn_eps: float = 1e-5,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if len(temporal_kernels) != len(depths) or len(strides) != len(depths):
            raise ValueError("depths, temporal_kernels and strides need one entry per stage")
        cb = lambda cin, cout, k, s, p: _conv_bn(nn.Conv3d, nn.BatchNorm3d, cin, cout, k, s, p, bn_eps)  # noqa: E731
        self.stem = nn.Sequential(
            cb(3, width, (5, 7, 7), (2, 2, 2), (2, 3, 3)),
            nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        )

        def branch(i: int, cin: int, inner: int, cout: int, s: int) -> nn.Sequential:
            tk = temporal_kernels[i]
            return nn.Sequential(
                cb(cin, inner, (tk, 1, 1), 1, (tk // 2, 0, 0)),
                nn.ReLU(inplace=True),
                cb(inner, inner, (1, 3, 3), (1, s, s), (0, 1, 1)),
                nn.ReLU(inplace=True),
                cb(inner, cout, 1, 1, 0),
            )

        self.stages, self.out_features = _stages(width, width, depths, strides, branch, lambda cin, cout, s: cb(cin, cout, 1, (1, s, s), 0))
        _init(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = normalize_video(x)
        return self.stages(self.stem(x)).mean(dim=(2, 3, 4))


class AudioResNet(nn.Module):
    """2D ResNet over log-mel spectrograms: ``[N, 1, n_mels, frames]`` float -> ``[N, 32*width]``.

    Separable stem: Conv2d k(9,1) + BN + ReLU + Conv2d k(1,9) + BN + ReLU. Every stage has stride 2 on its
    middle conv; the first ``separable_stages`` stages split the 3x3 into 3x1 (stride (s,1)) + BN + ReLU +
    1x3 (stride (1,s)).
    """

    def __init__(
        self,
        width: int = 32,
        depths: Sequence[int] = (3, 4, 6, 3),
        separable_stages: int = 2,
        bn_eps: float = 1e-5,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        cb = lambda cin, cout, k, s, p: _conv_bn(nn.Conv2d, nn.BatchNorm2d, cin, cout, k, s, p, bn_eps)  # noqa: E731
        self.stem = nn.Sequential(
            cb(1, width, (9, 1), 1, (4, 0)),
            nn.ReLU(inplace=True),
            cb(width, width, (1, 9), 1, (0, 4)),
            nn.ReLU(inplace=True),
        )

        def branch(i: int, cin: int, inner: int, cout: int, s: int) -> nn.Sequential:
            if i < separable_stages:
                middle = [cb(inner, inner, (3, 1), (s, 1), (1, 0)), nn.ReLU(inplace=True), cb(inner, inner, (1, 3), (1, s), (0, 1))]
            else:
                middle = [cb(inner, inner, 3, s, 1)]
            return nn.Sequential(cb(cin, inner, 1, 1, 0), nn.ReLU(inplace=True), *middle, nn.ReLU(inplace=True), cb(inner, cout, 1, 1, 0))

        strides = [2] * len(depths)
        self.stages, self.out_features = _stages(width, width, depths, strides, branch, lambda cin, cout, s: cb(cin, cout, 1, s, 0))
        _init(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

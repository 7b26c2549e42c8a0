"""Networks for the imaging tasks (MONAI backbones), each buildable in a DP-compatible form.

``dp_compatible=True`` gives GroupNorm instead of BatchNorm, no in-place activations and an
out-of-place residual add, so opacus' per-sample gradient hooks can train it.
"""

from __future__ import annotations

import types

import torch
from torch import nn

NETWORKS = ("small_cnn", "resnet10", "resnet18", "densenet121", "densenet264", "unet_encoder", "context_cnn",
            "resnet10_seg", "resnet18_seg", "resnet10_avgmax", "resnet18_avgmax")
# each also as "<name>_gnws": GroupNorm + weight-standardised convolutions, for DP (models_gn.py),
# and as "<name>_mirror": the input plus its left-right asymmetry image (MirrorInput)
MIRROR = "_mirror"
SEG_NETWORKS = ("unet_encoder", "context_cnn", "resnet10_seg", "resnet18_seg")  # trained with an auxiliary segmentation head


def seg_classes_for(name: str) -> int:
    """Classes of the auxiliary segmentation head of network ``name`` (0: none)."""
    return 4 if name.removesuffix(MIRROR) in SEG_NETWORKS else 0


def _norm(dp: bool, ch: int) -> nn.Module:
    return nn.GroupNorm(min(8, ch), ch) if dp else nn.BatchNorm3d(ch)


class SmallCNN(nn.Module):
    """A 4-stage strided 3D CNN with GroupNorm: fast on CPU, DP-safe as built."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for i in range(4):
            out = width * 2**i
            layers += [
                nn.Conv3d(ch, out, 3, stride=2 if i else 1, padding=1),
                nn.GroupNorm(min(8, out), out),
                nn.ReLU(),
                nn.Conv3d(out, out, 3, padding=1),
                nn.GroupNorm(min(8, out), out),
                nn.ReLU(),
            ]
            ch = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _safe_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """MONAI ResNetBlock.forward with the residual added out of place (opacus-safe)."""
    residual = x
    out = self.act(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        residual = self.downsample(x)
    return self.act(out + residual)


def _make_dp_safe(model: nn.Module) -> nn.Module:
    """Swap BatchNorm -> GroupNorm, in-place ReLU -> ReLU, in-place residual add -> out of place."""
    from monai.networks.nets.resnet import ResNetBlock

    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.BatchNorm3d):
                setattr(mod, cname, nn.GroupNorm(min(8, child.num_features), child.num_features))
            elif isinstance(child, nn.ReLU) and child.inplace:
                setattr(mod, cname, nn.ReLU(inplace=False))
        if isinstance(mod, ResNetBlock):
            mod.forward = types.MethodType(_safe_block_forward, mod)
    return model


class ContextBlock(nn.Module):
    """Isensee-2017 context module: two 3x3x3 convs with dropout, added to the input."""

    def __init__(self, ch: int, dp: bool, norm=None, dropout: float = 0.3) -> None:
        super().__init__()
        norm = norm or (lambda c: _norm(dp, c))
        self.body = nn.Sequential(
            norm(ch), nn.LeakyReLU(0.01), nn.Conv3d(ch, ch, 3, padding=1),
            nn.Dropout3d(dropout), norm(ch), nn.LeakyReLU(0.01), nn.Conv3d(ch, ch, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UNetEncoderClassifier(nn.Module):
    """Chakrabarty-style classifier: an Isensee-2017 3D U-Net encoder, global pooling and a linear head.

    With ``seg_classes > 0`` a light decoder predicts the tumour segmentation from the encoder's
    skip features (multi-task training); ``forward`` then returns ``(logits, seg_logits)`` in training.
    """

    def __init__(
        self, in_channels: int, num_classes: int, base: int = 16, depth: int = 4,
        seg_classes: int = 0, dp: bool = False,
    ) -> None:
        super().__init__()
        self.levels = nn.ModuleList()
        ch = in_channels
        chans = []
        for i in range(depth):
            out = base * 2**i
            self.levels.append(
                nn.Sequential(nn.Conv3d(ch, out, 3, stride=1 if i == 0 else 2, padding=1),
                              ContextBlock(out, dp))
            )
            chans.append(out)
            ch = out
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(0.2),
                                  nn.Linear(ch, num_classes))
        self.seg_head = None
        if seg_classes:
            self.seg_head = nn.ModuleList(
                [nn.Conv3d(c, seg_classes, 1) for c in chans]
            )
        self.return_seg = False

    def forward(self, x: torch.Tensor):
        feats = []
        for lvl in self.levels:
            x = lvl(x)
            feats.append(x)
        logits = self.head(x)
        if self.seg_head is not None and self.return_seg:
            size = feats[0].shape[2:]
            seg = sum(
                nn.functional.interpolate(h(f), size=size, mode="trilinear", align_corners=False)
                for h, f in zip(self.seg_head, feats, strict=True)
            )
            return logits, seg
        return logits


class ContextCNN(nn.Module):
    """Chakrabarty-2021-like classifier sized for a CPU: instance norm, context blocks, position aware.

    A strided stem halves the input; each of ``depth`` levels is a strided 3x3x3 conv and an Isensee
    context block (instance norm, leaky ReLU, dropout). Where a lesion sits matters for its type (sella,
    cerebellopontine angle, dura), so a 1x1x1 conv of the voxel coordinates is added after the stem
    (the input stays the images alone), and the head reads average- and max-pooled features (max keeps
    a lesion of a few voxels from being averaged away). ``seg_classes > 0`` adds a per-level 1x1x1
    segmentation head, a training target only (``forward`` returns ``(logits, seg)`` when
    ``return_seg`` is set).
    """

    def __init__(self, in_channels: int, num_classes: int, base: int = 16, depth: int = 4,
                 seg_classes: int = 0, dp: bool = False) -> None:
        super().__init__()

        def norm(c: int) -> nn.Module:
            return nn.GroupNorm(min(8, c), c) if dp else nn.InstanceNorm3d(c, affine=True)

        self.stem = nn.Sequential(nn.Conv3d(in_channels, base, 3, stride=2, padding=1), norm(base),
                                  nn.LeakyReLU(0.01))
        self.position = nn.Conv3d(3, base, 1)
        self.levels = nn.ModuleList()
        ch, chans = base, []
        for i in range(depth):
            out = base * 2**i
            block = ContextBlock(out, dp, norm=norm, dropout=0.1)
            self.levels.append(nn.Sequential(nn.Conv3d(ch, out, 3, stride=1 if i == 0 else 2, padding=1),
                                             block))
            chans.append(out)
            ch = out
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * ch, num_classes))
        self.seg_head = nn.ModuleList([nn.Conv3d(c, seg_classes, 1) for c in chans]) if seg_classes else None
        self.return_seg = False

    def forward(self, x: torch.Tensor):
        size = x.shape[2:]
        x = self.stem(x)
        axes = [torch.linspace(-1, 1, n, device=x.device, dtype=x.dtype) for n in x.shape[2:]]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].expand(x.shape[0], -1, -1, -1, -1)
        x = x + self.position(grid)
        feats = []
        for lvl in self.levels:
            x = lvl(x)
            feats.append(x)
        logits = self.head(torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], 1))
        if self.seg_head is not None and self.return_seg:
            seg = sum(nn.functional.interpolate(h(f), size=size, mode="trilinear", align_corners=False)
                      for h, f in zip(self.seg_head, feats, strict=True))
            return logits, seg
        return logits


class ResNetSeg(nn.Module):
    """A MONAI ResNet whose first three stages also predict the lesion segmentation (1x1x1 heads,
    upsampled and summed): the mask is a training target only, which tells the early features where
    a lesion is. Prediction runs the plain ResNet (``return_seg`` off: the heads are idle)."""

    def __init__(self, net: nn.Module, seg_classes: int) -> None:
        super().__init__()
        self.net = net
        chans = [blk[-1].conv2.out_channels if hasattr(blk[-1], "conv2") else blk[-1].conv3.out_channels
                 for blk in (net.layer1, net.layer2, net.layer3)]
        self.seg_head = nn.ModuleList([nn.Conv3d(c, seg_classes, 1) for c in chans]) if seg_classes else None
        self.return_seg = False

    def forward(self, x: torch.Tensor):
        if self.seg_head is None or not self.return_seg:
            return self.net(x)
        n, size = self.net, x.shape[2:]
        h = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            h = n.maxpool(h)
        feats = []
        for layer in (n.layer1, n.layer2, n.layer3):
            h = layer(h)
            feats.append(h)
        h = n.avgpool(n.layer4(h)).flatten(1)
        logits = n.fc(h)
        seg = sum(nn.functional.interpolate(head(f), size=size, mode="trilinear", align_corners=False)
                  for head, f in zip(self.seg_head, feats, strict=True))
        return logits, seg


class AvgMaxPool3d(nn.Module):
    """Global average and global max pooling side by side ([B, 2C, 1, 1, 1]).

    The average says what the whole brain looks like; the maximum keeps a feature that fires in a few
    voxels only (a small or faint lesion), which averaging over the brain dilutes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3, 4), keepdim=True), x.amax(dim=(2, 3, 4), keepdim=True)], 1)


class MirrorInput(nn.Module):
    """Feed ``net`` each channel and its left-right asymmetry, ``x - flip_lr(x)``.

    A brain is nearly symmetric about the midline and a lesion mostly is not: the asymmetry image
    shows a faint one-sided change (a non-enhancing glioma on T1ce) against its mirror-image tissue
    instead of against the whole brain. Inputs are RAS whole-brain crops, so the first spatial axis
    (dim 2 of N, C, X, Y, Z) is left-right and the midline sits near the centre. No weights of its
    own; ``net`` is built with twice the input channels.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def return_seg(self) -> bool:
        return bool(getattr(self.net, "return_seg", False))

    @return_seg.setter
    def return_seg(self, value: bool) -> None:
        if hasattr(self.net, "return_seg"):
            self.net.return_seg = value

    def forward(self, x: torch.Tensor, *rest):
        return self.net(torch.cat([x, x - torch.flip(x, dims=(2,))], 1), *rest)


class ClinicalFusion(nn.Module):
    """Late fusion of clinical covariates: image logits + a linear map of (standardised values, missing).

    ``mean``/``std`` are buffers set from the first training set seen (saved with the weights); a
    missing value (NaN) contributes through its indicator only.
    """

    def __init__(self, backbone: nn.Module, n_clinical: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.clinical = nn.Linear(2 * n_clinical, num_classes)
        self.register_buffer("mean", torch.zeros(n_clinical))
        self.register_buffer("std", torch.ones(n_clinical))
        self.register_buffer("fitted", torch.zeros(()))

    def fit_clinical_stats(self, values: torch.Tensor) -> None:
        if bool(self.fitted):
            return
        finite = torch.isfinite(values)
        v = torch.where(finite, values, torch.zeros_like(values))
        n = finite.sum(0).clamp(min=1)
        mean = v.sum(0) / n
        var = (torch.where(finite, values - mean, torch.zeros_like(values)) ** 2).sum(0) / n
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt().clamp(min=1e-6))
        self.fitted.fill_(1.0)

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None):
        out = self.backbone(x)
        logits = out[0] if isinstance(out, tuple) else out
        if clinical is None:
            clinical = torch.full((x.shape[0], self.mean.numel()), float("nan"), device=x.device)
        missing = ~torch.isfinite(clinical)
        z = torch.where(missing, torch.zeros_like(clinical), (clinical - self.mean) / self.std)
        logits = logits + self.clinical(torch.cat([z, missing.float()], 1))
        return (logits, out[1]) if isinstance(out, tuple) else logits


def build_model(
    name: str, in_channels: int, num_classes: int, *, dp_compatible: bool = False,
    stem_stride: int = 2, seg_classes: int = 0, clinical: int = 0,
) -> nn.Module:
    """Build a network by name (see ``NETWORKS``); ``clinical > 0`` adds late clinical fusion.

    ``stem_stride=1`` gives MONAI's default ResNet stem (7^3, stride 1: slow).
    """
    net = _build_backbone(name, in_channels, num_classes, dp_compatible, stem_stride, seg_classes)
    return ClinicalFusion(net, clinical, num_classes) if clinical else net


def _build_backbone(name: str, in_channels: int, num_classes: int, dp_compatible: bool,
                    stem_stride: int, seg_classes: int) -> nn.Module:
    from monai.networks import nets

    from .models_gn import base_network, is_gnws, standardise_convolutions

    if name.endswith(MIRROR):
        return MirrorInput(_build_backbone(name.removesuffix(MIRROR), 2 * in_channels, num_classes,
                                           dp_compatible, stem_stride, seg_classes))
    if is_gnws(name) and base_network(name) in NETWORKS:
        return standardise_convolutions(_build_backbone(
            base_network(name), in_channels, num_classes, True, stem_stride, seg_classes))
    if name == "small_cnn":
        return SmallCNN(in_channels, num_classes)
    if name in ("resnet10", "resnet18"):
        fn = nets.resnet10 if name == "resnet10" else nets.resnet18
        model = fn(spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes,
                   conv1_t_stride=stem_stride, conv1_t_size=7 if stem_stride == 1 else 3)
        return _make_dp_safe(model) if dp_compatible else model
    if name in ("resnet10_avgmax", "resnet18_avgmax"):
        model = _build_backbone(name.removesuffix("_avgmax"), in_channels, num_classes, dp_compatible,
                                stem_stride, 0)
        model.avgpool = AvgMaxPool3d()
        model.fc = nn.Linear(2 * model.fc.in_features, num_classes)
        return model
    if name in ("resnet10_seg", "resnet18_seg"):
        return ResNetSeg(_build_backbone(name.removesuffix("_seg"), in_channels, num_classes,
                                         dp_compatible, stem_stride, 0), seg_classes)
    if name in ("densenet121", "densenet264"):
        cls = nets.DenseNet121 if name == "densenet121" else nets.DenseNet264
        kw = {"act": ("relu", {"inplace": False}), "norm": ("group", {"num_groups": 8})} if (
            dp_compatible) else {}
        return cls(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, **kw)
    if name == "unet_encoder":
        return UNetEncoderClassifier(in_channels, num_classes, seg_classes=seg_classes,
                                     dp=dp_compatible)
    if name == "context_cnn":
        return ContextCNN(in_channels, num_classes, seg_classes=seg_classes, dp=dp_compatible)
    raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)} "
                     "(or any of them + '_gnws' and/or '_mirror')")

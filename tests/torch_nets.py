"""Reference PyTorch networks for the conversion tests, written here from torch.nn alone.

They reproduce torchvision's ResNet (module names conv1, bn1, layer1..4, fc; blocks with conv1..3,
bn1..3, downsample.0/.1) and Monodepth2's decoders with its state-dict key names
(depth: ``decoder.<k>.conv.conv.*`` / ``decoder.<k>.conv.*``; pose: ``net.<k>.*``), following the
math in reference §3. No torchvision or Monodepth2 import: the tests need only torch.
Imported only by tests that have already checked torch is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride here: v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


LAYOUTS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3])}


class ResNet(nn.Module):
    """torchvision-named ResNet with an fc head; `features(x)` gives Monodepth2's f0..f4."""

    def __init__(self, num_layers=18, in_channels=3, num_classes=1000):
        super().__init__()
        block, sizes = LAYOUTS[num_layers]
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, n in enumerate(sizes):
            planes = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(f0))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3, self.layer4(f3)]


class Encoder(nn.Module):
    """Monodepth2-style wrapper: state-dict keys ``encoder.*``; input normalised (x-0.45)/0.225."""

    def __init__(self, num_layers=18, num_input_images=1):
        super().__init__()
        self.encoder = ResNet(num_layers, 3 * num_input_images)

    def forward(self, x):
        return self.encoder.features((x - 0.45) / 0.225)


class Conv3x3(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)

    def forward(self, x):
        return self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))


class ConvBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = Conv3x3(cin, cout)

    def forward(self, x):
        return F.elu(self.conv(x))


class DepthDecoder(nn.Module):
    """Reference §3.2; ModuleList order: upconv (4,0),(4,1),...,(0,1), then dispconv 0..3."""

    def __init__(self, num_ch_enc=(64, 64, 128, 256, 512)):
        super().__init__()
        dec = [16, 32, 64, 128, 256]
        mods = []
        for i in range(4, -1, -1):
            mods.append(ConvBlock(num_ch_enc[-1] if i == 4 else dec[i + 1], dec[i]))
            mods.append(ConvBlock(dec[i] + (num_ch_enc[i - 1] if i > 0 else 0), dec[i]))
        mods += [Conv3x3(dec[s], 1) for s in range(4)]
        self.decoder = nn.ModuleList(mods)

    def forward(self, feats):
        x, out = feats[-1], {}
        for n, i in enumerate(range(4, -1, -1)):
            x = F.interpolate(self.decoder[2 * n](x), scale_factor=2, mode="nearest")
            if i > 0:
                x = torch.cat([x, feats[i - 1]], 1)
            x = self.decoder[2 * n + 1](x)
            if i < 4:
                out[i] = torch.sigmoid(self.decoder[10 + i](x))
        return out


class PoseDecoder(nn.Module):
    """Reference §3.3: returns (axisangle, translation), each (B, 2, 1, 3)."""

    def __init__(self, cin=512):
        super().__init__()
        self.net = nn.ModuleList([nn.Conv2d(cin, 256, 1), nn.Conv2d(256, 256, 3, 1, 1),
                                  nn.Conv2d(256, 256, 3, 1, 1), nn.Conv2d(256, 12, 1)])

    def forward(self, feats):
        x = F.relu(self.net[0](feats[-1]))
        x = F.relu(self.net[1](x))
        x = F.relu(self.net[2](x))
        x = 0.01 * self.net[3](x).mean(3).mean(2).view(-1, 2, 1, 6)
        return x[..., :3], x[..., 3:]


@torch.no_grad()
def randomise_batchnorm(module: nn.Module, calib_input: torch.Tensor, generator: torch.Generator) -> None:
    """Give every BN realistic but random statistics and affine params.

    Running stats are first set to the real batch statistics of `calib_input` (one train-mode
    pass with momentum 1), so activations stay O(1) through the network, then perturbed; gamma
    and beta are drawn at random. Leaves the module in eval mode.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0
    module.train()
    module(calib_input)
    for bn in bns:
        c = bn.num_features
        bn.momentum = 0.1
        bn.running_mean += 0.1 * torch.randn(c, generator=generator) * bn.running_var.sqrt()
        bn.running_var *= torch.empty(c).uniform_(0.8, 1.25, generator=generator)
        bn.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=generator))
        bn.bias.copy_(0.1 * torch.randn(c, generator=generator))
        bn.num_batches_tracked.fill_(7)
    module.eval()


def nchw(x):
    """NHWC numpy -> NCHW float32 tensor."""
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().float()


def nhwc(t):
    """NCHW tensor -> NHWC numpy."""
    return t.detach().permute(0, 2, 3, 1).numpy()

"""PyTorch reference CNNs with torchvision's exact module layout (so their state_dict keys are
torchvision's): ResNet, VGG, MobileNetV2.

torchvision itself cannot be installed here: every torchvision wheel pins its own torch, and none
matches the torch==2.13.0 in the test extra (installing one pulls a different torch). These
modules follow torchvision/models/{resnet,vgg,mobilenetv2}.py layer for layer (same module
names, the same padding, ReLU6, adaptive 7x7 pooling, dropout positions); the tests compare jaxtl
against them, and against the real torchvision MobileNetV2 checkpoint.
"""
import torch
from torch import nn


# ---- ResNet (torchvision.models.resnet, v1.5: stride on the 3x3 conv).
class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], 2)
    self.layer3 = self._make_layer(block, 256, layers[2], 2)
    self.layer4 = self._make_layer(block, 512, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    """(logits, [stage outputs])."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    stages = []
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = layer(x)
      stages.append(x)
    return self.fc(torch.flatten(self.avgpool(x), 1)), stages


def resnet(depth, num_classes=1000):
  block, layers = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
                   50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3]),
                   152: (Bottleneck, [3, 8, 36, 3])}[depth]
  return ResNet(block, layers, num_classes)


# ---- VGG (torchvision.models.vgg).
VGG_CFGS = {11: [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
            13: [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
            16: [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512,
                 512, 'M'],
            19: [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M',
                 512, 512, 512, 512, 'M']}


class VGG(nn.Module):
  def __init__(self, depth, batch_norm=False, num_classes=1000, fc_width=4096):
    super().__init__()
    layers, channels = [], 3
    for v in VGG_CFGS[depth]:
      if v == 'M':
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers.append(nn.Conv2d(channels, v, 3, padding=1))
        if batch_norm:
          layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        channels = v
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, fc_width), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(fc_width, fc_width), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(fc_width, num_classes))

  def forward(self, x):
    stages = []
    for layer in self.features:
      x = layer(x)
      if isinstance(layer, nn.MaxPool2d):
        stages.append(x)
    return self.classifier(torch.flatten(self.avgpool(x), 1)), stages


# ---- MobileNetV2 (torchvision.models.mobilenetv2).
def _make_divisible(v, divisor=8):
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * v else new


class ConvBNReLU6(nn.Sequential):  # torchvision's Conv2dNormActivation(activation=ReLU6).
  def __init__(self, inp, oup, kernel=3, stride=1, groups=1):
    super().__init__(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups,
                               bias=False), nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    hidden = int(round(inp * expand_ratio))
    self.use_res_connect = stride == 1 and inp == oup
    layers = [ConvBNReLU6(inp, hidden, kernel=1)] if expand_ratio != 1 else []
    layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
               nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
    self.conv = nn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
  def __init__(self, num_classes=1000, width_mult=1.0):
    super().__init__()
    settings = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                [6, 160, 3, 2], [6, 320, 1, 1]]
    inp = _make_divisible(32 * width_mult)
    self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
    features = [ConvBNReLU6(3, inp, stride=2)]
    for t, c, n, s in settings:
      oup = _make_divisible(c * width_mult)
      for i in range(n):
        features.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
        inp = oup
    features.append(ConvBNReLU6(inp, self.last_channel, kernel=1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

  def forward(self, x):
    x = self.features(x)
    return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1)), x


def randomize_bn(model, seed=0):
  """Non-trivial running statistics and affine params, so parity tests exercise them."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
  return model

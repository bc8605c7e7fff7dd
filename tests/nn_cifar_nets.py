"""Independent torch.nn builds of the CIFAR-100 benchmark's networks, written from the architecture
as RepDistiller's models/resnet.py, vgg.py, resnetv2.py, mobilenetv2.py, ShuffleNetv1.py and
ShuffleNetv2.py lay it out (modules, not a parameter dict; their own configuration tables).

They are the yardstick for cifar_nets.py: same weights in, same outputs out. scripts/benchmark.py
also trains them in a plain PyTorch loop, as that code does, to compare speeds.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, ni, no, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(ni, no, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(no)
        self.conv2 = nn.Conv2d(no, no, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(no)
        self.downsample = nn.Sequential(nn.Conv2d(ni, no, 1, stride, bias=False), nn.BatchNorm2d(no)) \
            if stride != 1 or ni != no else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class NNResNet(nn.Module):
    def __init__(self, depth, filters, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        layers, ni = [], filters[0]
        for no, stride in zip(filters[1:], (1, 2, 2)):
            layers.append(nn.Sequential(*[BasicBlock(ni if i == 0 else no, no, stride if i == 0 else 1) for i in range(n)]))
            ni = no
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(ni, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return self.fc(F.avg_pool2d(f3, 8).flatten(1)), [f1, f2, f3]

    def flat_names(self):
        """{cifar_nets name: this module's state_dict name}."""
        out = {'conv0': 'conv1.weight', 'fc.weight': 'fc.weight', 'fc.bias': 'fc.bias'}
        bn = ('weight', 'bias', 'running_mean', 'running_var')
        out.update({f'bn0.{s}': f'bn1.{s}' for s in bn})
        for g in range(3):
            for i, blk in enumerate(getattr(self, f'layer{g + 1}')):
                src, dst = f'layer{g + 1}.{i}', f'group{g}.block{i}'
                out[dst + '.conv0'], out[dst + '.conv1'] = src + '.conv1.weight', src + '.conv2.weight'
                out.update({f'{dst}.bn0.{s}': f'{src}.bn1.{s}' for s in bn})
                out.update({f'{dst}.bn1.{s}': f'{src}.bn2.{s}' for s in bn})
                if blk.downsample is not None:
                    out[dst + '.convdim'] = src + '.downsample.0.weight'
                    out.update({f'{dst}.bndim.{s}': f'{src}.downsample.1.{s}' for s in bn})
        return out


class NNVGG(nn.Module):
    """Five stages of conv-bn-relu; max pools after stages 0 to 2 on 32x32 inputs; a linear classifier."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        stages, ni = [], 3
        for widths in cfg:
            layers = []
            for no in widths:
                layers += [nn.Conv2d(ni, no, 3, padding=1), nn.BatchNorm2d(no), nn.ReLU()]
                ni = no
            stages.append(nn.Sequential(*layers[:-1]))  # the stage's last relu is applied in forward
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        feats = []
        for b, stage in enumerate(self.stages):
            x = F.relu(stage(x))
            feats.append(x)
            if b < 3:
                x = F.max_pool2d(x, 2, 2)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1)), feats[1:]

    def flat_names(self):
        out = {'fc.weight': 'classifier.weight', 'fc.bias': 'classifier.bias'}
        for b, stage in enumerate(self.stages):
            for j in range(0, len(stage) + 1, 3):
                i = j // 3
                out.update({f'block{b}.conv{i}.{s}': f'stages.{b}.{j}.{s}' for s in ('weight', 'bias')})
                out.update({f'block{b}.bn{i}.{s}': f'stages.{b}.{j + 1}.{s}'
                            for s in ('weight', 'bias', 'running_mean', 'running_var')})
        return out


BN_STATE = ('weight', 'bias', 'running_mean', 'running_var')


def bn_names(dst, src):
    return {f'{dst}.{s}': f'{src}.{s}' for s in BN_STATE}


def shuffle(x, groups):
    """Channel shuffle written out: (N, g, C/g, H, W) -> (N, C/g, g, H, W) -> (N, C, H, W)."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """resnetv2.py's block: 1x1, 3x3 (stride), 1x1 to 4x planes, each with bn; shortcut conv + bn where
    the shape changes; relu after the sum."""

    def __init__(self, ni, planes, stride):
        super().__init__()
        no = 4 * planes
        self.conv1, self.bn1 = nn.Conv2d(ni, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, no, 1, bias=False), nn.BatchNorm2d(no)
        self.shortcut = nn.Sequential()
        if stride != 1 or ni != no:
            self.shortcut = nn.Sequential(nn.Conv2d(ni, no, 1, stride, bias=False), nn.BatchNorm2d(no))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class NNResNet50(nn.Module):
    def __init__(self, num_classes, blocks=(3, 4, 6, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        ni = 64
        for g, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2))):
            layer = []
            for i in range(n):
                layer.append(Bottleneck(ni, planes, stride if i == 0 else 1))
                ni = 4 * planes
            setattr(self, f'layer{g + 1}', nn.Sequential(*layer))
        self.linear = nn.Linear(ni, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out)
            feats.append(out)
        return self.linear(nn.AdaptiveAvgPool2d(1)(out).flatten(1)), feats

    def flat_names(self):
        out = {'conv0': 'conv1.weight', 'fc.weight': 'linear.weight', 'fc.bias': 'linear.bias', **bn_names('bn0', 'bn1')}
        for g in range(4):
            for i, blk in enumerate(getattr(self, f'layer{g + 1}')):
                src, dst = f'layer{g + 1}.{i}', f'group{g}.block{i}'
                for j in range(3):
                    out[f'{dst}.conv{j}'] = f'{src}.conv{j + 1}.weight'
                    out.update(bn_names(f'{dst}.bn{j}', f'{src}.bn{j + 1}'))
                if len(blk.shortcut):
                    out[f'{dst}.convdim'] = f'{src}.shortcut.0.weight'
                    out.update(bn_names(f'{dst}.bndim', f'{src}.shortcut.1'))
        return out


class InvertedResidual(nn.Module):
    def __init__(self, ni, no, stride, t):
        super().__init__()
        self.residual = stride == 1 and ni == no
        h = ni * t
        self.conv = nn.Sequential(
            nn.Conv2d(ni, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, no, 1, bias=False), nn.BatchNorm2d(no))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class NNMobileNetV2(nn.Module):
    """mobilenetv2.py's MobileNetV2(T, width_mult), by default mobile_half: T 6, width 0.5."""
    SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes, T=6, width_mult=0.5):
        super().__init__()
        ni = int(32 * width_mult)
        self.conv1 = nn.Sequential(nn.Conv2d(3, ni, 3, 2, 1, bias=False), nn.BatchNorm2d(ni), nn.ReLU())
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTING:
            no, layers = int(c * width_mult), []
            for i in range(n):
                layers.append(InvertedResidual(ni, no, s if i == 0 else 1, T if t != 1 else 1))
                ni = no
            self.blocks.append(nn.Sequential(*layers))
        last = 1280
        self.conv2 = nn.Sequential(nn.Conv2d(ni, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)  # that code's, for 32x32 inputs

    def forward(self, x):
        out, feats = self.conv1(x), []
        for s, stage in enumerate(self.blocks):
            out = stage(out)
            if s in (1, 2, 4, 6):
                feats.append(out)
        out = self.avgpool(self.conv2(out)).flatten(1)
        return self.classifier(out), feats

    def flat_names(self):
        out = {'conv0': 'conv1.0.weight', **bn_names('bn0', 'conv1.1'), 'conv1': 'conv2.0.weight',
               **bn_names('bn1', 'conv2.1'), 'fc.weight': 'classifier.0.weight', 'fc.bias': 'classifier.0.bias'}
        for s, stage in enumerate(self.blocks):
            for i in range(len(stage)):
                src, dst = f'blocks.{s}.{i}.conv', f'stage{s}.block{i}'
                for j, (c, b) in enumerate(((0, 1), (3, 4), (6, 7))):
                    out[f'{dst}.conv{j}'] = f'{src}.{c}.weight'
                    out.update(bn_names(f'{dst}.bn{j}', f'{src}.{b}'))
        return out


class ShuffleV1Block(nn.Module):
    def __init__(self, ni, no, stride, groups):
        super().__init__()
        self.stride, mid = stride, no // 4
        self.g = 1 if ni == 24 else groups
        self.conv1, self.bn1 = nn.Conv2d(ni, mid, 1, groups=self.g, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, no, 1, groups=groups, bias=False), nn.BatchNorm2d(no)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x):
        out = shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = F.relu(self.bn2(self.conv2(out)))
        out, res = self.bn3(self.conv3(out)), self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class NNShuffleV1(nn.Module):
    def __init__(self, num_classes, widths=(240, 480, 960), blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24)
        ni = 24
        for g, (w, n) in enumerate(zip(widths, blocks)):
            layer = []
            for i in range(n):
                layer.append(ShuffleV1Block(ni, w - ni if i == 0 else w, 2 if i == 0 else 1, groups))
                ni = w
            setattr(self, f'layer{g + 1}', nn.Sequential(*layer))
        self.linear = nn.Linear(ni, num_classes)

    def forward(self, x):
        out, feats = F.relu(self.bn1(self.conv1(x))), []
        for layer in (self.layer1, self.layer2, self.layer3):
            out = layer(out)
            feats.append(out)
        return self.linear(F.avg_pool2d(out, 4).flatten(1)), feats

    def flat_names(self):
        out = {'conv0': 'conv1.weight', **bn_names('bn0', 'bn1'), 'fc.weight': 'linear.weight', 'fc.bias': 'linear.bias'}
        for g in range(3):
            for i in range(len(getattr(self, f'layer{g + 1}'))):
                for j in range(3):
                    out[f'group{g}.block{i}.conv{j}'] = f'layer{g + 1}.{i}.conv{j + 1}.weight'
                    out.update(bn_names(f'group{g}.block{i}.bn{j}', f'layer{g + 1}.{i}.bn{j + 1}'))
        return out


class ShuffleV2Down(nn.Module):
    def __init__(self, ni, no):
        super().__init__()
        mid = no // 2
        self.conv1, self.bn1 = nn.Conv2d(ni, ni, 3, 2, 1, groups=ni, bias=False), nn.BatchNorm2d(ni)
        self.conv2, self.bn2 = nn.Conv2d(ni, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(ni, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        return shuffle(torch.cat([left, F.relu(self.bn5(self.conv5(right)))], 1), 2)


class ShuffleV2Basic(nn.Module):
    def __init__(self, channels):
        super().__init__()
        c = channels // 2
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        x1, x2 = x.chunk(2, 1)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        return shuffle(torch.cat([x1, F.relu(self.bn3(self.conv3(out)))], 1), 2)


class NNShuffleV2(nn.Module):
    """ShuffleNetv2.py's net size 1."""

    def __init__(self, num_classes, widths=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24)
        ni = 24
        for g, (w, n) in enumerate(zip(widths, blocks)):
            setattr(self, f'layer{g + 1}', nn.Sequential(ShuffleV2Down(ni, w), *[ShuffleV2Basic(w) for _ in range(n)]))
            ni = w
        self.conv2, self.bn2 = nn.Conv2d(ni, widths[3], 1, bias=False), nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out, feats = F.relu(self.bn1(self.conv1(x))), []
        for layer in (self.layer1, self.layer2, self.layer3):
            out = layer(out)
            feats.append(out)
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(F.avg_pool2d(out, 4).flatten(1)), feats

    def flat_names(self):
        out = {'conv0': 'conv1.weight', **bn_names('bn0', 'bn1'), 'conv1': 'conv2.weight', **bn_names('bn1', 'bn2'),
               'fc.weight': 'linear.weight', 'fc.bias': 'linear.bias'}
        for g in range(3):
            layer = getattr(self, f'layer{g + 1}')
            for i in range(len(layer)):
                dst = f'group{g}.down' if i == 0 else f'group{g}.block{i - 1}'
                for j in range(5 if i == 0 else 3):
                    out[f'{dst}.conv{j}'] = f'layer{g + 1}.{i}.conv{j + 1}.weight'
                    out.update(bn_names(f'{dst}.bn{j}', f'layer{g + 1}.{i}.bn{j + 1}'))
        return out


# the cross-architecture networks by cifar_nets' names
NAMED = {'ResNet50': NNResNet50, 'MobileNetV2': NNMobileNetV2, 'ShuffleV1': NNShuffleV1, 'ShuffleV2': NNShuffleV2}


def load_flat(net, flat):
    """Copies a cifar_nets parameter dict into `net`; every tensor of both must be named."""
    names = net.flat_names()
    own = {k for k in net.state_dict() if not k.endswith('num_batches_tracked')}
    assert set(names) == set(flat), set(names) ^ set(flat)
    assert set(names.values()) == own, set(names.values()) ^ own
    with torch.no_grad():
        sd = net.state_dict()
        for k, v in flat.items():
            sd[names[k]].copy_(v)
    return net


def flat_state(net):
    """The module's tensors under cifar_nets' names."""
    sd = net.state_dict()
    return {k: sd[v] for k, v in net.flat_names().items()}

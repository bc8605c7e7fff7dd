"""Independent torch.nn builds of the CIFAR-100 benchmark's networks, written from the architecture
as RepDistiller's models/resnet.py and models/vgg.py lay it out (modules, not a parameter dict).

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

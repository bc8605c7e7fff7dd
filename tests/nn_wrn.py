"""An independent WRN built from torch.nn layers, written from the paper's pre-activation WRN as the 2017 code built it.

It is the yardstick for resnet.py: same weights in, same outputs out. It also
names its state_dict the 2017 way, so tests can write 2017-format checkpoints.
"""
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, ni, no, stride):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(ni)
        self.conv0 = nn.Conv2d(ni, no, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(no)
        self.conv1 = nn.Conv2d(no, no, 3, 1, 1, bias=False)
        self.convdim = nn.Conv2d(ni, no, 1, stride, 0, bias=False) if ni != no else None

    def forward(self, x):
        o1 = F.relu(self.bn0(x))
        z = self.conv1(F.relu(self.bn1(self.conv0(o1))))
        return z + (self.convdim(o1) if self.convdim is not None else x)


class NNWideResNet(nn.Module):
    def __init__(self, depth, width, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        w = [16, int(16 * width), int(32 * width), int(64 * width)]
        self.conv0 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.groups = nn.ModuleList(
            nn.Sequential(*[Block(w[g] if i == 0 else w[g + 1], w[g + 1], (1, 2, 2)[g] if i == 0 else 1)
                            for i in range(n)]) for g in range(3))
        self.bn = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x):
        o = self.conv0(x)
        groups = []
        for g in self.groups:
            o = g(o)
            groups.append(o)
        o = F.avg_pool2d(F.relu(self.bn(o)), 8, 1, 0).view(o.size(0), -1)
        return self.fc(o), groups

    def flat_state(self):
        """state_dict with the 2017 names: groups.0.1.bn0.weight -> group0.block1.bn0.weight."""
        out = {}
        for k, v in self.state_dict().items():
            if k.endswith('num_batches_tracked'):
                continue
            if k.startswith('groups.'):
                _, g, i, rest = k.split('.', 3)
                k = f'group{g}.block{i}.{rest}'
                k = k.replace('.weight', '') if '.conv' in k else k
            elif k == 'conv0.weight':
                k = 'conv0'
            out[k] = v.clone()
        return out

    def load_flat_state(self, flat):
        own = self.flat_state()
        assert set(own) == set(flat), set(own) ^ set(flat)
        names = dict(zip(own, [k for k in self.state_dict() if not k.endswith('num_batches_tracked')]))
        self.load_state_dict({names[k]: flat[k] for k in own}, strict=False)
        return self

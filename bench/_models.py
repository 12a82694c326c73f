"""Factories for the certification benchmark (importable as `_models:cnn` once bench/ is on sys.path)."""

import torch
from torch import nn


def cnn() -> nn.Module:
    """The issue's CNN: Conv(1,16,4,s2)-Conv(16,32,4,s2)-FC100-FC10."""
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(800, 100), nn.ReLU(), nn.Linear(100, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def demo_cnn() -> nn.Module:
    """The demo's CNN (conv-relu-maxpool twice, two linear layers), for benchmarks that load it by factory."""
    from brittle.demo.model import DemoCNN

    return DemoCNN()


def conv_avgpool() -> nn.Module:
    """Two affine layers before the first ReLU (Conv -> AvgPool): CROWN must compose them, not take intervals."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.AvgPool2d(2), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 100), nn.ReLU(), nn.Linear(100, 10))


class BasicBlock(nn.Module):
    """A BasicBlock: conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, width: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResidualBN(nn.Module):
    """A small residual CNN with BatchNorm: a strided stem, one BasicBlock, a strided conv and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = BasicBlock(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        h = self.down(self.block(self.stem(x)))
        return self.head(h.view(h.size(0), -1))


def residual_bn() -> nn.Module:
    return ResidualBN()


def trained(factory: str, method: str, epochs: int, **kw):
    """`factory` ("_models:name") trained on the MNIST-5k training split with brittle.train, cached in bench/.cache;
    (model in eval mode, wall seconds spent training: 0 when cached)."""
    import time

    from _mnist import CACHE, split

    from brittle.training import TrainConfig, train

    name = f"cert_{factory.split(':')[1]}_{method}_e{epochs}_" + "_".join(f"{k}{v}" for k, v in sorted(kw.items()))
    out = CACHE / name
    weights = out / "weights.pt"
    t0 = time.time()
    if not weights.is_file():
        (x, y), _ = split()
        train(factory, (x, y), out=out, config=TrainConfig(method=method, epochs=epochs, batch_size=64, **kw),
              resume=(out / "checkpoint.pt").is_file())
    model = globals()[factory.split(":")[1]]()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval(), time.time() - t0

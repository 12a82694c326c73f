"""Factories for the certification benchmark (importable as `_models:cnn` once bench/ is on sys.path)."""

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

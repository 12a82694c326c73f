"""Shared fixtures: tiny models and data made here, offline, with fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn


class TinyMLP(nn.Module):
    """A small image classifier for (N, 1, 8, 8) inputs. Importable as a factory: tests.conftest:TinyMLP."""

    def __init__(self, classes: int = 3, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


class Noisy(nn.Module):
    """A random forward: Gaussian noise on the input at test time."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.05 * torch.randn_like(x))


def make_blobs(n: int = 240, classes: int = 3, seed: int = 0, noise: float = 0.25):
    """Images of class prototypes plus noise, in [0, 1]."""
    g = np.random.default_rng(seed)
    protos = g.uniform(0.2, 0.8, size=(classes, 1, 8, 8))
    y = np.arange(n) % classes
    x = np.clip(protos[y] + g.normal(0, noise, size=(n, 1, 8, 8)), 0, 1).astype(np.float32)
    return x, y.astype(np.int64)


def train_tiny(x, y, classes: int = 3, steps: int = 150, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyMLP(classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def blobs():
    return make_blobs()


@pytest.fixture(scope="session")
def tiny_model(blobs):
    return train_tiny(*blobs)


@pytest.fixture
def files(tmp_path, tiny_model, blobs):
    """A TorchScript model and .npz data on disk, as a user would bring them."""
    x, y = blobs
    model_path = tmp_path / "model.ts"
    torch.jit.script(tiny_model).save(str(model_path))
    data_path = tmp_path / "data.npz"
    np.savez(data_path, x=x, y=y)
    return model_path, data_path


def train_tiny_for_lds(x, y, *, seed: int):
    """A training function for `brittle attribute --evaluate-lds` (tests.conftest:train_tiny_for_lds). The same
    initial weights every time (full-batch training is then deterministic): margins move only with the subset."""
    return train_tiny(x.numpy(), y.numpy(), steps=100, seed=0)


TRAININGS: list[int] = []  # training-set sizes seen by train_tiny_digits, for tests that count trainings


def train_tiny_digits(x, y, *, seed: int):
    """A training function for `[label_errors] train_fn` (tests.conftest:train_tiny_digits): 10 classes."""
    TRAININGS.append(len(y))
    return train_tiny(x.numpy(), y.numpy(), classes=10, steps=100, seed=seed)


def check_report_html(html: str) -> None:
    """What a reader of report.html must never see: escaped entities as text, raw Python dicts, links that go
    nowhere. Every href is an anchor of the same file (the report is one self-contained file)."""
    from html.parser import HTMLParser

    class Reader(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.text, self.ids, self.hrefs, self.skip = [], set(), [], 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag in ("style", "script"):
                self.skip += 1
            if "id" in attrs:
                self.ids.add(attrs["id"])
            if tag == "a" and "href" in attrs:
                self.hrefs.append(attrs["href"])

        def handle_endtag(self, tag):
            if tag in ("style", "script"):
                self.skip -= 1

        def handle_data(self, data):
            if not self.skip:
                self.text.append(data)

    r = Reader()
    r.feed(html)
    visible = " ".join(r.text)
    assert "&#" not in visible and "&amp;" not in visible and "&lt;" not in visible, "escaped twice"
    assert "{'" not in visible and "['" not in visible, "a raw Python dict or list in the visible text"
    assert " -0%" not in visible and "(-0%" not in visible
    for href in r.hrefs:
        assert href.startswith("#") and href[1:] in r.ids, f"link {href!r} goes nowhere"

"""Data attribution benchmark: brittle's TRAK vs traker 0.3.2 on MNIST-5k, in one run.

    python bench/attribution.py [--skip-peers] [--ridges 0.001,0.01,0.1]
    python bench/attribution.py --torchscript-check [--baseline-src DIR] [--repeats 3]
        the attribution check on the demo's TorchScript CNN; with DIR, the src/ folder of an earlier brittle
        (e.g. `git worktree add /tmp/base 37538f2` and DIR=/tmp/base/src) runs the same check in the same run

Protocol (the issue's): MLP 784-256-10 (203k parameters), 4,000 training digits, fp32, one thread. The
ground truth for LDS is 50 random half subsets x 2 retraining seeds, margins of 100 test targets (cached in
bench/.cache; about two minutes the first time). Featurisation time is per 1,000 training examples at the
same projection dimension for both libraries; peak memory is the maximum resident set of a child process
doing only the featurisation (model and inputs loaded from a file), before and after it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import CACHE, split  # noqa: E402

from brittle.attribution import Trak, featurize, lds_from, margins  # noqa: E402

TARGETS = 100


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


def train_mlp(x, y, *, seed: int, epochs: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def ground_truth(x_train, y_train, x_t, y_t):
    path = CACHE / "lds_truth_mlp.npz"
    if path.is_file():
        z = np.load(path)
        return z["masks"], z["measured"]
    CACHE.mkdir(exist_ok=True)
    t0 = time.time()
    g = np.random.default_rng(0)
    masks = np.zeros((50, len(x_train)), bool)
    measured = np.zeros((50, len(x_t)))
    for s in range(50):
        masks[s, g.choice(len(x_train), len(x_train) // 2, replace=False)] = True
        idx = torch.as_tensor(np.flatnonzero(masks[s]))
        for r in range(2):
            measured[s] += margins(train_mlp(x_train[idx], y_train[idx], seed=1000 + 2 * s + r), x_t, y_t) / 2
    print(f"  (LDS ground truth: 100 trainings in {time.time() - t0:.0f} s)", file=sys.stderr)
    np.savez(path, masks=masks, measured=measured)
    return masks, measured


def lds(scores, masks, measured):
    r = lds_from(scores, masks, measured)
    return r["lds"], r["stderr"]


def brittle_features(model, x, y, proj_dim):
    """proj_dim 0: brittle's default for this MLP (exact gradients, no projection)."""
    return featurize(model, x, y, proj_dim=proj_dim or None, batch_size=100)


def traker_scores(models, x, y, x_t, y_t, proj_dim, save_dir):
    """traker's scores (targets, n) for an ensemble, and its featurisation CPU-s per model."""
    from trak import TRAKer

    t = TRAKer(model=models[0], task="image_classification", train_set_size=len(x), save_dir=save_dir, device="cpu",
               proj_dim=proj_dim, use_half_precision=False, logging_level=40)
    cpu = 0.0
    for m, model in enumerate(models):
        t.load_checkpoint(model.state_dict(), model_id=m)
        t0 = time.process_time()
        for i in range(0, len(x), 100):
            t.featurize(batch=(x[i: i + 100], y[i: i + 100]), num_samples=len(x[i: i + 100]))
        cpu += time.process_time() - t0
    t.finalize_features()
    for m, model in enumerate(models):
        t.start_scoring_checkpoint(exp_name="bench", checkpoint=model.state_dict(), model_id=m, num_targets=len(x_t))
        t.score(batch=(x_t, y_t), num_samples=len(x_t))
    return np.asarray(t.finalize_scores(exp_name="bench"), np.float64).T, cpu / len(models)


def _child(kind, proj_dim, inputs, queue):
    """Featurise 1,000 examples and nothing else, so that the peak resident set is the featurisation's."""
    torch.set_num_threads(1)
    saved = torch.load(inputs, weights_only=True)
    model = MLP()
    model.load_state_dict(saved["state"])
    model.eval()
    x1, y1 = saved["x"], saved["y"]
    before = _peak_mb()
    t0 = time.process_time()
    if kind == "brittle":
        brittle_features(model, x1, y1, proj_dim)
    elif kind == "brittle-vmap":
        # the generic path (convolutions, TorchScript): per-example gradients with torch.func, then projected
        from brittle.attribution import Projector, _per_example_grads

        projector = Projector(model, proj_dim)
        names = [n for gr in projector.groups for n in (gr.weight, gr.bias) if n]
        for i in range(0, len(x1), 100):
            projector(_per_example_grads(model, names, x1[i: i + 100], y1[i: i + 100])[0])
    else:
        from trak import TRAKer

        with tempfile.TemporaryDirectory() as d:
            t = TRAKer(model=model, task="image_classification", train_set_size=len(x1), save_dir=d, device="cpu",
                       proj_dim=proj_dim, use_half_precision=False, logging_level=40)
            t.load_checkpoint(model.state_dict(), model_id=0)
            for i in range(0, len(x1), 100):
                t.featurize(batch=(x1[i: i + 100], y1[i: i + 100]), num_samples=100)
    queue.put((time.process_time() - t0, before, _peak_mb()))


def _peak_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the parent
    across fork + exec, so a spawned child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(kind, proj_dim, inputs):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, proj_dim, inputs, q))
    p.start()
    out = q.get()
    p.join()
    return out


def conv_speed(skip_peers: bool) -> None:
    """Featurisation of 1,000 examples by the demo CNN (convolutions; untrained weights), one thread, warm."""
    from brittle.attribution import Projector, _per_example_grads
    from brittle.demo.model import DemoCNN

    (x, y), _ = split()
    x1, y1 = x[:1000], y[:1000]
    torch.manual_seed(0)
    model = DemoCNN().eval()
    print("\nConvolutional model (the demo CNN, 110k parameters), 1,000 examples, CPU-s, one thread:")
    for p in (512, 2048):
        featurize(model, x1[:100], y1[:100], proj_dim=p)  # warm-up
        t0 = time.process_time()
        featurize(model, x1, y1, proj_dim=p, batch_size=100)
        factors = time.process_time() - t0
        projector = Projector(model, p)
        names = [n for gr in projector.groups for n in (gr.weight, gr.bias) if n]
        t0 = time.process_time()
        for i in range(0, 1000, 100):
            projector(_per_example_grads(model, names, x1[i: i + 100], y1[i: i + 100])[0])
        vmap = time.process_time() - t0
        line = f"  p={p}: brittle (conv factors) {factors:.2f}, brittle (torch.func path) {vmap:.2f}"
        if not skip_peers:
            from trak import TRAKer

            with tempfile.TemporaryDirectory() as d:
                t = TRAKer(model=model, task="image_classification", train_set_size=1000, save_dir=d, device="cpu",
                           proj_dim=p, use_half_precision=False, logging_level=40)
                t.load_checkpoint(model.state_dict(), model_id=0)
                t0 = time.process_time()
                for i in range(0, 1000, 100):
                    t.featurize(batch=(x1[i: i + 100], y1[i: i + 100]), num_samples=100)
                line += f", traker {time.process_time() - t0:.2f}"
        print(line)


_BASELINE = """
import sys, time, numpy as np, torch
import brittle
model = torch.jit.load(sys.argv[1])
z, t = np.load(sys.argv[2]), np.load(sys.argv[3])
seconds = []
for _ in range(int(sys.argv[5])):
    t0 = time.perf_counter()
    r = brittle.audit(model, (z["x"], z["y"]), train_data=(t["x"], t["y"]), checks=["attribution"])["attribution"]
    seconds.append(time.perf_counter() - t0)
np.savez(sys.argv[4], scores=r.arrays["scores"], seconds=min(seconds), backward=r.cost.backward_passes)
"""


def _baseline(src: str, scripted, d, repeats: int) -> tuple[float, np.ndarray, int]:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        paths = [f"{tmp}/m.ts", f"{tmp}/d.npz", f"{tmp}/t.npz", f"{tmp}/out.npz"]
        scripted.save(paths[0])
        np.savez(paths[1], x=d.x_test, y=d.y_test)
        np.savez(paths[2], x=d.x_train, y=d.y_train)
        subprocess.run([sys.executable, "-c", _BASELINE, *paths, str(repeats)], check=True, env={"PYTHONPATH": src, "PATH": ""})
        out = np.load(paths[3])
        return float(out["seconds"]), out["scores"], int(out["backward"])


def torchscript_check(baseline_src: str | None = None, repeats: int = 3) -> None:
    """The attribution check of `brittle demo`'s audit (4,000 training digits, 20 targets, projected to 2048) on the
    demo's TorchScript CNN: TorchScript read back as eager Conv2d/Linear layers (factored projections, batched), and
    the path it replaced (the TorchScript module itself: one autograd call per example), in one run; with
    `baseline_src`, the same check of that earlier brittle too, in a subprocess. Each path's time is the best of
    `repeats` runs (a fresh adapter each time): single runs of the same path vary by 20% on this machine."""
    import brittle
    from brittle.demo import data as demo_data
    from brittle.demo.model import DemoCNN
    from brittle.demo.train import train_classifier
    from brittle.model import ModelAdapter

    d = demo_data.demo_data(seed=0)
    torch.manual_seed(0)
    scripted = torch.jit.script(train_classifier(DemoCNN(), d.x_train, d.y_train, epochs=4, seed=0))
    results = {}
    if baseline_src:
        seconds, scores, backward = _baseline(baseline_src, scripted, d, repeats)
        results["baseline brittle (before this change)"] = (seconds, scores, backward)
        print(f"baseline: {seconds:.1f} s", flush=True)
    for name in ("per-example loop (before)", "eager graph (now)"):
        seconds = []
        for _ in range(repeats):
            adapter = ModelAdapter(scripted, name="demo_cnn.ts")
            if name.startswith("per-example"):
                adapter._eager = adapter.module  # what the check did before: featurise the TorchScript module itself
            t0 = time.perf_counter()
            r = brittle.audit(adapter, (d.x_test, d.y_test), train_data=(d.x_train, d.y_train), checks=["attribution"])
            seconds.append(time.perf_counter() - t0)
        results[name] = (min(seconds), r["attribution"].arrays["scores"], r["attribution"].cost.backward_passes)
        print(f"{name}: {results[name][0]:.1f} s", flush=True)
    t_new, new, _ = results["eager graph (now)"]
    print("\n| path | seconds | ratio to now | largest score difference to now | backward passes counted |")
    print("|---|---|---|---|---|")
    for name, (t, scores, backward) in results.items():
        print(f"| {name} | {t:.1f} | {t / t_new:.1f}x | {float(np.abs(scores - new).max()):.1e} | {backward} |")
    print(f"(scores up to {float(np.abs(new).max()):.3g})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--ridges", default="3")
    ap.add_argument("--dims", default="0,512,2048", help="projection dimensions; 0 = exact gradients (the default)")
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--memory-only", action="store_true", help="only the featurisation time and memory table")
    ap.add_argument("--torchscript-check", action="store_true", help="only: the attribution check on the demo's "
                    "TorchScript CNN, read as eager layers (now) vs the per-example autograd loop (before)")
    ap.add_argument("--baseline-src", help="with --torchscript-check: src/ of an earlier brittle to time as well")
    ap.add_argument("--repeats", type=int, default=3, help="with --torchscript-check: best of this many runs per path")
    args = ap.parse_args()
    if args.torchscript_check:
        return torchscript_check(args.baseline_src, args.repeats)
    torch.set_num_threads(1)
    (x, y), (x_test, y_test) = split()
    x_t, y_t = x_test[:TARGETS], y_test[:TARGETS]
    masks, measured = ground_truth(x, y, x_t, y_t)
    models = [train_mlp(x, y, seed=s) for s in range(args.models)]
    print(f"test accuracy of the models: {[round(float((m(x_test).argmax(1) == y_test).float().mean()), 3) for m in models]}")
    dims = [int(d) for d in args.dims.split(",")]
    ridges = [float(r) for r in args.ridges.split(",")]
    rows = []
    for p in ([] if args.memory_only else dims):
        feats, tfeats, secs = [], [], []
        for m in models:
            t0 = time.process_time()
            feats.append(brittle_features(m, x, y, p))
            secs.append(time.process_time() - t0)
            tfeats.append(brittle_features(m, x_t, y_t, p))
        for ridge in ridges:
            for k in sorted({1, len(models)}):
                t0 = time.process_time()
                scores = Trak(feats[:k], ridge=ridge).scores(tfeats[:k])
                solve = time.process_time() - t0
                rows.append(("brittle", p or "exact", ridge, k, *lds(scores, masks, measured),
                             np.mean(secs) / len(x) * 1000, solve))
        if not args.skip_peers and p:
            for k in sorted({1, len(models)}):
                d = tempfile.mkdtemp()
                try:
                    t0 = time.process_time()
                    sc, cpu = traker_scores(models[:k], x, y, x_t, y_t, p, d)
                    total = time.process_time() - t0
                    rows.append(("traker 0.3.2", p, 0.0, k, *lds(sc, masks, measured), cpu / len(x) * 1000,
                                 total - cpu * k))
                finally:
                    shutil.rmtree(d, ignore_errors=True)
    print("\n| library | proj dim | ridge | models | LDS | stderr | featurise CPU-s per 1,000 | scoring CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:g} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.2f} | {r[7]:.1f} |")
    conv_speed(args.skip_peers)
    print("\nFeaturisation of 1,000 examples in a fresh process (one thread): CPU-s, peak RSS before and after (MB)")
    with tempfile.TemporaryDirectory() as d:
        inputs = Path(d) / "inputs.pt"
        torch.save({"state": models[0].state_dict(), "x": x[:1000], "y": y[:1000]}, inputs)
        for p in dims:
            kinds = ["brittle"] + (["brittle-vmap"] if p else []) + ([] if args.skip_peers or not p else ["traker"])
            for kind in kinds:
                cpu, before, after = measure(kind, p, inputs)
                print(f"  {kind:12s} p={p or 'exact'}: {cpu:.2f} CPU-s, peak RSS {before:.0f} -> {after:.0f} MB "
                      f"(+{after - before:.0f})")


if __name__ == "__main__":
    main()

"""The command line end to end, as a user runs it: exit codes, messages, resume after kill -9."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from brittle.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "brittle.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _config(tmp_path, text):
    p = tmp_path / "audit.toml"
    p.write_text(text)
    return p


def test_audit_torchscript_npz_end_to_end(files, tmp_path):
    model, data = files
    cfg = _config(tmp_path, 'gates = ["accuracy.accuracy >= 0.9"]\n[adversarial]\neps = 0.05\nsteps = 5\nmax_samples = 30\n')
    p = run_cli("audit", "--model", model, "--data", data, "--config", cfg, "--out", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert "brittle audit: PASS" in p.stdout
    for name in ("report.json", "report.html", "junit.xml"):
        assert (tmp_path / "out" / name).is_file()
    # A gate that fails gives exit code 1.
    p = run_cli("audit", "--model", model, "--data", data, "--checks", "accuracy", "--config",
                _config(tmp_path, 'gates = ["accuracy.accuracy >= 1.01"]\n'), "--out", tmp_path / "out2")
    assert p.returncode == 1 and "FAIL" in p.stdout


def _bad_inputs(tmp_path, files):
    model, data = files
    x, y = np.load(data)["x"], np.load(data)["y"]
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=nan, y=y)
    np.savez(tmp_path / "labels.npz", x=x, y=y + 5)
    np.savez(tmp_path / "shape.npz", x=x[:, :, :5], y=y)
    (tmp_path / "cut.npz").write_bytes(data.read_bytes()[:400])
    (tmp_path / "cut.ts").write_bytes(model.read_bytes()[:400])
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    return {
        "nan": ["--model", model, "--data", tmp_path / "nan.npz"],
        "labels out of range": ["--model", model, "--data", tmp_path / "labels.npz"],
        "wrong shape": ["--model", model, "--data", tmp_path / "shape.npz"],
        "truncated data": ["--model", model, "--data", tmp_path / "cut.npz"],
        "truncated model": ["--model", tmp_path / "cut.ts", "--data", data],
        "pickled module": ["--model", tmp_path / "pickled.pt", "--data", data],
        "missing data": ["--model", model, "--data", tmp_path / "nope.npz"],
        "eps typo": ["--model", model, "--data", data, "--config", _config(tmp_path, "[adversarial]\neps = 8\n")],
        "unknown check": ["--model", model, "--data", data, "--checks", "acuracy"],
    }


def test_every_bad_input_exits_2_with_a_message(files, tmp_path, capsys):
    for name, args in _bad_inputs(tmp_path, files).items():
        code = main(["audit", *map(str, args), "--out", str(tmp_path / "o"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("brittle: error:") and "Traceback" not in err, (name, err)
    assert not (tmp_path / "o" / "report.json").exists()


def test_bad_input_through_the_real_process(files, tmp_path):
    model, _ = files
    p = run_cli("audit", "--model", model, "--data", tmp_path / "nope.npz", "--out", tmp_path / "o")
    assert p.returncode == 2 and "no such file" in p.stderr and "Traceback" not in p.stderr


def test_out_dir_is_not_clobbered(files, tmp_path, capsys):
    model, data = files
    args = ["audit", "--model", str(model), "--data", str(data), "--checks", "accuracy", "--out", str(tmp_path / "o"),
            "--quiet"]
    assert main(args) == 0
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_report_command_rerenders(files, tmp_path):
    model, data = files
    assert main(["audit", "--model", str(model), "--data", str(data), "--checks", "accuracy", "--out",
                 str(tmp_path / "o"), "--quiet"]) == 0
    (tmp_path / "o" / "report.html").unlink()
    assert main(["report", str(tmp_path / "o"), "--quiet"]) == 0
    assert "accuracy" in (tmp_path / "o" / "report.html").read_text()


RESUME_CFG = "seed = 7\n[adversarial]\neps = 0.12\nsteps = 100\nmax_samples = 160\nshard_size = 10\n"


def _numbers(out):
    d = json.loads((out / "report.json").read_text())
    return [(c["id"], c["metrics"], c["cost"]["forward_passes"], c["cost"]["backward_passes"]) for c in d["checks"]]


def test_resume_after_kill_gives_identical_numbers(files, tmp_path):
    model, data = files
    cfg = _config(tmp_path, RESUME_CFG)
    base = ["audit", "--model", model, "--data", data, "--config", cfg, "--checks", "accuracy,adversarial"]
    full = run_cli(*base, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "brittle.cli", *map(str, base), "--out", str(tmp_path / "cut")],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "cut" / "state" / "adversarial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(shards.glob("main-*.npz"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(shards.glob("main-*.npz")))
    assert 3 <= done < 16, f"the kill must land mid-run (shards done: {done})"
    assert not (tmp_path / "cut" / "report.json").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.glob("main-*.npz")}

    resumed = run_cli(*base, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _numbers(tmp_path / "cut") == _numbers(tmp_path / "full")
    # No finished shard was redone.
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in shards.glob("main-*.npz") if p.name in mtimes)


def test_resume_refuses_a_different_run(files, tmp_path, capsys):
    model, data = files
    base = ["audit", "--model", str(model), "--data", str(data), "--checks", "accuracy", "--out", str(tmp_path / "o"),
            "--quiet"]
    assert main(base) == 0
    assert main(base + ["--resume", "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "changed since it was started: the configuration" in err and "Use --overwrite" in err


def test_progress_lines_when_stderr_is_not_a_terminal(files, tmp_path):
    model, data = files
    p = run_cli("audit", "--model", model, "--data", data, "--checks", "accuracy,calibration", "--out", tmp_path / "o")
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert any(re.match(r"^\[ *\d+\.\d+s\] accuracy: running$", line) for line in lines), p.stderr
    assert any(re.match(r"^\[ *\d+\.\d+s\] calibration: pass in \d+\.\d+ s$", line) for line in lines), p.stderr
    assert "\r" not in p.stderr  # no bar redrawn in place in a log


def test_the_python_api_prints_progress_when_asked(tiny_model, blobs, capsys):
    import brittle

    brittle.audit(tiny_model, blobs, checks=["accuracy"], progress=True)
    assert "accuracy: pass in" in capsys.readouterr().err
    brittle.audit(tiny_model, blobs, checks=["accuracy"])
    assert capsys.readouterr().err == ""  # silent by default


def test_negative_bounds_and_a_factory_beside_the_data(tmp_path):
    """`--bounds -5,15` means what it says, and a factory in the working folder imports as `python -m` would."""
    pkg = tmp_path / "mymodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("import torch\n\ndef make_mlp():\n    torch.manual_seed(0)\n"
                                 "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), "
                                 "torch.nn.Linear(8, 2))\n")
    import importlib.util
    spec = importlib.util.spec_from_file_location("nets_for_weights", pkg / "nets.py")
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    torch.save(nets.make_mlp().state_dict(), tmp_path / "w.pt")
    g = np.random.default_rng(0)
    x = g.uniform(-4, 14, size=(80, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, 0] > 5).astype(np.int64))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, "-m", "brittle.cli", "audit", "--model", "mymodels.nets:make_mlp", "--weights",
                        "w.pt", "--data", "d.npz", "--bounds", "-5,15", "--checks", "accuracy", "--out", "o"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    # Out of bounds: a tabular user is told about bounds, in the form the command line takes.
    p = subprocess.run([sys.executable, "-m", "brittle.cli", "audit", "--model", "mymodels.nets:make_mlp", "--weights",
                        "w.pt", "--data", "d.npz", "--checks", "accuracy", "--out", "o2"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 2 and "--bounds=-4,14" in p.stderr and "never rescales" in p.stderr, p.stderr


def test_missing_target_names_the_target_option(files, tmp_path, capsys):
    model, data = files
    assert main(["estimate", "--model", str(model), "--data", str(data), "--target", str(tmp_path / "no.npz")]) == 2
    assert "check the path given as --target" in capsys.readouterr().err
    import brittle

    with pytest.raises(brittle.InputError, match="check the path given as target"):
        brittle.estimate_accuracy(str(model), str(data), str(tmp_path / "no.npz"))


def test_monitor_and_estimate_print_a_verdict(files, tmp_path, capsys):
    model, data = files
    assert main(["monitor", "--model", str(model), "--reference", str(data), "--batch", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no drift: 240 new inputs against 240 reference inputs") and "class whose probability" in out
    assert main(["estimate", "--model", str(model), "--data", str(data), "--target", str(data)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("estimated accuracy") and "optimal-transport" in out
    assert main(["estimate", "--model", str(model), "--data", str(data), "--target", str(data), "--json"]) == 0
    assert "estimate" in json.loads(capsys.readouterr().out)


def test_pgd_takes_a_loss_name_like_apgd(tiny_model, blobs):
    from brittle.attacks import PGD

    x, y = (torch.from_numpy(a[:16]) for a in blobs)
    adv = PGD(eps=0.1, steps=3, loss="ce")(tiny_model, x, y)
    assert adv.shape == x.shape and float((adv - x).abs().max()) <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="'loss' parameter of PGD must be one of"):
        PGD(eps=0.1, loss="hinge")

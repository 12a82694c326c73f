"""Sharded work on a process pool and on a local Ray cluster gives exactly the in-process numbers,
survives a killed worker, and resumes across backends."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from brittle import UsageError, audit
from brittle.backends import ProcessBackend, make_backend

CFG = {"adversarial": {"eps": 0.1, "max_samples": 240, "shard_size": 20, "steps": 40, "probe_size": 16}}


def _numbers(result):
    a = result["adversarial"]
    return (a.metrics, a.cost.forward_passes, a.cost.backward_passes, a.arrays["robust"].tolist(),
            a.arrays["distance"].tolist(), a.details["broken_by"], a.details["curve"])


def _in_process(model, blobs, cfg):
    """The in-process reference, with one torch thread per task like every pool and Ray worker: MKL may
    split a matrix product differently with two threads, which changes the last bit of some distances."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return audit(model, blobs, checks=["adversarial"], config=cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_run(tiny_model, blobs):
    return _in_process(tiny_model, blobs, CFG)


KILL_CFG = {"adversarial": {**CFG["adversarial"], "shard_size": 10, "steps": 100}}  # 24 shards


def _kill_one_worker(marker: str, shards: Path, stop: threading.Event, killed: list) -> None:
    """Once two shards are saved (so the run is under way and more shards remain), SIGKILL the first
    process whose command line contains `marker`."""
    me = os.getpid()
    while not stop.is_set() and len(list(shards.glob("main-*.npz"))) < 2:
        time.sleep(0.005)
    while not stop.is_set() and not killed:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == me:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            except OSError:
                continue
            if marker in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(len(list(shards.glob("main-*.npz"))))
                return
        time.sleep(0.005)


def _audit_while_killing(model, blobs, tmp_path, backend, marker, **kw):
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_one_worker,
                               args=(marker, tmp_path / "state" / "adversarial", stop, killed))
    watcher.start()
    try:
        r = audit(model, blobs, checks=["adversarial"], config=KILL_CFG, backend=backend, out=tmp_path, **kw)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no worker was killed: the test did not test anything"
    assert killed[0] < 24, "the kill came after the last shard"
    return r


@pytest.fixture(scope="module")
def local_kill_run(tiny_model, blobs):
    return _in_process(tiny_model, blobs, KILL_CFG)


def test_process_pool_matches_in_process(tiny_model, blobs, local_run):
    r = audit(tiny_model, blobs, checks=["adversarial"], config=CFG, backend="process", workers=2)
    assert _numbers(r) == _numbers(local_run)
    assert len(r["adversarial"].details["workers"]) == 2  # per-worker cost in the report


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds worker processes through /proc")
def test_process_pool_retries_the_shard_of_a_killed_worker(tiny_model, blobs, local_kill_run, tmp_path):
    r = _audit_while_killing(tiny_model, blobs, tmp_path, "process", "multiprocessing.spawn", workers=2)
    assert _numbers(r) == _numbers(local_kill_run)


def test_resume_across_backends(tiny_model, blobs, local_run, tmp_path):
    audit(tiny_model, blobs, checks=["adversarial"], config=CFG, out=tmp_path)
    state = tmp_path / "state"
    (state / "results" / "adversarial.json").unlink()
    shards = sorted((state / "adversarial").glob("main-*.npz"))
    for f in shards[::2]:
        f.unlink()  # as if the run had been killed with half the shards done
    r = audit(tiny_model, blobs, checks=["adversarial"], config=CFG, out=tmp_path, resume=True, backend="process",
              workers=2)
    assert _numbers(r)[:5] == _numbers(local_run)[:5]


def test_backend_options_are_checked():
    with pytest.raises(UsageError, match="need backend process or ray"):
        make_backend("local", workers=4)
    with pytest.raises(UsageError, match="one of local, process, ray"):
        make_backend("dask")
    with pytest.raises(UsageError, match="workers"):
        ProcessBackend(workers=0)


def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=r"pip install 'brittle\[ray\]'"):
        make_backend("ray")


# ----- Ray: a real local cluster, started and stopped here -------------------------------------------
@pytest.fixture(scope="module")
def ray_backend():
    pytest.importorskip("ray", reason="the Ray extra is not installed: pip install 'brittle[ray]'")
    backend = make_backend("ray", workers=2)
    yield backend
    backend.close()


def test_ray_matches_in_process(tiny_model, blobs, local_run, ray_backend):
    r = audit(tiny_model, blobs, checks=["adversarial"], config=CFG, backend=ray_backend)
    assert ray_backend.cpus == 2  # the audit used (and left open) the cluster it was given
    assert _numbers(r) == _numbers(local_run)
    workers = r["adversarial"].details["workers"]
    assert sum(w["shards"] for w in workers.values()) == 12 and len(workers) >= 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds worker processes through /proc")
def test_ray_retries_the_shard_of_a_killed_worker(tiny_model, blobs, local_kill_run, ray_backend, tmp_path):
    r = _audit_while_killing(tiny_model, blobs, tmp_path, ray_backend, "ray::_ray_task")
    assert _numbers(r) == _numbers(local_kill_run)  # the lost shard was redone, nothing counted twice
    assert sum(w["shards"] for w in r["adversarial"].details["workers"].values()) == 24

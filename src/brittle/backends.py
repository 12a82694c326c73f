"""Where shard work runs: in this process (default), in a local pool of processes, or on Ray.

A task is a pure function of (model, shared inputs, the task's own arguments), so every backend gives the
same numbers; the caller merges results in task order and saves each one as it arrives (so a resumed run,
on any backend, redoes no finished task). The model and the shared inputs go to each worker once, not per
task. A worker that dies costs only its task, which is retried; a result is delivered once, so nothing is
counted twice. Every task runs with one torch thread on every backend: a matrix product split across two
threads can round differently, and the numbers must not depend on where they were computed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from .errors import UsageError, arg

__all__ = ["Backend", "LocalBackend", "ProcessBackend", "RayBackend", "Task", "make_backend"]

MAX_RETRIES = 3


@dataclass
class Task:
    """One shard: `fn(model, *shared, *args)`, where `shared` is what every task of a run reads."""

    key: str
    args: tuple


TaskFn = Callable[..., dict]


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _timed(fn: TaskFn, model, shared: tuple, task: Task) -> dict:
    """Run one task and add what every result carries: the passes it made (on this process's copy of the model
    adapter, when it has a pass counter), the worker and the seconds."""
    counter = getattr(model, "counter", None)
    before = counter.snapshot() if counter is not None else (0, 0)
    t0 = time.perf_counter()
    with _one_thread():
        out = dict(fn(model, *shared, *task.args))
    after = counter.snapshot() if counter is not None else (0, 0)
    out.setdefault("passes", (after[0] - before[0], after[1] - before[1]))
    out["worker"] = _worker_id()
    out["seconds"] = time.perf_counter() - t0
    return out


class Backend(ABC):
    name: str = "backend"
    in_process: bool = False  # True: the driver's model adapter counts the passes itself

    @abstractmethod
    def run(self, fn: TaskFn, model, shared: tuple, tasks: list[Task], on_done: Callable[[Task, dict], None]) -> None:
        """Run every task; call `on_done(task, result)` exactly once per task, in completion order."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalBackend(Backend):
    name = "local"
    in_process = True

    def run(self, fn, model, shared, tasks, on_done):
        for task in tasks:
            on_done(task, _timed(fn, model, shared, task))


# ----- a pool of local processes ---------------------------------------------------------------------
_WORKER_STATE: dict[str, Any] = {}


def _pool_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _pool_run(fn: TaskFn, payload_path: str, task: Task) -> dict:
    """Run a task on this worker's copy of the model and shared inputs, read from `payload_path` the first time
    this worker meets that run (a pool outlives one `run`: each run writes its own payload file)."""
    import pickle

    s = _WORKER_STATE
    if s.get("path") != payload_path:
        s.clear()  # the previous run's copy goes before the next one is read
        with open(payload_path, "rb") as f:
            s["model"], s["shared"] = pickle.load(f)
        s["path"] = payload_path
    return _timed(fn, s["model"], s["shared"], task)


class ProcessBackend(Backend):
    """A pool of `workers` processes on this machine (spawned, one torch thread each). The pool is started on
    the first run and kept until `close()`: starting a worker (importing torch) costs seconds, and an audit
    makes one run per check phase."""

    name = "process"

    def __init__(self, workers: int | None = None):
        self.workers = int(workers) if workers is not None else (os.cpu_count() or 1)
        if self.workers < 1:
            raise UsageError(f"The 'workers' option must be >= 1; got {workers}.")
        self._pool = None

    def run(self, fn, model, shared, tasks, on_done):
        import pickle

        # Read once per worker from a file, not sent per task: and not through the spawn pipe either, where a
        # large payload blocks the parent for good if a worker dies while it starts.
        with tempfile.NamedTemporaryFile(prefix="brittle-payload-", suffix=".pkl", delete=False) as f:
            pickle.dump((model, shared), f)
            payload = f.name
        try:
            self._run_pool(fn, payload, tasks, on_done)
        finally:
            os.unlink(payload)

    def _start_pool(self):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_pool_init,
                                             initargs=(1,))
        return self._pool

    def _run_pool(self, fn, payload: str, tasks, on_done) -> None:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        pending = {t.key: t for t in tasks}
        attempts = {t.key: 0 for t in tasks}
        while pending:
            pool = self._start_pool()
            broken = False
            try:
                futures = {pool.submit(_pool_run, fn, payload, t): t for t in pending.values()}
                for fut in as_completed(futures):
                    task = futures[fut]
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        break  # a worker died: start a new pool for the shards not yet done
                    del pending[task.key]
                    on_done(task, result)
            except BaseException:
                self.close()  # interrupted: no worker goes on with shards nobody will collect
                raise
            if broken:
                self.close()
            for key in pending:
                attempts[key] += 1
                if attempts[key] > MAX_RETRIES:
                    raise RuntimeError(f"shard {key} failed {MAX_RETRIES + 1} times: its worker process kept dying")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ----- Ray --------------------------------------------------------------------------------------------
def _ray_task(fn: TaskFn, model, task: Task, *shared) -> dict:
    import warnings

    with warnings.catch_warnings():
        # Tensors from the object store are read-only views; brittle indexes (copies) them, never writes.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _timed(fn, model, shared, task)


class RayBackend(Backend):
    """Ray tasks, one CPU each. Without `address`, starts (and later stops) a local cluster of `workers` CPUs."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, init_timeout: float = 120.0):
        try:
            import ray
        except ImportError:
            raise UsageError("The Ray backend needs Ray: pip install 'brittle[ray]' "
                             "(with -c constraints.txt in this environment).") from None
        if workers is not None and int(workers) < 1:
            raise UsageError(f"The 'workers' option must be >= 1; got {workers}.")
        self.ray = ray
        self.address = None if address in (None, "", "local") else address
        self.workers = workers
        self._started = False
        self._init_timeout = init_timeout
        self._connect(init_timeout)
        self._remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_ray_task)
        self._refs: dict[int, tuple[Any, Any]] = {}  # id(object) -> (object, ref): each goes to the store once

    def _connect(self, timeout: float) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if self.address:
            kwargs["address"] = self.address
        else:
            kwargs["num_cpus"] = int(self.workers) if self.workers is not None else (os.cpu_count() or 1)
            # Workers must import the same modules as the driver (a factory, a test's model class).
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
        if not self.address:
            _check_loopback()
        try:
            with _deadline(timeout):
                ray.init(**kwargs)
        except _InitTimeout:
            raise UsageError(f"ray.init() did not finish within {timeout:g} s. Ray needs a working loopback "
                             "interface (127.0.0.1) and free local ports; check `ip addr show lo`, or pass "
                             f"{arg('address')} HOST:PORT of a running cluster, or use {arg('backend')} "
                             "process.") from None
        except Exception as exc:
            raise UsageError(f"Ray could not start: {type(exc).__name__}: {exc}") from None
        self._started = self.address is None

    def run(self, fn, model, shared, tasks, on_done):
        ray = self.ray
        if not ray.is_initialized():  # closed earlier: start our cluster again rather than Ray's default one
            self._refs.clear()
            self._connect(self._init_timeout)
        # Each shared input is its own top-level argument: Ray resolves those, and each goes to the store once per
        # audit however many phases read it.
        model_ref, shared_refs = self._put(model), [self._put(obj) for obj in shared]
        futures = {self._remote.remote(fn, model_ref, t, *shared_refs): t for t in tasks}
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                on_done(futures[ref], ray.get(ref))

    @property
    def cpus(self) -> float:
        return float(self.ray.cluster_resources().get("CPU", 0))

    def _put(self, obj):
        """The object store ref for obj, made once (the model is shipped once per audit, not per task)."""
        kept = self._refs.get(id(obj))
        if kept is None or kept[0] is not obj:
            kept = (obj, self.ray.put(obj))
            self._refs[id(obj)] = kept
        return kept[1]

    def close(self) -> None:
        self._refs.clear()
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
            self._started = False


class _InitTimeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise _InitTimeout after `seconds` (main thread only: ray.init must run there, its cluster dies with
    the thread that started it; elsewhere no deadline is set)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise _InitTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_loopback() -> None:
    """Ray hangs for many minutes without a loopback interface; find out in milliseconds instead."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=2):
                pass
    except OSError as exc:
        raise UsageError(f"Ray needs the loopback interface, and 127.0.0.1 is not usable here ({exc}). "
                         f"Bring it up (`ip link set lo up`), give {arg('address')} of a running cluster, or use "
                         f"{arg('backend')} process.") from None


def make_backend(name: str | Backend | None, *, workers: int | None = None, address: str | None = None) -> Backend:
    if isinstance(name, Backend):
        return name
    if name in (None, "local"):
        if workers not in (None, 1) or address:
            raise UsageError(f"{arg('workers')} and {arg('address')} need {arg('backend')} process or ray.")
        return LocalBackend()
    if name == "process":
        if address:
            raise UsageError(f"{arg('address')} is for {arg('backend')} ray.")
        return ProcessBackend(workers)
    if name == "ray":
        return RayBackend(address=address, workers=workers)
    raise UsageError(f"The 'backend' option must be one of local, process, ray; got {name!r}.")

"""The Ray runner: the only module that talks to Ray.

A pool of actors, each owning the state its class builds once (a model, open stores); the
driver only hands out small task descriptions and waits. In-flight work is bounded per actor;
a crashed actor is restarted by Ray and its in-flight tasks are retried on the new process.
An error that a task raises on purpose (a ``RepPipelineError``: a corrupt image, say) stops
the run and reaches the caller as itself.
"""
from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

from . import config
from .errors import RepPipelineError
from .location import storage_environment


INLINE = "inline"  # --address inline: every worker in this process, one after another, no Ray
_inline = False


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (a cluster) or start a local instance, once per process.
    ``address="inline"`` starts nothing: the pools of this process then build their workers
    here and call them in turn (small runs without Ray's process start-up, e.g. presets with
    stand-in models); the default and every cluster address use Ray."""
    global _inline
    if address == INLINE:
        _inline = True
        return
    _inline = False
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        _token_without_a_writable_home()
        # Ray enables token authentication on a new local instance and says so on every start;
        # the instance is this process's own, so the notice is kept quiet (the token is not)
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level, notice.level = notice.level, logging.ERROR
        try:
            # "local": a new instance of this process's own, never one a `ray start` left on the machine
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **kwargs)
        finally:
            notice.setLevel(level)
        _end_with_this_process()


def _token_without_a_writable_home() -> None:
    """A new local instance with token authentication keeps its token in ``~/.ray/auth_token``;
    where that folder cannot be written (a read-only or unwritable HOME), the token of this
    process's own instance is handed to it and its workers in ``RAY_AUTH_TOKEN`` instead."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN") \
            or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    folder = Path.home() / ".ray"
    if (folder / "auth_token").is_file():
        return
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)


# Watches the driver; once it is gone (ended, crashed or killed), ends every process of the
# local Ray instance it started (GCS, raylet, dashboard and runtime-env agents, workers).
_WATCHDOG = """
import sys, time, psutil
driver, roots = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
procs = {}
def collect():
    for pid in roots:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                procs.setdefault(p.pid, p)
        except psutil.Error:
            pass
collect()
while psutil.pid_exists(driver):
    time.sleep(0.5)
    collect()
alive = [p for p in procs.values() if p.is_running()]
for p in alive:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(alive, timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def _end_with_this_process() -> None:
    """A local Ray instance this process started ends with it, even when it is killed (SIGKILL
    leaves Ray no time to stop its own processes): a small watchdog, in a session of its own
    so Ctrl-C does not reach it, ends them once this process is gone."""
    import psutil

    roots = [str(p.pid) for p in psutil.Process().children()]
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *roots], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() and not _inline else None


def cluster_gpus() -> int:
    if _inline:
        return 0  # inline workers run on this process's CPU backend
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    if _inline:
        return os.cpu_count() or 1
    return int(ray.cluster_resources().get("CPU", 1))


def node_cpus() -> list[int]:
    """The CPUs of each live node that has any (a head kept free of work has none)."""
    if _inline:
        return [os.cpu_count() or 1]
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return [c for c in cpus if c > 0] or [1]


def cpus_per_actor(n_actors: int) -> int:
    """CPUs for each of ``n_actors`` CPU actors: the cluster's share per actor, but never more
    than the largest node holds (an actor cannot span nodes, and one asking for more would
    wait forever, as would one sized for a node that has since been lost)."""
    nodes = node_cpus()
    return max(1, min(sum(nodes) // max(n_actors, 1), max(nodes)))


class ActorPool:
    """One actor per entry of ``args_per_actor`` (``cls(*args)``), each reserving
    ``num_cpus``/``num_gpus``. ``max_concurrency=2`` lets a driver poll a cheap method (such
    as progress) while a long one runs. Under ``ensure_ray("inline")`` an ``InlinePool``
    stands in: the same calls on plain objects of this process."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "ActorPool":
        return super().__new__(InlinePool if _inline and cls is ActorPool else cls)

    def __init__(self, cls: type, args_per_actor: Sequence[Sequence[Any]], *, num_cpus: float = 1,
                 num_gpus: float = 0, max_restarts: int = config.ACTOR_MAX_RESTARTS,
                 max_task_retries: int = config.ACTOR_MAX_TASK_RETRIES, max_concurrency: int = 1):
        # the driver's object-storage environment (endpoint, credentials) reaches the actors on
        # every node, so an s3:// store opens there as it does here
        env = storage_environment()
        remote_cls = ray.remote(cls).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=max_concurrency,
            max_restarts=max_restarts, max_task_retries=max_task_retries,
            scheduling_strategy="SPREAD",  # one per node first: the work and a lost node's share spread
            **({"runtime_env": {"env_vars": env}} if env else {}),
        )
        self.actors = [remote_cls.remote(*args) for args in args_per_actor]

    def call_all(self, method: str, *args: Any, skip_lost: bool = False) -> list[Any]:
        """``method(*args)`` on every actor, results in actor order. With ``skip_lost``, an
        actor that is gone (its node lost, say) gives None instead of an error."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        if not skip_lost:
            return _get(refs)
        out = []
        for ref in refs:
            try:
                out.append(_get(ref))
            except RayActorError:
                out.append(None)
        return out

    def call_one(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on the first actor (work that one process does, such as a fit)."""
        return _get(getattr(self.actors[0], method).remote(*args))

    def map_unordered(self, method: str, tasks: Iterable[tuple], in_flight_per_actor: int = config.TASKS_IN_FLIGHT_PER_ACTOR,
                      ) -> Iterator[tuple[tuple, Any]]:
        """Yield ``(task, method(*task))`` as results arrive, keeping each actor busy. A task
        whose actor is lost (its process or node gone, Ray's retries spent) goes back to the
        queue for the actors still there; only when none is left does the error reach the caller."""
        pending = list(tasks)[::-1]
        running: dict[ray.ObjectRef, tuple[int, tuple]] = {}
        lost: set[int] = set()

        def submit(actor_index: int) -> None:
            task = pending.pop()
            ref = getattr(self.actors[actor_index], method).remote(*task)
            running[ref] = (actor_index, task)

        for i in range(len(self.actors)):
            for _ in range(in_flight_per_actor):
                if pending:
                    submit(i)
        try:
            while running:
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor_index, task = running.pop(ref)
                try:
                    result = _get(ref)
                except RayActorError:
                    lost.add(actor_index)
                    if len(lost) == len(self.actors):
                        raise
                    pending.append(task)
                    alive = [i for i in range(len(self.actors)) if i not in lost]
                    busy = {i: sum(1 for a, _ in running.values() if a == i) for i in alive}
                    submit(min(alive, key=busy.get))
                    continue
                if pending:
                    submit(actor_index)
                yield task, result
        finally:
            for ref in running:  # an error or an interrupt: stop what is still queued
                ray.cancel(ref)

    def run_all(self, method: str, poll: Callable[[int], Any] | None = None, poll_method: str = "progress",
                every: float = 0.5) -> Iterator[Any]:
        """``method()`` on every actor; yields results as they finish. Meanwhile calls
        ``poll(sum of poll_method() over the actors)`` every ``every`` seconds."""
        running = {getattr(a, method).remote(): a for a in self.actors}
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=every)
            for ref in ready:
                running.pop(ref)
                yield _get(ref)
            if poll is not None:
                poll(sum(_get([getattr(a, poll_method).remote() for a in self.actors])))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class InlinePool(ActorPool):
    """The pool's calls on workers built in this process and called one after another."""

    def __init__(self, cls: type, args_per_actor: Sequence[Sequence[Any]], **_: Any):
        self.actors = [cls(*args) for args in args_per_actor]

    def call_all(self, method: str, *args: Any, skip_lost: bool = False) -> list[Any]:
        return [getattr(a, method)(*args) for a in self.actors]

    def call_one(self, method: str, *args: Any) -> Any:
        return getattr(self.actors[0], method)(*args)

    def map_unordered(self, method: str, tasks: Iterable[tuple], in_flight_per_actor: int = 1,
                      ) -> Iterator[tuple[tuple, Any]]:
        for i, task in enumerate(tasks):
            yield task, getattr(self.actors[i % len(self.actors)], method)(*task)

    def run_all(self, method: str, poll: Callable[[int], Any] | None = None, poll_method: str = "progress",
                every: float = 0.5) -> Iterator[Any]:
        for actor in self.actors:
            result = getattr(actor, method)()
            if poll is not None:
                poll(sum(getattr(a, poll_method)() for a in self.actors))
            yield result

    def shutdown(self) -> None:
        self.actors = []


def _get(refs: Any) -> Any:
    try:
        return ray.get(refs)
    except RayTaskError as exc:
        cause = exc.cause if hasattr(exc, "cause") else None
        if isinstance(cause, RepPipelineError):
            raise cause from None
        raise


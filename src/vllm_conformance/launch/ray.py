"""The ``ray`` launcher: the servers of matrix entries placed on a Ray cluster.

``pytest --launcher ray --ray-address HOST:PORT`` (``auto`` on a node of the cluster) runs
the suites unchanged; only where each entry's server runs changes. Tests, records and the
report stay in the driver (the pytest process), which reaches every server over HTTP.

- **Placement.** Each entry reserves a placement group: one bundle ``{"CPU": 1, "GPU": n,
  "accelerator_type:H100": 0.001}`` on one node (``STRICT_PACK``), or with
  ``hardware.nodes: N`` N bundles of ``count / N`` GPUs on N distinct nodes
  (``STRICT_SPREAD``). A CPU entry's bundle is ``{"CPU": 1}``: one CPU of its node is the
  server's slot. An entry no node can ever hold is skipped at collection with the reason;
  one that does not fit *now* waits for its placement group: the queue.
- **Servers.** One actor per bundle (node rank) runs the project's :class:`VllmServer` on
  its node, as a subprocess: vLLM started inside a Ray actor would switch itself to the Ray
  executor. The actor hands back the port, the startup time and the KV capacity; each
  rank's log is copied to the driver's run directory.
- **One deployment over several nodes** (``hardware.nodes > 1``): vLLM's multi-node mode
  (``vllm serve --nnodes N --node-rank R --master-addr ... --master-port ...``, plus
  ``--headless`` on the followers; vLLM >= 0.11.1), with ``VLLM_HOST_IP`` set to each rank's
  node. Rank 0 serves HTTP. The deployment is alive while every rank is.
- **``--distributed-executor-backend ray``** in ``serve.extra_args``: vLLM places its own
  GPU workers on the cluster (``RAY_ADDRESS`` is passed on); the entry reserves one CPU for
  the API server only, since a second reservation of the same GPUs would wait forever.
- **Teardown.** The ``server`` fixture stops every rank (head first) through its actor,
  then the actors and the placement group go. A server whose actor dies without teardown
  (its node failed, the driver was killed) ends itself through its lifeline
  (:mod:`~vllm_conformance.launch.lifeline`): ``ray.kill`` and Ray's own clean-up do not
  reach a process that leads its own session. At the end of the session every alive node
  is swept for processes carrying this launcher's tag (``VLLM_CONFORMANCE_RAY_RUN``).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )
except ImportError as exc:  # the optional extra is missing
    raise ImportError("the ray launcher needs Ray: pip install 'vllm-conformance[ray]'") from exc

from vllm_conformance.launch import procs, serving
from vllm_conformance.launch.endpoint import Endpoint, EndpointError, connect
from vllm_conformance.launch.local import (
    LaunchSpec,
    LeftoverProcessError,
    ServerStartError,
    VllmServer,
    command,
    free_port,
    tail,
)
from vllm_conformance.launch.logparse import FailureReason, KvCacheInfo, failure_reason
from vllm_conformance.matrix import Deployment
from vllm_conformance.perf import estimate
from vllm_conformance.progress import Progress

#: Every process a launcher's servers start carries ``RUN_TAG_VAR=<the launcher's tag>``.
RUN_TAG_VAR = "VLLM_CONFORMANCE_RAY_RUN"
#: ``vllm serve`` (multi-node mode needs it; :mod:`~vllm_conformance.launch.vllm_serve`).
SERVE_MODULE = "vllm_conformance.launch.vllm_serve"
#: Ray's accelerator type of each GPU kind of the matrix (``ray.util.accelerators``).
ACCELERATORS = {"a100": "A100", "h100": "H100", "h200": "H200", "b200": "B200"}
#: Any share of a node's ``accelerator_type:<T>`` resource selects nodes of that kind.
_KIND_SHARE = 0.001
#: How long a rank's actor may go unanswered before its deployment counts as dead: Ray
#: itself marks a node dead after it missed its health checks (about 15-30 s by default).
UNREACHABLE_S = 45.0


# -- planning: pure functions of the entry and the cluster's node resources ------------------


@dataclass(frozen=True)
class Placement:
    """The Ray resources of one entry: a bundle per node rank, and how they are spread."""

    bundles: tuple[dict[str, float], ...]
    strategy: str


def ray_executor(entry: Deployment) -> bool:
    """Whether the entry runs vLLM's Ray executor (``--distributed-executor-backend ray``)."""
    args = entry.serve.extra_args
    for i, arg in enumerate(args):
        if arg.startswith("--distributed-executor-backend="):
            return arg.split("=", 1)[1] == "ray"
        if arg == "--distributed-executor-backend":
            return args[i + 1 : i + 2] == ["ray"]
    return False


def _kind_key(entry: Deployment) -> str:
    return f"accelerator_type:{ACCELERATORS[entry.hardware.gpu]}"


def plan(entry: Deployment) -> Placement:
    """The placement group ``entry`` needs."""
    hw = entry.hardware
    bundle = {"CPU": 1.0}
    if ray_executor(entry):
        return Placement((bundle,), "STRICT_PACK")
    if hw.gpu != "cpu":
        bundle["GPU"] = float(hw.count // hw.nodes)
        bundle[_kind_key(entry)] = _KIND_SHARE
    strategy = "STRICT_PACK" if hw.nodes == 1 else "STRICT_SPREAD"
    return Placement(tuple(dict(bundle) for _ in range(hw.nodes)), strategy)


def describe(resources: Mapping[str, float]) -> str:
    """``2 x H100, 1 CPU``: the resources that matter here, of a bundle or a node."""
    kinds = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    parts = []
    if gpus := resources.get("GPU"):
        parts.append(f"{gpus:g} x {'/'.join(kinds) or 'GPU'}")
    parts.append(f"{resources.get('CPU', 0.0):g} CPU")
    return ", ".join(parts)


def _holds(node: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(node.get(key, 0.0) >= amount for key, amount in bundle.items())


def unfit(entry: Deployment, nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why ``entry`` can never be placed on a cluster whose alive nodes have these total
    resources (``ray.nodes()[i]["Resources"]``), or None when it fits (perhaps later)."""
    placement = plan(entry)
    hw = entry.hardware
    if ray_executor(entry) and hw.gpu != "cpu":
        kind = _kind_key(entry)
        total = sum(n.get("GPU", 0.0) for n in nodes if n.get(kind))
        if total < hw.count:
            return (
                f"needs {hw.count} x {ACCELERATORS[hw.gpu]} in the Ray cluster for vLLM's "
                f"Ray executor; the cluster has {total:g}"
            )
    bundle = placement.bundles[0]
    if sum(_holds(n, bundle) for n in nodes) >= len(placement.bundles):
        return None
    shapes = Counter(describe(n) for n in nodes)
    have = "; ".join(f"{count} node(s) of {shape}" for shape, count in sorted(shapes.items()))
    where = "one node" if len(placement.bundles) == 1 else f"{len(placement.bundles)} nodes"
    return f"needs {describe(bundle)} on {where}; the Ray cluster has {have or 'no alive node'}"


def rank_args(rank: int, nodes: int, master_addr: str, master_port: int) -> list[str]:
    """The ``vllm serve`` arguments of node rank ``rank`` of a multi-node deployment."""
    args = ["--nnodes", str(nodes), "--node-rank", str(rank)]
    args += ["--master-addr", master_addr, "--master-port", str(master_port)]
    return args + (["--headless"] if rank else [])


# -- on the node: one actor per node rank ------------------------------------------------------


@dataclass(frozen=True)
class RankLaunch:
    """What one rank's actor starts. The API key travels here (an actor call's argument),
    and reaches vLLM in its environment: never on a command line."""

    entry: Deployment
    api_key: str | None
    startup_timeout: float
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    module: str | None = None
    serves_http: bool = True


@dataclass(frozen=True)
class RankResult:
    """What a rank's launch gave: its spec, and either the started server's figures or the
    start failure (an exception with vLLM's log would not survive pickling intact)."""

    spec: LaunchSpec
    port: int | None = None
    startup_seconds: float | None = None
    kv_cache: KvCacheInfo | None = None
    failure: str | None = None
    reason: FailureReason | None = None
    log_tail: str = ""


def _node_dir(run_tag: str) -> Path:
    """Where a node keeps the logs of one driver's servers until they are copied."""
    return Path(tempfile.gettempdir()) / "vllm-conformance-ray" / run_tag


class NodeServer:
    """One node rank of an entry's deployment: a :class:`VllmServer` on the actor's node."""

    def __init__(self, run_tag: str, name: str) -> None:
        self.run_tag = run_tag
        self.ip = ray.util.get_node_ip_address()
        self.log_path = _node_dir(run_tag) / f"{name}.log"
        self.server: VllmServer | None = None

    def where(self) -> dict[str, Any]:
        return {"node": self.ip, "gpus": [int(g) for g in ray.get_gpu_ids()]}

    def free_port(self) -> int:
        return free_port(self.ip)

    def launch(self, launch: RankLaunch) -> RankResult:
        spec = serving.launch_spec(launch.entry, None, launch.startup_timeout, launch.api_key)
        spec = dataclasses.replace(
            spec,
            host=self.ip,
            args=[*spec.args, *launch.args],
            env={**spec.env, **launch.env, RUN_TAG_VAR: self.run_tag},
            module=launch.module or spec.module,
        )
        self.server = VllmServer(spec, self.log_path, lifeline=True)
        if not launch.serves_http:
            self.server.spawn()
            return RankResult(spec)
        try:
            self.server.start()
        except ServerStartError as exc:
            return RankResult(spec, failure=exc.message, reason=exc.reason, log_tail=exc.log_tail)
        server = self.server
        return RankResult(spec, server.port, server.startup_seconds, server.kv_cache)

    def status(self, offset: int) -> tuple[int | None, bytes]:
        """The exit code (None while running) and the log from byte ``offset`` on."""
        proc = self.server.proc if self.server else None
        return (None if proc is None else proc.poll()), self.read_log(offset)

    def read_log(self, offset: int) -> bytes:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read()
        except OSError:
            return b""

    def stop(self, grace: float, offset: int) -> tuple[str | None, bytes]:
        """Stop the server; what survived (None: nothing) and the rest of the log, which
        is then removed from the node."""
        left = None
        if self.server is not None:
            try:
                self.server.stop(grace)
            except LeftoverProcessError as exc:
                left = str(exc)
        rest = self.read_log(offset)
        self.log_path.unlink(missing_ok=True)
        return left, rest


_NodeServerActor = ray.remote(NodeServer)


@ray.remote(num_cpus=0)
def _sweep(run_tag: str) -> tuple[list[int], list[int]]:
    """End this node's processes of the run and remove its logs there (what a rank could
    not hand back, its node having failed): (the PIDs found, those that survived)."""
    found = procs.tagged_pids(run_tag, var=RUN_TAG_VAR)
    left = procs.end_tagged(run_tag, var=RUN_TAG_VAR) if found else []
    shutil.rmtree(_node_dir(run_tag), ignore_errors=True)
    return found, left


# -- on the driver -------------------------------------------------------------------------------


def _cause(exc: BaseException) -> str:
    """The lines of a Ray error that say why, without its ids."""
    noise = ("class_name:", "actor_id:", "namespace:", "pid:", "name:", "ip:")
    lines = [line.strip() for line in str(exc).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(noise))


@dataclass
class _Rank:
    rank: int
    actor: Any
    node: str
    gpus: list[int]
    log_path: Path
    offset: int = 0
    spec: LaunchSpec | None = None

    def append(self, chunk: bytes) -> None:
        if chunk:
            with self.log_path.open("ab") as log:
                log.write(chunk)
            self.offset += len(chunk)


@dataclass(frozen=True)
class _Death:
    """A rank found gone: why, and whether its node (or the way to it) was lost."""

    rank: _Rank
    why: str
    node_lost: bool


class RayServer:
    """An entry's deployment on the Ray cluster, driven from here.

    What the ``server`` fixture sees (a :class:`~vllm_conformance.launch.serving.Server`):
    the endpoint, the KV capacity, the startup time, the log (rank 0's, copied from its
    node), liveness and stop.
    """

    def __init__(self, launcher: RayLauncher, entry: Deployment, log_path: Path) -> None:
        self.launcher = launcher
        self.entry = entry
        self.log_path = log_path
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self.kv_cache: KvCacheInfo | None = None
        self._endpoint: Endpoint | None = None
        self._group: Any = None
        self._ranks: list[_Rank] = []
        self._queued_seconds: float | None = None
        self._placed_at: float | None = None
        self._death: _Death | None = None
        self._stopped = False

    @property
    def placement(self) -> dict[str, Any]:
        return {
            "gpus": [r.gpus for r in self._ranks] or None,
            "nodes": [r.node for r in self._ranks],
            "queued_seconds": self._queued_seconds,
            "placed_at": self._placed_at,
            "placement_group": self._group_name,
        }

    @property
    def _group_name(self) -> str:
        return f"vllm-conformance-{self.launcher.tag[:12]}-{self.entry.id}"

    def command(self, port: int | None) -> list[str]:
        """Rank 0's command line (empty until the deployment was placed and launched)."""
        spec = self._ranks[0].spec if self._ranks else None
        return [] if spec is None else command(spec, port)

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise RuntimeError("server not started")
        return self._endpoint

    # -- start -------------------------------------------------------------------------------

    def start(self) -> Endpoint:
        """Wait for the entry's placement (the queue), launch every rank, and wait until
        rank 0 serves a real completion."""
        try:
            self._reserve()
            self._launch()
        except BaseException:
            # Start failed or was interrupted: end what was launched; a leftover would hide
            # behind the start failure, so it is reported with it.
            try:
                self.stop()
            except LeftoverProcessError as exc:
                raise ServerStartError(str(exc), None, tail(self.log_path)) from None
            raise
        return self.endpoint

    def _reserve(self) -> None:
        placement = plan(self.entry)
        self._group = placement_group(
            list(placement.bundles), placement.strategy, name=self._group_name
        )
        began = time.monotonic()
        ready, _ = ray.wait([self._group.ready()], timeout=0)
        if not ready:
            with self.launcher.progress.phase(self.entry.id, "waiting for a Ray placement") as wait:
                wait.note(f"free in the cluster: {self.launcher.free_summary()}")
                ready, _ = ray.wait([self._group.ready()], timeout=self.launcher.queue_timeout)
        self._queued_seconds = round(time.monotonic() - began, 3)
        self._placed_at = time.time() if ready else None
        if not ready:
            raise ServerStartError(
                f"not placed on the Ray cluster within {self.launcher.queue_timeout:.0f} s: "
                f"needs {describe(placement.bundles[0])} on {len(placement.bundles)} node(s) "
                f"({placement.strategy}); free in the cluster now: {self.launcher.free_summary()}",
                None,
                "",
            )
        for i, bundle in enumerate(placement.bundles):
            name = f"{self.entry.id}-rank{i}-{uuid.uuid4().hex[:8]}"
            actor = _NodeServerActor.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0.0),
                resources={k: v for k, v in bundle.items() if k.startswith("accelerator_type:")},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._group, placement_group_bundle_index=i
                ),
                # status and stop must answer while launch() waits for the server
                max_concurrency=4,
            ).remote(self.launcher.tag, name)
            where = ray.get(actor.where.remote())
            path = self.log_path if i == 0 else self.log_path.with_name(f"server.rank{i}.log")
            self._ranks.append(_Rank(i, actor, where["node"], where["gpus"], path))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def _launch(self) -> None:
        key = serving.api_key(self.entry)
        timeout = self.launcher.startup_timeout_for(self.entry)
        head = self._ranks[0]
        env = {"RAY_ADDRESS": self.launcher.gcs_address} if ray_executor(self.entry) else {}
        planned = estimate.startup_seconds(self.entry)
        with self.launcher.progress.phase(self.entry.id, "server start", planned_s=planned):
            if len(self._ranks) == 1:
                launch = RankLaunch(self.entry, key, timeout, env=env)
                result = ray.get(head.actor.launch.remote(launch))
            else:
                result = self._launch_ranks(key, timeout)
        head.spec = result.spec
        head.append(ray.get(head.actor.read_log.remote(head.offset)))
        if result.failure is not None:
            raise ServerStartError(
                f"{result.failure} (Ray node {head.node})", result.reason, result.log_tail
            )
        self.port, self.startup_seconds, self.kv_cache = (
            result.port,
            result.startup_seconds,
            result.kv_cache,
        )
        base_url = f"http://{head.node}:{self.port}"
        try:
            endpoint = connect(
                base_url, api_key=key, expected_model=self.entry.served_model_name, server=self
            )
        except EndpointError as exc:
            raise ServerStartError(
                f"started on Ray node {head.node}, but this driver cannot reach it: {exc}",
                None,
                tail(self.log_path),
            ) from None
        endpoint.kv_cache = self.kv_cache
        self._endpoint = endpoint

    def _launch_ranks(self, key: str | None, timeout: float) -> RankResult:
        """Followers first (headless, they wait for rank 0), then rank 0, watched: a
        follower that dies during start-up fails the start at once, not at the deadline."""
        head = self._ranks[0]
        master_port = ray.get(head.actor.free_port.remote())
        nodes = len(self._ranks)

        def launch(rank: _Rank) -> Any:
            return rank.actor.launch.remote(
                RankLaunch(
                    self.entry,
                    key,
                    timeout,
                    tuple(rank_args(rank.rank, nodes, head.node, master_port)),
                    {"VLLM_HOST_IP": rank.node},
                    SERVE_MODULE,
                    serves_http=rank.rank == 0,
                )
            )

        for rank in self._ranks[1:]:
            rank.spec = ray.get(launch(rank)).spec
        started = launch(head)
        while not ray.wait([started], timeout=5.0)[0]:
            for rank in self._ranks[1:]:
                if (death := self._rank_death(rank)) is not None:
                    lines = tail(rank.log_path, 400).splitlines()
                    raise ServerStartError(
                        f"{death.why} during start-up",
                        failure_reason(lines),
                        "\n".join(lines[-40:]),
                    )
        return ray.get(started)  # type: ignore[no-any-return]

    # -- liveness ----------------------------------------------------------------------------

    def _rank_death(self, rank: _Rank) -> _Death | None:
        """Why ``rank`` is gone, or None while it runs (its new log lines are copied)."""
        deadline = time.monotonic() + UNREACHABLE_S
        where = f"node rank {rank.rank} (Ray node {rank.node})"
        while True:
            try:
                code, chunk = ray.get(rank.actor.status.remote(rank.offset), timeout=10.0)
            except (ActorUnavailableError, GetTimeoutError) as exc:
                # The node may be restarting its connection, or dead and not yet declared so.
                if time.monotonic() > deadline:
                    why = f"{where} has not answered for {UNREACHABLE_S:.0f} s: {_cause(exc)}"
                    return _Death(rank, why, node_lost=True)
                time.sleep(1.0)
                continue
            except RayActorError as exc:
                return _Death(rank, f"the Ray actor of {where} died: {_cause(exc)}", True)
            rank.append(chunk)
            if code is None:
                return None
            return _Death(rank, f"vLLM {where} exited with code {code}", node_lost=False)

    def alive(self) -> bool:
        """Whether every rank still runs. Of several ranks gone, a lost node is the cause to
        report: the ranks on other nodes then fail for want of it."""
        if self._death is None:
            deaths = [d for rank in self._ranks if (d := self._rank_death(rank)) is not None]
            self._death = next((d for d in deaths if d.node_lost), next(iter(deaths), None))
        return self._death is None

    def death_message(self) -> str:
        death = self._death or _Death(self._ranks[0], "the deployment was stopped", False)
        path = death.rank.log_path
        return (
            f"{self.entry.id} on Ray: {death.why}\n"
            f"--- last lines of the server log ({path}) ---\n{tail(path)}"
        )

    # -- stop --------------------------------------------------------------------------------

    def stop(self, grace: float = 20.0) -> None:
        """Stop every rank (rank 0 first), then the actors and the placement group; raise
        if a process of the deployment survived."""
        if self._stopped:
            return
        self._stopped = True
        left = []
        for rank in self._ranks:
            try:
                survived, rest = ray.get(
                    rank.actor.stop.remote(grace, rank.offset), timeout=grace + 60.0
                )
            except (RayActorError, GetTimeoutError):
                # Its node is gone or cut off: the server's lifeline ended it there.
                continue
            rank.append(rest)
            if survived:
                left.append(f"node rank {rank.rank} (Ray node {rank.node}): {survived}")
        for rank in self._ranks:
            ray.kill(rank.actor, no_restart=True)
        if self._group is not None:
            remove_placement_group(self._group)
            self._group = None
        if left:
            raise LeftoverProcessError("; ".join(left))


class RayLauncher:
    """Servers of matrix entries placed on the Ray cluster at ``address``.

    Connects on first use (an xdist controller that collects nothing never does);
    ``queue_timeout`` bounds an entry's wait for its placement; ``startup_timeout`` None
    gives each entry the deadline of its model's size, as the local launcher does.
    """

    def __init__(
        self,
        address: str,
        startup_timeout: float | None,
        queue_timeout: float,
        progress: Progress | None = None,
    ) -> None:
        self.address = address
        self.startup_timeout = startup_timeout
        self.queue_timeout = queue_timeout
        self.progress = progress or Progress(None)
        self.tag = uuid.uuid4().hex
        self._nodes: list[dict[str, Any]] | None = None

    def _connect(self) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=False)

    def startup_timeout_for(self, entry: Deployment) -> float:
        if self.startup_timeout is not None:
            return self.startup_timeout
        return estimate.startup_timeout_seconds(entry)

    @property
    def gcs_address(self) -> str:
        self._connect()
        return str(ray.get_runtime_context().gcs_address)

    def nodes(self) -> list[dict[str, Any]]:
        """The alive nodes, as the session first saw them (placement decisions use it)."""
        if self._nodes is None:
            self._connect()
            self._nodes = [n for n in ray.nodes() if n["Alive"]]
        return self._nodes

    def free_summary(self) -> str:
        """What the cluster has free now, all nodes together."""
        return describe(ray.available_resources())

    def unavailable(self, entry: Deployment) -> str | None:
        return unfit(entry, [n["Resources"] for n in self.nodes()])

    def server(self, entry: Deployment, log_path: Path) -> RayServer:
        if (why := self.unavailable(entry)) is not None:
            raise RuntimeError(f"{entry.id}: {why}")
        return RayServer(self, entry, log_path)

    def sweep(self) -> dict[str, list[int]]:
        """End this launcher's processes on every alive node; the PIDs found, by node (a
        stopped server leaves none: what is found here escaped its teardown)."""
        if not ray.is_initialized():
            return {}
        calls = {
            n["NodeManagerAddress"]: _sweep.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(self.tag)
            for n in ray.nodes()
            if n["Alive"]
        }
        found = {}
        for node, call in calls.items():
            pids, survivors = ray.get(call, timeout=120.0)
            if survivors:
                raise LeftoverProcessError(
                    f"Ray node {node}: processes of this run survived the sweep: {survivors}"
                )
            if pids:
                found[node] = pids
        return found

    def close(self) -> None:
        """Sweep every node, then disconnect; raise if the sweep found anything."""
        try:
            found = self.sweep()
        finally:
            if ray.is_initialized():
                ray.shutdown()
        if found:
            raise LeftoverProcessError(
                f"processes of this run outlived their servers' teardown, ended now: {found}"
            )

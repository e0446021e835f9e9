"""Where rollout engines run: which ranks drive an engine, which SGLang servers each launches
on which GPUs and ports, and the lines `plan`, `launch --dry-run` and the trainer print about it.

`layout(cfg, ranks)` is a pure function of the rollout config and the job's ranks (`RankInfo`),
so the trainer (from the ranks it gathers at start-up, `gather_ranks`) and `plan` / `launch`
(from Megatron's rank order, `megatron_ranks`) lay out the same engines. `start_engine` builds
this rank's engine, if it drives one.

Placements (RolloutConfig.placement):
- node: the local rank 0 of every node drives one engine. Embedded: one HF model. SGLang: one
  server per sglang.tp_size GPUs of the node (server i on GPUs i*tp .. (i+1)*tp - 1), launched,
  put to sleep and stopped by that rank, which also pushes the weights to them (the colocated
  transport, CUDA IPC, reaches only GPUs of its own node). Server g of the job, counted node by
  node, listens on sglang.base_port + g and a node's router on sglang.router_port + node, so
  two "nodes" on one host do not collide. Each rank talks only to its own node's servers.
- dp_rank (embedded only): the first rank (tp, pp and cp rank 0) of every data-parallel
  replica, so every replica generates.
- rank0: global rank 0 alone, v1's layout (sglang.num_engines servers on its node).
- Servers given by URL (sglang.server_urls, also a rollout pool's, which the Slurm job passes
  in) and disaggregated SGLang in general are driven by rank 0, whatever the placement.

Every rank that drives an engine receives the full HF-named tensors from the collective export
(megatron/export.py yields the same buckets on every rank of a model-parallel group), so the
weights reach every engine without further communication; rollout/dispatch.py spreads the
samples over the engines.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rpg_megatron.config import ConfigError, RolloutConfig, SGLangConfig
from rpg_megatron.rollout.engine import Detokenizer, RolloutEngine, make_engine


@dataclass(frozen=True, slots=True, kw_only=True)
class RankInfo:
    """What the layout needs to know about one rank of the job."""

    rank: int
    """Global rank."""
    node: int
    """Node index in the job (torchrun's GROUP_RANK), 0-based."""
    local_rank: int
    """Rank on its node."""
    replica_first: bool
    """True on the first rank of a data-parallel replica (tp, pp and cp rank 0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Server:
    """One SGLang server a rank launches."""

    index: int
    """Index among all launched servers of the job, node by node."""
    local_index: int
    """Index among its node's servers (its GPUs start at local_index * tp_size)."""
    port: int
    """TCP port it listens on."""
    gpus: tuple[int, ...]
    """GPU indices on its node (--base-gpu-id is the first, --tp-size the count)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Engine:
    """One engine of the layout and the rank that drives it."""

    rank: int
    """Global rank that builds it, generates its share of each batch and scores it, loads its
    weights and puts it to sleep."""
    node: int
    """Node of that rank."""
    servers: tuple[Server, ...] = ()
    """SGLang servers that rank launches; () for the embedded engine and attached servers."""
    router_port: int | None = None
    """Port of the sglang-router the rank launches in front of several servers of its node."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Every engine of the job, in dispatch order (share e of a batch goes to engines[e])."""

    engines: tuple[Engine, ...]
    """At least one; engines[0] is driven by global rank 0."""
    kind: str
    """What the engines are, for messages: "embedded", "sglang" (launched) or "attached"."""
    placement: str
    """RolloutConfig.placement it was built from (or "rank0" where rank 0 drives attached
    servers whatever the setting)."""
    nodes: int
    """Nodes of the job."""
    attached: tuple[str, ...] = ()
    """URLs of attached servers (kind "attached")."""

    def engine_of(self, rank: int) -> Engine | None:
        """The engine `rank` drives, or None."""
        return next((e for e in self.engines if e.rank == rank), None)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The driving ranks in dispatch order."""
        return tuple(e.rank for e in self.engines)

    def describe(self, *, samples: int | None = None, chunk: int | None = None) -> list[str]:
        """Lines saying which rank drives which engine on which node (and GPUs and ports), and,
        given the samples per generation batch and the dispatch chunk, how a batch is split
        (the trainer logs them, `plan` and `launch --dry-run` print them)."""
        n = len(self.engines)
        lines = []
        if self.kind == "attached":
            lines.append(f"rank 0 drives the attached SGLang servers {', '.join(self.attached)}")
        elif self.kind == "embedded":
            where = {
                "node": "on the local rank 0 of each node",
                "dp_rank": "on the first rank of each data-parallel replica",
                "rank0": "on global rank 0",
            }[self.placement]
            ranks = ", ".join(f"rank {e.rank} (node {e.node})" for e in self.engines)
            lines.append(
                f"{n} embedded engine{'s' if n > 1 else ''} {where} "
                f"(placement={self.placement}): {ranks}"
            )
        else:
            total = sum(len(e.servers) for e in self.engines)
            lines.append(
                f"{total} SGLang server{'s' if total > 1 else ''} on "
                f"{n} node{'s' if n > 1 else ''} (placement={self.placement}); each node's "
                "driving rank launches its own, loads their weights and puts them to sleep"
            )
            for e in self.engines:
                servers = ", ".join(f"GPUs {_span(s.gpus)} :{s.port}" for s in e.servers)
                router = f", router :{e.router_port}" if e.router_port is not None else ""
                lines.append(f"  node {e.node} (rank {e.rank}): {servers}{router}")
        if samples is not None and chunk is not None and n > 1:
            sizes = [hi - lo for lo, hi in shares(samples, n, chunk)]
            lines.append(
                f"a generation batch's {samples} samples in shares of "
                f"{', '.join(map(str, sizes))} (cut at multiples of {chunk}), each scored by "
                "the rank that generated it, then gathered on every rank"
            )
            idle = sizes.count(0)
            if idle:
                what = (
                    "embedded_batch_size"
                    if self.kind == "embedded"
                    else "sglang.prompts_per_request"
                )
                lines.append(
                    f"warning: {idle} of the {n} engines get no samples; rollout.{what}="
                    f"{chunk} <= {samples // n} (samples / engines) would use every engine"
                )
        return lines


def _span(gpus: Sequence[int]) -> str:
    return str(gpus[0]) if len(gpus) == 1 else f"{gpus[0]}-{gpus[-1]}"


# ------------------------------------------------------------------------------- layout
def layout(cfg: RolloutConfig, ranks: Sequence[RankInfo]) -> Layout:
    """The engines of a job with these ranks; ConfigError when the placement cannot be laid
    out (servers that do not divide a node's GPUs, ports past 65535)."""
    _check_ranks(ranks)
    nodes = 1 + max(r.node for r in ranks)
    by_rank = {r.rank: r for r in ranks}
    sg = cfg.sglang
    if cfg.engine == "sglang" and sg.server_urls:
        return Layout(
            engines=(Engine(rank=0, node=by_rank[0].node),),
            kind="attached",
            placement="rank0",
            nodes=nodes,
            attached=tuple(sg.server_urls),
        )
    if cfg.engine == "sglang" and cfg.pool_nodes:
        raise ConfigError(
            f"rollout.pool_nodes={cfg.pool_nodes} but rollout.sglang.server_urls is empty: a "
            "rollout pool's servers are started by the Slurm job `rpg-megatron launch` renders, "
            "which passes their URLs to the trainer; launch the recipe, or set "
            "rollout.sglang.server_urls and router_url by hand"
        )
    placement = cfg.placement
    if cfg.engine == "sglang" and cfg.mode == "disaggregated":
        placement = "rank0"  # its servers need GPUs of their own: v1's launch on rank 0's node
    if placement == "rank0":
        drivers = [by_rank[0]]
    elif placement == "node":
        drivers = sorted((r for r in ranks if r.local_rank == 0), key=lambda r: r.node)
    else:
        drivers = sorted((r for r in ranks if r.replica_first), key=lambda r: r.rank)
    if cfg.engine == "embedded":
        engines = tuple(Engine(rank=r.rank, node=r.node) for r in drivers)
        return Layout(engines=engines, kind="embedded", placement=placement, nodes=nodes)
    return Layout(
        engines=_sglang_engines(cfg, drivers, ranks, placement),
        kind="sglang",
        placement=placement,
        nodes=nodes,
    )


def _sglang_engines(
    cfg: RolloutConfig, drivers: Sequence[RankInfo], ranks: Sequence[RankInfo], placement: str
) -> tuple[Engine, ...]:
    sg = cfg.sglang
    if placement == "rank0":
        counts = [sg.num_engines]
    else:
        per_node = [sum(r.node == d.node for r in ranks) for d in drivers]  # one rank per GPU
        counts = []
        for d, gpus in zip(drivers, per_node, strict=True):
            if gpus % sg.tp_size:
                raise ConfigError(
                    f"rollout.sglang.tp_size={sg.tp_size} does not divide the {gpus} GPUs of "
                    f"node {d.node} (one rank per GPU): placement=node runs one server per "
                    "tp_size GPUs; change tp_size or the GPUs per node"
                )
            count = gpus // sg.tp_size
            if sg.num_engines not in (1, count):
                raise ConfigError(
                    f"rollout.sglang.num_engines={sg.num_engines} with rollout.placement=node: "
                    f"node {d.node} runs one server per tp_size={sg.tp_size} of its {gpus} GPUs, "
                    f"{count}; leave num_engines at 1 or set it to {count}, or set "
                    "rollout.placement=rank0 to launch num_engines servers on rank 0's node"
                )
            counts.append(count)
    last = sg.base_port + sum(counts) - 1
    if last > 65535 or sg.router_port + len(drivers) - 1 > 65535:
        raise ConfigError(
            f"rollout.sglang.base_port={sg.base_port}, router_port={sg.router_port}: "
            f"{sum(counts)} servers on {len(drivers)} nodes need ports up to {last} and "
            f"{sg.router_port + len(drivers) - 1}; lower them"
        )
    engines, first = [], 0
    for d, count in zip(drivers, counts, strict=True):
        servers = tuple(
            Server(
                index=first + i,
                local_index=i,
                port=sg.base_port + first + i,
                gpus=tuple(range(i * sg.tp_size, (i + 1) * sg.tp_size)),
            )
            for i in range(count)
        )
        router = sg.router_port + d.node if count > 1 else None
        engines.append(Engine(rank=d.rank, node=d.node, servers=servers, router_port=router))
        first += count
    return tuple(engines)


def _check_ranks(ranks: Sequence[RankInfo]) -> None:
    if sorted(r.rank for r in ranks) != list(range(len(ranks))):
        raise ValueError(f"placement: ranks {[r.rank for r in ranks]} are not 0..{len(ranks) - 1}")
    nodes = sorted({r.node for r in ranks})
    if nodes != list(range(len(nodes))):
        raise ValueError(f"placement: node indices {nodes} are not 0..{len(nodes) - 1}")
    for node in nodes:
        local = sorted(r.local_rank for r in ranks if r.node == node)
        if local != list(range(len(local))):
            raise ValueError(f"placement: node {node} has local ranks {local}, not 0..")


def shares(n: int, engines: int, chunk: int) -> list[tuple[int, int]]:
    """[lo, hi) of each engine's contiguous share of n samples: the batch is cut into chunks of
    `chunk` samples (the last one shorter) and the chunks are dealt out in order, as evenly as
    whole chunks allow, the first engines taking the extra ones. An engine decoding chunk by
    chunk then sees exactly the decode batches one engine would see for the whole batch; with
    fewer chunks than engines the last engines get empty shares (`describe` says so)."""
    if n < 0 or engines < 1 or chunk < 1:
        raise ValueError(f"shares(n={n}, engines={engines}, chunk={chunk}): need n >= 0, >= 1")
    chunks = -(-n // chunk)
    bounds = [-(-e * chunks // engines) for e in range(engines + 1)]
    return [(min(lo * chunk, n), min(hi * chunk, n)) for lo, hi in itertools.pairwise(bounds)]


def dispatch_chunk(cfg: RolloutConfig) -> int:
    """Samples per dispatch chunk: the embedded engine's decode batch, or SGLang's request."""
    return cfg.embedded_batch_size if cfg.engine == "embedded" else cfg.sglang.prompts_per_request


def describe_pool(cfg: RolloutConfig, *, trainer_nodes: int, gpus_per_node: int) -> list[str]:
    """Lines about a rollout pool (rollout.pool_nodes) as the Slurm job starts it."""
    sg = cfg.sglang
    if gpus_per_node % sg.tp_size:
        raise ConfigError(
            f"rollout.sglang.tp_size={sg.tp_size} does not divide launch.gpus_per_node="
            f"{gpus_per_node}: each rollout-pool node runs one server per tp_size GPUs"
        )
    per = gpus_per_node // sg.tp_size
    first, last = trainer_nodes, trainer_nodes + cfg.pool_nodes - 1
    servers = ", ".join(
        f"GPUs {_span(range(i * sg.tp_size, (i + 1) * sg.tp_size))} :{sg.base_port + i}"
        for i in range(per)
    )
    return [
        f"rollout pool: job nodes {first}-{last} ({cfg.pool_nodes} after the {trainer_nodes} "
        f"trainer node{'s' if trainer_nodes > 1 else ''}), {per * cfg.pool_nodes} SGLang "
        f"servers, each node: {servers}",
        f"sglang-router on job node {first} :{sg.router_port} over all of them; trainer rank 0 "
        "attaches through it and broadcasts weights to every server by NCCL",
    ]


def job_lines(
    cfg: RolloutConfig, *, nodes: int, ranks_per_node: int, tp: int, pp: int, cp: int
) -> list[str]:
    """`describe` (or `describe_pool`) of a job of `nodes` x `ranks_per_node` ranks, laid out
    in Megatron's rank order, for `plan` and `launch`."""
    if cfg.pool_nodes:
        return describe_pool(cfg, trainer_nodes=nodes, gpus_per_node=ranks_per_node)
    ranks = megatron_ranks(nodes=nodes, ranks_per_node=ranks_per_node, tp=tp, pp=pp, cp=cp)
    samples = cfg.prompts_per_step * cfg.n_samples
    return layout(cfg, ranks).describe(samples=samples, chunk=dispatch_chunk(cfg))


# ------------------------------------------------------------------------------- ranks
def megatron_ranks(*, nodes: int, ranks_per_node: int, tp: int, pp: int, cp: int) -> list[RankInfo]:
    """The job's ranks as torchrun numbers them (node by node) and Megatron groups them:
    megatron-core 0.16.1 `initialize_model_parallel(order="tp-cp-ep-dp-pp")`, so tp varies
    fastest, then cp, then dp (ep = 1), pp slowest: rank r is tp/cp rank 0 when r is a multiple
    of tp * cp, and pp rank 0 when r < world / pp. For `plan` and `launch`; the trainer asks
    its own process groups instead (`gather_ranks`)."""
    world = nodes * ranks_per_node
    return [
        RankInfo(
            rank=r,
            node=r // ranks_per_node,
            local_rank=r % ranks_per_node,
            replica_first=r % (tp * cp) == 0 and r < world // pp,
        )
        for r in range(world)
    ]


def gather_ranks(*, rank: int, local_rank: int, replica_first: bool) -> list[RankInfo]:
    """Every rank's RankInfo, the same list on every rank (a collective when torch.distributed
    is initialised with several ranks). The node index is torchrun's GROUP_RANK."""
    import torch.distributed as dist

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    world = dist.get_world_size() if distributed else 1
    node = os.environ.get("GROUP_RANK")
    if node is None:  # not torchrun: one node, unless LOCAL_WORLD_SIZE says otherwise
        node = rank // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    mine = RankInfo(rank=rank, node=int(node), local_rank=local_rank, replica_first=replica_first)
    if not distributed:
        return [mine]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


# ------------------------------------------------------------------------------ engines
def start_engine(
    layout_: Layout,
    cfg: RolloutConfig,
    *,
    rank: int,
    hf_config: Mapping[str, Any],
    tokenizer: Detokenizer | None = None,
) -> RolloutEngine | None:
    """This rank's engine (None when it drives none): launched servers on its node's GPUs and
    ports; a rollout pool's servers once they answer /health (they start with the job).

    Collective: when an engine fails to start on any rank, every rank raises (the failing
    rank its own error, the others a RuntimeError naming it) and the engines that did start
    are shut down; a rank left waiting in the first weight export would hang instead."""
    import torch.distributed as dist

    engine, error = None, None
    try:
        engine = _start(layout_, cfg, rank=rank, hf_config=hf_config, tokenizer=tokenizer)
    except Exception as e:
        error = e
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return engine
    problems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, None if error is None else f"{type(error).__name__}: {error}")
    failed = next(((r, p) for r, p in enumerate(problems) if p is not None), None)
    if failed is None:
        return engine
    if engine is not None:
        engine.shutdown()
    if error is not None:
        raise error
    raise RuntimeError(f"rollout: the engine of rank {failed[0]} did not start: {failed[1]}")


def _start(
    layout_: Layout,
    cfg: RolloutConfig,
    *,
    rank: int,
    hf_config: Mapping[str, Any],
    tokenizer: Detokenizer | None,
) -> RolloutEngine | None:
    me = layout_.engine_of(rank)
    if me is None:
        return None
    if layout_.kind == "attached" and cfg.pool_nodes:
        sg = cfg.sglang
        wait_healthy([*sg.server_urls, *([sg.router_url] if sg.router_url else [])], sg)
        if sg.nccl_master_address in ("127.0.0.1", "localhost"):
            # The pool's servers join the weight broadcast from other nodes, so they need this
            # rank's own address; which trainer node hosts rank 0 is known only here.
            cfg = replace(cfg, sglang=replace(sg, nccl_master_address=socket.getfqdn()))
    if layout_.kind == "sglang" and layout_.placement == "node":
        first = me.servers[0]
        # Server i of this node: port base_port + i and GPUs i*tp.. in sglang_protocol's
        # server_argv, so shift base_port to this node's first server.
        node_sglang = replace(
            cfg.sglang,
            num_engines=len(me.servers),
            base_port=first.port,
            router_port=me.router_port or cfg.sglang.router_port,
        )
        cfg = replace(cfg, sglang=node_sglang)
    return make_engine(cfg, hf_config=hf_config, tokenizer=tokenizer)


def wait_healthy(urls: Sequence[str], sg: SGLangConfig, *, poll_s: float = 2.0) -> None:
    """Until every URL answers GET /health, at most sglang.launch_timeout_s seconds in all;
    TimeoutError naming those that did not."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + sg.launch_timeout_s
    pending = list(urls)
    while pending:
        pending = [u for u in pending if not _answers(opener, u.rstrip("/") + "/health", sg)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"SGLang at {', '.join(pending)} did not answer /health within "
                f"rollout.sglang.launch_timeout_s={sg.launch_timeout_s} (host "
                f"{socket.gethostname()}); see the servers' logs, or raise the timeout"
            )
        time.sleep(poll_s)


def _answers(opener: Any, url: str, sg: SGLangConfig) -> bool:
    try:
        with opener.open(url, timeout=sg.health_timeout_s) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False

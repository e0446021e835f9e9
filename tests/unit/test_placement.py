"""rollout/placement.py without servers: which ranks drive engines, which servers they launch on
which GPUs and ports (checked through the command line sglang_protocol would run), how a batch
is cut into shares, and the rank order plan/launch assume (against Megatron's own
RankGenerator)."""

from __future__ import annotations

import itertools
import re

import pytest
from megatron.core.parallel_state import RankGenerator

from rpg_megatron.config import ConfigError, RolloutConfig, SGLangConfig
from rpg_megatron.rollout import placement
from rpg_megatron.rollout.placement import RankInfo, layout, megatron_ranks, shares
from rpg_megatron.rollout.sglang_protocol import server_argv


def _ranks(nodes: int, per_node: int, *, tp: int = 1, pp: int = 1, cp: int = 1) -> list[RankInfo]:
    return megatron_ranks(nodes=nodes, ranks_per_node=per_node, tp=tp, pp=pp, cp=cp)


def _sglang(**kw) -> RolloutConfig:
    sg = {"model_path": "/m", **kw.pop("sglang", {})}
    return RolloutConfig(engine="sglang", sglang=SGLangConfig(**sg), **kw)


@pytest.mark.parametrize(
    ("tp", "pp", "cp"), [(1, 1, 1), (2, 1, 1), (2, 2, 1), (1, 2, 2), (4, 2, 1)]
)
def test_replica_first_ranks_are_megatrons_dp_group_of_rank0(tp, pp, cp):
    world = 16
    dp = world // (tp * pp * cp)
    groups = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp").get_ranks("dp")
    (of_rank0,) = [g for g in groups if 0 in g]  # the ranks whose tp, cp and pp ranks are 0
    ranks = _ranks(2, 8, tp=tp, pp=pp, cp=cp)
    assert [r.rank for r in ranks if r.replica_first] == sorted(of_rank0)


def test_embedded_placements():
    ranks = _ranks(2, 4, tp=2)  # ranks 0-3 on node 0, 4-7 on node 1, replicas (0,1) (2,3) ...
    node = layout(RolloutConfig(placement="node"), ranks)
    assert [(e.rank, e.node) for e in node.engines] == [(0, 0), (4, 1)]
    assert node.engine_of(4) is not None and node.engine_of(1) is None
    assert layout(RolloutConfig(placement="dp_rank"), ranks).ranks == (0, 2, 4, 6)
    assert layout(RolloutConfig(placement="rank0"), ranks).ranks == (0,)
    assert all(not e.servers for e in node.engines)
    text = "\n".join(node.describe(samples=64, chunk=64))
    assert "shares of 64, 0" in text
    assert (
        "warning: 1 of the 2 engines get no samples; rollout.embedded_batch_size=64 <= 32" in text
    )


def test_sglang_one_server_per_tp_gpus_on_every_node(monkeypatch):
    cfg = _sglang(sglang={"tp_size": 2, "base_port": 31000, "router_port": 31100})
    lay = layout(cfg, _ranks(2, 8))
    assert lay.ranks == (0, 8)  # each node's local rank 0
    gpus = [(0, 1), (2, 3), (4, 5), (6, 7)]
    for node, engine in enumerate(lay.engines):
        assert [s.gpus for s in engine.servers] == gpus
        assert [s.port for s in engine.servers] == [31000 + 4 * node + i for i in range(4)]
        assert engine.router_port == 31100 + node
    # What the node's rank launches: start_engine's config through sglang_protocol.server_argv.
    seen = []
    monkeypatch.setattr(placement, "make_engine", lambda c, **_: seen.append(c) or "engine")
    assert placement.start_engine(lay, cfg, rank=8, hf_config={}) == "engine"
    assert placement.start_engine(lay, cfg, rank=3, hf_config={}) is None
    (node1,) = seen
    assert node1.sglang.num_engines == 4 and node1.sglang.router_port == 31101
    for server in lay.engines[1].servers:
        argv = server_argv(node1.sglang, server.local_index, python="python")
        assert argv[argv.index("--port") + 1] == str(server.port)
        assert argv[argv.index("--base-gpu-id") + 1] == str(server.gpus[0])
        assert argv[argv.index("--tp-size") + 1] == "2"
    text = "\n".join(lay.describe(samples=8192, chunk=32))
    assert "8 SGLang servers on 2 nodes" in text
    assert "node 1 (rank 8): GPUs 0-1 :31004, GPUs 2-3 :31005" in text
    assert "shares of 4096, 4096" in text


def test_sglang_rank0_attached_and_disaggregated_are_driven_by_rank0():
    ranks = _ranks(2, 8)
    v1 = layout(_sglang(placement="rank0", sglang={"num_engines": 3}), ranks)
    assert v1.ranks == (0,) and [s.gpus for s in v1.engines[0].servers] == [(0,), (1,), (2,)]
    urls = ("http://a:1", "http://b:2")
    attached = layout(_sglang(sglang={"server_urls": urls}), ranks)
    assert attached.ranks == (0,) and attached.kind == "attached" and attached.attached == urls
    dis = layout(_sglang(mode="disaggregated", sglang={"weight_sync": "distributed"}), ranks)
    assert dis.ranks == (0,)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (_sglang(sglang={"tp_size": 3}), "tp_size=3 does not divide the 8 GPUs of node 0"),
        (_sglang(sglang={"num_engines": 3}), "num_engines=3 with rollout.placement=node"),
        (_sglang(sglang={"base_port": 65530}), "need ports up to 65545"),
    ],
)
def test_layouts_that_cannot_be_placed(cfg, match):
    with pytest.raises(ConfigError, match=match):
        layout(cfg, _ranks(2, 8))


def test_config_refuses_placements_that_mean_nothing():
    with pytest.raises(
        ConfigError, match=re.escape("placement='dp_rank' with rollout.engine='sglang'")
    ):
        _sglang(placement="dp_rank")
    with pytest.raises(ConfigError, match="valid placements are node, dp_rank, rank0"):
        RolloutConfig(placement="everywhere")
    with pytest.raises(ConfigError, match=re.escape("pool_nodes=2 with rollout.mode='colocated'")):
        _sglang(pool_nodes=2)
    pool = _sglang(mode="disaggregated", pool_nodes=2, sglang={"weight_sync": "distributed"})
    with pytest.raises(ConfigError, match="server_urls is empty"):
        layout(pool, _ranks(1, 8))


def test_shares_are_contiguous_chunk_aligned_and_even():
    for n, engines, chunk in itertools.product(range(0, 70), (1, 2, 3, 5), (1, 4, 16)):
        got = shares(n, engines, chunk)
        assert len(got) == engines
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(got))  # contiguous, in order
        assert all(lo % chunk == 0 or lo == hi == n for lo, hi in got)  # cut at chunk bounds
        chunks = [-(-(hi - lo) // chunk) for lo, hi in got]
        assert max(chunks) - min(chunks) <= 1  # whole chunks dealt out evenly
    assert shares(256, 2, 64) == [(0, 128), (128, 256)]
    assert shares(100, 3, 32) == [(0, 64), (64, 96), (96, 100)]  # 4 chunks: 2, 1, 1
    assert shares(64, 2, 64) == [(0, 64), (64, 64)]  # one chunk: rank 0's engine takes it


def test_node_index_comes_from_torchrun(monkeypatch):
    monkeypatch.setenv("GROUP_RANK", "3")
    (me,) = placement.gather_ranks(rank=0, local_rank=0, replica_first=True)
    assert me.node == 3
    monkeypatch.delenv("GROUP_RANK")
    (me,) = placement.gather_ranks(rank=0, local_rank=0, replica_first=True)
    assert me.node == 0

"""SGLangEngine against a fake SGLang HTTP server that mirrors sglang 0.5.23's rules.

Independent truth: tests/fixtures/sglang_schemas.json is dumped from sglang 0.5.23 itself
(tools/check_sglang_schemas.py: dataclass / msgspec fields of its io_struct request classes and
the generated /generate sampling-params contract), not from our code, and every body we send is
checked against it. The fake (fake_sglang.py) follows sglang's source, each rule citing the file
and line it comes from (FakeSGLang's docstring); the same behaviours are seen on real servers in
tests/sglang/ where a CPU can run them (sleep/wake cannot: sglang's release_memory_occupation
synchronises a CUDA device, weight_updater.py 379). Completions follow a rule written here (token
k of prompt p is (p[-1] + k + 1) % 100, log-prob -(k + 1) / 10), so the expected Completions come
from the rule, not from the client.

Launch and restart use a fake `python` (a script written per test) that answers the version
probe and serves fake_sglang.py on --port; no sglang, no GPU.
"""

from __future__ import annotations

import base64
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rpg_megatron.batch import SamplingParams
from rpg_megatron.config import ConfigError, RolloutConfig, SGLangConfig
from rpg_megatron.rollout import sglang as sg
from rpg_megatron.rollout import sglang_weights
from tests.unit.fake_sglang import (
    ALL_TAGS,
    BODY_CLASS,
    HF,
    SCHEMAS,
    TENSOR_GLOBALS,
    FakeSGLang,
    expected_tokens,
    schema_errors,
)


def test_fixture_comes_from_sglang_and_schema_check_bites() -> None:
    assert set(SCHEMAS) == {*BODY_CLASS.values(), "SamplingParams"}
    assert SCHEMAS["InitWeightsUpdateGroupReqInput"]["master_port"]["required"]
    assert schema_errors({"input_ids": [[1]], "sampling_params": [{"seed": 1}]}, "GenerateReqInput")
    assert schema_errors({"input_ids": "x"}, "GenerateReqInput")
    assert schema_errors({"master_address": "a"}, "InitWeightsUpdateGroupReqInput")
    assert schema_errors({"tags": "weights"}, "ReleaseMemoryOccupationReqInput")


@pytest.fixture
def fake():
    server = FakeSGLang()
    yield server
    server.close()
    assert not server.errors, server.errors  # every body we sent fits sglang's schema
    assert server.crashed is None, server.crashed


def _sps(body: dict) -> list[dict]:
    """sampling_params of a /generate body as a list (a single dict serves the whole batch)."""
    sps = body["sampling_params"]
    return sps if isinstance(sps, list) else [sps] * len(body["input_ids"])


def _attach(fake: FakeSGLang, **kw) -> sg.SGLangEngine:
    cfg = SGLangConfig(server_urls=(fake.url,), health_timeout_s=2, retries=0, **kw)
    return sg.SGLangEngine(RolloutConfig(engine="sglang"), hf_config=HF, sglang=cfg)


BUCKETS = [[("a.weight", torch.ones(2, 3))], [("b.weight", torch.zeros(4)), ("c", torch.ones(1))]]


# ---------------------------------------------------------------------------------- generate
def test_generate_end_to_end(fake) -> None:
    engine = _attach(fake, prompts_per_request=4, max_concurrency=3, deterministic=True)
    with pytest.raises(RuntimeError, match="no weights loaded"):
        engine.generate([[1]], SamplingParams())
    engine.update_weights(BUCKETS, version=7)
    prompts = [[i % 97 + 1, i % 13] for i in range(10)] + [[99, 1]]
    params = SamplingParams(max_new_tokens=5, stop_token_ids=(3,), top_k=None, seed=11)
    out = engine.generate(prompts, params)

    assert [c.prompt_index for c in out] == list(range(11))
    for p, c in zip(prompts, out, strict=True):
        tokens, kind = expected_tokens(p, {"max_new_tokens": 5, "stop_token_ids": [3]})
        assert c.token_ids == tokens and c.finish_reason == kind and c.weight_version == 7
        assert c.logprobs == pytest.approx([-(k + 1) / 10 for k in range(len(tokens))])
    assert {c.finish_reason for c in out} == {"stop", "length", "abort"}

    gens = [b for path, b in fake.requests if path == "/generate"]
    assert sorted(len(b["input_ids"]) for b in gens) == [3, 4, 4]  # batched chunks, concurrent
    sps = [sp for b in gens for sp in _sps(b)]
    assert all(sp["top_k"] == -1 and sp["max_new_tokens"] == 5 for sp in sps)
    assert all(b["return_logprob"] is True for b in gens)
    seeds = [sp["sampling_seed"] for sp in sps]
    assert len(set(seeds)) == 11 and all(0 <= s < 2**63 for s in seeds)
    engine.shutdown()


def test_seeds_depend_on_prompt_index_not_chunking(fake) -> None:
    seeds = []
    for n in (1, 3, 32):  # max_concurrency=1: requests in order
        engine = _attach(fake, prompts_per_request=n, max_concurrency=1, deterministic=True)
        engine.update_weights(BUCKETS, version=0)
        fake.requests.clear()
        engine.generate([[5]] * 6, SamplingParams(max_new_tokens=1, seed=4))
        sps = [sp for p, b in fake.requests if p == "/generate" for sp in _sps(b)]
        seeds.append([sp["sampling_seed"] for sp in sps])
    assert seeds[0] == seeds[1] == seeds[2] and len(set(seeds[0])) == 6
    engine.generate([[5]], SamplingParams(max_new_tokens=1))  # no seed -> none sent
    assert "sampling_seed" not in fake.requests[-1][1]["sampling_params"]


def test_seeds_only_for_deterministic_servers_and_one_prompt_per_routed_request(fake) -> None:
    """sglang reads sampling_seed only under --enable-deterministic-inference (sampling_batch_info
    .py 157-172): otherwise the batch shares one sampling_params dict, the only form
    sglang-router takes (R1). Seeded requests through a router carry one prompt each."""
    engine = _attach(fake, prompts_per_request=8)
    engine.update_weights(BUCKETS, version=0)
    engine.generate([[5]] * 3, SamplingParams(max_new_tokens=1, seed=4))
    body = fake.requests[-1][1]
    assert len(body["input_ids"]) == 3 and "sampling_seed" not in body["sampling_params"]
    router = FakeSGLang(router=fake)
    try:
        cfg = SGLangConfig(
            server_urls=(fake.url,), router_url=router.url, deterministic=True, retries=0
        )
        engine = sg.SGLangEngine(RolloutConfig(engine="sglang"), hf_config=HF, sglang=cfg)
        engine.update_weights(BUCKETS, version=0)
        out = engine.generate([[5], [6], [7]], SamplingParams(max_new_tokens=2, seed=4))
        assert [c.token_ids for c in out] == [[6, 7], [7, 8], [8, 9]]
        gens = [b for p, b in router.requests if p == "/generate"]
        assert [len(b["input_ids"]) for b in gens] == [1, 1, 1]
        assert len({b["sampling_params"]["sampling_seed"] for b in gens}) == 3
    finally:
        router.close()
    assert not router.errors, router.errors


# ---------------------------------------------------------------------------------- weights
def test_update_runs_in_a_session_with_one_payload_per_rank(fake) -> None:
    """Finding 1: sglang 0.5.23 refuses tensor updates outside a session (rule S1), so this
    failed with HTTP 400 before the engine opened one. The fake decodes each of the tp_size
    entries (T1) and gets the tensors back."""
    fake.tp_size = 2
    engine = _attach(fake, tp_size=2)
    engine.update_weights(BUCKETS, version=3)
    assert fake.paths() == [
        "/begin_weight_update",
        "/update_weights_from_tensor",
        "/update_weights_from_tensor",
        "/end_weight_update",
    ]
    ups = [b for p, b in fake.requests if p == "/update_weights_from_tensor"]
    assert [b["flush_cache"] for b in ups] == [False, True]  # flush once, after the last
    assert all(b["weight_version"] == "3" and len(b["serialized_named_tensors"]) == 2 for b in ups)
    assert sorted(fake.loaded) == ["a.weight", "b.weight", "c"]
    assert torch.equal(fake.loaded["a.weight"], torch.ones(2, 3))
    assert torch.equal(fake.loaded["b.weight"], torch.zeros(4))
    assert not fake.session and engine.generate([[1]], SamplingParams(max_new_tokens=1))
    engine.flush_cache()
    assert fake.paths()[-1] == "/flush_cache"


def test_a_session_left_open_is_closed_and_a_failed_update_closes_its_own(fake, monkeypatch):
    """S2: a trainer that died mid-update leaves its session open and the next begin is refused;
    the engine closes it and starts its own. A refused bucket (the loader rejects a name)
    raises ValueError, leaves the engine without weights, and still ends the session."""
    fake.session = True
    engine = _attach(fake)
    engine.update_weights(BUCKETS, version=1)
    begin, end = "/begin_weight_update", "/end_weight_update"
    assert fake.paths()[:3] == [begin, end, begin]
    orig = fake.load
    monkeypatch.setattr(fake, "load", lambda what, v: (400, {"success": False, "message": "zzz"}))
    with pytest.raises(ValueError, match=r"update_weights_from_tensor refused.*zzz"):
        engine.update_weights(BUCKETS, version=2)
    assert not fake.session and fake.paths()[-1] == "/end_weight_update"
    with pytest.raises(RuntimeError, match="no weights loaded"):
        engine.generate([[1]], SamplingParams())
    monkeypatch.setattr(fake, "load", orig)
    engine.update_weights(BUCKETS, version=4)
    assert engine.generate([[1]], SamplingParams(max_new_tokens=1))[0].weight_version == 4


def test_unknown_names_and_wrong_shapes_are_refused_before_sending(fake) -> None:
    """sglang 0.5.23's Qwen3 loader skips a name the model lacks with a log warning
    (srt/models/qwen3.py 752-759; seen on a real server in tests/sglang), so the engine checks
    names and shapes against hf_config's model itself, before anything is sent."""
    from rpg_megatron.tiny import tiny_hf_config

    cfg = SGLangConfig(server_urls=(fake.url,), retries=0)
    engine = sg.SGLangEngine(
        RolloutConfig(engine="sglang"), hf_config=tiny_hf_config(27), sglang=cfg
    )
    with pytest.raises(ValueError, match=r"version=1\): 'a\.weight' is not a tensor of this model"):
        engine.update_weights(BUCKETS, version=1)
    wrong = [[("lm_head.weight", torch.zeros(27, 63))]]
    with pytest.raises(ValueError, match=r"lm_head\.weight has shape \(27, 63\).*\(27, 64\)"):
        engine.update_weights(wrong, version=2)
    assert "/update_weights_from_tensor" not in fake.paths()
    engine.update_weights([[("lm_head.weight", torch.zeros(27, 64))]], version=3)
    assert torch.equal(fake.loaded["lm_head.weight"], torch.zeros(27, 64))


def test_serialised_once_per_tp_rank_and_server(monkeypatch) -> None:
    """Finding 7: each TP rank of each server gets its own serialization (a CUDA IPC dump
    registers one reference per dump; tp_worker.py 194-201). Before, one blob was repeated for
    every rank and every server: 1 dump per bucket instead of tp_size x servers."""
    servers = [FakeSGLang(tp_size=2), FakeSGLang(tp_size=2)]
    calls: list[list[str]] = []
    real = sglang_weights.serialize_named_tensors

    def counting(bucket):
        calls.append([n for n, _ in bucket])
        return real(bucket)

    monkeypatch.setattr(sglang_weights, "serialize_named_tensors", counting)
    try:
        cfg = SGLangConfig(server_urls=tuple(s.url for s in servers), tp_size=2, retries=0)
        engine = sg.SGLangEngine(RolloutConfig(engine="sglang"), hf_config=HF, sglang=cfg)
        engine.update_weights(BUCKETS, version=0)
        assert calls == [["a.weight"]] * 4 + [["b.weight", "c"]] * 4  # 2 buckets x 2 x 2
        assert all(sorted(s.loaded) == ["a.weight", "b.weight", "c"] for s in servers)
    finally:
        for s in servers:
            s.close()
        assert not any(s.errors for s in servers), [s.errors for s in servers]


def test_cpu_tensors_go_as_file_system_shared_memory() -> None:
    """Finding 5: CPU tensors are pickled under torch's file_system strategy (a named /dev/shm
    segment any local process can open), whatever the process-wide strategy is, which is
    restored afterwards. The default file-descriptor strategy sends a socket handle that a
    separately launched server cannot fetch (AuthenticationError; on CPU the server dies)."""
    import torch.multiprocessing as mp

    assert mp.get_sharing_strategy() == "file_descriptor"  # Linux default: the bad one
    payload = base64.b64decode(sglang_weights.per_rank_payloads(BUCKETS[1], 1)[0])
    assert b"rebuild_storage_filename" in payload
    assert b"rebuild_storage_fd" not in payload and b"DupFd" not in payload
    assert mp.get_sharing_strategy() == "file_descriptor"
    # The default strategy, for contrast, is what the fake's T1 rule refuses:
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump([(n, t.clone()) for n, t in BUCKETS[1]])
    fake = FakeSGLang()
    try:
        err = fake.decode_tensors([base64.b64encode(buf.getvalue()).decode()])
        assert err is not None and "rebuild_storage_fd" in err
    finally:
        fake.close()


def test_the_shared_memory_manager_inherits_no_pipes() -> None:
    """The first file_system share starts torch_shm_manager, which outlives the process while a
    server holds a segment. It must not inherit this process's inheritable pipes: a parent
    waiting for EOF on one (multiprocessing's Process.join) would wait for the server.
    In a fresh process: an inheritable pipe, a dump (the manager starts), close our write end:
    the read end must see EOF at once."""
    code = (
        "import os, select, torch\n"
        "from rpg_megatron.rollout import sglang_weights\n"
        "r, w = os.pipe()\n"
        "os.set_inheritable(w, True)\n"
        "sglang_weights.per_rank_payloads([('t', torch.ones(3))], 1)\n"
        "assert os.get_inheritable(w)\n"  # restored afterwards
        "os.close(w)\n"
        "ready, _, _ = select.select([r], [], [], 10)\n"
        "assert ready and os.read(r, 1) == b'', 'the pipe is held open by another process'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_trainer_never_imports_sglang(fake, monkeypatch) -> None:
    """Finding 3: the colocated transport used to import sglang.srt.utils in this process;
    sglang pins torch==2.14.1, so the trainer's environment cannot have it. With `sglang`
    unimportable, a tensor update still works."""
    monkeypatch.setitem(sys.modules, "sglang", None)  # `import sglang` raises ImportError
    engine = _attach(fake)
    engine.update_weights(BUCKETS, version=2)
    assert torch.equal(fake.loaded["c"], torch.ones(1))


def test_import_is_lazy() -> None:
    code = (
        "import sys, torch.distributed as dist\n"
        "import rpg_megatron.rollout.sglang\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sglang', 'sglang_router')]\n"
        "assert not bad, bad\n"
        "assert not dist.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_export_goes_out_in_the_engine_dtype(single_rank) -> None:
    """Finding 6: the trainer exported float32 to bfloat16 servers (twice the bytes over
    IPC/NCCL and in the relaunch copy). The export now casts to rollout.sglang.dtype."""
    from rpg_megatron import train
    from rpg_megatron.config import Config, ModelConfig, OptimConfig, ParallelConfig
    from rpg_megatron.megatron import step
    from rpg_megatron.megatron.arch import read_hf_config
    from rpg_megatron.tiny import tiny_hf_config

    sglang_cfg = Config(rollout=RolloutConfig(engine="sglang"))
    assert train._engine_dtype(sglang_cfg) == torch.bfloat16  # SGLangConfig.dtype's default
    assert train._engine_dtype(Config()) == torch.float32  # the embedded engine's
    policy = step.build_policy(
        arch=read_hf_config(tiny_hf_config(27)),
        model_cfg=ModelConfig(dtype="float32"),
        par=ParallelConfig(),
        optim_cfg=OptimConfig(),
        ctx=single_rank,
    )

    class Recorder:
        def update_weights(self, buckets, version):
            self.dtypes = {t.dtype for b in buckets for _, t in b}

    engine = Recorder()
    train._sync_weights(policy, engine, version=0, dtype=train._engine_dtype(sglang_cfg))
    assert engine.dtypes == {torch.bfloat16}


# ---------------------------------------------------------------------------------- sleep/wake
def test_sleep_releases_the_weights_and_an_update_resumes_them_first(fake) -> None:
    """Finding 2: sleep releases every tag, the weights included (M1); train then syncs while
    the engine sleeps. Before, the push went into released weights and the fake's scheduler
    died (M2). Now: resume `weights`, push in a session, and wake resumes the rest."""
    engine = _attach(fake)
    engine.update_weights(BUCKETS, version=1)
    fake.requests.clear()
    engine.sleep()
    assert fake.released == set(ALL_TAGS)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], SamplingParams())
    engine.update_weights(BUCKETS, version=2)
    assert fake.released == {"kv_cache", "cuda_graph"}
    engine.wake()
    assert not fake.released
    assert fake.paths() == [
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/begin_weight_update",
        "/update_weights_from_tensor",
        "/update_weights_from_tensor",
        "/end_weight_update",
        "/resume_memory_occupation",
    ]
    assert fake.requests[1][1] == {"tags": ["weights"]}
    assert fake.requests[-1][1] == {"tags": ["cuda_graph", "kv_cache"]}
    out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=3))[0]
    assert out.token_ids == [3, 4, 5] and out.weight_version == 2  # the rule, not garbage (M3)


def test_a_wake_without_an_update_has_no_weights_unless_kept(fake) -> None:
    """Finding 2 (docstring): "the weights are those before sleep" was false. Attached servers
    keep no copy: after sleep + wake alone, generate raises instead of serving garbage (M3)."""
    engine = _attach(fake)
    engine.update_weights(BUCKETS, version=1)
    engine.sleep()
    engine.wake()
    assert not fake.released
    with pytest.raises(RuntimeError, match="no weights loaded"):
        engine.generate([[1]], SamplingParams())


def test_health_while_asleep_does_not_generate(fake) -> None:
    """Finding 4: 0.5.23's /health generates a token (H1); probing a sleeping server with it
    ran a generation on a released KV cache (M2). Asleep servers get /ready now."""
    engine = _attach(fake)
    engine.update_weights(BUCKETS, version=0)
    engine.sleep()
    assert engine.health() and fake.paths()[-1] == "/ready"
    engine.wake()
    assert engine.health() and fake.paths()[-1] == "/health_generate"


def test_cpu_servers_neither_sleep_nor_wake(fake) -> None:
    """device=cpu: sglang's release_memory_occupation synchronises a CUDA device (weight_updater
    .py 379) and kills a CPU scheduler, so sleep/wake send nothing; generate still refuses
    while asleep, as on GPUs."""
    engine = _attach(fake, device="cpu")
    engine.update_weights(BUCKETS, version=0)
    n = len(fake.requests)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], SamplingParams())
    engine.update_weights(BUCKETS, version=1)
    engine.wake()
    assert "/release_memory_occupation" not in fake.paths()[n:]
    assert engine.generate([[1]], SamplingParams(max_new_tokens=1))[0].weight_version == 1


# ---------------------------------------------------------------------------------- config
def test_attached_refuses_tempered_logprobs(fake) -> None:
    engine = _attach(fake)
    engine.update_weights(BUCKETS, version=0)
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        engine.generate([[1]], SamplingParams(temperature=0.7))
    engine = _attach(fake, attached_original_logprobs=True)
    engine.update_weights(BUCKETS, version=0)
    assert engine.generate([[1]], SamplingParams(temperature=0.7, max_new_tokens=2))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"sglang\.router_url"):
        SGLangConfig(router_url="http://r:1")
    with pytest.raises(ValueError, match=r"sglang\.weight_sync='nccl'"):
        SGLangConfig(model_path="/m", weight_sync="nccl")
    with pytest.raises(ConfigError, match=r"sglang\.deterministic=true with device=cpu.*Triton"):
        SGLangConfig(model_path="/m", device="cpu", deterministic=True)
    with pytest.raises(ConfigError, match=r"sglang\.max_total_tokens=-1"):
        SGLangConfig(model_path="/m", max_total_tokens=-1)
    with pytest.raises(
        ValueError, match=r"rollout\.sglang\.server_urls .* or rollout\.sglang\.model_path"
    ):
        sg.SGLangEngine(RolloutConfig(engine="sglang"), hf_config=HF)


# ---------------------------------------------------------------------------------- failures
def test_attached_dead_server_raises_clearly() -> None:
    server = FakeSGLang()
    engine = _attach(server)
    engine.update_weights(BUCKETS, version=0)
    server.close()
    with pytest.raises(RuntimeError, match=rf"{server.url}.*attached.*restart them"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))


def _fake_python(tmp_path: Path, mode: str = "serve") -> str:
    """An executable standing in for `python`: the version probe, then this file's server."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, time\n"
        "if sys.argv[1] == '-c':\n"
        f"    print({'0.4.9' if mode == 'old' else '0.5.23'!r}); sys.exit(0)\n"
        f"if {mode!r} == 'crash':\n"
        "    print('boom: CUDA out of memory', flush=True); sys.exit(3)\n"
        f"if {mode!r} == 'hang':\n"
        "    time.sleep(60)\n"
        "assert os.environ.get('SGLANG_RETURN_ORIGINAL_LOGPROB') == '1'\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "tp = int(sys.argv[sys.argv.index('--tp-size') + 1])\n"
        # H1 as the server would apply it, from the environment it was launched with.
        "gen = os.environ.get('SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION', '1') != '0'\n"
        # The fake server module alone (stdlib only), so the child starts without torch (fast).
        "import runpy\n"
        f"ns = runpy.run_path({FAKE_MODULE!r})\n"
        "server = ns['FakeSGLang'](port, tp_size=tp, health_generates=gen, decode=False)\n"
        "print('health generates:', gen, flush=True)\n"
        "server.thread.join()\n"
    )
    script.chmod(0o755)
    return str(script)


FAKE_MODULE = str(Path(__file__).with_name("fake_sglang.py"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cfg(tmp_path: Path, mode: str = "serve", **kw) -> SGLangConfig:
    return SGLangConfig(
        model_path="/models/tiny",
        python=_fake_python(tmp_path, mode),
        base_port=_free_port(),
        log_dir=str(tmp_path / "logs"),
        launch_timeout_s=kw.pop("launch_timeout_s", 20),
        health_timeout_s=2,
        retries=0,
        **kw,
    )


@pytest.mark.parametrize("kept", ["host", "disk"])
def test_launched_server_dies_relaunch_and_reload(tmp_path, kept) -> None:
    """A SIGKILLed launched server is seen by the next generate, relaunched, and the last
    weights go back in: host copy through a tensor session, or the disk copy through
    /update_weights_from_disk (S3, no session); the fake would otherwise answer
    weight_version "default" and generate would raise. The launched server's /health does not
    generate (H1 with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0, finding 4)."""
    cfg = _launch_cfg(tmp_path, restart_weights=kept)
    engine = sg.SGLangEngine(RolloutConfig(engine="sglang"), hf_config=HF, sglang=cfg)
    try:
        server = engine._servers[0]
        assert server.argv[1:3] == ["-m", "sglang.launch_server"]
        assert "--enable-memory-saver" in server.argv
        assert "health generates: False" in server.log_path.read_text()
        engine.update_weights(BUCKETS, version=5)
        if kept == "disk":
            shards = sorted((tmp_path / "logs" / "weights").glob("*.safetensors"))
            assert [p.name for p in shards] == [f"model-0000{k}.safetensors" for k in (1, 2)]
        first_pid = server.proc.pid
        os.killpg(first_pid, signal.SIGKILL)
        server.proc.wait()
        assert not engine.health()
        out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=3))
        assert server.proc.pid != first_pid and engine.health()
        assert out[0].token_ids == [3, 4, 5] and out[0].weight_version == 5
    finally:
        engine.shutdown()
    assert server.proc.poll() is not None


def test_launched_wake_reloads_the_kept_weights(tmp_path) -> None:
    """Finding 2 for launched servers: sleep released the weights (M1); a wake with no update
    in between (an evaluation's wake/sleep, then the next rollout's wake) reloads the kept copy
    in a session, so generate serves the rule again instead of garbage (M3)."""
    engine = sg.SGLangEngine(
        RolloutConfig(engine="sglang"), hf_config=HF, sglang=_launch_cfg(tmp_path)
    )
    try:
        engine.update_weights(BUCKETS, version=3)
        engine.sleep()
        engine.wake()
        out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=3))[0]
        assert out.token_ids == [3, 4, 5] and out.weight_version == 3
    finally:
        engine.shutdown()


def test_launch_version_crash_and_timeout_errors(tmp_path) -> None:
    rc = RolloutConfig(engine="sglang")
    with pytest.raises(RuntimeError, match=r"0\.4\.9.*outside.*>=0\.5,<0\.6"):
        sg.SGLangEngine(rc, hf_config=HF, sglang=_launch_cfg(tmp_path / "a", "old"))
    with pytest.raises(RuntimeError, match=r"exited with code 3(.|\n)*CUDA out of memory"):
        sg.SGLangEngine(rc, hf_config=HF, sglang=_launch_cfg(tmp_path / "b", "crash"))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"sglang\.launch_timeout_s=1\.0"):
        sg.SGLangEngine(
            rc, hf_config=HF, sglang=_launch_cfg(tmp_path / "c", "hang", launch_timeout_s=1.0)
        )
    assert time.monotonic() - t0 < 10  # and the hung process was stopped, not waited for


# ---------------------------------------------------------------------------------- GPU
def _open_payloads(entries: list[str], shapes: list[list[int]], queue) -> None:
    """Child process: open each CUDA-IPC payload as sglang's rank does (the device named by
    UUID, mapped back to an index: srt/utils/patch_torch.py 80-99) and send back CPU copies."""
    from torch.multiprocessing import reductions

    def rebuild(*args):
        uuid = args[6]
        index = next(
            i
            for i in range(torch.cuda.device_count())
            if str(torch.cuda.get_device_properties(i).uuid) == uuid
        )
        return reductions.rebuild_cuda_tensor(*args[:6], index, *args[7:])

    class Loader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
                return rebuild
            if (module, name) not in TENSOR_GLOBALS:
                raise pickle.UnpicklingError(f"global {module}.{name} refused")
            return super().find_class(module, name)

    out = []
    for entry in entries:
        named = Loader(io.BytesIO(base64.b64decode(entry))).load()
        assert [list(t.shape) for _, t in named] == shapes
        assert all(t.is_cuda for _, t in named)
        out.append([(n, t.cpu().numpy()) for n, t in named])
    queue.put(out)


@pytest.mark.gpu
def test_cuda_ipc_payloads_open_in_another_process_once_per_rank() -> None:
    """Our CUDA serialization (no sglang): a separate dump per TP rank, each opened in another
    process through torch's CUDA IPC with the device given by UUID, holding the exact values."""
    import torch.multiprocessing as mp

    bucket = [("a", torch.randn(3, 5, device="cuda")), ("b", torch.arange(7.0, device="cuda"))]
    entries = sglang_weights.per_rank_payloads(bucket, 2)
    assert entries[0] != entries[1]  # each dump registers its own IPC reference
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_open_payloads, args=(entries, [[3, 5], [7]], queue))
    child.start()
    try:
        got = queue.get(timeout=120)
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    for rank in got:
        for (name, value), (want_name, want) in zip(rank, bucket, strict=True):
            assert name == want_name and torch.equal(torch.from_numpy(value), want.cpu())


def _group_peer(port: int, name: str, shapes: list[list[int]], queue) -> None:
    """Child: rank 1 of the weight-update group, made as sglang makes its half
    (init_custom_process_group, srt/utils/common.py 2859-2927), receiving the broadcasts."""
    from datetime import timedelta

    from torch.distributed import distributed_c10d as c10d

    torch.cuda.set_device(1)
    timeout = timedelta(seconds=120)
    store, _, _ = next(c10d.rendezvous(f"tcp://127.0.0.1:{port}", 1, 2, timeout=timeout))
    group, _ = c10d._new_process_group_helper(
        2, 1, [], c10d.Backend("nccl"), c10d.PrefixStore(name, store), group_name=name,
        timeout=timeout,
    )  # fmt: skip
    c10d._world.pg_group_ranks[group] = {0: 0, 1: 1}
    out = []
    for shape in shapes:
        t = torch.empty(shape, device="cuda:1")
        torch.distributed.broadcast(t, src=0, group=group)
        out.append(t.cpu().numpy())
    queue.put(out)


@pytest.mark.gpu
def test_nccl_weight_group_broadcasts_to_a_peer() -> None:
    """WeightGroup over NCCL: this process (rank 0, GPU 0) and a peer made the way an sglang
    server makes its half (GPU 1) receive every tensor of a bucket, in order."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: one for the trainer side, one for the server side")
    import torch.multiprocessing as mp

    bucket = [("a", torch.randn(4, 4, device="cuda:0")), ("b", torch.randn(9, device="cuda:0"))]
    port, name = _free_port(), "rpg_test_group"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_group_peer, args=(port, name, [[4, 4], [9]], queue))
    child.start()
    try:
        group = sglang_weights.WeightGroup(
            address="127.0.0.1", port=port, world_size=2, name=name, backend="nccl", timeout_s=120
        )
        group.broadcast(bucket)
        got = queue.get(timeout=120)
        group.close()
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    for value, (_, want) in zip(got, bucket, strict=True):
        assert torch.equal(torch.from_numpy(value), want.cpu())

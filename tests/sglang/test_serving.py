"""Real SGLang 0.5.23 servers on CPU: generation with log-probs, the three weight-sync paths
(tensor, distributed, disk), the router, and the server rules the fake in
tests/unit/test_sglang_client.py mirrors (sessions, /health without generation, the stand-in).

Truth: a Hugging Face Qwen3ForCausalLM in this process holding the same tensors; log-probs of the
engine's own samples must equal its log-probs to support.TOL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
import torch

from rpg_megatron.batch import SamplingParams
from rpg_megatron.rollout import sglang_weights
from rpg_megatron.rollout.sglang_servers import Http, SGLangHTTPError
from tests.sglang import support

pytestmark = pytest.mark.sglang

SAMPLE = SamplingParams(max_new_tokens=8, temperature=1.0)


def test_generate_a_batch_with_logprobs(cluster, tiny) -> None:
    """16 prompts through the router in 4 batched requests: one Completion per prompt, in
    order, finish reasons from the server, and log-probs (raw, temperature 1) equal to HF's."""
    model_dir, state = tiny
    cluster.update_weights(support.buckets(state), version=1)
    prompts = support.prompts(16, seed=1)
    out = cluster.generate(prompts, SAMPLE)
    assert [c.prompt_index for c in out] == list(range(16))
    assert {c.finish_reason for c in out} <= {"stop", "length"}
    assert all(len(c.token_ids) <= 8 for c in out)
    assert all(c.finish_reason == "length" or c.token_ids[-1] == 2 for c in out)  # EOS is kept
    support.assert_matches_hf(model_dir, state, prompts, out, version=1)


def test_greedy_decoding_reproduces_across_calls_and_chunkings(cluster, tiny) -> None:
    """Temperature 0 gives HF's argmax path, identically for one prompt per request and all in
    one. (Per-prompt sampling seeds are not honoured on CPU: sglang 0.5.23 seeds sampling only
    under --enable-deterministic-inference, which needs a GPU attention backend and a Triton
    kernel; SGLangConfig refuses deterministic=true with device=cpu.)"""
    model_dir, state = tiny
    url = cluster._servers[0].url
    prompts = support.prompts(8, seed=2)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    runs = []
    for per_request in (1, 8):
        engine = support.attach([url], prompts_per_request=per_request, max_concurrency=4)
        engine.update_weights(support.buckets(state), version=2)
        runs.append([c.token_ids for c in engine.generate(prompts, greedy)])
    assert runs[0] == runs[1]
    from transformers import AutoConfig, Qwen3ForCausalLM

    hf = Qwen3ForCausalLM(AutoConfig.from_pretrained(model_dir))
    hf.load_state_dict(state)
    for p, tokens in zip(prompts, runs[0], strict=True):
        ids = torch.tensor([p + tokens])
        with torch.no_grad():
            argmax = hf(ids).logits[0, len(p) - 1 : -1].argmax(-1).tolist()
        assert tokens == argmax


def test_stop_tokens_and_lengths_as_the_server_applies_them(cluster, tiny) -> None:
    """Finish reasons from the real server map to ours: a greedy run, then the same with its
    third token as a stop token, stops there with "stop" (the stop token kept, so the policy
    learns to stop); ignore_eos runs to max_new_tokens with "length"."""
    _, state = tiny
    engine = support.attach([cluster._servers[1].url])
    engine.update_weights(support.buckets(state), version=20)
    prompt = support.prompts(1, seed=20)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    (free,) = engine.generate(prompt, greedy)
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    stop = free.token_ids[2]
    first = free.token_ids.index(stop)  # the stop token may occur earlier too
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=(stop,))
    (cut,) = engine.generate(prompt, params)
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[: first + 1]
    assert cut.logprobs == pytest.approx(free.logprobs[: first + 1], abs=support.TOL)


def test_unknown_names_are_skipped_by_the_server_so_the_engine_refuses_them(cluster, tiny):
    """The real server takes a tensor it has no parameter for (it logs a warning and answers
    success), which is why the engine checks names against the model itself: with the model's
    config.json it raises ValueError naming the tensor and sends nothing; a complete update then
    serves exactly its weights."""
    model_dir, state = tiny
    url = cluster._servers[1].url
    http = Http(timeout_s=300, probe_timeout_s=60, retries=0)
    bogus = [("model.no_such_module.weight", torch.zeros(3))]
    body = {"serialized_named_tensors": sglang_weights.per_rank_payloads(bogus, 1)}
    http.call("POST", url + "/begin_weight_update", {}, retries=False)
    try:
        out = http.call("POST", url + "/update_weights_from_tensor", body, retries=False)
    finally:
        http.call("POST", url + "/end_weight_update", {}, retries=False)
    assert out["success"] is True  # sglang 0.5.23 skipped it
    assert "model.no_such_module.weight not found" in cluster._servers[1].log_path.read_text()
    hf_config = json.loads((model_dir / "config.json").read_text())
    engine = support.attach([url], hf_config=hf_config)
    with pytest.raises(ValueError, match=r"'model\.no_such_module\.weight' is not a tensor"):
        engine.update_weights([bogus], version=21)
    new = support.perturbed(state, seed=21)
    engine.update_weights(support.buckets(new), version=22)
    prompts = support.prompts(4, seed=21)
    support.assert_matches_hf(model_dir, new, prompts, engine.generate(prompts, SAMPLE), 22)


def test_tensor_path_in_a_session_matches_hf(cluster, tiny) -> None:
    """Colocated transport (CPU tensors as file_system shared memory) into server 0: after
    pushing perturbed weights the engine samples from exactly them."""
    model_dir, state = tiny
    new = support.perturbed(state, seed=3)
    engine = support.attach([cluster._servers[0].url], weight_sync="colocated")
    engine.update_weights(support.buckets(new), version=3)
    prompts = support.prompts(8, seed=3)
    support.assert_matches_hf(model_dir, new, prompts, engine.generate(prompts, SAMPLE), version=3)


def test_distributed_path_gloo_reaches_both_servers(cluster, tiny) -> None:
    """Distributed transport on CPU: this process and both servers in one gloo group
    (world 3), a broadcast per bucket inside a session on each; then each server, asked
    directly, samples from the pushed weights. Done twice, so the second update reuses the
    group."""
    model_dir, state = tiny
    urls = [s.url for s in cluster._servers]
    engine = support.attach(urls, weight_sync="distributed", nccl_master_port=support.free_ports(1))
    try:
        for version, seed in ((4, 4), (5, 5)):
            new = support.perturbed(state, seed=seed)
            engine.update_weights(support.buckets(new), version=version)
            prompts = support.prompts(6, seed=seed)
            for url in urls:
                out = support.raw_generate(url, prompts, SAMPLE, version)
                support.assert_matches_hf(model_dir, new, prompts, out, version)
    finally:
        engine.shutdown()  # destroys the group on the servers too


def test_router_generation_and_weights_reach_both(cluster, tiny) -> None:
    """The launched pair behind sglang-router (round robin): the engine's generate goes through
    the router; eight more requests to the router are spread over both servers; and each
    server, asked directly, samples from the weights the engine pushed to both."""
    model_dir, state = tiny
    new = support.perturbed(state, seed=6)
    cluster.update_weights(support.buckets(new), version=6)
    prompts = support.prompts(16, seed=6)
    support.assert_matches_hf(model_dir, new, prompts, cluster.generate(prompts, SAMPLE), version=6)
    before = [_generations(s.log_path) for s in cluster._servers]
    router = cluster._router.url
    for k in range(8):
        out = support.raw_generate(router, prompts[2 * k : 2 * k + 2], SAMPLE, 6)
        support.assert_matches_hf(model_dir, new, prompts[2 * k : 2 * k + 2], out, version=6)
    after = [_generations(s.log_path) for s in cluster._servers]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    for s in cluster._servers:
        out = support.raw_generate(s.url, prompts[:4], SAMPLE, 6)
        support.assert_matches_hf(model_dir, new, prompts[:4], out, version=6)


def test_real_server_refuses_updates_outside_a_session(cluster) -> None:
    """The rules the fake server's S1/S2 mirror, on the real thing: a tensor update without
    /begin_weight_update is refused (400, 'must run between'); so is a second begin, and an end
    with no session open."""
    http = Http(timeout_s=300, probe_timeout_s=60, retries=0)
    url = cluster._servers[1].url
    bucket = [("lm_head.weight", torch.zeros(27, 64))]
    body = {"serialized_named_tensors": sglang_weights.per_rank_payloads(bucket, 1)}
    with pytest.raises(SGLangHTTPError, match=r"400.*must run between begin_weight_update"):
        http.call("POST", url + "/update_weights_from_tensor", body, retries=False)
    http.call("POST", url + "/begin_weight_update", {}, retries=False)
    try:
        with pytest.raises(SGLangHTTPError, match="already open"):
            http.call("POST", url + "/begin_weight_update", {}, retries=False)
    finally:
        http.call("POST", url + "/end_weight_update", {}, retries=False)
    with pytest.raises(SGLangHTTPError, match="no weight-update session is open"):
        http.call("POST", url + "/end_weight_update", {}, retries=False)


def test_health_does_not_generate_on_launched_servers(cluster) -> None:
    """Finding 4 on a real server: launched with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0,
    /health answers without a generation (no new batch in the server's log), while
    /health_generate runs one (the counter does move)."""
    server = cluster._servers[0]
    http = Http(timeout_s=300, probe_timeout_s=120, retries=0)
    before = _generations(server.log_path)
    for _ in range(3):
        assert http.probe(server.url + "/health")
    time.sleep(2)
    assert _generations(server.log_path) == before
    assert http.probe(server.url + "/health_generate")
    deadline = time.monotonic() + 60
    while _generations(server.log_path) == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _generations(server.log_path) == before + 1


def test_cpu_stand_in_acts_only_when_asked(sglang_python) -> None:
    """tools/sglang_cpu: with SGLANG_USE_CPU_ENGINE=1 `sgl_kernel` is the stand-in (no
    submodules, calls raise, assign_req_to_token_pool_cpu writes the slots of each request);
    without it the stand-in stays out of the way."""
    code = (
        "import os, sys, torch\n"
        "if os.environ.get('SGLANG_USE_CPU_ENGINE') != '1':\n"
        "    print('registered', 'sgl_kernel' in sys.modules); sys.exit(0)\n"
        "import sgl_kernel\n"
        "assert sgl_kernel.__path__ == []\n"
        "try:\n"
        "    import sgl_kernel.cpu\n"
        "    raise SystemExit('sgl_kernel.cpu imported')\n"
        "except ImportError:\n"
        "    pass\n"
        "from sgl_kernel import rmsnorm_cpu\n"
        "try:\n"
        "    rmsnorm_cpu(torch.ones(1))\n"
        "    raise SystemExit('no NotImplementedError')\n"
        "except NotImplementedError as e:\n"
        "    assert 'rmsnorm_cpu' in str(e)\n"
        "r2t = torch.zeros(3, 6, dtype=torch.int32)\n"
        "sgl_kernel.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), r2t, torch.tensor([1, 0]),"
        " torch.tensor([3, 2]), torch.tensor([7, 8, 9, 10]), 6)\n"
        "print(r2t.tolist())\n"
    )
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
    out = subprocess.run([sglang_python, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([[9, 10, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 7, 8, 0, 0, 0]])
    env.pop("SGLANG_USE_CPU_ENGINE")
    out = subprocess.run([sglang_python, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "registered False", out.stderr


def _generations(log_path) -> int:
    """Batches the server ran, from its log ('Prefill batch' lines, one per scheduled
    prefill)."""
    return len(re.findall(r"Prefill batch", log_path.read_text(errors="replace")))

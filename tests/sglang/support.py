"""Helpers of the `sglang` tier: where the SGLang venv is, the tiny model with saved weights,
ports, and the independent truth (a Hugging Face model holding the same tensors)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from bench.e2e import default_sglang_python
from rpg_megatron.batch import Completion, SamplingParams
from rpg_megatron.config import RolloutConfig, SGLangConfig
from rpg_megatron.rollout.sglang import SGLangEngine
from rpg_megatron.rollout.sglang_protocol import generate_payload, parse_generate_response
from rpg_megatron.rollout.sglang_servers import Http

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
TOL = 1e-4
"""Engine vs trainer / HF log-probs, float32 on both sides (the issue's refit bound)."""


def sglang_python() -> str | None:
    """The SGLang venv's interpreter: $RPG_SGLANG_PYTHON (the Makefile sets it), else the
    keyed cache path tools/sglang_venv.sh would use, if that venv is complete."""
    if os.environ.get("RPG_SGLANG_PYTHON"):
        return os.environ["RPG_SGLANG_PYTHON"]
    return default_sglang_python()


def train_args(
    demo: Path, run: Path, *, sglang_python: str, port: int, log_dir: Path | None = None
) -> list[str]:
    """`rpg-megatron train` arguments of examples/tiny_cpu_sglang.yaml on `demo`'s model and
    data (rpg_megatron.tiny.prepare_demo), writing to `run`, its launched server(s) run by
    `sglang_python` from `port` on, their logs in `log_dir` (default run/sglang). Tests add
    their own settings after these."""
    return [
        str(REPO / "examples" / "tiny_cpu_sglang.yaml"),
        f"model.hf_path={demo / 'model'}",
        f"rollout.sglang.model_path={demo / 'model'}",
        f"data.train_files=[{demo / 'train.parquet'}]",
        f"log.run_dir={run}",
        f"checkpoint.dir={run / 'checkpoints'}",
        f"rollout.sglang.python={sglang_python}",
        f"rollout.sglang.base_port={port}",
        f"rollout.sglang.log_dir={log_dir or run / 'sglang'}",
    ]


def free_ports(n: int) -> int:
    """The first of n consecutive TCP ports that are free now (server i listens on base + i)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for k in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind((HOST, base + k))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError(f"no {n} consecutive free ports on {HOST}")


def write_model(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """rpg_megatron.tiny's model directory with seeded random weights saved (sglang loads them;
    the trainer-side tests start from them too); returns the state dict."""
    from transformers import AutoConfig, Qwen3ForCausalLM

    from rpg_megatron.tiny import write_tiny_model_dir

    write_tiny_model_dir(path)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(path))
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict:
    """`state` plus seeded Gaussian noise: weights no server has seen."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def buckets(state: dict[str, torch.Tensor], n: int = 3) -> list[list[tuple[str, torch.Tensor]]]:
    """The state dict in n buckets, as the trainer's export streams them."""
    items = sorted(state.items())
    return [items[i::n] for i in range(n)]


def hf_logprobs(model_dir: Path, state: dict, rows: list[tuple[list[int], list[int]]]) -> list:
    """log p(completion token | prefix) of each (prompt, completion) row under a Hugging Face
    Qwen3ForCausalLM holding `state` (float32)."""
    from transformers import AutoConfig, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(model_dir))
    model.load_state_dict(state, strict=True)
    model.eval()
    out = []
    with torch.no_grad():
        for prompt, completion in rows:
            ids = torch.tensor([prompt + completion])
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            pos = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
            out.append(logp[pos, torch.tensor(completion)].tolist())
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return max((abs(x - y) for x, y in pairs), default=0.0)


def cpu_config(**kw) -> SGLangConfig:
    """SGLangConfig for a CPU server of the tiny model: float32, a small KV cache, generous
    timeouts (2 shared cores), no retries that would hide a dead server."""
    base = dict(
        device="cpu",
        dtype="float32",
        max_total_tokens=16384,
        mem_fraction_static=0.5,
        launch_timeout_s=1200,
        request_timeout_s=600,
        health_timeout_s=120,
        retries=1,
    )
    return SGLangConfig(**{**base, **kw})


def attach(urls: list[str], hf_config: dict | None = None, **kw) -> SGLangEngine:
    """An engine attached to running servers (no launch, no relaunch)."""
    cfg = cpu_config(server_urls=tuple(urls), **kw)
    hf = hf_config or {"vocab_size": 27}
    return SGLangEngine(RolloutConfig(engine="sglang"), hf_config=hf, sglang=cfg)


def prompts(n: int, seed: int) -> list[list[int]]:
    """n prompts of 3..8 tokens: BOS, then characters of the tiny vocabulary (ids 4..26)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 8, (1,), generator=g))
        out.append([1, *torch.randint(4, 27, (length,), generator=g).tolist()])
    return out


def raw_generate(
    url: str, prompts: list[list[int]], params: SamplingParams, version: int
) -> list[Completion]:
    """One batched /generate straight to `url` (a server or the router), parsed as the engine
    parses it; raises unless every result reports weight_version `version`."""
    http = Http(timeout_s=600, probe_timeout_s=120, retries=0)
    body = generate_payload(prompts, params, 0, None)
    out = http.call("POST", url + "/generate", body, retries=False)
    return parse_generate_response(out, 0, len(prompts), version)


def assert_matches_hf(model_dir: Path, state: dict, prompts: list, completions: list, version: int):
    """Each completion is from weight `version`, non-empty, and its log-probs equal those of a
    Hugging Face model holding `state` to TOL."""
    assert all(c.weight_version == version for c in completions)
    assert all(c.token_ids and len(c.logprobs) == len(c.token_ids) for c in completions)
    rows = [(p, c.token_ids) for p, c in zip(prompts, completions, strict=True)]
    got = [c.logprobs for c in completions]
    assert max_diff(got, hf_logprobs(model_dir, state, rows)) < TOL

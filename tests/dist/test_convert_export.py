"""Converted checkpoints on 2 gloo ranks: logits at TP = 2, resharded loading, live export.

Setup (parent process): tiny random HF checkpoints for llama, qwen2 (tied) and qwen3; llama and
qwen3 converted at TP = 1 in-process, qwen2 at TP = 2 by `hf_to_mcore(tp=2)` itself (its two
spawned workers), V = 260 padded to 264 at TP = 1 and 272 at TP = 2, so loading always crosses
a different vocab padding or TP size. Each rank then, per family:

* TP = 2: loads the checkpoint, runs the fixed prompt; the logits gathered over the vocab
  shards equal the HF model's (float32; only summation order differs: atol 1e-4, rtol 0).
  Live export (`iter_hf_buckets`, bucket_bytes = 40 000) yields exactly the original
  safetensors (names, shapes, dtypes, torch.equal), and with dtype=bfloat16 their bf16 casts.
* TP = 1 / PP = 2: loads the same checkpoint (qwen2: saved at TP = 2 / PP = 1, the issue's
  resharding case) and exports again: exact original tensors, on both stages.

Bucket bound: every bucket's bytes <= bucket_bytes unless it holds the HF tensors of a single
Megatron parameter (the embedding, 66 560 bytes, and each fc1 = gate + up, 49 152 bytes).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from rpg_megatron import convert
from rpg_megatron.config import ModelConfig, ParallelConfig
from rpg_megatron.megatron import export, model, parallel
from rpg_megatron.megatron.arch import read_hf_config
from tests import tiny_hf
from tests.distributed import spawn

pytestmark = pytest.mark.slow

BUCKET = 40_000
LOGITS_ATOL = 1e-4


def _param_key(name: str) -> str:
    """HF names that come from one Megatron parameter share a key (q/k/v, gate/up)."""
    name = re.sub(r"self_attn\.[qkv]_proj\.", "self_attn.qkv.", name)
    return re.sub(r"mlp\.(gate|up)_proj\.", "mlp.fc1.", name)


def _export_and_check(gpt: Any, arch: Any, want: dict[str, torch.Tensor], dtype=None) -> None:
    got: dict[str, torch.Tensor] = {}
    buckets = 0
    for bucket in export.iter_hf_buckets([gpt], arch, bucket_bytes=BUCKET, dtype=dtype):
        buckets += 1
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        if size > BUCKET:
            assert len({_param_key(n) for n, _ in bucket}) == 1, [n for n, _ in bucket]
        for name, t in bucket:
            assert name not in got, f"{name} exported twice"
            got[name] = t.clone()
    assert buckets > 4
    assert got.keys() == want.keys()
    for name, t in want.items():
        t = t if dtype is None else t.to(dtype)
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def _worker(rank: int, world: int, cases: list[tuple[str, str, dict, torch.Tensor]]) -> None:
    from megatron.core import parallel_state

    fp32 = ModelConfig(dtype="float32")
    for family, mc_dir, hf_state, hf_logits in cases:
        arch = read_hf_config(mc_dir)
        par = ParallelConfig(tp=2)
        parallel.init(par)
        try:
            gpt = model.build_gpt(arch, fp32, par, pre_process=True, post_process=True)
            convert.load_mcore(gpt, mc_dir)
            gpt.eval()
            ids = tiny_hf.prompt()
            with torch.no_grad():
                shard = gpt(ids, torch.arange(ids.shape[1])[None], None)
            parts = [torch.empty_like(shard) for _ in range(2)]
            dist.all_gather(parts, shard, group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)[..., : tiny_hf.V]
            torch.testing.assert_close(logits, hf_logits, atol=LOGITS_ATOL, rtol=0, msg=family)
            _export_and_check(gpt, arch, hf_state)
            if family == "qwen3":
                _export_and_check(gpt, arch, hf_state, dtype=torch.bfloat16)
        finally:
            parallel.destroy()

        par = ParallelConfig(pp=2)
        ctx = parallel.init(par)
        try:
            gpt = model.build_gpt(
                arch, fp32, par, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage
            )
            convert.load_mcore(gpt, mc_dir)
            _export_and_check(gpt, arch, hf_state)
            # A finished run's policy as an HF directory (one safetensors file per bucket).
            out = Path(mc_dir).with_name(f"exported-{family}")
            convert.export_policy(
                [gpt],
                arch,
                out,
                src_hf_dir=mc_dir,
                dtype=None,
                write=rank == 0,
                bucket_bytes=BUCKET,
            )
        finally:
            parallel.destroy()


def test_converted_logits_tp2_resharding_and_live_export(tmp_path: Path) -> None:
    cases = []
    for family in ("llama", "qwen2", "qwen3"):
        hf = tmp_path / f"hf-{family}"
        logits = tiny_hf.write(hf, family)
        tp = 2 if family == "qwen2" else 1
        mc = convert.hf_to_mcore(hf, tmp_path / f"mc-{family}", tp=tp)
        assert f'"tp": {tp}' in (mc / "conversion.json").read_text()
        cases.append((family, str(mc), tiny_hf.read_safetensors(hf), logits))
    spawn(2, _worker, cases)
    from transformers import AutoModelForCausalLM

    for family, mc, want, logits in cases:
        out = Path(mc).with_name(f"exported-{family}")
        got = tiny_hf.read_safetensors(out)
        assert got.keys() == want.keys(), family
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (family, name)
        assert (out / "model.safetensors.index.json").is_file()  # several files, and an index
        assert not list(out.parent.glob(f".exported-{family}.*"))  # no temporary left behind
        hf_model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            again = hf_model(tiny_hf.prompt()).logits
        # bit-equal weights; the logits were computed in another process (thread count)
        torch.testing.assert_close(again, logits, atol=1e-5, rtol=0, msg=family)


def test_checkpoint_saved_at_tp2_converts_back_bit_exact(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    tiny_hf.write(hf, "qwen3", dtype=torch.bfloat16)
    mc = convert.hf_to_mcore(hf, tmp_path / "mc", tp=2)
    back = convert.mcore_to_hf(mc, tmp_path / "back")
    want, got = tiny_hf.read_safetensors(hf), tiny_hf.read_safetensors(back)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


# ------------------------------------------------------- a training run's initial weights
def _initial_logprobs(rank: int, world: int, hf_dir: str, init_from: str) -> torch.Tensor:
    from rpg_megatron.config import Config, OptimConfig
    from rpg_megatron.megatron import step
    from rpg_megatron.train import _initial_weights

    cfg = Config(model=ModelConfig(hf_path=hf_dir, dtype="float32", init_from=init_from))
    par = ParallelConfig(tp=world)
    ctx = parallel.init(par)
    try:
        policy = step.build_policy(
            arch=read_hf_config(hf_dir),
            model_cfg=cfg.model,
            par=par,
            optim_cfg=OptimConfig(),
            ctx=ctx,
        )
        _initial_weights(cfg, policy)
        ids = tiny_hf.prompt()
        return step.logprobs(policy, step.TrainBatch(tokens_NS=ids, mask_NS=torch.zeros(ids.shape)))
    finally:
        parallel.destroy()


def test_training_starts_from_the_hf_or_converted_weights(tmp_path: Path) -> None:
    """`model.init_from`: a TP = 2 policy loaded from the HF safetensors ("auto") or from a
    checkpoint converted at TP = 1 gives the HF model's own log-probs of the prompt; "random"
    does not; "hf" without safetensors names the directory."""
    hf = tmp_path / "hf"
    logits = tiny_hf.write(hf, "qwen3")
    ids = tiny_hf.prompt()
    want = torch.log_softmax(logits, -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    mc = convert.hf_to_mcore(hf, tmp_path / "mc", tp=1)
    for init_from in ("auto", str(mc)):
        got = spawn(2, _initial_logprobs, str(hf), init_from)
        for logp in got:
            torch.testing.assert_close(logp[0, 1:], want, atol=1e-4, rtol=0, msg=init_from)
    (rand,) = spawn(1, _initial_logprobs, str(hf), "random")
    assert float((rand[0, 1:] - want).abs().max()) > 0.1
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((hf / "config.json").read_text())
    with pytest.raises(Exception, match=r"bare: no \*\.safetensors"):
        spawn(1, _initial_logprobs, str(bare), "hf")

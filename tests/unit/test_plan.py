"""`rpg_megatron.plan` against independent truth.

* Parameter counts: `transformers` models built from the same config (tiny ones with random
  weights on CPU, the published Qwen shapes on the meta device), Megatron GPTModels built at
  TP = 1 (one gloo process) and at TP = 2 and PP = 2 (two gloo processes, `slow`), and the sizes
  Qwen publishes on its model cards.
* Activations: the closed forms of Korthikanti et al. 2022 ("Reducing Activation Recomputation
  in Large Transformer Models", Table 2) for the GPT-3 layer they apply to exactly.
* Recipes: every examples/*.yaml loads strictly and the shipped GPU recipes fit an H100 80GB;
  Qwen2.5-7B at tp=1 without the distributed optimizer is refused naming the optimizer term.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rpg_megatron import cli, launch, plan
from rpg_megatron.config import ConfigError, ModelConfig, ParallelConfig
from rpg_megatron.megatron import model, parallel
from rpg_megatron.megatron.arch import read_hf_config
from tests.distributed import spawn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FP32 = ModelConfig(dtype="float32")

# Published config.json shapes (the Hugging Face repos' config.json files).
QWEN3_4B = {
    "model_type": "qwen3",
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 9728,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "use_sliding_window": False,
}
QWEN3_1_7B = {
    **QWEN3_4B,
    "hidden_size": 2048,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "intermediate_size": 6144,
}
QWEN2_5_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "sliding_window": 131072,
    "use_sliding_window": False,
}
RECIPE_MODELS = {
    "qwen3_4b_rpg_8k.yaml": QWEN3_4B,
    "qwen3_4b_rpg_8k_fp8.yaml": QWEN3_4B,
    "qwen2_5_7b_instruct_rpg.yaml": QWEN2_5_7B,
}
"""The GPU recipes and the published shapes of the model each trains."""
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _write(tmp_path: Path, d: dict[str, Any]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def _hf_config(family: str, **overrides: Any) -> Any:
    import transformers

    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[family]
    return getattr(transformers, cls)(**{**TINY, **overrides})


# ----------------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    ("family", "tied", "extra"),
    [
        ("qwen3", True, {"head_dim": 24}),  # q/k norms, heads * head_dim != hidden
        ("qwen3", False, {"head_dim": 24}),
        ("qwen2", True, {}),  # q/k/v biases
        ("qwen2", False, {}),
        ("llama", False, {}),
    ],
)
def test_parameter_count_equals_transformers(family: str, tied: bool, extra: dict) -> None:
    import transformers

    c = _hf_config(family, vocab_size=256, tie_word_embeddings=tied, **extra)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(c)
    want = sum(p.numel() for p in hf.parameters())  # a tied matrix is one parameter
    arch = read_hf_config(c.to_dict())
    assert plan.parameter_count(arch) == want
    # 256 rows need no TP = 1 padding, so the one stage holds exactly the HF parameters.
    assert plan.stage_parameters(arch, tp=1, pp=1, stage=0) == want


@pytest.mark.parametrize(
    ("shape", "total", "total_tol", "non_embedding", "non_embedding_tol"),
    [
        # Qwen3-4B: 4.02B total; model card "3.6B non-embedding" (one decimal: +-0.05B).
        (QWEN3_4B, 4.02e9, 0.01 * 4.02e9, 3.6e9, 0.05e9),
        # Qwen2.5-7B(-Instruct) model card: 7.61B, 6.53B non-embedding (two decimals: 1%).
        (QWEN2_5_7B, 7.61e9, 0.01 * 7.61e9, 6.53e9, 0.01 * 6.53e9),
        # Qwen3-1.7B model card: 1.7B, 1.4B non-embedding (one decimal: +-0.05B).
        (QWEN3_1_7B, 1.7e9, 0.05e9, 1.4e9, 0.05e9),
    ],
    ids=["qwen3-4b", "qwen2.5-7b", "qwen3-1.7b"],
)
def test_published_model_sizes(
    tmp_path: Path,
    shape: dict,
    total: float,
    total_tol: float,
    non_embedding: float,
    non_embedding_tol: float,
) -> None:
    import transformers

    arch = read_hf_config(_write(tmp_path, shape))  # the reader accepts the real files
    count = plan.parameter_count(arch)
    vocab_matrices = 1 if arch.tie_word_embeddings else 2
    assert abs(count - total) <= total_tol, count
    no_embed = count - vocab_matrices * arch.vocab_size * arch.hidden_size
    assert abs(no_embed - non_embedding) <= non_embedding_tol, no_embed
    # And exactly what transformers builds from the same file (meta device: no memory).
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**shape)
        )
    assert count == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize(("family", "tied"), [("qwen3", False), ("qwen2", True)])
def test_stage_parameters_equal_megatron_tp1(single_rank, family: str, tied: bool) -> None:
    # vocab 300 -> 304 rows in Megatron: the count must include the TP padding.
    arch = read_hf_config(_hf_config(family, vocab_size=300, tie_word_embeddings=tied).to_dict())
    gpt = model.build_gpt(arch, FP32, ParallelConfig(), pre_process=True, post_process=True)
    assert plan.stage_parameters(arch, tp=1, pp=1, stage=0) == sum(
        p.numel() for p in gpt.parameters()
    )


def _split_counts(rank: int, world: int, configs: dict[str, dict]) -> dict[str, int]:
    """This rank's parameter count of each model at TP = 2 and at PP = 2 (stage = rank)."""
    out = {}
    for name, d in configs.items():
        arch = read_hf_config(d)
        for layout, par in (("tp2", ParallelConfig(tp=2)), ("pp2", ParallelConfig(pp=2))):
            ctx = parallel.init(par)
            try:
                gpt = model.build_gpt(
                    arch, FP32, par, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage
                )
                out[f"{name}/{layout}"] = sum(p.numel() for p in gpt.parameters())
            finally:
                parallel.destroy()
    return out


@pytest.mark.slow
def test_stage_parameters_equal_megatron_tp2_and_pp2() -> None:
    configs = {
        "qwen3": _hf_config("qwen3", vocab_size=300, head_dim=24).to_dict(),
        # tied: with pp = 2 the last stage holds its own copy of the embedding matrix
        "qwen2": _hf_config("qwen2", vocab_size=300, tie_word_embeddings=True).to_dict(),
    }
    counts = spawn(2, _split_counts, configs)
    for name, d in configs.items():
        arch = read_hf_config(d)
        for rank in (0, 1):
            assert counts[rank][f"{name}/tp2"] == plan.stage_parameters(
                arch, tp=2, pp=1, stage=0
            ), (name, rank)
            assert counts[rank][f"{name}/pp2"] == plan.stage_parameters(
                arch, tp=1, pp=2, stage=rank
            ), (name, rank)


# ---------------------------------------------------------------------------- activations
S, B, H, A = 2048, 4, 1024, 16  # sequence, micro-batch, hidden, heads (GPT-3-like layer)


@pytest.mark.parametrize(
    ("tp", "sp", "recompute", "paper"),
    [  # Korthikanti et al. 2022, Table 2, per layer (their L = 1)
        (1, False, "none", S * B * H * (34 + 5 * A * S / H)),
        (8, False, "none", S * B * H * (10 + 24 / 8 + 5 * A * S / (H * 8))),
        (8, True, "none", S * B * H / 8 * (34 + 5 * A * S / H)),
        (8, False, "selective", S * B * H * (10 + 24 / 8)),
        (8, True, "selective", S * B * H * 34 / 8),
        (1, False, "full", 2 * S * B * H),
        (8, True, "full", 2 * S * B * H / 8),
    ],
)
def test_layer_activations_equal_korthikanti(tp: int, sp: bool, recompute: str, paper: float):
    got = plan.layer_activation_bytes(
        tokens=S * B,
        seq_len=S,
        hidden=H,
        heads=A,
        kv_heads=A,  # MHA
        head_dim=H // A,
        ffn=4 * H,  # plain GeLU MLP of width 4h
        gated=False,
        dropout=True,
        flash=False,
        tp=tp,
        sequence_parallel=sp,
        recompute=recompute,
    )
    assert got == pytest.approx(paper, rel=1e-12)


# -------------------------------------------------------------------------------- recipes
def test_every_example_loads_strictly() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert {f.name for f in files} >= {"tiny_cpu.yaml", "tiny_cpu_grpo.yaml", *RECIPE_MODELS}
    for f in files:
        launch.load(f, [])


@pytest.mark.parametrize("recipe", sorted(RECIPE_MODELS))
def test_shipped_recipes_fit_h100_80gb(tmp_path: Path, recipe: str) -> None:
    hf = _write(tmp_path, RECIPE_MODELS[recipe])
    result = plan.plan_recipe(EXAMPLES / recipe, [f"model.hf_path={hf}"], gpu_gb=80)
    assert result.usable_gib == pytest.approx(79.1)
    assert result.fits, result.format()


def test_qwen2_5_7b_at_tp1_without_distributed_optimizer_is_refused(tmp_path: Path, capsys):
    hf = _write(tmp_path, QWEN2_5_7B)
    argv = [
        "plan",
        str(EXAMPLES / "qwen2_5_7b_instruct_rpg.yaml"),
        f"model.hf_path={hf}",
        "parallel.tp=1",
        "parallel.sequence_parallel=false",
        "optim.distributed_optimizer=false",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    # 7.6B x 12 B of fp32 master + Adam states alone exceed the GPU.
    assert "optimizer" in err and "distributed_optimizer=true" in err
    assert "gradients" in err and "parameters" in err


def test_layout_must_divide_the_world(tmp_path: Path) -> None:
    hf = _write(tmp_path, QWEN3_4B)
    with pytest.raises(ConfigError, match=r"6 GPUs are not divisible by parallel.tp\*pp\*cp"):
        plan.plan_recipe(
            EXAMPLES / "qwen3_4b_rpg_8k.yaml",
            [f"model.hf_path={hf}", "launch.gpus_per_node=6", "parallel.tp=4"],
            gpu_gb=80,
        )


def test_without_launch_section_eight_gpus_are_assumed(tmp_path: Path) -> None:
    from rpg_megatron.tiny import tiny_hf_config

    hf = _write(tmp_path / "model", tiny_hf_config(vocab_size=27))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  hf_path: {hf}\n")
    result = plan.plan_recipe(recipe, [], gpu_gb=80)
    assert "no launch section: assuming 1 node x 8 GPUs" in result.format()
    assert result.fits


def test_advice_names_the_fixed_allowance_when_it_alone_does_not_fit(tmp_path: Path) -> None:
    """The tiny model's own terms are kilobytes; the 0.5 + 1.5 + 0.5 GiB CUDA/NCCL allowance is
    what exceeds a 1 GB GPU (0.99 GiB usable), and no setting shrinks it."""
    from rpg_megatron.tiny import tiny_hf_config

    hf = _write(tmp_path / "model", tiny_hf_config(vocab_size=27))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  hf_path: {hf}\nlaunch:\n  gpus_per_node: 1\n")
    result = plan.plan_recipe(recipe, [], gpu_gb=1)
    assert not result.fits
    advice = result.advice()
    assert "largest terms: CUDA/NCCL 2.50 GiB: no setting shrinks it" in advice
    assert "CUDA/NCCL alone take 2.50 GiB" in advice and "more memory" in advice


def test_zero_nodes_is_a_config_error_not_a_division(tmp_path: Path) -> None:
    hf = _write(tmp_path, QWEN3_4B)
    with pytest.raises(ConfigError, match=r"launch\.nodes=0: a job needs at least one node"):
        plan.plan_recipe(
            EXAMPLES / "qwen3_4b_rpg_8k.yaml", [f"model.hf_path={hf}", "launch.nodes=0"], gpu_gb=80
        )


def test_missing_config_json_names_the_path(tmp_path: Path) -> None:
    recipe = EXAMPLES / "qwen3_4b_rpg_8k.yaml"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"{empty / 'config.json'} does not exist")):
        plan.plan_recipe(recipe, [f"model.hf_path={empty}"], gpu_gb=80)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nowhere'} does not exist")):
        plan.plan_recipe(recipe, [f"model.hf_path={tmp_path / 'nowhere'}"], gpu_gb=80)


# ------------------------------------------------------------------------------------ CLI
def test_cli_plan_prints_the_table(tmp_path: Path) -> None:
    hf = _write(tmp_path, QWEN3_4B)
    exe = Path(sys.executable).parent / "rpg-megatron"
    run = subprocess.run(
        [str(exe), "plan", str(EXAMPLES / "qwen3_4b_rpg_8k.yaml"), f"model.hf_path={hf}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "4,022,468,096" in run.stdout  # the published Qwen3-4B count, exactly
    for term in ("parameters", "gradients", "optimizer", "activations", "logits", "total"):
        assert f"\n{term} " in run.stdout
    assert "of 79.10 GiB usable" in run.stdout


def test_cli_bad_config_path_names_the_file(tmp_path: Path, capsys) -> None:
    assert cli.main(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert str(tmp_path / "missing.yaml") in capsys.readouterr().err


def test_plan_shows_the_behaviour_snapshots_host_memory(tmp_path: Path) -> None:
    """k + 1 copies of the GPU's bf16 weight shard, counted from the model's own parameter count
    (stage_parameters is checked against Megatron above); none in the synchronous loop."""
    hf = _write(tmp_path, QWEN3_4B)
    recipe = EXAMPLES / "qwen3_4b_rpg_8k.yaml"
    args = ["rollout.mode=disaggregated", "rollout.max_staleness=2", "data.dynamic_sampling=false"]
    sync = plan.plan_recipe(recipe, [f"model.hf_path={hf}", *args[:1]], gpu_gb=80)
    assert not any("behaviour" in n for n in sync.notes)
    got = plan.plan_recipe(recipe, [f"model.hf_path={hf}", *args], gpu_gb=80)
    (line,) = [n for n in got.notes if "behaviour snapshots" in n]
    cfg = launch.load(recipe, [f"model.hf_path={hf}", *args])[1]
    par = cfg.parallel
    shard = plan.stage_parameters(read_hf_config(QWEN3_4B), tp=par.tp, pp=par.pp, stage=got.stage)
    assert f"3 x {shard * 2 / 2**30:.2f} GiB" in line
    assert f"= {3 * shard * 2 / 2**30:.2f} GiB pinned host memory per GPU" in line
    assert got.total_gib == pytest.approx(sync.total_gib)  # host memory, not the GPU's

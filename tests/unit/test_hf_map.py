"""hf_map: HF <-> Megatron names, layouts and TP shards for llama, qwen2 and qwen3.

Independent truths (none is the module's own output fed back to itself):
- Names and shapes: a real megatron-core GPTModel built here with the local layer spec from the
  HF config (TransformerConfig + get_gpt_layer_local_spec + GPTModel, TP = 1, CPU).
- The QKV interleave, gate/up order, norm placement and vocab padding: the converted weights
  loaded into that GPTModel give the HF model's logits on a fixed prompt (float32, atol 1e-4,
  rtol 0), and the padded vocab columns give exactly 0.
- TE names: literal strings read off get_gpt_layer_with_transformer_engine_spec (norms fused into
  TELayerNormColumnParallelLinear.layer_norm_weight); TE itself is not installed here.
- TP shards: slices of the HF q/k/v, gate/up, o_proj/down_proj and embedding tensors taken here
  by hand, following megatron-core 0.16.1's partitioning.
Round trips are bit-exact (torch.equal, same dtype) in float32 and bfloat16.

Legend: V vocab, VP padded vocab, H hidden, D head dim, G query groups, F ffn hidden.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from rpg_megatron.megatron import hf_map
from rpg_megatron.megatron.arch import HFArch, read_hf_config
from rpg_megatron.megatron.hf_map import (
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from tests import tiny_hf

transformers = pytest.importorskip("transformers")

V, VP, H, F_FFN, LAYERS, HEADS, GROUPS = 250, 256, 64, 96, 2, 4, 2
HEAD_DIM = {"llama": H // HEADS, "qwen2": H // HEADS, "qwen3": 24}  # qwen3: HEADS * D != H
FAMILIES = ("llama", "qwen2", "qwen3")
CASES = [(f, t) for f in FAMILIES for t in (False, True)]
SEQ = 12
LOGITS_ATOL = 1e-4
ROPE_THETA = 50000


# ------------------------------------------------------------------------------ HF side
@functools.cache
def _hf(family: str, tied: bool) -> tuple[HFArch, dict[str, torch.Tensor], torch.Tensor]:
    """(its HFArch, HF state dict, HF logits [1, SEQ, V]) of a tiny random model (every
    parameter re-drawn: HF's norms of 1 and biases of 0 would hide a swapped q_norm/k_norm or a
    misplaced bias)."""
    cfg, model, logits = tiny_hf.random_model(
        family,
        tied=tied,
        ids=_prompt(),
        vocab_size=V,
        intermediate_size=F_FFN,
        rope_theta=ROPE_THETA,
    )
    return read_hf_config(cfg.to_dict()), dict(model.state_dict()), logits


def _prompt() -> torch.Tensor:
    return torch.randint(0, V, (1, SEQ), generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------------------ Megatron side
@pytest.fixture(scope="module")
def megatron_world() -> Iterator[None]:
    """A gloo world of 1 with Megatron's TP=PP=1 groups, plus two CPU patches for forward."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    created = not dist.is_initialized()
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        if created:
            store = os.path.join(tmp, "store")
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
        # megatron-core 0.16.1 on CPU: RotaryEmbedding.get_emb moves inv_freq to
        # torch.cuda.current_device(), and DotProductAttention.forward forks the CUDA RNG
        # tracker (seeded only by model_parallel_cuda_manual_seed, which needs CUDA). Dropout
        # is 0 here, so a no-op fork changes nothing.
        mp.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
        mp.setattr(
            tensor_parallel.get_cuda_rng_tracker(),
            "fork",
            lambda *a, **k: contextlib.nullcontext(),
        )
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            if created:
                dist.destroy_process_group()


def _gpt(family: str, tied: bool):
    """GPTModel with the local spec, configured from the HF config by hand (not via hf_map)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    # The sizes _hf gave transformers, restated: independent of any config parser.
    tc = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=H,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM[family],
        ffn_hidden_size=F_FFN,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=family == "qwen3", normalization="RMSNorm")
    return GPTModel(
        config=tc,
        transformer_layer_spec=spec,
        vocab_size=VP,
        max_sequence_length=64,
        position_embedding_type="rope",
        rotary_base=ROPE_THETA,
        share_embeddings_and_output_weights=tied,
    )


def _weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}


# ------------------------------------------------------------------- against a GPTModel
@pytest.mark.parametrize(("family", "tied"), CASES)
def test_names_shapes_dtypes_match_local_spec_gptmodel(megatron_world, family, tied):
    arch, hf_state, _ = _hf(family, tied)
    ours = hf_map.hf_to_mcore(hf_state, arch, padded_vocab=VP)
    real = _weights(_gpt(family, tied).state_dict())
    assert {k: (tuple(v.shape), v.dtype) for k, v in ours.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in real.items()
    }


@pytest.mark.parametrize(("family", "tied"), CASES)
def test_converted_weights_reproduce_hf_logits(megatron_world, family, tied):
    arch, hf_state, hf_logits = _hf(family, tied)
    model = _gpt(family, tied)
    missing, unexpected = model.load_state_dict(
        hf_map.hf_to_mcore(hf_state, arch, padded_vocab=VP), strict=False
    )
    assert not unexpected
    assert all(k.endswith("._extra_state") for k in missing)
    model.eval()
    ids = _prompt()
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)  # True = masked
    with torch.no_grad():
        logits = model(ids, torch.arange(SEQ)[None], causal)  # [1, SEQ, VP]
    assert logits.shape == (1, SEQ, VP)
    assert hf_logits.abs().max() > 1.0  # the comparison below is not between near-zeros
    torch.testing.assert_close(logits[..., :V], hf_logits, atol=LOGITS_ATOL, rtol=0)
    assert torch.all(logits[..., V:] == 0)  # zero padding rows -> zero logits


# ------------------------------------------------------------------------ round trips
# Read off get_gpt_layer_with_transformer_engine_spec (megatron-core 0.16.1): input_layernorm and
# pre_mlp_layernorm are IdentityOp; TELayerNormColumnParallelLinear owns `layer_norm_weight`.
TE_LAYER0 = {
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc2.weight",
}
TE_LAYER0_EXTRA = {
    "llama": set(),
    "qwen2": {"decoder.layers.0.self_attention.linear_qkv.bias"},
    "qwen3": {
        "decoder.layers.0.self_attention.q_layernorm.weight",
        "decoder.layers.0.self_attention.k_layernorm.weight",
    },
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("te_names", [False, True])
@pytest.mark.parametrize(("family", "tied"), CASES)
def test_round_trip_is_bit_exact(family, tied, te_names, dtype):
    arch, hf_state, _ = _hf(family, tied)
    hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    mc = hf_map.hf_to_mcore(hf_state, arch, padded_vocab=VP, te_names=te_names)
    if te_names:
        layer0 = {k for k in mc if k.startswith("decoder.layers.0.")}
        assert layer0 == TE_LAYER0 | TE_LAYER0_EXTRA[family]
    # A saved checkpoint has no lm_head when tied; HF's state_dict shows the shared tensor.
    want = {k: v for k, v in hf_state.items() if not (tied and k == "lm_head.weight")}
    for back in (
        hf_map.mcore_to_hf(mc, arch),  # naming detected
        hf_map.mcore_to_hf(mc, arch, te_names=te_names),
        dict(hf_map.iter_mcore_to_hf(reversed(list(mc.items())), arch)),
    ):
        assert back.keys() == want.keys()
        for k, v in want.items():
            assert back[k].dtype == v.dtype, k
            assert torch.equal(back[k], v), k


def test_export_skips_extra_state_and_tied_output_copy():
    arch, hf_state, _ = _hf("qwen3", True)
    mc = hf_map.hf_to_mcore(hf_state, arch, padded_vocab=VP)
    mc["decoder.layers.0.mlp.linear_fc1._extra_state"] = None
    mc["output_layer.weight"] = mc["embedding.word_embeddings.weight"].clone()  # last PP stage
    assert hf_map.mcore_to_hf(mc, arch).keys() == hf_state.keys() - {"lm_head.weight"}
    mc["output_layer.weight"][0, 0] += 1
    with pytest.raises(UnexpectedTensorError, match=r"output_layer\.weight differs"):
        hf_map.mcore_to_hf(mc, arch)


def test_ignored_hf_buffers_are_accepted():
    arch, hf_state, _ = _hf("llama", False)
    extra = {
        "model.rotary_emb.inv_freq": torch.ones(8),
        "model.layers.1.self_attn.rotary_emb.inv_freq": torch.ones(8),
    }
    mc = hf_map.hf_to_mcore({**hf_state, **extra}, arch, padded_vocab=VP)
    assert mc.keys() == hf_map.hf_to_mcore(hf_state, arch, padded_vocab=VP).keys()


# ---------------------------------------------------------------------------- TP shards
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_shards_are_megatron_partitions_and_unshard_inverts(family, tp):
    arch, hf, _ = _hf(family, False)
    mc = hf_map.hf_to_mcore(hf, arch, padded_vocab=VP)
    D, per_group = HEAD_DIM[family], HEADS // GROUPS * HEAD_DIM[family]
    p, rank_of = "model.layers.1.", range(tp)
    shards = {
        n: [hf_map.shard(n, t, tp_rank=r, tp_size=tp) for r in rank_of] for n, t in mc.items()
    }

    # qkv: the fused rows of group g are [q of heads g*Q/G..; k_g; v_g]; a rank holds G/tp
    # whole groups (tp <= G) or 1/(tp/G) of one group (tp > G), consecutive in that order.
    for kind in ("weight", "bias") if family == "qwen2" else ("weight",):
        q, k, v = (hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv")
        groups = [
            torch.cat(
                [
                    q[g * per_group : (g + 1) * per_group],
                    k[g * D : (g + 1) * D],
                    v[g * D : (g + 1) * D],
                ]
            )
            for g in range(GROUPS)
        ]
        got = shards[f"decoder.layers.1.self_attention.linear_qkv.{kind}"]
        if tp <= GROUPS:
            per_rank = GROUPS // tp
            for r in rank_of:
                assert torch.equal(got[r], torch.cat(groups[r * per_rank : (r + 1) * per_rank]))
        else:
            for g in range(GROUPS):
                ranks = got[g * tp // GROUPS : (g + 1) * tp // GROUPS]
                assert torch.equal(torch.cat(ranks), groups[g])
    # fc1: rank r holds [gate rows of r; up rows of r] (megatron's stride-2 partition).
    gate, up = hf[f"{p}mlp.gate_proj.weight"], hf[f"{p}mlp.up_proj.weight"]
    f = F_FFN // tp
    for r in rank_of:
        fc1_r = shards["decoder.layers.1.mlp.linear_fc1.weight"][r]
        assert torch.equal(fc1_r, torch.cat([gate[r * f : (r + 1) * f], up[r * f : (r + 1) * f]]))
        o = hf[f"{p}self_attn.o_proj.weight"]
        c = o.shape[1] // tp
        proj_r = shards["decoder.layers.1.self_attention.linear_proj.weight"][r]
        assert torch.equal(proj_r, o[:, r * c : (r + 1) * c])
        down_r = shards["decoder.layers.1.mlp.linear_fc2.weight"][r]
        assert torch.equal(down_r, hf[f"{p}mlp.down_proj.weight"][:, r * f : (r + 1) * f])
        embed_r = shards["embedding.word_embeddings.weight"][r]
        vr = VP // tp
        padded = torch.cat([hf["model.embed_tokens.weight"], torch.zeros(VP - V, H)])
        assert torch.equal(embed_r, padded[r * vr : (r + 1) * vr])
        assert torch.equal(shards["decoder.final_layernorm.weight"][r], hf["model.norm.weight"])

    for n, t in mc.items():
        assert torch.equal(hf_map.unshard(n, shards[n]), t), n


def test_shard_errors_name_the_tensor():
    with pytest.raises(UnexpectedTensorError, match=r"decoder\.layers\.0\.mlp\.router\.weight"):
        hf_map.shard("decoder.layers.0.mlp.router.weight", torch.zeros(4, 4), tp_rank=0, tp_size=2)
    with pytest.raises(ShapeMismatchError, match=r"linear_proj\.weight: dim 1 of size 6"):
        hf_map.shard(
            "decoder.layers.0.self_attention.linear_proj.weight",
            torch.zeros(4, 6),
            tp_rank=0,
            tp_size=4,
        )
    norm = "decoder.layers.0.input_layernorm.weight"
    with pytest.raises(ShapeMismatchError, match=f"{norm}: replicated tensor differs on TP rank 1"):
        hf_map.unshard(norm, [torch.zeros(4), torch.ones(4)])


# ------------------------------------------------------------------------------ errors
def test_missing_hf_tensor_is_named():
    arch, hf_state, _ = _hf("qwen2", False)
    state = dict(hf_state)
    del state["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        hf_map.hf_to_mcore(state, arch, padded_vocab=VP)
    del state["lm_head.weight"]  # untied: lm_head is required
    with pytest.raises(MissingTensorError, match=r"lm_head\.weight"):
        hf_map.hf_to_mcore(state, arch, padded_vocab=VP)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_norm.weight",  # a qwen3 tensor in a llama checkpoint
        "model.layers.2.input_layernorm.weight",  # layer index beyond num_hidden_layers
        "model.layers.0.mlp.experts.0.up_proj.weight",
    ],
)
def test_unexpected_hf_tensor_is_named(name):
    arch, hf_state, _ = _hf("llama", False)
    with pytest.raises(UnexpectedTensorError, match=name.replace(".", r"\.")):
        hf_map.hf_to_mcore({**hf_state, name: torch.zeros(4)}, arch, padded_vocab=VP)


def test_wrong_hf_shape_names_tensor_expected_and_got():
    arch, hf_state, _ = _hf("qwen3", False)
    bad = {**hf_state, "model.layers.0.self_attn.k_norm.weight": torch.ones(H)}
    with pytest.raises(
        ShapeMismatchError, match=r"k_norm\.weight: expected shape \[24\], got \[64\]"
    ):
        hf_map.hf_to_mcore(bad, arch, padded_vocab=VP)


def test_tied_lm_head_must_equal_embedding():
    arch, hf_state, _ = _hf("llama", True)
    bad = {**hf_state, "lm_head.weight": hf_state["lm_head.weight"] + 1}
    with pytest.raises(UnexpectedTensorError, match=r"lm_head\.weight differs"):
        hf_map.hf_to_mcore(bad, arch, padded_vocab=VP)
    with pytest.raises(ValueError, match="padded_vocab=200"):
        hf_map.hf_to_mcore(hf_state, arch, padded_vocab=200)


def test_mcore_errors_name_the_tensor():
    arch, hf_state, _ = _hf("llama", False)
    mc = hf_map.hf_to_mcore(hf_state, arch, padded_vocab=VP)
    name = "decoder.layers.1.mlp.linear_fc1.weight"
    with pytest.raises(MissingTensorError, match=name.replace(".", r"\.")):
        hf_map.mcore_to_hf({k: v for k, v in mc.items() if k != name}, arch)
    with pytest.raises(ShapeMismatchError, match=rf"{name}: expected shape \[192, 64\], got"):
        hf_map.mcore_to_hf({**mc, name: mc[name][:-2]}, arch)
    te_in_local = "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    with pytest.raises(UnexpectedTensorError, match=f"{te_in_local}: not a llama parameter"):
        hf_map.mcore_to_hf({**mc, te_in_local: torch.ones(H)}, arch, te_names=False)
    with pytest.raises(UnexpectedTensorError, match=r"linear_qkv\.bias: not a llama parameter"):
        list(
            hf_map.iter_mcore_to_hf(
                [("decoder.layers.0.self_attention.linear_qkv.bias", torch.zeros(4))], arch
            )
        )


def test_hf_outputs_name_the_tensors_to_hf_returns():
    arch = _hf("qwen2", False)[0]
    assert [n for n, _ in hf_map.hf_outputs("decoder.layers.1.mlp.linear_fc1.weight", arch)] == [
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]
    assert hf_map.hf_outputs("embedding.word_embeddings.weight", arch) == [
        ("model.embed_tokens.weight", (V, H))
    ]
    assert hf_map.hf_outputs("decoder.layers.0.mlp.linear_fc1._extra_state", arch) == []
    _, hf_state, _ = _hf("qwen2", False)
    mc = hf_map.hf_to_mcore(hf_state, arch, padded_vocab=VP)
    for name, t in mc.items():
        got = [(n, tuple(x.shape)) for n, x in hf_map.to_hf(name, t, arch=arch)]
        assert got == hf_map.hf_outputs(name, arch), name

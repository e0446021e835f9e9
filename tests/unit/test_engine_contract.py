"""The RolloutEngine contract, on the embedded engine, against Hugging Face transformers itself.

Independent truth: tokens and log-probs are checked against a separate HF model holding the same
weights, run teacher-forced over prompt + completion with one full forward (no KV cache, no
padding), and against `model.generate`; sampling frequencies against softmax(logits / T) of that
forward. Tiny random Qwen2/Qwen3 configs (2 layers, hidden 64, vocab 96), no downloads.

Tolerance: log-probs agree to atol 1e-5 (float32 on both sides; the engine's batched, padded,
KV-cached path differs from the full forward only in summation order: 1.7e-6 measured at most).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

from rpg_megatron.batch import Completion, SamplingParams
from rpg_megatron.config import RolloutConfig
from rpg_megatron.rollout import make_engine

V = 96
ATOL = 1e-5
PROMPTS = [[5, 17, 3], [40, 2, 9, 9, 11, 60, 7], [88], [1, 2, 3, 4, 5]]


def _hf_config(family: str = "qwen3", **overrides) -> dict:
    common = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # Larger than HF's 0.02 so next-token distributions are peaked (logit std ~2): top-k/p
        # then cut real mass and greedy has clear winners.
        initializer_range=0.25,
        eos_token_id=None,
    )
    common.update(overrides)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **common).to_dict()
    return Qwen2Config(**common).to_dict()


def _hf_model(hf_config: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = (Qwen3Config if hf_config["model_type"] == "qwen3" else Qwen2Config).from_dict(hf_config)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _buckets(model: torch.nn.Module, per_bucket: int = 5) -> list[list[tuple[str, torch.Tensor]]]:
    items = [(n, t.detach().clone()) for n, t in model.state_dict().items()]
    return [items[i : i + per_bucket] for i in range(0, len(items), per_bucket)]


def _engine(hf_config: dict, model=None, *, version: int = 0, tokenizer=None, **cfg):
    engine = make_engine(RolloutConfig(**cfg), hf_config=hf_config, tokenizer=tokenizer)
    if model is not None:
        engine.update_weights(_buckets(model), version=version)
    return engine


@torch.no_grad()
def _teacher_forced(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Logits [len(completion), V] predicting each completion token, from one full forward."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]


def _check_against_hf(model, prompt: list[int], c: Completion) -> None:
    """Completion log-probs are the raw (T=1) log-softmax of the HF model at those tokens."""
    logits = _teacher_forced(model, prompt, c.token_ids)
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=ATOL, rtol=0)


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """Printable ASCII, one character per token (ids 0..94), plus <eos> = 95."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))} | {"<eos>": 95}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# ------------------------------------------------------------------------------ greedy, batching
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_greedy_tokens_and_logprobs_match_hf(family):
    hf_config = _hf_config(family)
    model = _hf_model(hf_config, seed=1)
    engine = _engine(hf_config, model, version=3)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    out = engine.generate(PROMPTS, params)
    assert [c.prompt_index for c in out] == list(range(len(PROMPTS)))
    for prompt, c in zip(PROMPTS, out, strict=True):
        assert c.finish_reason == "length" and len(c.token_ids) == 10 and c.weight_version == 3
        logits = _teacher_forced(model, prompt, c.token_ids)
        assert c.token_ids == logits.argmax(-1).tolist()
        _check_against_hf(model, prompt, c)
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0
        )
        assert c.token_ids == ref[0, len(prompt) :].tolist()


def test_decoding_uses_no_deprecated_transformers_api(caplog):
    # transformers 5.24 renamed the KV cache `past_key_values` -> `cache`: the old name warns
    # (a FutureWarning from the forward's deprecate_kwarg, a logged warning from the output's
    # property) and goes in 5.40. A row that finishes early shrinks the cache too.
    hf_config = _hf_config()
    engine = _engine(hf_config, _hf_model(hf_config, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, stop_token_ids=(7, 9)))
    assert len(out) == len(PROMPTS)
    assert "deprecated" not in caplog.text


def test_batched_prompts_of_different_lengths_equal_one_by_one():
    hf_config = _hf_config()
    model = _hf_model(hf_config, seed=2)
    engine = _engine(hf_config, model)
    for params in (
        SamplingParams(max_new_tokens=8, temperature=0.0),
        SamplingParams(max_new_tokens=8, temperature=1.0, seed=11),
    ):
        batched = engine.generate(PROMPTS, params)
        for i, prompt in enumerate(PROMPTS):
            # Row i of a sampled batch draws from the stream of (seed, i): prepend i dummy
            # prompts so the single prompt sits at the same index.
            alone = engine.generate([[0]] * i + [prompt], params)[i]
            assert alone.token_ids == batched[i].token_ids
            torch.testing.assert_close(alone.logprobs, batched[i].logprobs, atol=ATOL, rtol=0)


def test_batch_size_chunking_does_not_change_samples():
    hf_config = _hf_config()
    model = _hf_model(hf_config, seed=2)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=5)
    whole = _engine(hf_config, model, embedded_batch_size=64).generate(PROMPTS, params)
    chunked = _engine(hf_config, model, embedded_batch_size=3).generate(PROMPTS, params)
    assert [c.token_ids for c in whole] == [c.token_ids for c in chunked]
    assert [c.prompt_index for c in chunked] == [0, 1, 2, 3]


def test_top_k_1_equals_greedy():
    hf_config = _hf_config()
    engine = _engine(hf_config, _hf_model(hf_config, seed=3))
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0))
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, top_k=1, seed=9))
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]


# ------------------------------------------------------------------------------ sampling
def test_seeded_sampling_is_reproducible_and_streams_are_independent():
    hf_config = _hf_config()
    model = _hf_model(hf_config, seed=4)
    engine = _engine(hf_config, model)
    prompts = [PROMPTS[1]] * 4  # n samples of one prompt = the prompt repeated
    a = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=123))
    b = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=123))
    c = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=124))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert len({tuple(x.token_ids) for x in a}) == 4, "repeated prompts must get distinct streams"
    # A freshly built engine with the same weights and seed samples the same tokens.
    again = _engine(hf_config, model).generate(prompts, SamplingParams(max_new_tokens=12, seed=123))
    assert [x.token_ids for x in again] == [x.token_ids for x in a]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=10, temperature=0.7, top_k=5, seed=1),
        SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.6, seed=2),
    ],
    ids=["T0.7-top_k5", "T1.3-top_p0.6"],
)
def test_sampled_tokens_respect_filters_and_logprobs_are_raw_model(params):
    hf_config = _hf_config()
    model = _hf_model(hf_config, seed=5)
    engine = _engine(hf_config, model)
    for prompt, c in zip(PROMPTS, engine.generate(PROMPTS, params), strict=True):
        # Documented definition: temperature-1, unfiltered log-probs (what the trainer computes).
        _check_against_hf(model, prompt, c)
        logits = _teacher_forced(model, prompt, c.token_ids)
        for t, tok in enumerate(c.token_ids):
            probs = torch.softmax(logits[t].double() / params.temperature, -1)
            order = probs.argsort(descending=True).tolist()
            if params.top_k is not None:
                assert tok in order[: params.top_k]
            if params.top_p < 1:
                mass_before = probs[order[: order.index(tok)]].sum().item()
                assert mass_before < params.top_p


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(0.7, None, 1.0), (1.5, 10, 1.0), (1.0, None, 0.8)],
)
def test_one_step_sample_frequencies_match_softmax(temperature, top_k, top_p):
    hf_config = _hf_config()
    model = _hf_model(hf_config, seed=6)
    engine = _engine(hf_config, model, embedded_batch_size=4096)
    prompt, n = [7, 30, 2], 4000
    params = SamplingParams(
        max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=2024
    )
    out = engine.generate([prompt] * n, params)
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out]), minlength=V).double()

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    mass = 0.0
    for rank, tok in enumerate(order.tolist()):  # the filters, spelled out by hand
        if (top_k is not None and rank >= top_k) or mass >= top_p:
            break
        keep[tok] = True
        mass += probs[tok].item()
    expected = torch.where(keep, probs, 0.0)
    expected = expected / expected.sum() * n

    assert counts[~keep].sum() == 0, "a filtered-out token was sampled"
    # Pearson chi-square over bins with >= 5 expected draws, the rest pooled into one bin.
    big = expected >= 5
    obs = torch.cat([counts[big], counts[keep & ~big].sum()[None]])
    exp = torch.cat([expected[big], expected[keep & ~big].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    dof = len(exp) - 1
    # Mean dof, sd sqrt(2 dof): dof + 5 sd is far beyond any honest draw, and a wrong
    # temperature or filter (e.g. T applied twice) lands orders of magnitude above it.
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


# ------------------------------------------------------------------------------ stopping
def test_stop_token_ids_eos_and_max_tokens():
    hf_config = _hf_config()
    model = _hf_model(hf_config, seed=7)
    free = _engine(hf_config, model).generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0.0)
    )[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_tok = free.token_ids[4]
    cut = free.token_ids.index(stop_tok) + 1  # first occurrence, stop token kept

    stopped = _engine(hf_config, model).generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[stop_tok])
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[:cut]
    assert stopped.logprobs == pytest.approx(free.logprobs[:cut], abs=ATOL)

    # The model's own eos_token_id (config.json) stops it too, unless ignore_eos.
    eos_config = _hf_config(eos_token_id=stop_tok)
    eos_engine = _engine(eos_config, model)
    by_eos = eos_engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0))
    assert by_eos[0].finish_reason == "stop" and by_eos[0].token_ids == free.token_ids[:cut]
    ignored = eos_engine.generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    )
    assert ignored[0].finish_reason == "length" and ignored[0].token_ids == free.token_ids

    short = _engine(hf_config, model).generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=3, temperature=0.0)
    )[0]
    assert short.finish_reason == "length" and short.token_ids == free.token_ids[:3]


def test_stop_strings_truncate_after_the_completing_token():
    hf_config = _hf_config()
    model = _hf_model(hf_config, seed=8)
    tok = _char_tokenizer()
    prompt = tok("x = 1 + ")["input_ids"]
    engine = _engine(hf_config, model, tokenizer=tok)
    free = engine.generate([prompt], SamplingParams(max_new_tokens=16, temperature=0.0))[0]
    text = tok.decode(free.token_ids)
    stop = text[6:8]
    # Independent truth: the shortest prefix whose full decode contains the stop string.
    cut = next(k for k in range(1, 17) if stop in tok.decode(free.token_ids[:k]))

    params = SamplingParams(max_new_tokens=16, temperature=0.0, stop=[stop, "never-there"])
    out = engine.generate([prompt, prompt], params)
    for c in out:
        assert c.finish_reason == "stop"
        assert c.token_ids == free.token_ids[:cut]

    with pytest.raises(ValueError, match=r"SamplingParams\.stop=.*need a tokenizer"):
        _engine(hf_config, model).generate([prompt], params)


# ------------------------------------------------------------------------------ weights
def test_generate_before_any_update_raises():
    engine = _engine(_hf_config())
    with pytest.raises(RuntimeError, match="no weights loaded"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))


def test_update_weights_takes_effect_in_place_and_sets_version():
    hf_config = _hf_config()
    model_a, model_b = _hf_model(hf_config, seed=10), _hf_model(hf_config, seed=11)
    engine = _engine(hf_config, model_a, version=0)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = engine.generate(PROMPTS, params)
    ptrs = {n: p.data_ptr() for n, p in engine._model.named_parameters()}

    engine.update_weights(iter(_buckets(model_b, per_bucket=3)), version=7)
    after = engine.generate(PROMPTS, params)
    assert {n: p.data_ptr() for n, p in engine._model.named_parameters()} == ptrs
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    for prompt, c in zip(PROMPTS, after, strict=True):
        assert c.weight_version == 7
        assert c.token_ids == _teacher_forced(model_b, prompt, c.token_ids).argmax(-1).tolist()
        _check_against_hf(model_b, prompt, c)


def test_update_weights_accepts_bf16_and_tied_embeddings():
    hf_config = _hf_config("qwen2", tie_word_embeddings=True)
    model = _hf_model(hf_config, seed=12)
    engine = _engine(hf_config)
    # The Megatron export sends no lm_head.weight when embeddings are tied; both forms load.
    without_head = [
        [(n, t.to(torch.bfloat16)) for n, t in b if n != "lm_head.weight"] for b in _buckets(model)
    ]
    engine.update_weights(without_head, version=1)
    model_bf16 = _hf_model(hf_config, seed=12)
    model_bf16.load_state_dict({n: t.to(torch.bfloat16) for n, t in model.state_dict().items()})
    c = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=6, temperature=0.0))[0]
    _check_against_hf(model_bf16, PROMPTS[1], c)

    engine.update_weights(_buckets(model), version=2)  # with lm_head.weight == embedding
    bad = dict(model.state_dict())
    bad["lm_head.weight"] = bad["lm_head.weight"] + 1.0
    with pytest.raises(
        ValueError, match=r"lm_head\.weight and model\.embed_tokens\.weight are tied"
    ):
        engine.update_weights([list(bad.items())], version=3)


def test_update_weights_rejects_unknown_name_wrong_shape_and_missing_tensors():
    hf_config = _hf_config()
    model = _hf_model(hf_config, seed=13)
    engine = _engine(hf_config, model, version=0)
    state = list(model.state_dict().items())

    unknown = [*state, ("model.layers.2.mlp.up_proj.weight", torch.zeros(128, 64))]
    with pytest.raises(
        ValueError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight' is not a tensor"
    ):
        engine.update_weights([unknown], version=1)

    name, t = state[3]
    wrong = [*state[:3], (name, t[:-1]), *state[4:]]
    with pytest.raises(ValueError, match=rf"{name} has shape \[{t.shape[0] - 1}, "):
        engine.update_weights([wrong], version=1)

    with pytest.raises(ValueError, match=rf"1 parameters never arrived \(first: {state[-1][0]}\)"):
        engine.update_weights([state[:-1]], version=1)
    # A failed update leaves no usable weights rather than a mix of two policies.
    with pytest.raises(RuntimeError, match="no weights loaded"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    engine.update_weights([state], version=2)
    assert engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))[0].weight_version == 2


# ------------------------------------------------------------------------------ lifecycle
def test_sleep_wake_health_and_idempotent_shutdown():
    hf_config = _hf_config()
    model = _hf_model(hf_config, seed=14)
    engine = _engine(hf_config, model)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    before = engine.generate(PROMPTS, params)
    engine.sleep()
    assert engine.health()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, params)
    engine.update_weights(_buckets(model), version=5)  # colocated sync may happen while asleep
    engine.wake()
    after = engine.generate(PROMPTS, params)
    assert [c.token_ids for c in after] == [c.token_ids for c in before]
    assert {c.weight_version for c in after} == {5}
    engine.shutdown()
    engine.shutdown()
    assert not engine.health()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(PROMPTS, params)


# ------------------------------------------------------------------------------ inputs, factory
def test_bad_prompts_and_params_are_named():
    hf_config = _hf_config()
    engine = _engine(hf_config, _hf_model(hf_config, seed=15))
    p = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        engine.generate([[1], []], p)
    with pytest.raises(ValueError, match=rf"prompts\[0\] holds token id {V}, outside"):
        engine.generate([[1, V]], p)
    with pytest.raises(ValueError, match=r"exceeds max_position_embeddings=128"):
        engine.generate([[1] * 100], SamplingParams(max_new_tokens=29))
    for kwargs, field in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="2 token_ids but 1 logprobs"):
        Completion(
            prompt_index=0, token_ids=[1, 2], logprobs=[0.0], finish_reason="stop", weight_version=0
        )


def test_make_engine_names_the_engine_it_cannot_build():
    with pytest.raises(ValueError, match=r"rollout\.engine='sglang' needs rollout\.sglang"):
        make_engine(RolloutConfig(engine="sglang"), hf_config=_hf_config())
    with pytest.raises(ValueError, match=r"rollout\.engine='vllm'.*embedded, sglang"):
        make_engine(RolloutConfig(engine="vllm"), hf_config=_hf_config())
    with pytest.raises(ValueError, match=r"model_type='gpt9'"):
        make_engine(RolloutConfig(), hf_config={"model_type": "gpt9"})


@pytest.mark.gpu
def test_cuda_engine_matches_cpu_and_sleep_frees_device_memory():
    hf_config = _hf_config()
    model = _hf_model(hf_config, seed=16)
    cpu = _engine(hf_config, model)
    gpu = _engine(hf_config, model, embedded_device="cuda")
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    want = cpu.generate(PROMPTS, params)
    got = gpu.generate(PROMPTS, params)
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(g.logprobs, w.logprobs, atol=1e-4, rtol=0)
    awake = torch.cuda.memory_allocated()
    gpu.sleep()
    assert torch.cuda.memory_allocated() < awake
    gpu.update_weights(_buckets(model), version=1)  # lands in the host copy while asleep
    gpu.wake()
    assert [c.token_ids for c in gpu.generate(PROMPTS, params)] == [c.token_ids for c in want]
    gpu.shutdown()

"""Vocab-parallel log-probs (TP = 1) and the Megatron loss_func, against float64 references.

The truth is `torch.log_softmax` in float64 over the true (unpadded) vocabulary and, for the
loss, the aggregation formulas written out here; gradients come from float64 autograd.

Legend: T tokens, V padded vocab, N sequences.
"""

from __future__ import annotations

import pytest
import torch

from rpg_megatron.megatron.loss_hook import LossInputs, make_loss_func, vocab_parallel_logprobs
from rpg_megatron.objectives import GRPO, TokenTerms

PAD_VALUE = 1e4  # exp(1e4) overflows everything; any leak of a padded column shows


def _logits(T: int, V: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x_TV = torch.randn(T, V, generator=g, dtype=torch.float64) * 4
    x_TV[:, vocab_size:] = PAD_VALUE
    return x_TV


def _reference(x_TV: torch.Tensor, target_T: torch.Tensor, vocab_size: int):
    """float64 logp, entropy and d(sum g * logp)/dx of the true vocabulary."""
    x = x_TV.detach().double()[:, :vocab_size].requires_grad_()
    logsm_TV = torch.log_softmax(x, dim=-1)
    logp_T = logsm_TV.gather(1, target_T[:, None]).squeeze(1)
    ent_T = -(logsm_TV.exp() * logsm_TV).sum(-1)
    return logp_T, ent_T, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 4096])
@pytest.mark.parametrize("grad_into_logits", [False, True])
def test_logp_entropy_grad_match_float64(dtype, chunk_tokens, grad_into_logits):
    T, V, vocab_size = 45, 96, 89  # 7 padded columns; 7 does not divide 45
    x_TV = _logits(T, V, vocab_size).to(dtype)
    target_T = torch.randint(0, vocab_size, (T,), generator=torch.Generator().manual_seed(1))
    g_T = torch.randn(T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    ref_logp_T, ref_ent_T, x_ref = _reference(x_TV, target_T, vocab_size)
    (ref_logp_T * g_T).sum().backward()

    leaf_TV = x_TV.clone().requires_grad_()
    logp_T, ent_T = vocab_parallel_logprobs(
        leaf_TV,
        target_T,
        vocab_start=0,
        vocab_size=vocab_size,
        chunk_tokens=chunk_tokens,
        with_entropy=True,
        grad_into_logits=grad_into_logits,
    )
    assert logp_T.dtype == ent_T.dtype == torch.float32
    assert not ent_T.requires_grad
    # float32 accumulation from the exact same (possibly bf16) logits: ~1e-6 absolute.
    torch.testing.assert_close(logp_T.double(), ref_logp_T.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(ent_T.double(), ref_ent_T.detach(), rtol=0, atol=2e-5)

    (logp_T * g_T.float()).sum().backward()
    grad_TV = leaf_TV.grad
    assert grad_TV.dtype == dtype
    assert torch.all(grad_TV[:, vocab_size:] == 0)
    # The gradient is rounded once to the logits dtype: within one rounding step of the truth.
    expected_TV = x_ref.grad.to(dtype).double()
    eps = torch.finfo(dtype).eps
    tol_TV = eps * expected_TV.abs() + 1e-6
    assert torch.all((grad_TV[:, :vocab_size].double() - expected_TV).abs() <= tol_TV)


def test_without_entropy_returns_none_and_same_logp():
    T, V = 20, 33
    x_TV = _logits(T, V, V).float()
    target_T = torch.arange(T) % V
    a, ent = vocab_parallel_logprobs(x_TV, target_T, vocab_start=0, vocab_size=V, chunk_tokens=3)
    b, _ = vocab_parallel_logprobs(
        x_TV, target_T, vocab_start=0, vocab_size=V, chunk_tokens=3, with_entropy=True
    )
    assert ent is None
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_infinite_padding_is_ignored():
    T, V, vocab_size = 6, 16, 10
    x_TV = _logits(T, V, vocab_size).float()
    x_TV[:, vocab_size:] = float("inf")
    target_T = torch.tensor([0, 9, 3, 9, 1, 2])
    logp_T, ent_T = vocab_parallel_logprobs(
        x_TV, target_T, vocab_start=0, vocab_size=vocab_size, with_entropy=True
    )
    ref_logp_T, ref_ent_T, _ = _reference(x_TV, target_T, vocab_size)
    torch.testing.assert_close(logp_T.double(), ref_logp_T.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_T.double(), ref_ent_T.detach(), rtol=0, atol=1e-5)


def test_grad_into_logits_refuses_a_second_backward():
    x_TV = _logits(4, 8, 8).float().requires_grad_()
    logits_TV = x_TV * 1.0  # a non-leaf, as the model's output is
    logp_T, _ = vocab_parallel_logprobs(
        logits_TV,
        torch.zeros(4, dtype=torch.long),
        vocab_start=0,
        vocab_size=8,
        grad_into_logits=True,
    )
    logp_T.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp_T.sum().backward()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_tokens": 0}, "chunk_tokens=0"),
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"target_T": torch.zeros(4, dtype=torch.int32)}, "target_T"),
        ({"logits_TV": torch.zeros(2, 4, 8)}, "logits_TV"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    args = {
        "logits_TV": torch.zeros(4, 8),
        "target_T": torch.zeros(4, dtype=torch.long),
        "vocab_start": 0,
        "vocab_size": 8,
    } | kwargs
    logits, target = args.pop("logits_TV"), args.pop("target_T")
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs(logits, target, **args)


# --------------------------------------------------------------------------------- loss_func
N_SEQS, V_LOSS, VOCAB = 8, 40, 37
MAX_RESPONSE = 9
OBJECTIVE = GRPO(beta=0.05, clip=(0.2, 0.2), kl_importance_weight=True)


def _batch():
    """N_SEQS packed sequences of varying length; the first two positions of each are prompt
    (mask 0), and one sequence has no trained token at all."""
    g = torch.Generator().manual_seed(3)
    lens_N = [5, 9, 3, 7, 4, 8, 6, 2]
    seq_T = torch.cat([torch.full((n,), i) for i, n in enumerate(lens_N)])
    mask_T = torch.cat([(torch.arange(n) >= 2).double() for n in lens_N])
    mask_T[seq_T == 7] = 0  # a sequence with an empty response still counts as "constant"
    T = seq_T.numel()
    x_TV = _logits(T, V_LOSS, VOCAB, seed=4).float().double()
    target_T = torch.randint(0, VOCAB, (T,), generator=g)
    true_logp_T = torch.log_softmax(x_TV[:, :VOCAB], -1).gather(1, target_T[:, None]).squeeze(1)
    old_T = true_logp_T + 0.3 * torch.randn(T, generator=g, dtype=torch.float64)
    ref_T = true_logp_T + 0.3 * torch.randn(T, generator=g, dtype=torch.float64)
    adv_T = torch.randn(N_SEQS, generator=g, dtype=torch.float64)[seq_T]
    return lens_N, seq_T, mask_T, x_TV, target_T, old_T, ref_T, adv_T


def _reference_loss(mode: str):
    """Loss and d loss / d logits of the whole batch, float64, aggregation written out."""
    _, seq_T, mask_T, x_TV, target_T, old_T, ref_T, adv_T = _batch()
    x = x_TV.clone().requires_grad_()
    logp_T = torch.log_softmax(x[:, :VOCAB], -1).gather(1, target_T[:, None]).squeeze(1)
    terms = TokenTerms(
        logp_T=logp_T, old_logp_T=old_T, ref_logp_T=ref_T, adv_T=adv_T, mask_T=mask_T
    )
    loss_T, _ = OBJECTIVE(terms)
    if mode == "token":
        loss = (loss_T * mask_T).sum() / mask_T.sum()
    elif mode == "sequence":
        per_seq = [
            (loss_T * mask_T)[seq_T == i].sum() / mask_T[seq_T == i].sum()
            for i in range(N_SEQS)
            if mask_T[seq_T == i].sum() > 0
        ]
        loss = torch.stack(per_seq).mean()
    else:
        loss = (loss_T * mask_T).sum() / (N_SEQS * MAX_RESPONSE)
    loss.backward()
    return loss.detach(), x.grad


def _run_micro_batches(mode: str, n_micro: int):
    """What Megatron does: backward each numerator, sum the denominators, divide once."""
    lens_N, seq_T, mask_T, x_TV, target_T, old_T, ref_T, adv_T = _batch()
    per_mb = N_SEQS // n_micro
    nums, dens, grads, logs = [], [], [], []
    start = 0
    for m in range(n_micro):
        ids = range(m * per_mb, (m + 1) * per_mb)
        stop = start + sum(lens_N[i] for i in ids)
        sl = slice(start, stop)
        inp = LossInputs(
            target_T=target_T[sl],
            old_logp_T=old_T[sl].float(),
            ref_logp_T=ref_T[sl].float(),
            adv_T=adv_T[sl].float(),
            mask_T=mask_T[sl].float(),
            seq_index_T=seq_T[sl] - m * per_mb,
            n_seqs=per_mb,
            max_response_len=MAX_RESPONSE,
        )
        fn = make_loss_func(
            inp,
            OBJECTIVE,
            mode,
            tp_group=None,
            vocab_start=0,
            vocab_size=VOCAB,
            chunk_tokens=5,
            with_entropy=True,
        )
        logits_BSV = x_TV[sl].float()[None].clone().requires_grad_()
        num, den, log = fn(logits_BSV)
        assert num.dim() == 0 and den.dim() == 0 and den.dtype == torch.int64
        num.backward()
        nums.append(num.detach())
        dens.append(den)
        grads.append(logits_BSV.grad[0])
        logs.append(log)
        start = stop
    total_den = torch.stack(dens).sum()
    loss = torch.stack(nums).sum() / total_den
    return loss, torch.cat(grads) / total_den, logs, mask_T


@pytest.mark.parametrize("mode", ["token", "sequence", "constant"])
@pytest.mark.parametrize("n_micro", [1, 4])
def test_loss_func_micro_batches_match_whole_batch(mode, n_micro):
    ref_loss, ref_grad_TV = _reference_loss(mode)
    loss, grad_TV, logs, mask_T = _run_micro_batches(mode, n_micro)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_TV.double(), ref_grad_TV, rtol=1e-4, atol=1e-6)

    summed = {k: sum(log[k] for log in logs) for k in logs[0]}
    assert set(summed) >= {"loss", "entropy", "ratio", "kl"}
    torch.testing.assert_close(summed["loss"][0] / summed["loss"][1], ref_loss, rtol=1e-5, atol=0)
    for name in ("entropy", "ratio", "kl"):
        assert summed[name][1].item() == mask_T.sum().item()  # counts are trained tokens


def test_loss_func_rejects_missing_ref_and_wrong_logits_shape():
    _, seq_T, mask_T, _, target_T, old_T, _, adv_T = _batch()
    fields = dict(target_T=target_T, old_logp_T=old_T, adv_T=adv_T, mask_T=mask_T)
    inp = LossInputs(**fields, ref_logp_T=None, seq_index_T=seq_T, n_seqs=N_SEQS)
    with pytest.raises(ValueError, match="ref_logp_T"):
        make_loss_func(inp, OBJECTIVE, "token", tp_group=None, vocab_start=0, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="max_response_len"):
        make_loss_func(
            inp, GRPO(beta=0.0), "constant", tp_group=None, vocab_start=0, vocab_size=VOCAB
        )
    fn = make_loss_func(
        inp, GRPO(beta=0.0), "token", tp_group=None, vocab_start=0, vocab_size=VOCAB
    )
    with pytest.raises(ValueError, match=r"B \* S"):
        fn(torch.zeros(1, 3, V_LOSS))
    with pytest.raises(ValueError, match=r"LossInputs\.adv_T"):
        LossInputs(
            **(fields | {"adv_T": adv_T[:-1]}), ref_logp_T=None, seq_index_T=seq_T, n_seqs=N_SEQS
        )


def test_token_weights_scale_each_tokens_loss_and_gradient():
    """weight_T (truncated importance weights) multiplies token t's loss: with weights w_t the
    logits gradient of token t is w_t times the unweighted one, and the numerator follows."""
    T, V = 6, 11
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, V, (T,), generator=g)
    weights = torch.tensor([0.5, 2.0, 1.0, 0.0, 1.5, 1.0])
    common = dict(
        target_T=target,
        old_logp_T=torch.full((T,), -2.0),
        ref_logp_T=torch.full((T,), -2.1),
        adv_T=torch.randn(T, generator=g),
        mask_T=torch.ones(T),
        seq_index_T=torch.zeros(T, dtype=torch.int64),
        n_seqs=1,
    )
    grads, nums = [], []
    for w in (None, weights):
        logits = torch.randn(1, T, V, generator=torch.Generator().manual_seed(4)).requires_grad_()
        fn = make_loss_func(
            LossInputs(**common, weight_T=w),
            GRPO(beta=0.05, kl_importance_weight=True),
            "token",
            tp_group=None,
            vocab_start=0,
            vocab_size=V,
        )
        num, _, _ = fn(logits)
        (grad,) = torch.autograd.grad(num, logits)
        grads.append(grad[0])
        nums.append(num)
    torch.testing.assert_close(grads[1], grads[0] * weights[:, None])
    assert torch.all(grads[1][3] == 0) and torch.any(grads[0][3] != 0)

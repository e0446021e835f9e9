"""TP = 2 vocab-parallel log-probs and loss_func on gloo, against one-rank float64 truth.

Each rank holds the vocabulary shard [rank * V_tp, (rank + 1) * V_tp) of the same logits, as
Megatron's VocabParallelEmbedding / ColumnParallelLinear split them; the vocabulary is padded to
2 * V_tp, so the padding sits on the last rank. Log-probs and entropy must equal float64
`log_softmax` over the true vocabulary on every rank, and the per-rank gradients, concatenated,
must equal float64 autograd's.

Legend: T tokens, V padded vocab, V_tp = V / 2 per rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rpg_megatron.megatron.loss_hook import LossInputs, make_loss_func, vocab_parallel_logprobs
from rpg_megatron.objectives import GRPO
from tests.distributed import spawn

pytestmark = pytest.mark.slow

T, V = 23, 64
V_TP = V // 2


def _data(vocab_size: int):
    g = torch.Generator().manual_seed(0)
    x_TV = torch.randn(T, V, generator=g, dtype=torch.float64) * 4
    x_TV[:, vocab_size:] = 1e4  # padding with values that would dominate any softmax
    target_T = torch.randint(0, vocab_size, (T,), generator=g)
    g_T = torch.randn(T, generator=g, dtype=torch.float64)
    return x_TV, target_T, g_T


def _np(x):
    """Results cross the process boundary as float64 numpy arrays: tensors put on spawn's
    torch.multiprocessing queue travel as shared-memory handles, which fail (EOFError) when the
    rank exits before the parent has received them."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    if isinstance(x, dict):
        return {k: _np(v) for k, v in x.items()}
    return tuple(_np(v) for v in x)


def _t(x):
    """Inverse of _np, in the parent."""
    if isinstance(x, dict):
        return {k: _t(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_t(v) for v in x)
    return torch.from_numpy(x)


CASES = [  # (true vocab size, logits dtype)
    (61, torch.float32),  # three padded columns, all on rank 1
    (61, torch.bfloat16),
    (30, torch.float32),  # rank 1 holds padding only (an extreme split)
    (30, torch.bfloat16),
]


def _tp_logprobs(rank: int, world: int) -> list[tuple[torch.Tensor, ...]]:
    out = []
    for vocab_size, dtype in CASES:  # one spawn for all cases: process start-up dominates
        x_TV, target_T, g_T = _data(vocab_size)
        shard_TV = x_TV[:, rank * V_TP : (rank + 1) * V_TP].to(dtype).requires_grad_()
        logp_T, ent_T = vocab_parallel_logprobs(
            shard_TV,
            target_T,
            vocab_start=rank * V_TP,
            vocab_size=vocab_size,
            tp_group=dist.group.WORLD,
            chunk_tokens=5,
            with_entropy=True,
        )
        (logp_T * g_T.float()).sum().backward()
        out.append(_np((logp_T, ent_T, shard_TV.grad)))
    return out


def test_tp2_matches_full_vocab_float64():
    per_rank = [[_t(c) for c in r] for r in spawn(2, _tp_logprobs)]
    for case, (vocab_size, dtype) in enumerate(CASES):
        results = [r[case] for r in per_rank]
        x_TV, target_T, g_T = _data(vocab_size)
        x = x_TV.to(dtype).double()[:, :vocab_size].requires_grad_()
        logsm_TV = torch.log_softmax(x, -1)
        ref_logp_T = logsm_TV.gather(1, target_T[:, None]).squeeze(1)
        ref_ent_T = -(logsm_TV.exp() * logsm_TV).sum(-1)
        (ref_logp_T * g_T).sum().backward()

        for logp_T, ent_T, _ in results:  # every TP rank returns the full-vocab answer
            torch.testing.assert_close(logp_T.double(), ref_logp_T.detach(), rtol=0, atol=2e-5)
            torch.testing.assert_close(ent_T.double(), ref_ent_T.detach(), rtol=0, atol=2e-5)
        grad_TV = torch.cat([r[2] for r in results], dim=1).double()
        assert torch.all(grad_TV[:, vocab_size:] == 0), f"case {case}: padding got gradient"
        expected_TV = x.grad.to(dtype).double()  # one rounding to the logits dtype
        tol_TV = torch.finfo(dtype).eps * expected_TV.abs() + 1e-6
        err_TV = (grad_TV[:, :vocab_size] - expected_TV).abs()
        assert torch.all(err_TV <= tol_TV), f"case {case}: max grad error {err_TV.max():.3g}"


def _loss_inputs(vocab_size: int) -> tuple[LossInputs, torch.Tensor]:
    x_TV, target_T, _ = _data(vocab_size)
    g = torch.Generator().manual_seed(1)
    seq_T = torch.tensor([0] * 8 + [1] * 9 + [2] * 6)
    mask_T = (torch.rand(T, generator=g) > 0.3).float()
    inp = LossInputs(
        target_T=target_T,
        old_logp_T=-3 + torch.randn(T, generator=g),
        ref_logp_T=-3 + torch.randn(T, generator=g),
        adv_T=torch.randn(3, generator=g)[seq_T],
        mask_T=mask_T,
        seq_index_T=seq_T,
        n_seqs=3,
    )
    return inp, x_TV.float()


def _loss_func_np(rank: int, world: int, vocab_size: int):
    return _np(_loss_func(rank, world, vocab_size))


def _loss_func(rank: int, world: int, vocab_size: int):
    inp, x_TV = _loss_inputs(vocab_size)
    objective = GRPO(beta=0.05, kl_importance_weight=True)
    fn = make_loss_func(
        inp,
        objective,
        "sequence",
        tp_group=None if world == 1 else dist.group.WORLD,
        vocab_start=rank * x_TV.shape[1] // world,
        vocab_size=vocab_size,
        chunk_tokens=4,
        with_entropy=True,
    )
    shard = slice(rank * V // world, (rank + 1) * V // world)
    logits_BSV = x_TV[None, :, shard].clone().requires_grad_()
    num, den, logs = fn(logits_BSV)
    num.backward()
    return num, den, logs, logits_BSV.grad[0]


def test_tp2_loss_func_matches_one_rank():
    num1, den1, logs1, grad1_TV = _t(_np(_loss_func(0, 1, 61)))
    results = [_t(r) for r in spawn(2, _loss_func_np, 61)]
    for num, den, logs, _ in results:  # TP ranks agree; den is not multiplied by TP
        torch.testing.assert_close(num, num1, rtol=1e-6, atol=1e-7)
        assert den.item() == den1.item() == 3
        for name, value in logs1.items():
            torch.testing.assert_close(logs[name], value, rtol=1e-5, atol=1e-6)
    grad_TV = torch.cat([r[3] for r in results], dim=1)
    torch.testing.assert_close(grad_TV, grad1_TV, rtol=1e-5, atol=1e-7)

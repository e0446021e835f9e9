"""The RL loop end to end on CPU: engine/trainer log-prob agreement after the weight export,
and a run killed with SIGKILL then resumed reproduces the uninterrupted run's metrics (with
sequence packing on)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rpg_megatron import tiny
from rpg_megatron.batch import SamplingParams
from rpg_megatron.config import ModelConfig, OptimConfig, ParallelConfig, RolloutConfig
from tests import tiny_hf
from tests.distributed import spawn

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _engine_vs_trainer(rank, world, model_dir):
    from rpg_megatron.megatron import parallel, step
    from rpg_megatron.megatron.arch import read_hf_config
    from rpg_megatron.rollout import make_engine
    from rpg_megatron.train import _sync_weights

    par = ParallelConfig(tp=world)
    ctx = parallel.init(par)
    try:
        hf_config = json.loads((Path(model_dir) / "config.json").read_text())
        arch = read_hf_config(hf_config)
        policy = step.build_policy(
            arch=arch,
            model_cfg=ModelConfig(dtype="float32"),
            par=par,
            optim_cfg=OptimConfig(),
            ctx=ctx,
        )
        engine = make_engine(RolloutConfig(), hf_config=hf_config) if rank == 0 else None
        _sync_weights(policy, engine, version=3)  # TP-sharded trainer -> full HF tensors -> engine
        prompt = [1, 6, 14, 7, 17, 18]  # some tokens of the tiny vocabulary
        out = None
        if rank == 0:
            (c,) = engine.generate(
                [prompt], SamplingParams(max_new_tokens=12, seed=0, ignore_eos=True)
            )
            out = (c.token_ids, c.logprobs, c.weight_version)
        box = [out]
        torch.distributed.broadcast_object_list(box, src=0)
        ids, engine_logp, version = box[0]
        tokens = torch.tensor([prompt + ids])
        mask = torch.zeros_like(tokens, dtype=torch.float32)
        mask[0, len(prompt) :] = 1
        trainer_logp = step.logprobs(policy, step.TrainBatch(tokens_NS=tokens, mask_NS=mask))
        return version, torch.tensor(engine_logp), trainer_logp[0, len(prompt) :]
    finally:
        parallel.destroy()


def test_engine_logprobs_equal_the_trainers_after_export(tmp_path):
    model_dir = tiny.write_tiny_model_dir(tmp_path / "model")
    version, engine_logp, trainer_logp = spawn(2, _engine_vs_trainer, str(model_dir))[0]
    assert version == 3
    assert len(engine_logp) == 12
    # float32, different kernels (HF eager attention vs Megatron local spec): 1e-5 absolute.
    torch.testing.assert_close(engine_logp, trainer_logp, rtol=0, atol=1e-5)


def _config_args(run: Path, steps: int) -> list[str]:
    return [
        "examples/tiny_cpu.yaml",
        f"model.hf_path={run / 'model'}",
        f"data.train_files=[{run / 'train.parquet'}]",
        f"log.run_dir={run}",
        f"checkpoint.dir={run / 'ck'}",
        f"optim.steps={steps}",
        "checkpoint.every=3",
        "rollout.prompts_per_step=4",
        "optim.micro_batch_size=16",
    ]


def _cmd(run: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rpg_megatron.cli", "train", *_config_args(run, steps), *extra]


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines
    ]


def _prepare(run: Path) -> None:
    tiny.write_tiny_model_dir(run / "model")
    tiny.write_parquet(tiny.arithmetic_rows(64, 0), run / "train.parquet")


# The loop with sequence packing (THD micro-batches of <= 100 tokens): rollouts carry their
# lengths through log-probs, advantages and the update.
PACKED = ("optim.max_tokens_per_microbatch=100",)


def _torchrun(run: Path, steps: int, *extra: str) -> list[str]:
    """2 gloo ranks (dp = 2) under torchrun, as `make demo` runs them."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "rpg_megatron.cli",
        "train",
        *_config_args(run, steps),
        *extra,
    ]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank under it (the ranks outlive a killed torchrun)."""
    import psutil

    tree = psutil.Process(proc.pid)
    for p in [*tree.children(recursive=True), tree]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# The GPU recipes' optimizer: Megatron's DistributedOptimizer, its state sharded over dp = 2.
DISTOPT = ("optim.distributed_optimizer=true",)


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    """SIGKILL of every rank after step 4 (the checkpoint of step 3 exists), then --resume:
    the metrics and the final weights equal the uninterrupted run's bit for bit. Then a shard
    of the last checkpoint is truncated: --resume stops every rank, with one line naming the
    file, before any rank prints a resume line or writes into the run directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for run in (straight, broken):
        _prepare(run)
    over = (*PACKED, *DISTOPT)
    run = {"cwd": REPO, "env": env, "capture_output": True}
    hf_every = "checkpoint.save_hf_every=3"  # <run_dir>/hf/step_00000003 (weights only)
    subprocess.run(_torchrun(straight, 6, *over, hf_every), check=True, **run)

    proc = subprocess.Popen(
        _torchrun(broken, 6, *over),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while time.time() < deadline:  # kill -9 once step 4 is logged (checkpoint of step 3 exists)
        path = broken / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    _kill_tree(proc)
    assert (broken / "ck" / "latest").read_text().strip() == "step_00000003"
    out = subprocess.run(
        _torchrun(broken, 6, *over, "--resume"), cwd=REPO, env=env, check=True, capture_output=True
    )
    assert b"resume: continuing from step 3 of 6" in out.stdout

    want, got = _records(straight), _records(broken)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert got == want
    # Each completed run wrote its policy as an HF model: the same weights, loadable by
    # transformers with the tiny model's config.
    from transformers import AutoModelForCausalLM

    a, b = tiny_hf.read_safetensors(straight / "hf"), tiny_hf.read_safetensors(broken / "hf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf_model = AutoModelForCausalLM.from_pretrained(broken / "hf")
    assert {n for n, _ in hf_model.named_parameters()} <= a.keys()

    # Any training checkpoint exports and evaluates as the policy it holds: a step directory
    # (or the checkpoint directory, through `latest`) gives the weights of the HF exports.
    hf3 = straight / "hf" / "step_00000003"
    assert (hf3 / "config.json").is_file()  # the final export kept it
    cli = [sys.executable, "-m", "rpg_megatron.cli"]
    for src, want in ((straight / "ck" / "step_00000003", hf3), (straight / "ck", straight / "hf")):
        out_dir = tmp_path / f"export-{src.name}"
        convert = [*cli, "convert", "mcore-to-hf", "--mcore", str(src), "--out", str(out_dir)]
        subprocess.run(convert, check=True, **run)
        x, y = tiny_hf.read_safetensors(out_dir), tiny_hf.read_safetensors(want)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    answers = {}
    for flag, src in (("--mcore", straight / "ck" / "step_00000006"), ("--model", straight / "hf")):
        report = tmp_path / f"eval{flag}.json"
        evaluate = [
            *cli, "eval", flag, str(src), "--config", str(straight / "config.yaml"),
            "--data", str(straight / "train.parquet"), "--k", "1", "--max-new-tokens", "2",
            "--out", str(report), "reward.workers=1",
        ]  # fmt: skip
        subprocess.run(evaluate, check=True, **run)
        problems = json.loads(report.read_text())["benchmarks"][0]["problems"]
        answers[flag] = [p["answers"] for p in problems]
    assert answers["--mcore"] == answers["--model"] and len(answers["--model"]) > 1

    # Rank 1's shard of the last checkpoint, cut short.
    shard = broken / "ck" / "step_00000006" / "weights" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = _files(broken)
    out = subprocess.run(
        _torchrun(broken, 6, *over, "--resume"), cwd=REPO, env=env, capture_output=True
    )
    assert out.returncode != 0
    assert b"resume:" not in out.stdout  # no rank announced a resume
    lines = [x for x in out.stderr.decode().splitlines() if x.startswith("rpg-megatron train:")]
    # Both ranks stop on the same decision (tests/dist/test_checkpoint.py checks each rank's
    # error); the console gets the job's one line, the lowest failing rank's (rundir.agreed).
    assert len(lines) == 1
    assert str(shard) in lines[0] and "truncated" in lines[0]
    assert _files(broken) == before  # config.yaml, metrics, TensorBoard, checkpoints untouched


def test_sigusr1_checkpoints_and_stops_then_resume_continues(tmp_path):
    """What Slurm's --signal=USR1@T does before the time limit: the trainer finishes its step,
    checkpoints, exits 0; --resume continues the step count from there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    _prepare(run)
    cmd = _cmd(run, 40, "checkpoint.every=100")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "preempted" in out
    assert not (run / "hf").exists()  # only a completed run exports its policy
    stopped = int((run / "ck" / "latest").read_text().strip().split("_")[1])
    assert 2 <= stopped < 40
    assert [r["step"] for r in _records(run)] == list(range(1, stopped + 1))
    subprocess.run(
        [*_cmd(run, stopped + 2, "checkpoint.every=100"), "--resume"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    assert [r["step"] for r in _records(run)] == list(range(1, stopped + 3))
    assert (run / "hf" / "config.json").is_file() and list((run / "hf").glob("*.safetensors"))


def test_reinforce_pp_folds_the_reference_kl_into_its_returns(tmp_path):
    """REINFORCE++ with beta > 0 needs the reference log-probs for its KL-in-reward term even
    though its loss has no KL anchor (it crashed at step 1 before)."""
    run = tmp_path / "rpp"
    _prepare(run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    over = (
        "objective.name=reinforce_pp",
        "objective.advantage=reinforce_pp",
        "objective.beta=0.01",
    )
    subprocess.run(_cmd(run, 2, *over), cwd=REPO, env=env, check=True, capture_output=True)
    assert [r["step"] for r in _records(run)] == [1, 2]


def test_a_short_dynamic_sampling_step_trains_on_a_multiple_that_splits(tmp_path):
    """DAPO dynamic sampling that runs out of generation batches trains on the groups it has,
    trimmed to what the step's 16-row micro-batches split into (multiples of 2 groups of 8
    samples); 3 groups (24 sequences) failed the micro-batch split before. With too few
    groups for one micro-batch the run stops with a message naming data.max_gen_batches."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dapo = (
        "objective.name=dapo",
        "objective.advantage=group_norm",
        "objective.beta=0",  # tiny_cpu.yaml's KL settings do not apply to DAPO (refused)
        "objective.ref_reset_every=0",
        "data.dynamic_sampling=true",
    )
    run = tmp_path / "dapo"
    _prepare(run)
    subprocess.run(
        _cmd(run, 4, *dapo, "data.max_gen_batches=3"),
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    kept = [r["sampling/groups_kept"] for r in _records(run)]
    assert len(kept) == 4 and 2 in kept and set(kept) <= {2, 4}, kept  # this seed: a step of 3
    short = tmp_path / "short"
    _prepare(short)
    out = subprocess.run(
        _cmd(short, 4, *dapo, "data.max_gen_batches=2"), cwd=REPO, env=env, capture_output=True
    )
    assert out.returncode == 2
    assert b"1 informative groups" in out.stderr and b"data.max_gen_batches=2" in out.stderr


def test_the_on_policy_skip_trains_as_the_pi_old_pass_does(tmp_path):
    """optim.skip_onpolicy_pass (the demo's default: one optimizer step per rollout) takes
    pi_old from the training forward and skips the reference pass while the anchor is the
    current weights (step 1, and after every reset): every logged metric of 12 steps, the
    engine/trainer log-prob mismatch included, equals the run with both passes, to float32
    round-off (bench/e2e.py measures the time saved)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for skip in (False, True):
        run = tmp_path / f"skip_{skip}"
        _prepare(run)
        over = (f"optim.skip_onpolicy_pass={str(skip).lower()}", "objective.ref_reset_every=5")
        subprocess.run(_cmd(run, 12, *over), cwd=REPO, env=env, check=True, capture_output=True)
        runs[skip] = run
    with_pass, without = _records(runs[False]), _records(runs[True])
    assert len(with_pass) == len(without) == 12
    assert sum(r["ref/reset"] for r in without) == 2  # after steps 5 and 10
    for a, b in zip(with_pass, without, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a["step"], key)

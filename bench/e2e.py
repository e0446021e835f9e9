"""One RL step of our loop, phase by phase, and the same work through TRL's GRPOTrainer.

(1) ours: `rpg-megatron train examples/tiny_cpu.yaml` (world 1, one thread) in a subprocess on
    the tiny demo inputs (`rpg_megatron.tiny.prepare_demo`); the per-phase times come from the
    run's metrics.jsonl (`time/generate_s`, `time/logprob_s`, `time/train_s`, `time/sync_s`,
    `time/step_s`), medians over the steps after the first (warm-up).
(2) TRL: `trl.GRPOTrainer` in a second subprocess (this file with `--trl-worker`, one thread) on
    the same tiny model (`AutoModelForCausalLM.from_config` of `<demo>/model/config.json`,
    randomly initialised), the same prompt pool (the parquet's chat messages), the same prompts
    per step x samples per prompt, max new tokens, lr, clip range (0.2, 0.28), KL beta 1e-3,
    group-mean advantages without std scaling, token-level loss aggregation, grad clip 1.0, no
    weight decay, constant lr, and the same reward (1.0 when the completion's last number equals
    the ground truth, as `reward.extract=[last_number]`). One optimizer step per rollout batch
    on both sides (TRL: micro-batches of 32 with gradient accumulation over the batch).

(3) with `--sglang`: our loop again, with rollout.engine=sglang: one real SGLang 0.5.23 server on
    this CPU (float32, sglang's native-torch CPU path, launched by the trainer from the SGLang
    venv of tools/sglang_venv.sh), the same config otherwise; its start-up (~1 min) counts in
    the start-up column, not in the step times.

Not equal by construction: the initial weights (Megatron's seeded init vs HF's, both random
with std 0.02), the prompt order (each side shuffles the pool with its own sampler), and what
each side computes per step (both take pi_old from the training forward on this on-policy work,
ours by optim.skip_onpolicy_pass; `--with-pass` adds a row of ours running the separate pass).
Both subprocesses run one after the other inside one invocation; start-up (imports, model
build) is excluded from the per-step times and reported separately.

    python bench/e2e.py                      # 250 steps each (~6 min on 2 CPU cores)
    python bench/e2e.py --steps 3 --prompts 4
    python bench/e2e.py --record             # append the table to docs/benchmarks.md
    python bench/e2e.py --sglang             # plus the SGLang-server row

Last line, exactly: step_ratio=<ours / TRL median seconds per step>, then with --with-pass
` pass_step_ratio=<ours with the pi_old pass / TRL>`, then with --sglang
` sglang_step_ratio=<ours through SGLang / ours embedded>`.

`--compare engines` (`compare_engines`) instead times a step's generation phase, the
trainer's collect() (generation, reward scoring, the gather: what `time/generate_s` measures), on
2 gloo ranks with one thread each, each with an embedded engine and reward workers as
rollout.placement=dp_rank gives them: spread over both engines (rollout/dispatch.py), against
rank 0 alone (placement=rank0). The two alternate round by round in the same processes, on the
same prompts, seed and (random-init) weights, so they do the same work, which the bench checks
(same token ids). The figure is the median over the rounds after the first of each round's
ratio: the two arms of a round run back to back under the same load, while the load of other
processes drifts between rounds. Beside it, the machine's parallel capacity in the same rounds
(a fixed kernel on rank 0 alone vs on both ranks at once), the ceiling of the figure here now:

    python bench/e2e.py --compare engines [--steps 20] [--max-new-tokens 16] [--record]

Last line, exactly: engines_speedup=<median per-round generate s, rank 0 alone / engine per rank>

`--compare async` (bench/e2e_async.py): the synchronous loop against rollout.max_staleness=1 on
the same prompts, one trainer and one engine process on the 2 cores, longer responses:

    python bench/e2e.py --compare async [--steps 200] [--max-new-tokens 48] [--record]

Last line, exactly: async_speedup=<sync / async s per step> ideal=<(gen + train) / max(gen,
train) of the sync run> reward_delta=<async - sync mean reward, last 10% of steps>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/x.py` from anywhere

from bench.record import record  # noqa: E402

CONFIG = REPO / "examples" / "tiny_cpu.yaml"
PHASES = ("generate", "logprob", "train", "sync")
"""Our per-step phases, as logged under `time/<phase>_s`."""


def last_number_reward(completion: str, ground_truth: str) -> float:
    """1.0 when the last number in `completion` equals the integer/decimal `ground_truth`."""
    from rpg_megatron.rewards import extract_last_number

    answer = extract_last_number(completion)
    try:
        return float(answer is not None and float(answer) == float(ground_truth))
    except ValueError:  # "a/b" forms: compare as text
        return float(answer == ground_truth)


def time_to_reward(
    seconds: list[float], rewards: list[float], *, threshold: float, window: int
) -> tuple[int, float] | None:
    """(step, cumulative seconds) at the first step where the mean reward of the last `window`
    steps is >= `threshold` (only full windows count); None when never. Steps count from 1."""
    elapsed = 0.0
    for i, (s, _) in enumerate(zip(seconds, rewards, strict=True)):
        elapsed += s
        recent = rewards[max(0, i + 1 - window) : i + 1]
        if i + 1 >= window and sum(recent) / len(recent) >= threshold:
            return i + 1, elapsed
    return None


# ---------------------------------------------------------------------------------- ours
def sglang_overrides(demo: Path, run_dir: Path, python: str) -> list[str]:
    """Config overrides that put one real SGLang server (CPU) under our loop."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        "rollout.engine=sglang",
        f"rollout.sglang.model_path={demo / 'model'}",
        "rollout.sglang.load_format=dummy",  # the first weight sync brings the trainer's
        "rollout.sglang.device=cpu",
        "rollout.sglang.dtype=float32",
        "rollout.sglang.max_total_tokens=16384",
        "rollout.sglang.mem_fraction_static=0.5",
        "rollout.sglang.prompts_per_request=256",
        f"rollout.sglang.python={python}",
        f"rollout.sglang.base_port={port}",
        f"rollout.sglang.log_dir={run_dir / 'sglang'}",
        "rollout.sglang.launch_timeout_s=1200",
        "rollout.sglang.health_timeout_s=120",
    ]


def default_sglang_python() -> str | None:
    """The SGLang venv tools/sglang_venv.sh keeps, if it is complete."""
    out = subprocess.run(
        ["bash", str(REPO / "tools" / "sglang_venv.sh"), "--path"],
        capture_output=True,
        text=True,
        check=True,
    )
    venv = Path(out.stdout.strip())
    return str(venv / "bin" / "python") if (venv / ".rpg-complete").exists() else None


def run_ours(
    demo: Path,
    out: Path,
    *,
    steps: int,
    prompts: int,
    samples: int,
    threads: int,
    name: str = "ours",
    sglang_python: str | None = None,
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train `steps` steps with our loop in a subprocess; returns the per-step metrics. With
    `sglang_python`, rollouts come from a real SGLang server run by that interpreter;
    `overrides` are further `key=value` settings."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a reused --work-dir: this run starts afresh
    cmd = [
        sys.executable,
        "-m",
        "rpg_megatron.cli",
        "train",
        str(CONFIG),
        f"model.hf_path={demo / 'model'}",
        f"data.train_files=[{demo / 'train.parquet'}]",
        f"log.run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'checkpoints'}",
        f"optim.steps={steps}",
        "checkpoint.every=1000",
        f"rollout.prompts_per_step={prompts}",
        f"rollout.n_samples={samples}",
    ]
    if sglang_python is not None:
        cmd += sglang_overrides(demo, run_dir, sglang_python)
    cmd += overrides
    t0 = time.perf_counter()
    _run(cmd, threads, run_dir.with_suffix(".log"))
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_s": wall,
        "step_s": [r["time/step_s"] for r in rows],
        "reward": [r["reward/mean"] for r in rows],
        "response_len": [r["response_len/mean"] for r in rows],
        "samples": [int(r["reward/samples"]) for r in rows],
        "prompts": [int(r["reward/samples"]) // samples for r in rows],
        "phases": {p: [r[f"time/{p}_s"] for r in rows] for p in PHASES},
        "trainer_idle": [r.get("time/trainer_idle_s", float("nan")) for r in rows],
        "engine_idle": [r.get("time/engine_idle_s", float("nan")) for r in rows],
        "staleness": [r.get("staleness/mean", float("nan")) for r in rows],
    }


# ---------------------------------------------------------------------------------- TRL
def run_trl(
    demo: Path, out: Path, *, steps: int, prompts: int, samples: int, threads: int, config: dict
) -> dict[str, Any]:
    """The same work through TRL's GRPOTrainer, in a subprocess (`--trl-worker`)."""
    result = out / "trl.json"
    cmd = [sys.executable, __file__, "--trl-worker", str(demo), str(result)]
    cmd += ["--steps", str(steps), "--prompts", str(prompts), "--samples", str(samples)]
    cmd += ["--lr", str(config["optim"]["lr"])]
    cmd += ["--max-new-tokens", str(config["rollout"]["max_new_tokens"])]
    t0 = time.perf_counter()
    _run(cmd, threads, out / "trl.log")
    data = json.loads(result.read_text())
    data["wall_s"] = time.perf_counter() - t0
    return data


def trl_worker(demo: Path, result: Path, args: argparse.Namespace) -> None:
    """Run GRPOTrainer for `args.steps` optimizer steps; write per-step times and rewards."""
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    rows = pq.read_table(demo / "train.parquet").to_pylist()
    dataset = Dataset.from_list(
        [
            {"prompt": list(r["prompt"]), "ground_truth": r["reward_model"]["ground_truth"]}
            for r in rows
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    # TRL builds its reference model from the policy's path, so the random init is saved first.
    init = result.parent / "trl_init"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo / "model"))
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    batch = args.prompts * args.samples
    micro = min(32, batch)  # examples/tiny_cpu.yaml optim.micro_batch_size
    if batch % micro:
        raise ValueError(f"--prompts x --samples = {batch}: must be a multiple of {micro}")

    seen: list[dict[str, int]] = []  # per reward call: completions and prompt groups

    def reward(completions: list, ground_truth: list[str], **kwargs: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        # A group is `samples` consecutive completions of one prompt (TRL's RepeatSampler). The
        # pool repeats prompts (25 distinct sums), so groups are counted, not distinct prompts.
        prompts_ = kwargs["prompts"]
        groups = len(prompts_) // args.samples
        if len(prompts_) % args.samples or any(
            prompts_[i] != prompts_[i - i % args.samples] for i in range(len(prompts_))
        ):
            groups = -1  # not laid out in groups of `samples`: the caller reports the mismatch
        seen.append({"completions": len(texts), "prompts": groups})
        return [last_number_reward(t, g) for t, g in zip(texts, ground_truth, strict=True)]

    class Clock(TrainerCallback):
        """Seconds between optimizer-step ends (the first from train start), and logged rewards."""

        def __init__(self) -> None:
            self.t = 0.0
            self.step_s: list[float] = []
            self.logs: dict[int, dict[str, float]] = {}

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            now = time.perf_counter()
            self.step_s.append(now - self.t)
            self.t = now

        def on_log(self, _args: Any, state: Any, _control: Any, logs: Any = None, **k: Any) -> None:
            if logs and "reward" in logs:
                self.logs[state.global_step] = dict(logs)

    clock = Clock()
    config = GRPOConfig(
        output_dir=str(result.parent / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,
        num_generations=args.samples,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=1e-3,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",  # token-level aggregation, as objective.aggregation=token
        scale_rewards="none",  # group-mean advantage, as objective.advantage=group_mean
        temperature=1.0,
        gradient_checkpointing=False,  # TRL's default; it only costs time at this size
        disable_dropout=True,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    trainer = GRPOTrainer(
        model=str(init),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    steps = sorted(clock.logs)
    payload = {
        "step_s": clock.step_s,
        "reward": [clock.logs[s]["reward"] for s in steps],
        "response_len": [clock.logs[s].get("completions/mean_length", float("nan")) for s in steps],
        "samples": [c["completions"] for c in seen],
        "prompts": [c["prompts"] for c in seen],
        "trl": __import__("trl").__version__,
    }
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, result)


# ------------------------------------------------------------------------------ engines
def engines_worker(
    rank: int, world: int, demo: Path, steps: int, prompts: int, samples: int, tokens: int
) -> dict[str, Any] | None:
    """One rank of `--compare engines` (started by parallel.spawn_local, gloo, one thread):
    an embedded engine and reward workers, as the trainer gives every rank with
    placement=dp_rank, then `steps` rounds of the trainer's own collect() on the same prompts
    and seed, once with rank 0 alone and once spread over both ranks, the order alternating by
    round so that drifting load falls on both alike. Rank 0 returns the wall times."""
    import time as time_

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rpg_megatron import data
    from rpg_megatron.config_io import load_config
    from rpg_megatron.megatron.arch import load_config_json
    from rpg_megatron.rewards import RewardScorer
    from rpg_megatron.rollout import make_engine
    from rpg_megatron.rollout.collect import collect
    from rpg_megatron.rollout.dispatch import Spread

    cfg = load_config(
        CONFIG,
        [
            f"model.hf_path={demo / 'model'}",
            f"data.train_files=[{demo / 'train.parquet'}]",
            f"rollout.prompts_per_step={prompts}",
            f"rollout.n_samples={samples}",
            f"rollout.max_new_tokens={tokens}",
            # decode batches of at most half the samples, so both engines get a share
            f"rollout.embedded_batch_size={min(64, max(1, prompts * samples // 2))}",
        ],
    )
    hf_config = load_config_json(demo / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(demo / "model"))
    pool = data.load_prompts(cfg.data, tokenizer)
    torch.manual_seed(cfg.parallel.seed)  # the same random policy on both ranks
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    engine = make_engine(cfg.rollout, hf_config=hf_config, tokenizer=tokenizer)
    engine.update_weights([list(model.state_dict().items())], version=0)
    chunk = cfg.rollout.embedded_batch_size
    arms = {
        "alone": Spread(ranks=(0,), rank=rank, chunk=chunk, distributed=True),
        "spread": Spread(ranks=(0, 1), rank=rank, chunk=chunk, distributed=True),
    }
    times: dict[str, list[float]] = {
        k: [] for k in ("alone", "spread", "kernel_alone", "kernel_spread")
    }
    same, both, lengths = True, True, []
    with RewardScorer(cfg.reward) as scorer:
        for step in range(steps):
            order = ["alone", "spread"] if step % 2 == 0 else ["spread", "alone"]
            got = {}
            for arm in order:
                sampler = data.PromptSampler(pool, seed=cfg.data.seed + step, shuffle=True)
                torch.distributed.barrier()
                t0 = time_.perf_counter()
                got[arm] = collect(
                    engine, scorer, tokenizer, sampler, cfg, seed=step, spread=arms[arm]
                )
                times[arm].append(time_.perf_counter() - t0)
            same &= torch.equal(got["alone"].batch.tokens_NS, got["spread"].batch.tokens_NS)
            both &= set(got["spread"].engine_rank_N.tolist()) == {0, 1}
            lengths.append(got["alone"].metrics["response_len/mean"])
            for arm in order:  # the machine's own parallel capacity, in the same round
                torch.distributed.barrier()
                t0 = time_.perf_counter()
                if arm == "spread" or rank == 0:
                    _compute_kernel()
                torch.distributed.barrier()
                times[f"kernel_{arm}"].append(time_.perf_counter() - t0)
    engine.shutdown()
    if rank:
        return None
    return {
        **times,
        "same": same,
        "both": both,
        "response_len": lengths,
        "samples": prompts * samples,
    }


def _compute_kernel() -> None:
    """A fixed single-threaded CPU load (matmuls), about 0.1 s on an idle core."""
    import torch

    x = torch.full((128, 128), 0.01)
    for _ in range(300):
        x = torch.tanh(x @ x)


def compare_engines(args: argparse.Namespace, argv: list[str]) -> int:
    """`--compare engines`: an engine per rank against rank 0 alone (module docstring)."""
    from rpg_megatron.megatron.parallel import spawn_local
    from rpg_megatron.tiny import prepare_demo

    steps, tokens = args.steps or 20, args.max_new_tokens or 16
    prompts, samples = args.prompts or 32, args.samples or 8
    load = os.getloadavg()[0]
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="bench_e2e.") as tmp:
        demo = prepare_demo((args.work_dir or Path(tmp)) / "demo")
        result, _ = spawn_local(2, engines_worker, demo, steps, prompts, samples, tokens)
    if not result["same"]:
        raise RuntimeError("the two placements generated different completions: not the same work")
    if not result["both"]:
        raise RuntimeError("spread over two engines, one of them generated nothing")
    lines = [
        "| engines | steps | samples x max new tokens | generate s (median) | min | max "
        "| generated tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    tok = result["samples"] * _median(result["response_len"])
    for name, key in (("rank 0 alone (placement=rank0)", "alone"), ("one per rank", "spread")):
        xs = result[key][1:] or result[key]
        lines.append(
            f"| {name} | {steps} | {result['samples']} x {tokens} | {_median(result[key]):.3f} "
            f"| {min(xs):.3f} | {max(xs):.3f} | {tok / _median(result[key]):.0f} |"
        )
    # The two arms of a round run back to back, so they see the same load; the load of other
    # processes drifts between rounds. So the figure is the median of the per-round ratios.
    ratios = [a / b for a, b in zip(result["alone"], result["spread"], strict=True)]
    speedup = _median(ratios)
    # A fixed kernel on rank 0 alone and on both ranks at once, in every round: how much faster
    # two processes get through twice the work here now (2.0 on two idle cores), the ceiling
    # of engines_speedup on this machine at this load.
    capacity = [
        2 * a / b for a, b in zip(result["kernel_alone"], result["kernel_spread"], strict=True)
    ]
    text = (
        "\n".join(lines)
        + "\n\nsame completions in both (token ids of every step): yes; the first round is "
        "warm-up and left out of the medians"
        + "\ngenerate s per step, rank 0 alone / one engine per rank, per round: "
        + " ".join(f"{r:.2f}" for r in ratios[1:])
        + f"\nmedian of those: {speedup:.3f} (ratio of the medians above: "
        f"{_median(result['alone']) / _median(result['spread']):.3f})"
        + "\nparallel capacity per round (2 x a fixed kernel's s on rank 0 alone / on both "
        "ranks at once; 2.00 on two idle cores): "
        + " ".join(f"{c:.2f}" for c in capacity[1:])
        + f"\nmedian capacity: {_median(capacity):.2f}"
        + f"\n1-minute load average at start: {load:.1f}\n"
    )
    print(text)
    if args.record:
        record(
            "e2e engines: an embedded engine per rank vs rank 0 alone (2 gloo ranks)",
            f"python bench/e2e.py {' '.join(argv)}",
            text,
        )
    print(f"engines_speedup={speedup:.3f}")
    return 0


# ---------------------------------------------------------------------------------- report
def _run(cmd: list[str], threads: int, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; {log}:\n{tail}")


def _median(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def table(
    ours: dict,
    trl: dict,
    *,
    threshold: float,
    window: int,
    load: float,
    sglang: dict | None = None,
    with_pass: dict | None = None,
) -> str:
    """The markdown table: per-phase medians of ours, step medians of all, time to reward."""
    systems = [("ours (rpg_megatron)", ours), (f"TRL {trl['trl']}", trl)]
    if with_pass is not None:
        systems.insert(1, ("ours, with the separate pi_old pass", with_pass))
    if sglang is not None:
        systems.append(("ours, rollouts from a real SGLang server (CPU)", sglang))
    lines = [
        "| system | steps | prompts x samples / step | generate s | log-prob s | train s "
        "| sync s | step s | response tok/s | final reward (last 10) "
        f"| steps, s to reward {threshold} (window {window}) | start-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, d in systems:
        n = sum(d["samples"]) / len(d["samples"])
        step_s = _median(d["step_s"])
        phases = [f"{_median(d['phases'][p]):.3f}" for p in PHASES] if "phases" in d else ["-"] * 4
        tok_s = n * _median(d["response_len"]) / step_s
        hit = time_to_reward(d["step_s"], d["reward"], threshold=threshold, window=window)
        reached = f"{hit[0]}, {hit[1]:.1f}" if hit else "not reached"
        final = sum(d["reward"][-10:]) / len(d["reward"][-10:])
        startup = d["wall_s"] - sum(d["step_s"])
        shape = f"{d['prompts'][0]} x {d['samples'][0] // d['prompts'][0]}"
        lines.append(
            f"| {name} | {len(d['step_s'])} | {shape} "
            f"| {' | '.join(phases)} | {step_s:.3f} | {tok_s:.0f} | {final:.3f} | {reached} "
            f"| {startup:.1f} |"
        )
    ratio = _median(ours["step_s"]) / _median(trl["step_s"])
    text = (
        "\n".join(lines)
        + f"\n\nstep-time ratio ours / TRL (median s per step, first step excluded): {ratio:.3f}"
    )
    if with_pass is not None:
        text += (
            "\nstep-time ratio ours with the pi_old pass / TRL: "
            f"{_median(with_pass['step_s']) / _median(trl['step_s']):.3f}"
        )
    if sglang is not None:
        text += (
            "\nstep-time ratio ours through SGLang / ours embedded: "
            f"{_median(sglang['step_s']) / _median(ours['step_s']):.3f}"
        )
    return text + f"\n1-minute load average at start: {load:.1f}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--compare",
        choices=("trl", "engines", "async"),
        default="trl",
        help="trl: ours vs TRL's GRPOTrainer; engines: an engine per rank vs rank 0 alone; "
        "async: synchronous vs rollout.max_staleness=1 (bench/e2e_async.py)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (250; engines: 8)"
    )
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default: yaml)")
    p.add_argument("--samples", type=int, default=None, help="samples per prompt (default: yaml)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both runs")
    p.add_argument("--threshold", type=float, default=0.3, help="demo reward threshold")
    p.add_argument("--window", type=int, default=10, help="sliding window in steps")
    p.add_argument("--work-dir", type=Path, default=None, help="keep runs here (default: tmp)")
    p.add_argument("--record", action="store_true", help="append the table to the docs")
    p.add_argument(
        "--sglang",
        nargs="?",
        const="auto",
        default=None,
        metavar="PYTHON",
        help="also run our loop with rollouts from a real SGLang server on this CPU, run by "
        "PYTHON (default: the venv of tools/sglang_venv.sh)",
    )
    p.add_argument(
        "--with-pass",
        action="store_true",
        help="also run our loop with the separate pi_old pass (optim.skip_onpolicy_pass=false)",
    )
    p.add_argument(
        "--trl-worker", nargs=2, type=Path, metavar=("DEMO", "RESULT"), help=argparse.SUPPRESS
    )
    p.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="engines: new tokens per sample (16); async: (48)",
    )
    p.add_argument("--plot", type=Path, default=None, help="async: the PNG (docs/async_reward.png)")
    p.add_argument(
        "--behaviour",
        choices=("snapshot", "engine"),
        default="snapshot",
        help="async: rollout.behaviour_logprobs of the max_staleness=1 arm",
    )
    args = p.parse_args(argv)
    if args.trl_worker:
        trl_worker(*args.trl_worker, args)
        return 0
    if args.compare == "engines":
        return compare_engines(args, argv)
    if args.compare == "async":
        from bench.e2e_async import compare_async

        return compare_async(args, argv, run_ours, record)
    args.steps = args.steps or 250

    import yaml

    from rpg_megatron.tiny import prepare_demo

    config = yaml.safe_load(CONFIG.read_text())
    prompts = args.prompts or config["rollout"]["prompts_per_step"]
    samples = args.samples or config["rollout"]["n_samples"]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_e2e.") as tmp:
        out = args.work_dir or Path(tmp)
        demo = prepare_demo(out / "demo")
        common = {"steps": args.steps, "prompts": prompts, "samples": samples}
        ours = run_ours(demo, out, threads=args.threads, **common)
        trl = run_trl(demo, out, threads=args.threads, config=config, **common)
        sglang = None
        if args.sglang is not None:
            python = default_sglang_python() if args.sglang == "auto" else args.sglang
            if python is None:
                p.error("--sglang: no SGLang venv; build it with `bash tools/sglang_venv.sh`")
            sglang = run_ours(
                demo, out, threads=args.threads, name="ours_sglang", sglang_python=python, **common
            )
        with_pass = None
        if args.with_pass:
            with_pass = run_ours(
                demo,
                out,
                threads=args.threads,
                name="ours_with_pass",
                overrides=("optim.skip_onpolicy_pass=false",),
                **common,
            )
    text = table(
        ours,
        trl,
        threshold=args.threshold,
        window=args.window,
        load=load,
        sglang=sglang,
        with_pass=with_pass,
    )
    print(text)
    if args.record:
        record(
            "e2e: one RL step, ours vs TRL GRPOTrainer"
            + (", and ours through a real SGLang server (CPU)" if sglang is not None else ""),
            f"python bench/e2e.py {' '.join(argv)}",
            text,
        )
    ratio = _median(ours["step_s"]) / _median(trl["step_s"])
    last = f"step_ratio={ratio:.3f}"
    if with_pass is not None:
        last += f" pass_step_ratio={_median(with_pass['step_s']) / _median(trl['step_s']):.3f}"
    if sglang is not None:
        last += f" sglang_step_ratio={_median(sglang['step_s']) / _median(ours['step_s']):.3f}"
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())

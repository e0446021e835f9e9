"""Every GPU check of the project on a lent GPU box, most important first, within a deadline.

Device-tool calls for a session lent an H100/H200 (15 minutes of device time in all, start-up,
transfers and idle included; the box goes back after 30 s idle: make the calls back to back):

  0. Here, before any device call (no device time; 7 min on a busy 2-core machine):
         python3 bench/gpu_pack.py       # -> .gpu-pack/, 32 MiB: megatron-core 0.19.2 and
                                         #    0.16.1, TE 2.20.2 (sm_90 cubins only), their needs
     For the fallback below, also before call 1 (25 min here; the box will not wait):
         python3 bench/gpu_pack.py --all-archs --out .gpu-full
                                         # -> .gpu-full, .gpu-full2..4 (60 MiB), .gpu-full5
  1. run(carry=[".gpu-pack"], timeout_s=600, command="bash bench/gpu.sh --deadline 540")
     Start-up ~1-2 min, ~35 MiB carried, then at most 540 s: about 11.5 minutes.
  2. Only if its last line says stopped=deadline and status() shows budget_left_s >= 200, at
     once (the warm box keeps /tmp/site, nothing to carry):
         run(timeout_s=200, command="bash bench/gpu.sh --deadline 170 --from <next=...>")
  3. give_back(). Append the returned benchmarks.md to docs/benchmarks.md; summary.txt holds
     every figure (name=value), gpu.log every line.

  Fallback, if call 1 printed te_smoke=failed (the slimmed TE library did not load; phase a
  ran, b and c were skipped at once, so call 1 took ~4 min), back to back:
     calls 2-5: run(carry=[".gpu-full"], timeout_s=60,
                    command="bash bench/gpu.sh stash --pack .gpu-full"), then the same with
                .gpu-full2, .gpu-full3, .gpu-full4 (each stashes its part in /root/gpu-parts)
     call 6:    run(carry=[".gpu-full5"], timeout_s=420, command="bash bench/gpu.sh
                --deadline 390 --pack /root/gpu-parts --pack .gpu-full5 install b c")

Phases, in order; device seconds expected on an H200 (estimated; the run prints the real ones
as phase_<p>_s) / the most its checks may take:
  install  unpack the bundle into /tmp/site (skipped when a warm box has it); versions;
           megatron-core 0.19.2 (it imports triton at start-up; the box's torch 2.11 brings
           triton 3.6.0), else 0.16.1; TE smoke test (Linear, RMSNorm-Linear, FP8 delayed,
           fused attention).                                                    ~40 / 150
  a        `pytest -m "gpu and not te" -k "not checkpoint"` WITHOUT TE on the path, so the
           local layer spec runs on CUDA: float16 loss scaling, the reference's pinned copies,
           NCCL with one rank (two ranks skip: one GPU), the CUDA rollout engine, and whatever
           gpu tests other modules add.                                         ~90 / 180
  b        bench/train_step.py --record, ours vs plain Megatron-Core with peak memory:
           Qwen3-4B 8K bf16, the same with FP8 delayed, Qwen3-1.7B 8K bf16.    ~150 / 390
  c        `pytest -m "gpu and te"` (packed THD == padded, CP=2 (skips: one GPU), FP8 follows
           bf16, TE weight-gradient fusion); `pytest -m "gpu and not te" -k checkpoint` with TE
           on the path (the distributed-optimizer resume test; "absent" if there is none);
           the levers table at 4B/8K.                                          ~250 / 540
Each check runs in its own process group, cut at min(its limit, the deadline); a check that
cannot get its minimum before the deadline is not started. Every figure goes to
$OUT/summary.txt the moment it is known (name=value, flushed), every output line to
$OUT/gpu.log, the benchmark sections to $OUT/benchmarks.md after each benchmark: a call cut off
still returns what it measured. The last line holds device_s, stopped=done|deadline, next=
(where to go on), failed=, te_smoke, mcore and the goals step_ratio, mem_ratio, fp8_speedup.

    python3 bench/gpu.py [install] [a] [b] [c] [--deadline S] [--from CHECK] [--mcore V]
    python3 bench/gpu.py --dry [a] [b]  # CPU rehearsal: tiny preset, records into $OUT only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gpu_pack import stash, unpack  # noqa: E402

PHASES = ("install", "a", "b", "c")
MCORE = ("0.19.2", "0.16.1")
RESERVE_S = 15.0
"""Seconds kept back from the deadline for the summary and the benchmarks copy."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One command of a phase."""

    name: str
    """Id, e.g. 'b.4b-bf16'; also the prefix of its figures and the --from target."""
    argv: tuple[str, ...]
    """Command, run from the repository root."""
    limit: float
    """Seconds it may run at most (less when the deadline is nearer)."""
    env: str = "te"
    """'plain' (megatron-core without Transformer Engine: the local layer spec) or 'te'."""
    kind: str = "figures"
    """'pytest' (counts from its summary line) or 'figures' (its last name=value line)."""
    minimum: float = 30.0
    """Not started with less than this left before the deadline."""


@dataclass(slots=True, kw_only=True)
class Result:
    name: str
    """Check.name."""
    status: str
    """ok, failed, cut (killed at its limit), not-started (deadline), skipped, absent."""
    seconds: float = 0.0
    """Wall seconds it ran (device seconds while the box is held)."""
    figures: dict[str, str] = field(default_factory=dict)
    """What its output reported."""
    note: str = ""
    """Why it was skipped or failed, in a few words."""


# ------------------------------------------------------------------------------ parsing
_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
_FIGURE = re.compile(r"[A-Za-z_][\w.-]*=\S+")
_PROGRESS = re.compile(r"^([.FsExX]+)(?: +\[ *\d+%\])?$", re.MULTILINE)
"""A line of pytest -q's progress: one character per test, then [ NN%]."""


def parse_pytest(text: str) -> dict[str, str]:
    """Counts from pytest's last summary line ('== 3 passed, 1 skipped in 2.0s =='), and the
    ids of failed tests (from -rfE's 'FAILED id' / 'ERROR id' lines)."""
    counts: dict[str, str] = {}
    for line in reversed(text.splitlines()):
        found = _PYTEST_COUNTS.findall(line)
        if found and re.search(r"\bin \d+(\.\d+)?s\b", line):
            for n, what in found:
                counts["errors" if what.startswith("error") else what] = n
            break
    if not counts:  # cut before its summary: count the progress characters so far
        marks = "".join(m[1] for m in _PROGRESS.finditer(text))
        for char, what in ((".", "passed"), ("F", "failed"), ("s", "skipped"), ("E", "errors")):
            if marks.count(char):
                counts[f"{what}_so_far"] = str(marks.count(char))
    bad = [m[2] for m in re.finditer(r"^(FAILED|ERROR) (\S+)", text, re.MULTILINE)]
    if bad:
        counts["failing"] = ",".join(bad)
    return counts


def parse_figures(text: str) -> dict[str, str]:
    """The last line made only of name=value tokens (a benchmark's figures line)."""
    for line in reversed(text.splitlines()):
        tokens = line.split()
        if tokens and all(_FIGURE.fullmatch(t) for t in tokens):
            return dict(t.split("=", 1) for t in tokens)
    return {}


# ------------------------------------------------------------------------------- runner
class Runner:
    """Runs checks against one deadline, writing everything to `out` as it goes."""

    def __init__(self, out: Path, deadline_s: float, *, clock: Callable[[], float] = time.time):
        self.out = out
        self.clock = clock
        self.t0 = clock()
        self.deadline = self.t0 + deadline_s
        self.results: list[Result] = []
        self.figures: dict[str, str] = {}
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "gpu.log"
        self.summary = out / "summary.txt"

    def left(self) -> float:
        return self.deadline - self.clock()

    def figure(self, name: str, value: object) -> None:
        """Record name=value now (appended and flushed to summary.txt)."""
        self.figures[name] = str(value)
        with self.summary.open("a") as f:
            f.write(f"{name}={value}\n")
            f.flush()
            os.fsync(f.fileno())

    def say(self, line: str) -> None:
        print(line, flush=True)
        with self.log.open("a") as f:
            f.write(line + "\n")

    def skip(self, check: Check, status: str, note: str) -> Result:
        res = Result(name=check.name, status=status, note=note)
        self.results.append(res)
        self.figure(f"{check.name}.status", status)
        self.say(f"=== {check.name}: {status} ({note})")
        return res

    def run(self, check: Check, env: dict[str, str]) -> Result:
        left = self.left() - RESERVE_S
        if left < check.minimum:
            return self.skip(check, "not-started", f"{left:.0f} s left before the deadline")
        limit = min(check.limit, left)
        self.say(f"=== {check.name} (limit {limit:.0f} s): {shlex.join(check.argv)}")
        start = self.log.stat().st_size
        t = self.clock()
        with self.log.open("ab") as f:
            proc = subprocess.Popen(
                check.argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: spawned ranks die with it
            )
            try:
                rc: int | None = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                rc = None
            _kill_group(proc)
        seconds = self.clock() - t
        with self.log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        figures = parse_pytest(text) if check.kind == "pytest" else parse_figures(text)
        if rc is None:
            status = "cut"
        elif check.kind == "pytest" and rc == 5:  # no test collected by the selection
            status = "absent"
        else:
            status = "ok" if rc == 0 else "failed"
        res = Result(name=check.name, status=status, seconds=seconds, figures=figures)
        self.results.append(res)
        for k, v in figures.items():
            self.figure(f"{check.name}.{k}", v)
        self.figure(f"{check.name}.seconds", f"{seconds:.1f}")
        self.figure(f"{check.name}.status", status)
        if status in ("failed", "cut"):
            tail = "\n".join(text.splitlines()[-25:])
            print(tail, flush=True)
        print(f"=== {check.name}: {status} rc={rc} in {seconds:.1f} s", flush=True)
        return res


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the check's process group, then SIGKILL whatever of it is left (spawned ranks,
    servers a test left behind: nothing of a check outlives it or holds the GPU)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


# ------------------------------------------------------------------------------- the plan
TE_SMOKE = """
import torch, transformer_engine.pytorch as te
from transformer_engine.common.recipe import DelayedScaling
x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
lin = te.Linear(256, 256, params_dtype=torch.bfloat16)
norm_lin = te.LayerNormLinear(256, 256, normalization="RMSNorm", params_dtype=torch.bfloat16)
y = norm_lin(lin(x))
y.float().square().mean().backward()
with te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling()):
    z = lin(x)
z.float().square().mean().backward()
attn = te.DotProductAttention(4, 64, attn_mask_type="causal", qkv_format="sbhd")
q = torch.randn(128, 2, 4, 64, device="cuda", dtype=torch.bfloat16)
o = attn(q, q, q)
torch.cuda.synchronize()
ok = all(bool(torch.isfinite(t).all()) for t in (y, z, o, x.grad, lin.weight.grad))
print("te_smoke=" + ("ok" if ok else "nonfinite"))
"""

VERSIONS = """
import importlib.util, sys, torch, megatron.core as m
te = importlib.util.find_spec("transformer_engine") is not None
tv = __import__("transformer_engine").__version__ if te else "absent"
gpu = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "none"
import rpg_megatron.megatron.step
print(f"python={sys.version.split()[0]} torch={torch.__version__} mcore={m.__version__} "
      f"te={tv} gpu={gpu}")
"""


def _bench(name: str, args: list[str], limit: float, dry: bool) -> Check:
    if dry:  # CPU rehearsal: the tiny float32 preset, TP=1, two measured steps
        args = [a for a in args if a not in ("--fp8", "delayed")]
        i = args.index("--preset")
        args[i + 1 : i + 2] = ["tiny-cpu", "--tps", "1", "--seq", "64", "--steps", "1"]
        args += ["--warmup", "0"]
    argv = (sys.executable, "bench/train_step.py", *args, "--record")
    return Check(name=name, argv=argv, limit=limit, minimum=60.0 if not dry else 10.0)


def plan(*, dry: bool, tests: str, workers: int) -> dict[str, list[Check]]:
    """The checks of each phase, in order."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    pytest += ["-c", str(REPO / "pyproject.toml")]  # its markers, also for another --tests path
    pytest += ["--continue-on-collection-errors", "-W", "ignore::DeprecationWarning"]
    if workers > 1:
        pytest += ["-n", str(workers)]
    return {
        "install": [
            Check(name="install.versions", argv=(sys.executable, "-c", VERSIONS), limit=60),
            Check(name="install.te_smoke", argv=(sys.executable, "-c", TE_SMOKE), limit=90),
        ],
        "a": [
            Check(
                name="a.tests",
                argv=(*pytest, "-m", "gpu and not te", "-k", "not checkpoint", tests),
                limit=180,
                env="plain",
                kind="pytest",
            )
        ],
        "b": [
            _bench("b.4b-bf16", ["--preset", "qwen3-4b-8k"], 150, dry),
            _bench("b.4b-fp8", ["--preset", "qwen3-4b-8k", "--fp8", "delayed"], 150, dry),
            _bench("b.1.7b-bf16", ["--preset", "qwen3-1.7b-8k"], 90, dry),
        ],
        "c": [
            Check(
                name="c.te-tests",
                argv=(*pytest, "-m", "gpu and te", tests),
                limit=240,
                kind="pytest",
            ),
            Check(
                name="c.checkpoint",
                argv=(*pytest, "-m", "gpu and not te", "-k", "checkpoint", tests),
                limit=150,
                kind="pytest",
            ),
            _bench("c.4b-levers", ["--preset", "qwen3-4b-8k", "--levers"], 150, dry),
        ],
    }


# --------------------------------------------------------------------------- environments
def environments(site: Path | None, mcore: str) -> dict[str, dict[str, str]]:
    """PYTHONPATH for 'plain' (no TE) and 'te' runs; `site` None: this interpreter's own."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if site is None:
        path = os.pathsep.join([str(REPO), *inherited])
        return {"plain": {**base, "PYTHONPATH": path}, "te": {**base, "PYTHONPATH": path}}
    plain = [str(REPO), str(site / f"mcore-{mcore}"), str(site / "base"), *inherited]
    te = [*plain[:2], str(site / "te"), *plain[2:]]
    return {
        "plain": {**base, "PYTHONPATH": os.pathsep.join(plain)},
        "te": {**base, "PYTHONPATH": os.pathsep.join(te)},
    }


# ------------------------------------------------------------------------------------ main
def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("phases", nargs="*", metavar="PHASE", help="install a b c (default: all)")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds from start to finish")
    ap.add_argument("--from", dest="start", default=None, help="skip the checks before this one")
    ap.add_argument(
        "--mcore", choices=MCORE, default=None, help=f"megatron-core to run (default {MCORE[0]})"
    )
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT)")
    ap.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where to unpack")
    ap.add_argument(
        "--pack", type=Path, action="append", default=None, help="bundle folders (.gpu-pack*)"
    )
    ap.add_argument("--tests", default="tests", help="test path for the pytest selections")
    ap.add_argument("--workers", type=int, default=None, help="pytest-xdist workers (GPU: 4)")
    ap.add_argument("--dry", action="store_true", help="CPU rehearsal: tiny preset, no install")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    known = (*PHASES, "stash")
    bad = [p for p in args.phases if p not in known]
    if bad:
        ap.error(f"unknown phase {bad[0]!r}; phases: {', '.join(known)}")
    if args.deadline <= 0:
        ap.error(f"--deadline {args.deadline:g}: must be > 0 seconds")
    if args.out is None:
        args.out = Path(os.environ.get("OUT") or "/tmp/gpu-out")
    if not args.phases:
        args.phases = ["a", "b"] if args.dry else list(PHASES)
    if args.pack is None:
        args.pack = [*sorted(p for p in REPO.glob(".gpu-pack*") if p.is_dir()), STASH]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    run = Runner(args.out, args.deadline)
    if "stash" in args.phases:
        copied = stash([p for p in args.pack if p.is_dir() and p != STASH], STASH)
        run.say(f"stash={','.join(copied) or 'nothing'}")
        return 0 if copied else 1
    cuda = _cuda()
    if not args.dry and not cuda:
        print("bench/gpu.py: no CUDA GPU here; use --dry for the CPU rehearsal", file=sys.stderr)
        return 2
    workers = args.workers if args.workers is not None else (4 if cuda and _xdist() else 1)
    checks = plan(dry=args.dry, tests=args.tests, workers=workers)
    todo = [c for p in args.phases for c in checks[p]]
    if args.start is not None:
        names = [c.name for c in todo]
        if args.start not in names:
            print(f"--from {args.start}: not one of {', '.join(names)}", file=sys.stderr)
            return 2
        todo = todo[names.index(args.start) :]
    doc = Path(os.environ.get("RPG_BENCHMARKS_DOC") or REPO / "docs" / "benchmarks.md")
    if args.dry:  # never the repository's own docs/benchmarks.md
        doc = args.out / "benchmarks-doc.md"
        doc.write_text("# Benchmarks (bench/gpu.py --dry)\n")
    doc_start = doc.stat().st_size if doc.exists() else 0
    site = None if args.dry else args.site
    mcore = args.mcore or _chosen_mcore(site) or MCORE[0]
    run.figure("dry", int(args.dry))
    if cuda:
        _nvidia_smi(args.out)
    te_ok, phase, phase_t0, imported = True, None, run.clock(), None
    for check in todo:
        if check.name.split(".")[0] != phase:
            _phase_done(run, phase, phase_t0)
            phase, phase_t0 = check.name.split(".")[0], run.clock()
        if check.name == "install.versions" and site is not None:
            chosen = _install(run, args, site, mcore)
            if chosen is None:
                break
            mcore = chosen
        if check.env == "te" and not te_ok:
            run.skip(check, "skipped", "Transformer Engine failed its smoke test")
            continue
        if check.name == "install.te_smoke" and args.dry:
            run.skip(check, "skipped", "dry run: no GPU")
            continue
        res = run.run(check, _env(site, mcore, check, doc))
        if check.name == "install.versions":
            if res.status == "failed" and mcore == MCORE[0]:
                run.figure("mcore_fallback", f"{MCORE[1]} ({MCORE[0]} did not import)")
                mcore = MCORE[1]
                res = run.run(check, _env(site, mcore, check, doc))
            if site is not None:
                (site / "chosen-mcore").write_text(mcore)
            imported = res.figures.get("mcore")  # the CPU's own in --dry
        if check.name == "install.te_smoke":
            te_ok = res.status == "ok" and res.figures.get("te_smoke") == "ok"
            run.figure("te_smoke", "ok" if te_ok else "failed")
        if check.argv[1:2] == ("bench/train_step.py",):
            _copy_new_sections(doc, doc_start, args.out / "benchmarks.md")
    _phase_done(run, phase, phase_t0)
    run.figure("mcore", imported or (mcore if site is not None else "not-checked"))
    return _finish(run, args, doc, doc_start)


STASH = Path("/root/gpu-parts")
"""Where `stash` keeps bundle parts between calls (the box keeps it while warm)."""


def _phase_done(run: Runner, phase: str | None, t0: float) -> None:
    if phase is not None:
        seconds = f"{run.clock() - t0:.1f}"
        run.figure(f"phase_{phase}_s", seconds)
        run.say(f"=== phase {phase}: {seconds} device seconds")


def _env(site: Path | None, mcore: str, check: Check, doc: Path) -> dict[str, str]:
    return {**environments(site, mcore)[check.env], "RPG_BENCHMARKS_DOC": str(doc)}


def _chosen_mcore(site: Path | None) -> str | None:
    """The megatron-core an earlier call on this warm box settled on."""
    f = site / "chosen-mcore" if site is not None else None
    return f.read_text().strip() if f is not None and f.is_file() else None


def _install(run: Runner, args: argparse.Namespace, site: Path, mcore: str) -> str | None:
    """Unpack the carried bundle unless this warm box has it already; pick megatron-core.
    None (and install=failed) when the bundle is missing or broken."""
    t = run.clock()
    packs = [p for p in args.pack if p.is_dir()]
    carried = [m for p in packs for m in sorted(p.glob("manifest*.json"))]
    have = site / "manifest.json"
    installed = json.loads(have.read_text()) if have.is_file() else None
    first = json.loads(carried[0].read_text())["sha256"] if carried else None
    if installed is None or first not in (None, installed["sha256"]):
        shutil.rmtree(site, ignore_errors=True)
        try:
            installed = unpack(packs, site)
        except (FileNotFoundError, ValueError, tarfile.TarError, OSError) as e:
            run.figure("install", "failed")
            run.say(f"install: {e}")
            return None
    run.figure("bundle_keep_arch", installed.get("keep_arch"))
    run.figure("install.unpack_s", f"{run.clock() - t:.1f}")
    if mcore == "0.19.2" and not _importable_in_box("triton"):
        # megatron-core 0.19.2 imports triton at start-up (transformer/moe/ops/paged_stash.py)
        run.figure("mcore_fallback", "0.16.1 (no triton on this box)")
        return "0.16.1"
    return mcore


def _finish(run: Runner, args: argparse.Namespace, doc: Path, doc_start: int) -> int:
    _derived(run)
    cut = [r.name for r in run.results if r.status in ("cut", "not-started")]
    failed = [r.name for r in run.results if r.status == "failed"]
    run.figure("device_s", f"{run.clock() - run.t0:.1f}")
    run.figure("stopped", "deadline" if cut else "done")
    if cut:
        run.figure("next", cut[0])
    if failed:
        run.figure("failed", ",".join(failed))
    _record_summary(run, args, doc)
    _copy_new_sections(doc, doc_start, args.out / "benchmarks.md")
    keys = ("device_s", "stopped", "next", "failed", "te_smoke", "mcore", "step_ratio",
            "mem_ratio", "fp8_speedup")  # fmt: skip
    print(" ".join(f"{k}={run.figures[k]}" for k in keys if k in run.figures), flush=True)
    return 1 if (failed or cut or run.figures.get("install") == "failed") else 0


def _derived(run: Runner) -> None:
    """The goals of issue 18: ours vs plain at 4B/8K, FP8 vs our bf16."""
    f = run.figures
    for k in ("step_ratio", "mem_ratio"):
        if f"b.4b-bf16.{k}" in f:
            run.figure(k, f[f"b.4b-bf16.{k}"])
    bf16, fp8 = f.get("b.4b-bf16.ours_tokens_s"), f.get("b.4b-fp8.ours_tokens_s")
    if bf16 and fp8:
        run.figure("fp8_speedup", f"{float(fp8) / float(bf16):.3f}")


def _record_summary(run: Runner, args: argparse.Namespace, doc: Path) -> None:
    """One section in the benchmarks document: every check, its status, seconds, figures."""
    os.environ["RPG_BENCHMARKS_DOC"] = str(doc)
    sys.path.insert(0, str(REPO))
    from bench import record as rec

    rec.DOC = doc
    lines = ["| check | status | device s | figures |", "|---|---|---:|---|"]
    for r in run.results:
        figs = " ".join(f"{k}={v}" for k, v in r.figures.items() if k != "failing")
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {figs or r.note} |")
    phases = ", ".join(f"{k[6:-2]} {v} s" for k, v in run.figures.items() if k.startswith("phase_"))
    goals = " ".join(
        f"{k}={run.figures[k]}" for k in ("step_ratio", "mem_ratio", "fp8_speedup")
        if k in run.figures
    )  # fmt: skip
    notes = (f"device seconds by phase: {phases or 'none'}", f"goals: {goals or 'not measured'}")
    cmd = "python3 bench/gpu.py " + shlex.join(args.argv)
    try:
        rec.record("GPU checks (bench/gpu.py)", cmd.strip(), "\n".join(lines), notes=notes)
    except Exception as e:  # the figures are in summary.txt already
        run.say(f"record: {type(e).__name__}: {e}")


def _copy_new_sections(doc: Path, start: int, dest: Path) -> None:
    if doc.exists() and doc.stat().st_size > start:
        with doc.open("rb") as f:
            f.seek(start)
            dest.write_bytes(f.read())


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


def _importable_in_box(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _nvidia_smi(out: Path) -> None:
    query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm"
    try:
        r = subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, timeout=20)
        (out / "nvidia-smi.txt").write_bytes(r.stdout + r.stderr)
    except (OSError, subprocess.TimeoutExpired) as e:
        (out / "nvidia-smi.txt").write_text(f"nvidia-smi: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())

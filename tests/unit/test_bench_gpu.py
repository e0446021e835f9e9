"""The CPU rehearsal of bench/gpu.py (the lent-GPU script) and bench/gpu_pack.py (its bundle):
argument handling, the deadline (a cut check keeps what it wrote, a later one is not started,
its spawned processes die), output parsing, the bundle's round trip and fatbin slimming, and a
dry run of phases a and b on CPU with the tiny preset."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu, gpu_pack

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ parsing
def test_pytest_summary_counts_and_failing_ids():
    text = "\n".join(
        [
            "..F.s",
            "=========================== short test summary info ============================",
            "SKIPPED [1] tests/dist/test_packing.py:160: needs 2 GPU(s), one rank each",
            "FAILED tests/dist/test_step.py::test_fp8[delayed-packed] - AssertionError: x",
            "ERROR tests/dist/test_gpu_paths.py::test_nccl - RuntimeError",
            "== 3 passed, 1 failed, 1 skipped, 7 deselected, 1 error in 41.20s ==",
        ]
    )
    assert gpu.parse_pytest(text) == {
        "passed": "3",
        "failed": "1",
        "skipped": "1",
        "deselected": "7",
        "errors": "1",
        "failing": "tests/dist/test_step.py::test_fp8[delayed-packed],"
        "tests/dist/test_gpu_paths.py::test_nccl",
    }
    assert gpu.parse_pytest("2 passed in 0.10s") == {"passed": "2"}
    # cut before the summary line: what the progress lines show so far
    cut = "collected 9 items\n\n..s.F                  [ 55%]\n.."
    assert gpu.parse_pytest(cut) == {
        "passed_so_far": "5",
        "skipped_so_far": "1",
        "failed_so_far": "1",
    }
    assert gpu.parse_pytest("collected 0 items\n\nno tests ran in 0.01s") == {}


def test_figures_are_the_last_name_value_line():
    text = "a=1 b=2\n| table | row |\nstep_ratio=1.042 mem_ratio=0.870 ours_peak_gib=51.25\nbye"
    assert gpu.parse_figures(text) == {
        "step_ratio": "1.042",
        "mem_ratio": "0.870",
        "ours_peak_gib": "51.25",
    }
    assert gpu.parse_figures("nothing = here\n") == {}


# ------------------------------------------------------------------------------ deadline
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_check_past_the_deadline_is_cut_and_keeps_what_it_wrote(tmp_path):
    """The check prints a figure, starts a grandchild and sleeps: at the deadline the whole
    process group dies, the figure is in summary.txt, and the next check is not started."""
    pidfile = tmp_path / "grandchild.pid"
    slow = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "print('measured=7.5', flush=True)\n"
        "time.sleep(120)\n"
    )
    run = gpu.Runner(tmp_path / "out", gpu.RESERVE_S + 3.0)
    t = time.monotonic()
    cut = run.run(
        gpu.Check(name="b.slow", argv=(sys.executable, "-c", slow), limit=60, minimum=1),
        dict(os.environ),
    )
    assert cut.status == "cut" and time.monotonic() - t < 20
    assert cut.figures == {"measured": "7.5"}
    later = run.run(
        gpu.Check(name="b.next", argv=(sys.executable, "-c", "pass"), limit=60, minimum=1),
        dict(os.environ),
    )
    assert later.status == "not-started"
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert "b.slow.measured=7.5" in summary and "b.slow.status=cut" in summary
    assert "b.next.status=not-started" in summary
    deadline = time.monotonic() + 10
    while _alive(int(pidfile.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(int(pidfile.read_text()))
    assert "measured=7.5" in (tmp_path / "out" / "gpu.log").read_text()


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["x"], "unknown phase 'x'"),
        (["--deadline", "0"], "--deadline 0: must be > 0"),
        (["--mcore", "0.17.0"], "invalid choice: '0.17.0'"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_no_cuda_without_dry_and_unknown_from(tmp_path, capsys):
    assert gpu.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA GPU here; use --dry" in capsys.readouterr().err
    assert gpu.main(["--dry", "--out", str(tmp_path), "--from", "b.nope", "b"]) == 2
    assert "--from b.nope: not one of b.4b-bf16, b.4b-fp8, b.1.7b-bf16" in capsys.readouterr().err


# ------------------------------------------------------------------------------- bundle
def test_bundle_round_trip_in_parts(tmp_path, monkeypatch):
    root = tmp_path / "stage"
    (root / "te" / "transformer_engine").mkdir(parents=True)
    (root / "base").mkdir()
    payload = os.urandom(300_000)  # incompressible: several parts
    (root / "te" / "transformer_engine" / "lib.so").write_bytes(payload)
    (root / "base" / "mod.py").write_text("x = 1\n")
    monkeypatch.setattr(gpu_pack, "PART_BYTES", 100_000)
    parts = gpu_pack.pack(root, tmp_path / ".gpu-pack", {"keep_arch": 90})
    assert [p.name for p in parts] == [".gpu-pack", ".gpu-pack2", ".gpu-pack3", ".gpu-pack4"][
        : len(parts)
    ]
    assert len(parts) >= 3
    site = tmp_path / "site"
    with pytest.raises(FileNotFoundError, match=r"missing: part\.1\.[0-9a-f]{12} "):
        gpu_pack.unpack([parts[0], *parts[2:]], site)
    stash = tmp_path / "stash"
    gpu_pack.stash(parts[:2], stash)  # as calls 1-2 would, then the last call carries the rest
    manifest = gpu_pack.unpack([stash, *parts[2:]], site)
    assert manifest["parts"] == len(parts) and manifest["keep_arch"] == 90
    assert (site / "te" / "transformer_engine" / "lib.so").read_bytes() == payload
    assert (site / "base" / "mod.py").read_text() == "x = 1\n"
    broken = tmp_path / "broken"
    broken.mkdir()
    (last,) = parts[-1].glob(f"part.{len(parts) - 1}.*")
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    (broken / last.name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        gpu_pack.unpack([stash, *parts[2:-1], broken], tmp_path / "site2")


def _elf_with_fatbin(containers: list[list[tuple]]) -> tuple[bytes, list]:
    """A minimal ELF64 whose .nv_fatbin holds `containers` of (kind, arch, flags, payload,
    decompressed size) entries; returns the bytes and (arch, flags, header offset, payload
    offset, payload) of every entry."""
    fat, entries = bytearray(), []
    text = b"\x90" * 40  # another section's bytes, which must stay as they are
    base = 64 + len(text)
    for container in containers:
        fat += struct.pack("<IHHQ", 0xBA55ED50, 1, 16, sum(64 + len(e[3]) for e in container))
        for kind, arch, flags, payload, full in container:
            head = bytearray(64)
            struct.pack_into("<HHIQQ", head, 0, kind, 0x101, 64, len(payload), len(payload))
            struct.pack_into("<I", head, 28, arch)
            struct.pack_into("<QQQ", head, 40, flags, 0, full)
            entries.append((arch, flags, base + len(fat), base + len(fat) + 64, payload))
            fat += head + payload
        fat += bytes(-len(fat) % 8)  # containers are 8-byte aligned
    shstr = b"\0.text\0.nv_fatbin\0.shstrtab\0"
    shoff = base + len(fat) + len(shstr)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 4, 3)
    sections = bytearray(64)  # the null section
    for name, off, size in (
        (1, 64, len(text)),
        (7, base, len(fat)),
        (18, base + len(fat), len(shstr)),
    ):
        sh = bytearray(64)
        struct.pack_into("<IIQQQQ", sh, 0, name, 1, 0, 0, off, size)
        sections += sh
    return bytes(header) + text + bytes(fat) + shstr + bytes(sections), entries


ZSTD, LINUX64 = 0x8000, 0x11


def test_slimming_empties_every_other_architecture_and_nothing_else(tmp_path):
    """sm_90 entries stay byte for byte; the others become a zstd frame of zeros of their
    decompressed size (zstd-flagged) or zeros, padded to their old size; headers keep their
    sizes except the compressed size of a rewritten zstd entry."""
    blob, entries = _elf_with_fatbin(
        [
            [
                (2, 80, LINUX64 | ZSTD, b"A" * 200, 300_000),
                (2, 90, LINUX64 | ZSTD, b"B" * 40, 999),
                (2, 100, LINUX64, b"C" * 16, 16),
            ],
            [(2, 90, LINUX64, b"D" * 8, 8), (2, 75, LINUX64 | ZSTD, b"E" * 4, 50)],  # too small
        ]
    )
    lib = tmp_path / "lib.so"
    lib.write_bytes(blob)
    stats = gpu_pack.slim_fatbins(lib, keep_arch=90)
    got = lib.read_bytes()
    assert stats == {"containers": 2, "kept": 48, "zeroed": 216}
    want = bytearray(blob)
    (_, _, head80, at80, p80), _b, (_, _, _, at100, p100), _d, _e = entries
    frame = gpu_pack.zstd_zeros(300_000)
    want[at80 : at80 + len(p80)] = frame + bytes(len(p80) - len(frame))
    struct.pack_into("<Q", want, head80 + 16, len(frame))
    want[at100 : at100 + len(p100)] = bytes(len(p100))
    assert got == bytes(want)  # every other byte (headers, sm_90 payloads, the ELF) unchanged
    if shutil.which("zstd"):  # the frame is real zstd, checked by the zstd tool itself
        r = subprocess.run(
            ["zstd", "-d", "-c"], input=got[at80 : at80 + len(frame)], capture_output=True
        )
        assert r.returncode == 0 and r.stdout == bytes(300_000)


@pytest.mark.parametrize(
    ("containers", "match"),
    [
        ([[(2, 80, LINUX64, b"A" * 8, 8)]], "no sm_90"),
        ([[(1, 90, LINUX64, b"ptx.....", 8), (2, 90, LINUX64, b"B" * 8, 8)]], "holds PTX"),
        ([[(2, 90, LINUX64, b"B" * 8, 8), (2, 80, LINUX64 | 0x2000, b"A" * 8, 8)]], "LZ4"),
    ],
)
def test_slimming_refuses_what_the_driver_might_need(tmp_path, containers, match):
    blob, _ = _elf_with_fatbin(containers)
    lib = tmp_path / "lib.so"
    lib.write_bytes(blob)
    with pytest.raises(ValueError, match=match):
        gpu_pack.slim_fatbins(lib, keep_arch=90)


# ------------------------------------------------------------------------------ dry run
FAKE_TESTS = """
import pytest

@pytest.mark.gpu
def test_gpu_passes():
    assert True

@pytest.mark.gpu
def test_gpu_skips():
    pytest.skip("needs 2 GPU(s), one rank each")

@pytest.mark.gpu
@pytest.mark.te
def test_needs_te():
    assert True

def test_cpu_only():
    assert True
"""


def _dry(tmp_path: Path, *argv: str) -> tuple[int, dict[str, str], Path]:
    tests = tmp_path / "fake_tests"
    tests.mkdir(exist_ok=True)
    (tests / "test_fake.py").write_text(FAKE_TESTS)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    cmd = [sys.executable, "bench/gpu.py", "--dry", "--tests", str(tests), "--out", str(out)]
    r = subprocess.run(
        [*cmd, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    lines = (out / "summary.txt").read_text().splitlines()
    return r.returncode, dict(line.split("=", 1) for line in lines), out


@pytest.mark.slow
def test_dry_run_of_phases_a_and_b_on_cpu(tmp_path):
    docs = REPO / "docs" / "benchmarks.md"
    before = hashlib.sha256(docs.read_bytes()).hexdigest() if docs.exists() else None
    rc, fig, out = _dry(tmp_path, "--deadline", "500", "a", "b")
    assert rc == 0, (out / "gpu.log").read_text()[-3000:]
    # phase a selected the gpu tests without te by marker: one passed, one skipped
    assert (fig["a.tests.passed"], fig["a.tests.skipped"], fig["a.tests.deselected"]) == (
        "1",
        "1",
        "2",
    )
    log = (out / "gpu.log").read_text()
    printed = [line for line in log.splitlines() if line.startswith("step_ratio=")]
    assert len(printed) == 3  # each bench's own last line, as it printed it
    for name, line in zip(("b.4b-bf16", "b.4b-fp8", "b.1.7b-bf16"), printed, strict=True):
        assert fig[f"{name}.status"] == "ok"
        own = dict(t.split("=") for t in line.split())
        assert fig[f"{name}.step_ratio"] == own["step_ratio"]
        assert float(own["ours_tokens_s"]) > 0
    assert fig["step_ratio"] == fig["b.4b-bf16.step_ratio"]
    want_fp8 = float(fig["b.4b-fp8.ours_tokens_s"]) / float(fig["b.4b-bf16.ours_tokens_s"])
    assert float(fig["fp8_speedup"]) == pytest.approx(want_fp8, abs=1e-3)
    assert fig["stopped"] == "done" and "next" not in fig
    assert float(fig["phase_a_s"]) > 0 and float(fig["phase_b_s"]) > 0
    md = (out / "benchmarks.md").read_text()
    assert md.count("## train_step: ours vs plain Megatron") == 3
    assert md.count("## GPU checks (bench/gpu.py)") == 1 and "| b.1.7b-bf16 | ok |" in md
    after = hashlib.sha256(docs.read_bytes()).hexdigest() if docs.exists() else None
    assert after == before  # the repository's docs/benchmarks.md is never touched by --dry


def test_dry_run_past_its_deadline_starts_nothing_and_says_where_to_go_on(tmp_path):
    rc, fig, out = _dry(tmp_path, "--deadline", str(gpu.RESERVE_S + 1), "a", "b")
    assert rc == 1
    assert fig["a.tests.status"] == "not-started" and fig["b.4b-bf16.status"] == "not-started"
    assert fig["stopped"] == "deadline" and fig["next"] == "a.tests"
    assert "| a.tests | not-started |" in (out / "benchmarks.md").read_text()


def test_parts_of_two_bundles_never_mix(tmp_path, monkeypatch):
    """A warm box may keep folders of an earlier bundle: unpack takes the first bundle (in the
    order given) whose parts are all there, and only its parts (named by its sha256)."""
    monkeypatch.setattr(gpu_pack, "PART_BYTES", 60_000)
    bundles = {}
    for name in ("slim", "full"):
        root = tmp_path / f"stage-{name}"
        (root / "te").mkdir(parents=True)
        (root / "te" / "lib.so").write_bytes(os.urandom(100_000))
        bundles[name] = (root, gpu_pack.pack(root, tmp_path / f".gpu-{name}", {"keep_arch": None}))
    full_first_only = [bundles["full"][1][0]]  # its manifest and part.0, not part.1
    got = gpu_pack.unpack([*full_first_only, *bundles["slim"][1]], tmp_path / "site")
    slim_root = bundles["slim"][0]
    assert (
        got["sha256"] == json.loads((bundles["slim"][1][0] / "manifest.json").read_text())["sha256"]
    )
    assert (tmp_path / "site" / "te" / "lib.so").read_bytes() == (
        slim_root / "te" / "lib.so"
    ).read_bytes()
    with pytest.raises(FileNotFoundError, match=r"missing: part\.1\."):
        gpu_pack.unpack(full_first_only, tmp_path / "site2")

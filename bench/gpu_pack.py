"""Pack megatron-core (0.19.2 and 0.16.1) and Transformer Engine 2.20.2 for the lent GPU box
into one folder a single device call can carry (run here, on the CPU machine, once).

The box (Python 3.12, torch 2.11+cu130, no network) lacks megatron-core and TE, and a call
carries at most 64 MiB with the checkout. TE's core wheel is 276 MB, nearly all of it
`libtransformer_engine.so`, whose CUDA kernels are stored once per GPU architecture
(sm_75, 80, 89, 90, 100, 103, 107, 120; already compressed by nvcc, so xz gains nothing).
An H100 or H200 runs only the sm_90 cubins, and the library has no PTX to JIT from, so the
other architectures' cubins can never be loaded there. `slim_fatbins` empties them in place
(each becomes a valid zstd frame of zeros, padded with zeros; every header, size and other
byte stays, so the ELF and every fatbin offset stay valid) and the zeros compress away: the
bundle is 32 MiB, one carry, instead of ../shared/gpu/README.md's six 48 MB parts. Checked
with NVIDIA's cuobjdump 13.5 (pip nvidia-cuda-cuobjdump): `-arch sm_90` lists and extracts
the 90 sm_90 cubins byte-identical from both libraries; the emptied entries decompress (to
zeros), so only a tool parsing every architecture's ELF notices them (`cuobjdump -lelf`
without -arch: "Invalid ELF"). The GPU run's TE smoke test is the proof; bench/gpu.py's
header gives the unslimmed fallback.

    python3 bench/gpu_pack.py                 # -> .gpu-pack/ (carry it; see bench/gpu.py)
    python3 bench/gpu_pack.py --all-archs     # the unslimmed fallback, in 60 MB parts

Wheels are unpacked (not pip-installed) into one folder per role, which bench/gpu.py puts on
PYTHONPATH: base/ (pure-Python needs of TE and the project the box lacks), te/ (TE core with
the slim library, TE's torch extension built on the box for torch 2.11+cu130, from
../shared/gpu), mcore-0.19.2/ and mcore-0.16.1/ (one of them per run).

On the box, bench/gpu.py calls `stash` (keep a call's parts for a later one) and `unpack`
(the first complete bundle, checked against its sha256).

Last line: bundle_mib=<size> parts=<n> carry=<folders> verified=<sm_90 cubins checked or no>.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TE_TORCH_WHEEL = "transformer_engine_torch-2.20.2-cp312-cp312-linux_x86_64.whl"
"""Built from its sdist on the box against torch 2.11+cu130 (no PyPI wheel exists); it lies
in ../shared/gpu beside the project checkout (or beside a folder above a worktree)."""
SHARED = next(
    (
        d / "shared" / "gpu"
        for d in REPO.parents
        if (d / "shared" / "gpu" / TE_TORCH_WHEEL).is_file()
    ),
    REPO.parent / "shared" / "gpu",
)

MCORE = ("0.19.2", "0.16.1")
"""megatron-core versions brought to the box; bench/gpu.py runs the first by default."""

ROLES: dict[str, tuple[str, ...]] = {
    # TE's and pydantic's needs the box lacks (it has pyyaml, packaging, einops, onnx,
    # onnxscript, numpy, psutil, triton 3.6.0: /work/.library/device/KINDS.md); pydantic
    # needs typing-extensions >= 4.16. The project's: schedulefree, math-verify.
    "base": (
        "pydantic==2.14.3",
        "pydantic-core==2.50.4",
        "annotated-types==0.8.0",
        "typing-inspection==0.4.5",
        "typing-extensions==4.16.0",
        "importlib-metadata==10.2.0",
        "nvdlfw-inspect==0.2.2",
        "schedulefree==1.4.1",
        "math-verify==0.9.0",
        "latex2sympy2-extended==1.11.0",
        "antlr4-python3-runtime==4.13.2",
    ),
    # nvidia-cudnn-frontend (11.6 MB, a pip requirement of TE's torch wheel) is left out: TE
    # 2.20.2 imports `cudnn` only in ops/fused/grouped_mlp.py (MoE grouped GEMM on sm_100).
    "te": ("transformer-engine==2.20.2", "transformer-engine-cu13==2.20.2"),
    **{f"mcore-{v}": (f"megatron-core=={v}",) for v in MCORE},
}
KEEP_ARCH = 90
"""sm_90: H100 and H200."""
PART_BYTES = 60 * 2**20
"""Per carried folder: the device tool's 64 MiB per call also holds the checkout (~1 MiB)."""


def download(specs: tuple[str, ...], dest: Path) -> None:
    """Wheels for the box (CPython 3.12, manylinux x86_64), without dependencies."""
    plats = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + ["manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in plats:
        cmd += ["--platform", p]
    subprocess.run([*cmd, *specs], check=True)


def _sections(data: mmap.mmap) -> dict[str, tuple[int, int]]:
    """ELF64 little-endian section name -> (file offset, size)."""
    if data[:6] != b"\x7fELF\x02\x01":
        raise ValueError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for i in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        raw.append((name, offset, size))
    strtab = raw[shstrndx][1]
    out = {}
    for name, offset, size in raw:
        end = data.find(b"\0", strtab + name)
        out[data[strtab + name : end].decode()] = (offset, size)
    return out


_FATBIN_MAGIC = 0xBA55ED50
"""CUDA fatbin container: magic u32, version u16, header size u16, payload size u64; then
entries, each a header (kind u16: 1 PTX, 2 cubin; u16; header size u32; payload size u64;
compressed size u64 at 16; arch u32 at 28; flags u64 at 40; decompressed size u64 at 56)
and its payload. Read from this library's own headers; cuobjdump (CUDA 13.5) agrees."""
_ZSTD = 0x8000
"""Entry flag: payload is a zstd frame (nvcc --compress-mode; TE 2.20.2's are all zstd)."""
_LZ4 = 0x2000
"""Entry flag: payload is LZ4-compressed (older nvcc)."""


def zstd_zeros(n: int) -> bytes:
    """A zstd frame (RFC 8878) that decompresses to n zero bytes: single segment, 4-byte
    content size, RLE blocks of at most 128 KiB (the block maximum)."""
    if not 0 < n < 2**32:
        raise ValueError(f"zstd_zeros: n={n} out of range")
    out = bytearray(struct.pack("<IBI", 0xFD2FB528, 0xA0, n))
    left = n
    while left:
        size = min(left, 128 * 1024)
        left -= size
        header = (size << 3) | (1 << 1) | (left == 0)  # RLE block, last flag
        out += header.to_bytes(3, "little") + b"\0"
    return bytes(out)


def slim_fatbins(path: Path, keep_arch: int = KEEP_ARCH) -> dict[str, int]:
    """Empty, in place, every fatbin entry of `path` (.nv_fatbin) whose GPU architecture is
    not `keep_arch`: a zstd entry's payload becomes a frame of zeros of its decompressed size
    (so a tool that decompresses every entry still can), then zero padding to the payload's
    old size. Headers, sizes and every other byte stay. Refuses a library in which some
    container lacks a `keep_arch` cubin, holds PTX (the driver could JIT from what was
    emptied) or LZ4 entries."""
    stats = {"containers": 0, "kept": 0, "zeroed": 0}
    with path.open("r+b") as f, mmap.mmap(f.fileno(), 0) as data:
        sections = _sections(data)
        if ".nv_fatbin" not in sections:
            return stats
        pos, size = sections[".nv_fatbin"]
        end = pos + size
        while pos < end:
            magic, _ver, header, payload = struct.unpack_from("<IHHQ", data, pos)
            if magic != _FATBIN_MAGIC:  # containers are 8-byte aligned, padded with zeros
                pos += 8
                continue
            stats["containers"] += 1
            entry, stop = pos + header, pos + header + payload
            entries = []
            while entry < stop:
                kind, _u, ehead, esize = struct.unpack_from("<HHIQ", data, entry)
                (arch,) = struct.unpack_from("<I", data, entry + 28)
                (flags,) = struct.unpack_from("<Q", data, entry + 40)
                (full,) = struct.unpack_from("<Q", data, entry + 56)
                entries.append((entry, kind, arch, flags, full, entry + ehead, esize))
                entry += ehead + esize
            where = f"{path.name}: fatbin container at byte {pos}"
            if entry != stop:
                raise ValueError(f"{where} does not parse")
            if any(e[1] != 2 for e in entries):
                raise ValueError(f"{where} holds PTX; not slimmed")
            if not any(e[2] == keep_arch for e in entries):
                raise ValueError(f"{where} has no sm_{keep_arch} cubin")
            for head, _kind, arch, flags, full, start, esize in entries:
                if arch == keep_arch:
                    stats["kept"] += esize
                    continue
                if flags & _LZ4:
                    raise ValueError(f"{where} has LZ4 entries; not slimmed")
                body = zstd_zeros(full) if flags & _ZSTD else b""
                if len(body) > esize:
                    continue  # would not fit (tiny entry): left as it is
                data[start : start + esize] = body + bytes(esize - len(body))
                if flags & _ZSTD:
                    struct.pack_into("<Q", data, head + 16, len(body))
                stats["zeroed"] += esize
            pos = stop
        data.flush()
    return stats


def verify_slim(cuobjdump: str, original: Path, slimmed: Path, arch: int = KEEP_ARCH) -> int:
    """Extract every sm_`arch` cubin of both libraries with NVIDIA's cuobjdump; raise unless
    they are the same, byte for byte. Returns how many there are."""

    def cubins(lib: Path) -> list[str]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [cuobjdump, "-xelf", "all", "-arch", f"sm_{arch}", str(lib)]
            subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
            files = sorted(Path(tmp).iterdir(), key=lambda f: int(f.name.split(".")[-3]))
            return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]

    want, got = cubins(original), cubins(slimmed)
    if not want or got != want:
        raise ValueError(f"{slimmed.name}: sm_{arch} cubins differ from the original's")
    return len(want)


def stage(
    cache: Path, root: Path, *, slim: bool, te_torch: Path, cuobjdump: str | None = None
) -> dict[str, dict]:
    """Unpack every role's wheels into root/<role>/; slim TE's libraries (and verify them with
    `cuobjdump` when given)."""
    report: dict[str, dict] = {}
    for role, specs in ROLES.items():
        dest = root / role
        dest.mkdir(parents=True)
        wheels = []
        for spec in specs:
            name, version = spec.split("==")
            stem = name.replace("-", "_").lower()
            found = [
                w for w in cache.glob("*.whl") if w.name.lower().startswith(f"{stem}-{version}-")
            ]
            if len(found) != 1:
                raise FileNotFoundError(f"{spec}: expected one wheel in {cache}, found {found}")
            wheels.append(found[0])
        if role == "te":
            wheels.append(te_torch)
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(dest)
        report[role] = {"wheels": sorted(w.name for w in wheels)}
    if slim:
        for lib in sorted((root / "te").glob("transformer_engine/wheel_lib/*.so")):
            original = root / f"{lib.name}.orig"
            shutil.copyfile(lib, original)
            report["te"][lib.name] = slim_fatbins(lib)
            if cuobjdump and report["te"][lib.name]["containers"]:
                report["te"][lib.name]["verified_cubins"] = verify_slim(cuobjdump, original, lib)
            original.unlink()
    return report


def _tar_xz(root: Path, bundle: Path) -> None:
    """root's folders -> bundle (xz, multi-threaded with the xz tool when there is one; the
    box reads either with Python's tarfile)."""
    names = sorted(c.name for c in root.iterdir())
    if shutil.which("tar") and shutil.which("xz"):
        with bundle.open("wb") as f:
            tar = subprocess.Popen(
                ["tar", "-C", str(root), "-cf", "-", *names], stdout=subprocess.PIPE
            )
            xz = subprocess.run(["xz", "-6", "-T0", "-c"], stdin=tar.stdout, stdout=f, check=True)
            tar.stdout.close()
            if tar.wait() or xz.returncode:
                raise RuntimeError(f"tar | xz failed for {root}")
        return
    with tarfile.open(bundle, "w:xz", preset=6) as tar:
        for name in names:
            tar.add(root / name, arcname=name)


def pack(root: Path, out: Path, manifest: dict) -> list[Path]:
    """root/ -> one bundle.tar.xz, cut into folders out, out2, out3, ... of at most
    PART_BYTES each, with manifest.json (parts, sha256) in the first. Part i is named
    part.<i>.<first 12 hex digits of the bundle's sha256>, so parts of two bundles on one box
    never mix."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        bundle = Path(tmp) / "bundle.tar.xz"
        _tar_xz(root, bundle)
        digest = hashlib.sha256()
        with bundle.open("rb") as f:
            while chunk := f.read(2**24):
                digest.update(chunk)
        tag = digest.hexdigest()[:12]
        for old in [out, *out.parent.glob(out.name + "[0-9]*")]:
            if old.is_dir():
                shutil.rmtree(old)
        parts: list[Path] = []
        with bundle.open("rb") as f:
            while chunk := f.read(PART_BYTES):
                folder = out if not parts else out.with_name(f"{out.name}{len(parts) + 1}")
                folder.mkdir()
                (folder / f"part.{len(parts)}.{tag}").write_bytes(chunk)
                parts.append(folder)
        total = bundle.stat().st_size
    manifest = {**manifest, "parts": len(parts), "bytes": total, "sha256": digest.hexdigest()}
    (parts[0] / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


# ------------------------------------------------------------------ on the GPU box
def stash(packs: list[Path], dest: Path) -> list[str]:
    """Copy the bundle parts and manifests of the carried folders to `dest`, where a later
    call finds them while the box stays warm (manifests renamed by their bundle's tag)."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for folder in packs:
        for f in sorted(folder.glob("part.*")):
            shutil.copy2(f, dest / f.name)
            copied.append(f.name)
        for f in sorted(folder.glob("manifest*.json")):
            tag = json.loads(f.read_text())["sha256"][:12]
            shutil.copy2(f, dest / f"manifest.{tag}.json")
            copied.append(f.name)
    return copied


def unpack(packs: list[Path], site: Path) -> dict:
    """Extract to `site` the first bundle, by the order of `packs`, whose manifest and every
    part (part.<i>.<tag>) are in `packs`, after checking its sha256. Returns its manifest.
    FileNotFoundError names the parts missing of the first manifest found."""
    manifests = [m for f in packs for m in sorted(f.glob("manifest*.json"))]
    if not manifests:
        raise FileNotFoundError(f"no manifest.json in {', '.join(map(str, packs)) or 'nothing'}")
    chosen, first_missing = None, None
    for m in manifests:
        manifest = json.loads(m.read_text())
        tag = manifest["sha256"][:12]
        found = {p.name: p for f in packs for p in f.glob(f"part.*.{tag}")}
        want = [f"part.{i}.{tag}" for i in range(manifest["parts"])]
        missing = [w for w in want if w not in found]
        if not missing:
            chosen = (manifest, [found[w] for w in want])
            break
        first_missing = first_missing or missing
    if chosen is None:
        raise FileNotFoundError(
            f"bundle parts missing: {', '.join(first_missing or [])} (carry or stash them)"
        )
    manifest, parts = chosen
    site.mkdir(parents=True, exist_ok=True)
    bundle = site / "bundle.tar.xz"
    digest = hashlib.sha256()
    with bundle.open("wb") as out:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != manifest["sha256"]:
        raise ValueError(f"bundle sha256 {digest.hexdigest()} != manifest {manifest['sha256']}")
    with tarfile.open(bundle) as tar:
        tar.extractall(site, filter="data")
    bundle.unlink()
    (site / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / ".gpu-pack", help="first carried folder")
    ap.add_argument("--cache", type=Path, default=REPO / ".gpu-cache", help="downloaded wheels")
    ap.add_argument("--te-torch-wheel", type=Path, default=SHARED / TE_TORCH_WHEEL)
    ap.add_argument("--all-archs", action="store_true", help="keep every GPU architecture")
    ap.add_argument(
        "--cuobjdump",
        default=shutil.which("cuobjdump"),
        help="NVIDIA's cuobjdump (pip nvidia-cuda-cuobjdump): check the sm_90 cubins",
    )
    args = ap.parse_args(argv)
    if not args.te_torch_wheel.is_file():
        print(f"--te-torch-wheel {args.te_torch_wheel}: no such file", file=sys.stderr)
        return 2
    if not args.out.name.startswith(".gpu"):
        print(
            f"--out {args.out}: name it .gpu* (git-ignored: it travels only when carried)",
            file=sys.stderr,
        )
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    for specs in ROLES.values():  # one pip call per role: pip refuses two megatron-cores
        download(specs, args.cache)
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        report = stage(
            args.cache,
            Path(tmp),
            slim=not args.all_archs,
            te_torch=args.te_torch_wheel,
            cuobjdump=args.cuobjdump,
        )
        manifest = {
            "roles": report,
            "mcore": list(MCORE),
            "keep_arch": None if args.all_archs else KEEP_ARCH,
        }
        parts = pack(Path(tmp), args.out, manifest)
    total = json.loads((parts[0] / "manifest.json").read_text())["bytes"]
    for p in parts:
        size = sum(f.stat().st_size for f in p.iterdir())
        print(f"{p.relative_to(REPO) if p.is_relative_to(REPO) else p}: {size / 2**20:.1f} MiB")
    carry = ",".join(p.name for p in parts)
    verified = report["te"].get("libtransformer_engine.so", {}).get("verified_cubins", "no")
    print(f"bundle_mib={total / 2**20:.1f} parts={len(parts)} carry={carry} verified={verified}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

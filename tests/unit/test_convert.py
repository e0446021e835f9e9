"""convert: HF safetensors -> Megatron dist checkpoint -> HF, in this process (TP = PP = 1).

Independent truths: the original safetensors written by `transformers` (round trips compare
every tensor with torch.equal and the same dtype) and the HF model's own logits on a fixed
prompt. Logit tolerance: float32 on both sides, only the summation order differs (fused QKV
and gate/up GEMMs): atol 1e-4, rtol 0, with logits of size ~1.
Corrupt inputs must fail with an error naming the tensor or file, before --out exists.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from rpg_megatron import cli, convert
from rpg_megatron.config import ConfigError, ModelConfig, ParallelConfig
from rpg_megatron.megatron import hf_map, model, parallel
from rpg_megatron.megatron.arch import read_hf_config
from tests import tiny_hf

LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    root = tmp_path_factory.mktemp("hf")
    out = {f: (root / f, tiny_hf.write(root / f, f)) for f in tiny_hf.CLASSES}
    tiny_hf.write(root / "qwen2-bf16", "qwen2", dtype=torch.bfloat16)
    out["qwen2-bf16"] = (root / "qwen2-bf16", None)
    return out


def _assert_same_hf(got_dir: Path, want_dir: Path) -> None:
    got, want = tiny_hf.read_safetensors(got_dir), tiny_hf.read_safetensors(want_dir)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_a_training_checkpoints_record_names_the_installed_megatron_core(hf_dirs):
    # package_info.__version__ of megatron-core 0.19 carries the git hash of whatever checkout
    # the venv sits in ("0.19.2+7d4a4f4"); the record names the release, as pip does.
    src, _ = hf_dirs["qwen3"]
    ctx = types.SimpleNamespace(tp=2, pp=1)
    record = convert.training_conversion(read_hf_config(src), src, "bfloat16", ctx)
    assert record.megatron_core == importlib.metadata.version("megatron-core")
    assert (record.tp, record.pp, record.dtype) == (2, 1, "bfloat16")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen2-bf16"])
def test_hf_mcore_hf_is_bit_exact_and_logits_match(hf_dirs, tmp_path, family):
    src, hf_logits = hf_dirs[family]
    mc = convert.hf_to_mcore(src, tmp_path / "mc")
    assert sorted(p.name for p in mc.iterdir()) == [
        "config.json", "conversion.json", "generation_config.json", "tokenizer_config.json",
        "weights",
    ]  # fmt: skip
    record = json.loads((mc / "conversion.json").read_text())
    assert record["dtype"] == ("bfloat16" if "bf16" in family else "float32")
    assert record["megatron_core"] == importlib.metadata.version("megatron-core")
    back = convert.mcore_to_hf(mc, tmp_path / "hf")
    _assert_same_hf(back, src)
    assert (back / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (back / "tokenizer_config.json").read_text() == '{"model_max_length": 64}\n'
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary directory left behind
    if hf_logits is None:
        return
    arch = read_hf_config(mc)
    parallel.init(ParallelConfig())
    try:
        gpt = model.build_gpt(
            arch, ModelConfig(dtype="float32"), ParallelConfig(), pre_process=True,
            post_process=True,
        )  # fmt: skip
        convert.load_mcore(gpt, mc)
        gpt.eval()
        ids = tiny_hf.prompt()
        with torch.no_grad():
            logits = gpt(ids, torch.arange(ids.shape[1])[None], None)
    finally:
        parallel.destroy()
    assert hf_logits.abs().max() > 1.0
    torch.testing.assert_close(logits[..., : tiny_hf.V], hf_logits, atol=LOGITS_ATOL, rtol=0)


# ------------------------------------------------------------------------------- corrupt
def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    from safetensors.torch import save_file

    state = tiny_hf.read_safetensors(path.parent)
    edit(state)
    save_file(state, path, {"format": "pt"})


def _drop_k_proj(state):
    del state["model.layers.1.self_attn.k_proj.weight"]


def _short_up_proj(state):
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1]


CORRUPT = [
    ("missing_tensor", _drop_k_proj, hf_map.MissingTensorError,
     r"model\.layers\.1\.self_attn\.k_proj\.weight"),
    ("wrong_shape", _short_up_proj, hf_map.ShapeMismatchError,
     r"model\.layers\.0\.mlp\.up_proj\.weight: expected shape \[96, 64\], got \[95, 64\]"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "error", "match"), [c[1:] for c in CORRUPT],
                         ids=[c[0] for c in CORRUPT])  # fmt: skip
def test_corrupt_tensors_are_named_and_out_never_appears(hf_dirs, tmp_path, edit, error, match):
    src = _corrupt_copy(hf_dirs["llama"][0], tmp_path / "src")
    _rewrite(src / "model.safetensors", edit)
    with pytest.raises(error, match=match):
        convert.hf_to_mcore(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_truncated_safetensors_names_the_file(hf_dirs, tmp_path):
    src = _corrupt_copy(hf_dirs["qwen3"][0], tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(convert.ConvertError, match=rf"{f}: unreadable safetensors file"):
        convert.hf_to_mcore(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_of_another_family_is_refused(hf_dirs, tmp_path):
    # qwen3 weights under a llama config.json: qwen3's q_norm/k_norm are not llama tensors.
    src = _corrupt_copy(hf_dirs["qwen3"][0], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(
        hf_map.UnexpectedTensorError, match=r"not in the llama weight map: .*q_norm\.weight"
    ):
        convert.hf_to_mcore(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ConfigError, match=rf"{src / 'config.json'}: model_type='mistral'"):
        convert.hf_to_mcore(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_out_is_never_clobbered(hf_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(convert.ConvertError, match="already exists"):
        convert.hf_to_mcore(hf_dirs["llama"][0], out)
    bad = _corrupt_copy(hf_dirs["llama"][0], tmp_path / "bad")
    _rewrite(bad / "model.safetensors", _drop_k_proj)
    with pytest.raises(hf_map.MissingTensorError):
        convert.hf_to_mcore(bad, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out"]


def test_cli_convert_reports_errors_and_keeps_config_subcommand(hf_dirs, tmp_path, capsys):
    src = _corrupt_copy(hf_dirs["qwen2"][0], tmp_path / "src")
    _rewrite(src / "model.safetensors", _drop_k_proj)
    argv = ["convert", "hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "k_proj.weight" in capsys.readouterr().err
    assert cli.main(["convert", "mcore-to-hf", "--mcore", str(src), "--out", str(tmp_path / "o")])
    assert "conversion.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli.main(["config", "parallel.tp=2"]) == 0
    assert "tp: 2" in capsys.readouterr().out


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_out_overlapping_the_source_is_refused_even_with_overwrite(hf_dirs, tmp_path):
    src = _corrupt_copy(hf_dirs["llama"][0], tmp_path / "m" / "src")
    before = _snapshot(src)
    for out, where in ((src, "is"), (src / "sub", "is inside"), (tmp_path / "m", "contains")):
        with pytest.raises(convert.ConvertError, match=rf"--out {out} {where} the source --hf"):
            convert.hf_to_mcore(src, out, overwrite=True)
    mc = convert.hf_to_mcore(src, tmp_path / "mc")
    mc_before = _snapshot(mc)
    with pytest.raises(convert.ConvertError, match=rf"--out {mc} is the source --mcore {mc}"):
        convert.mcore_to_hf(mc, mc, overwrite=True)
    with pytest.raises(convert.ConvertError, match=r"is inside the source --mcore"):
        convert.mcore_to_hf(mc, mc / "weights", overwrite=True)
    assert _snapshot(src) == before and _snapshot(mc) == mc_before


def test_overwrite_never_replaces_a_file(hf_dirs, tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    with pytest.raises(convert.ConvertError, match=rf"--out {f}: exists and is not a directory"):
        convert.hf_to_mcore(hf_dirs["llama"][0], f, overwrite=True)
    assert f.read_text() == "mine"


def test_errors_name_the_command_line_flags(hf_dirs, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(convert.ConvertError, match=rf"^--mcore {missing}: not a directory"):
        convert.mcore_to_hf(missing, tmp_path / "o")
    no_config = _corrupt_copy(hf_dirs["llama"][0], tmp_path / "nc")
    (no_config / "config.json").unlink()
    with pytest.raises(convert.ConvertError, match=rf"^--hf {no_config}: no config.json"):
        convert.hf_to_mcore(no_config, tmp_path / "o")
    # tiny_hf models have 4 attention heads: 3 does not divide them.
    with pytest.raises(convert.ConvertError, match=r"^--tp=3 does not divide num_attention_heads"):
        convert.hf_to_mcore(hf_dirs["llama"][0], tmp_path / "o", tp=3)
    (tmp_path / "o").mkdir()
    with pytest.raises(convert.ConvertError, match=r"already exists; pass --overwrite to replace"):
        convert.hf_to_mcore(hf_dirs["llama"][0], tmp_path / "o")


def test_load_mcore_of_a_missing_directory_says_so(tmp_path):
    # train's model.init_from=/nonexistent used to report a missing weights/metadata.json.
    with pytest.raises(convert.ConvertError, match=rf"^{tmp_path / 'no'}: no such directory"):
        convert.load_mcore(None, tmp_path / "no")


def test_cli_refuses_out_equal_to_source(hf_dirs, tmp_path, capsys):
    src = _corrupt_copy(hf_dirs["qwen2"][0], tmp_path / "src")
    before = _snapshot(src)
    argv = ["convert", "hf-to-mcore", "--hf", str(src), "--out", str(src), "--overwrite"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {src} is the source --hf {src}" in err and err.count("\n") == 1
    assert _snapshot(src) == before


def test_a_damaged_dist_checkpoint_is_named_and_out_is_kept(hf_dirs, tmp_path, capsys):
    """mcore-to-hf of a checkpoint with a cut-off .distcp (or .metadata) names the file in one
    line, before any output; an existing --out stays as it was, even with --overwrite."""
    mc = convert.hf_to_mcore(hf_dirs["qwen3"][0], tmp_path / "mc")
    out = convert.mcore_to_hf(mc, tmp_path / "out")
    kept = _snapshot(out)
    shard = max((mc / "weights").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    argv = ["convert", "mcore-to-hf", "--mcore", str(mc), "--out", str(out), "--overwrite"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{shard}: truncated" in err and err.count("\n") == 1
    shard.write_bytes(data)
    meta = mc / "weights" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:50])
    with pytest.raises(convert.ConvertError, match=rf"{meta}: cut off or corrupt"):
        convert.mcore_to_hf(mc, out, overwrite=True)
    assert _snapshot(out) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mc", "out"]  # no temporary left


def test_the_old_per_rank_training_format_is_refused_with_what_to_do(tmp_path):
    old = tmp_path / "ck" / "step_00000004"
    old.mkdir(parents=True)
    torch.save({}, old / "rank_00000.pt")
    (tmp_path / "ck" / "latest").write_text(old.name)
    for src in (old, tmp_path / "ck"):  # the step, or the checkpoint directory (latest)
        with pytest.raises(convert.ConvertError, match=r"per-rank format.*<log.run_dir>/hf"):
            convert.mcore_to_hf(src, tmp_path / "o")
    assert not (tmp_path / "o").exists()

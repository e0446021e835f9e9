"""The compatibility layer against the installed megatron-core: versions, CPU patches, and
docs/megatron-core.md (the list of every internal we use).

Independent truth: the installed package itself (import, getattr, inspect.signature, pip's
metadata), plain torch generators for the RNG tracker, and throwaway modules for the patch
machinery. When a release moves or renames something we use, the failing row says which.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from rpg_megatron.megatron import compat

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only code path")
ROOT = Path(__file__).resolve().parents[2]


# -------------------------------------------------------------------------------- releases
INSTALLED = compat.mcore_version()
APPLICABLE = [p for p in compat.CPU_PATCHES if p.applies_to(INSTALLED)]
APPLICABLE_TARGETS = {p.target for p in APPLICABLE}


@pytest.mark.parametrize("patch", APPLICABLE, ids=lambda p: p.target)
def test_every_patched_symbol_exists_in_installed_megatron(patch: compat.CpuPatch) -> None:
    # If a megatron-core upgrade renames or removes one of these, the workaround silently stops
    # applying; this test is where that surfaces (resolve raises AttributeError naming it).
    owner, name = compat.resolve(patch.target)
    assert hasattr(owner, name)


@pytest.mark.parametrize("patch", compat.CPU_PATCHES, ids=lambda p: p.target)
def test_every_patch_row_names_releases_ci_runs(
    patch: compat.CpuPatch,
) -> None:
    # A valid PEP 440 specifier that covers at least one release CI runs (else the row is dead).
    spec = SpecifierSet(patch.versions)
    assert any(Version(v) in spec for v in ("0.16.1", "0.19.2")), patch.versions


def _current(patch: compat.CpuPatch) -> object:
    owner, name = compat.resolve(patch.target)
    return getattr(owner, name)


def test_cuda_present_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_cuda_available", lambda: True)
    before = [_current(p) for p in APPLICABLE]
    assert compat.apply_cpu_compat() == ()
    after = [_current(p) for p in APPLICABLE]
    assert all(a is b for a, b in zip(before, after, strict=True))


@cpu_only
def test_apply_cpu_compat_is_idempotent() -> None:
    compat.apply_cpu_compat()
    first = [_current(p) for p in APPLICABLE]
    assert compat.apply_cpu_compat() == ()
    assert all(a is b for a, b in zip(first, [_current(p) for p in APPLICABLE], strict=True))
    assert all(getattr(obj, "_rpg_cpu_compat", False) for obj in first)


@cpu_only
def test_patches_apply_only_to_the_releases_they_name(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("rpg_fake_mcore")
    module.old_only = module.new_only = module.everywhere = "original"
    monkeypatch.setitem(sys.modules, "rpg_fake_mcore", module)

    def row(attr: str, versions: str) -> compat.CpuPatch:
        return compat.CpuPatch(
            target=f"rpg_fake_mcore.{attr}",
            versions=versions,
            works_around="test",
            make=lambda _orig: types.SimpleNamespace(),
        )

    rows = (row("old_only", "<0.17"), row("new_only", ">=0.19"), row("everywhere", ">=0.16.1"))
    monkeypatch.setattr(compat, "CPU_PATCHES", rows)
    monkeypatch.setattr(compat, "mcore_version", lambda: Version("0.19.2"))
    assert compat.apply_cpu_compat() == ("rpg_fake_mcore.new_only", "rpg_fake_mcore.everywhere")
    assert module.old_only == "original"
    assert module.new_only._rpg_cpu_compat and module.everywhere._rpg_cpu_compat


@pytest.mark.parametrize("version", ["0.16.1", "0.17.1", "0.19.2", "0.19.9"])
def test_release_inside_the_range_gets_no_warning(version: str) -> None:
    assert compat.untested_warning(Version(version)) is None


@pytest.mark.parametrize("version", ["0.16.0", "0.20.0", "0.20.0rc1", "1.0.0"])
def test_untested_release_gets_a_warning_naming_the_tested_range(version: str) -> None:
    warning = compat.untested_warning(Version(version))
    assert warning is not None
    assert f"megatron-core {version} is untested" in warning
    assert ">=0.16.1,<0.20" in warning


def test_tested_range_is_the_one_pyproject_declares() -> None:
    pyproject = ROOT / "pyproject.toml"
    deps = [Requirement(d) for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    (mcore,) = [d for d in deps if d.name == "megatron-core"]
    assert mcore.specifier == SpecifierSet(compat.MCORE_TESTED)


@cpu_only
def test_cpu_compat_redirects_cuda_allocations_to_cpu() -> None:
    compat.apply_cpu_compat()
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.utils import get_default_causal_mask

    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor  # everything else is torch's own
    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.ones(4, 4).triu(1).bool())
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cpu_rng_tracker_streams_match_plain_seeding_and_restore_default() -> None:
    tracker = compat.CpuRNGStatesTracker()
    torch.manual_seed(7)
    expected_default = torch.rand(3)
    torch.manual_seed(7)
    tracker.add("a", 11)
    tracker.add("b", 12)
    with tracker.fork("a"):
        a1 = torch.rand(2)
        with tracker.fork("b"):
            b1 = torch.rand(2)
        a2 = torch.rand(2)
    with tracker.fork("a"):
        a3 = torch.rand(2)
    assert torch.equal(torch.rand(3), expected_default)  # forks never moved the default stream
    # Stream "a" continues across forks exactly like one generator seeded with 11.
    assert torch.equal(torch.cat([a1, a2, a3]), torch.rand(6, generator=_gen(11)))
    assert torch.equal(b1, torch.rand(2, generator=_gen(12)))
    with pytest.raises(ValueError, match="seed 11 already used"):
        tracker.add("c", 11)


# ----------------------------------------------------------------- docs/megatron-core.md
DOC = ROOT / "docs" / "megatron-core.md"
_ROW = re.compile(r"^\| `(?P<symbol>[^`]+)` \| (?P<kind>[a-z ]+) \|", re.MULTILINE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One table row of docs/megatron-core.md."""

    path: str
    """Dotted path of the symbol."""
    args: tuple[str, ...]
    """Parameter names in the row's parentheses (empty without them)."""
    kind: str
    """name | private | keywords | positional | cpu patch."""


def _rows() -> list[Row]:
    rows = []
    for m in _ROW.finditer(DOC.read_text()):
        symbol, kind = m["symbol"], m["kind"].strip()
        path, _, rest = symbol.partition("(")
        args = tuple(a.strip() for a in rest.rstrip(")").split(",") if a.strip())
        rows.append(Row(path=path, args=args, kind=kind))
    return rows


ROWS = _rows()
KINDS = {"name", "private", "keywords", "positional", "cpu patch"}


def _get(path: str) -> object:
    owner, name = compat.resolve(path)
    return getattr(owner, name)


def _parameters(obj: object) -> list[inspect.Parameter]:
    params = list(inspect.signature(obj).parameters.values())
    return params[1:] if params and params[0].name == "self" else params


def test_the_list_is_read_and_every_kind_is_known() -> None:
    assert len(ROWS) > 40, f"{DOC}: only {len(ROWS)} rows parsed; did the table format change?"
    assert {r.kind for r in ROWS} <= KINDS, {r.kind for r in ROWS} - KINDS
    assert len({r.path for r in ROWS if r.kind != "cpu patch"}) == len(
        [r for r in ROWS if r.kind != "cpu patch"]
    ), "a symbol is listed twice"


@pytest.mark.parametrize("row", [r for r in ROWS if r.kind != "cpu patch"], ids=lambda r: r.path)
def test_listed_symbol_resolves_with_its_parameters(row: Row) -> None:
    obj = _get(row.path)  # AttributeError names the path and the missing attribute
    if row.kind == "private":
        assert row.path.rsplit(".", 1)[-1].startswith("_"), f"{row.path} is not a private name"
    if not row.args:
        return
    params = _parameters(obj)
    names = [p.name for p in params]
    if row.kind == "positional":
        assert names[: len(row.args)] == list(row.args), (
            f"{row.path}: megatron-core {INSTALLED} takes {names}; we pass {list(row.args)} by "
            "position"
        )
    else:
        by_keyword = {
            p.name
            for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        missing = [a for a in row.args if a not in by_keyword]
        assert not missing, f"{row.path}: megatron-core {INSTALLED} has no parameter {missing}"


def test_every_cpu_patch_is_listed_and_every_listed_patch_exists() -> None:
    listed = {r.path for r in ROWS if r.kind == "cpu patch"}
    assert {p.target for p in compat.CPU_PATCHES} == listed


@pytest.mark.parametrize("target", sorted(APPLICABLE_TARGETS))
def test_cpu_patch_target_of_the_installed_release_resolves(target: str) -> None:
    _get(target)


def test_the_version_read_is_the_installed_distribution() -> None:
    # package_info (what the code reads) against pip's metadata (how it was installed).
    assert Version(importlib.metadata.version("megatron-core")) == INSTALLED


# ------------------------------------------------ upstream bugs worked around in sharded_state
# Each probe runs the named megatron-core function itself, on the smallest object it reads (a
# torch Adam over one parameter; the attributes it touches), and checks that the workaround's
# release range says "affected" exactly where the installed release still has the bug. When a
# release fixes one, this fails and the range gets its upper bound.
def _torch_adam_only() -> None:
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        pytest.skip("TE/Apex FusedAdam installed: the torch-Adam paths are not taken")


def test_distopt_state_dict_on_a_fresh_torch_adam_is_still_refused_where_we_say() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from rpg_megatron.megatron import sharded_state

    _torch_adam_only()
    p = torch.nn.Parameter(torch.zeros(3))
    fresh = types.SimpleNamespace(optimizer=torch.optim.Adam([p]), grad_scaler=None)
    try:
        DistributedOptimizer.state_dict(fresh)
        present = False
    except AssertionError:  # `assert len(steps) == 1` over an empty torch state
        present = True
    assert present == (INSTALLED in SpecifierSet(sharded_state.DISTOPT_EMPTY_STATE_ASSERT))


def test_distopt_set_states_still_wants_a_step_tensor_where_we_say() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from rpg_megatron.megatron import sharded_state

    _torch_adam_only()
    p = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam([p])
    adam.state[p] = {
        "step": torch.tensor(2.0),
        "exp_avg": torch.zeros(3),
        "exp_avg_sq": torch.zeros(3),
    }
    opt = types.SimpleNamespace(
        optimizer=adam,
        model_param_group_index_map={p: (0, 0)},
        config=types.SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False),
    )
    # What load_parameter_state_from_fully_reshardable passes: the stored tensors, 'step' dropped.
    loaded = {"param": torch.full((3,), 1.0), "exp_avg": torch.full((3,), 2.0)}
    loaded["exp_avg_sq"] = torch.full((3,), 3.0)
    try:
        with torch.no_grad():  # as its caller runs it (@torch.no_grad)
            DistributedOptimizer._set_main_param_and_optimizer_states(opt, p, loaded)
        present = False
    except KeyError as e:
        assert e.args == ("step",), e
        present = True
    assert present == (INSTALLED in SpecifierSet(sharded_state.DISTOPT_STEP_KEYERROR))
    if not present:
        assert torch.equal(p.detach(), loaded["param"])  # the fixed release copied the state


def test_our_param_group_ids_are_megatron_identifier_keys() -> None:
    # sharded_state matches saved param groups by a fixed subset of Megatron's identifier keys.
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    from rpg_megatron.megatron import sharded_state

    assert set(sharded_state._GROUP_IDS) <= set(param_group_identifier_keys)

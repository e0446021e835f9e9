"""ObjectiveConfig refuses a field that the chosen objective would silently ignore.

Each case is a field/objective pair that has no effect in objectives.py / train.py (read there:
DAPO and REINFORCE++ build no KL term, GRPO has no KL direction, RPG has no estimator choice,
beta = 0 builds no anchor). Left at its default, a field is fine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rpg_megatron.config import ConfigError
from rpg_megatron.config_io import load_config
from rpg_megatron.objectives import RPG, build_objective

REPO = Path(__file__).resolve().parents[2]

REFUSED = [
    # (overrides, the field the message must name, the objective it must name)
    (["objective.kl_estimator=k1"], "kl_estimator", "rpg"),
    (["objective.kl_importance_weight=true"], "kl_importance_weight", "rpg"),
    (["objective.name=dapo", "objective.beta=0.001"], "beta", "dapo"),
    (["objective.name=dapo", "objective.kl_clamp=10"], "kl_clamp", "dapo"),
    (["objective.name=dapo", "objective.ref_reset_every=4"], "ref_reset_every", "dapo"),
    (["objective.name=dapo", "objective.kl=forward"], "kl", "dapo"),
    (["objective.name=grpo", "objective.kl=forward"], "kl", "grpo"),
    (["objective.name=grpo", "objective.normalized=true"], "normalized", "grpo"),
    (["objective.name=grpo", "objective.form=differentiable"], "form", "grpo"),
    (["objective.name=grpo", "objective.clip_style=hard"], "clip_style", "grpo"),
    (
        ["objective.name=grpo", "objective.beta=0", "objective.kl_estimator=k1"],
        "kl_estimator",
        "grpo",
    ),
    (["objective.name=reinforce_pp", "objective.beta=0.01"], "beta", "reinforce_pp"),
    (
        ["objective.name=reinforce_pp", "objective.advantage=reinforce_pp", "objective.kl_clamp=5"],
        "kl_clamp",
        "reinforce_pp",
    ),
    (["objective.beta=0", "objective.ref_reset_every=10"], "ref_reset_every", "rpg"),
    (["objective.beta=0", "objective.ref_reset_kl_target=0.1"], "ref_reset_kl_target", "rpg"),
    (["objective.beta=0", "objective.kl_clamp=10"], "kl_clamp", "rpg"),
    (["objective.form=differentiable", "objective.kl_weight=clipped"], "kl_weight", "rpg"),
    (["objective.form=differentiable", "objective.clip_style=hard"], "clip_style", "rpg"),
    (["objective.clip=null", "objective.kl_weight=clipped"], "kl_weight", "rpg"),
    (["objective.clip_style=hard", "objective.dual_clip_c=10"], "dual_clip_c", "rpg"),
]


@pytest.mark.parametrize(("overrides", "field", "objective"), REFUSED)
def test_a_field_that_does_not_apply_is_refused(overrides, field, objective):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert f"objective.{field}=" in msg and f"objective.name={objective}" in msg, msg


ACCEPTED = [
    ["objective.name=dapo"],  # RPG defaults (beta 1e-4, kl=reverse, ...) are left alone
    ["objective.name=dapo", "objective.beta=0"],  # beta = 0 is true of DAPO
    ["objective.name=grpo", "objective.kl_estimator=k1", "objective.kl_clamp=10"],
    [
        "objective.name=reinforce_pp",
        "objective.advantage=reinforce_pp",
        "objective.beta=0.01",
        "objective.ref_reset_every=16",
    ],
    ["objective.clip_style=hard", "objective.kl_weight=clipped"],  # dual_clip_c at default
    ["objective.clip_style=hard", "objective.dual_clip_c=null"],
    ["objective.form=differentiable", "objective.kl_clamp=10"],
]


@pytest.mark.parametrize("overrides", ACCEPTED)
def test_fields_that_apply_or_are_left_at_their_defaults_pass(overrides):
    build_objective(load_config(None, overrides).objective)


def test_hard_clamp_builds_without_the_default_dual_clip():
    cfg = load_config(None, ["objective.clip_style=hard", "objective.kl_weight=clipped"])
    obj = build_objective(cfg.objective)
    assert isinstance(obj, RPG) and obj.clip_style == "hard" and obj.dual_clip_c is None
    assert obj.kl_weight == "clipped" and obj.clip == (0.2, 0.28)


def test_every_example_recipe_passes_the_validation():
    recipes = sorted((REPO / "examples").rglob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        build_objective(load_config(path, []).objective)

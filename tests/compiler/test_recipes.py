"""Recipes and the pass registry: built-ins load, and every mistake in a recipe is a clear RecipeError."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.compiler import recipes, registry
from kiln.errors import RecipeError

GOOD = """
description = "fold then remove unused"
[[passes]]
name = "cleanup.fold-constants"
options = { input_size_limit = 100 }
[[passes]]
name = "cleanup.remove-unused"
[verify]
min_output_cosine = 0.999
max_metric_loss = 0.02
metric_loss = { perplexity = 0.1 }
"""


def test_every_builtin_recipe_loads_and_builds():
    names = recipes.builtin_names()
    assert {"cleanup", "rtn-w8", "rtn-w4"} <= set(names)
    for name in names:
        recipe = recipes.load(name)
        assert recipe.description
        assert [type(p).registry_name for p in recipe.build_passes()] == [s.name for s in recipe.passes]


def test_user_recipe_file(tmp_path: Path):
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    recipe = recipes.load(path)
    assert recipe.name == "mine"
    assert [s.name for s in recipe.passes] == ["cleanup.fold-constants", "cleanup.remove-unused"]
    assert recipe.passes[0].options.input_size_limit == 100
    assert recipe.tolerance.min_output_cosine == 0.999
    assert recipe.tolerance.metric_limit("perplexity") == 0.1
    assert recipe.tolerance.metric_limit("top1_agreement") == 0.02
    assert recipe.calibration_samples is None
    path.write_text(GOOD + "[calibration]\nsamples = 64\n")
    assert recipes.load(path).calibration_samples == 64


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[[passes]]\nname = "no.such.pass"', "unknown pass 'no.such.pass'"),
        ('[[passes]]\nname = "cleanup.fold-constants"\noptions = { bogus = 1 }', "has no option 'bogus'"),
        (
            '[[passes]]\nname = "cleanup.fold-constants"\noptions = { input_size_limit = "big" }',
            "must be int",
        ),
        ('[[passes]]\nname = "cleanup.fold-constants"\noptions = { input_size_limit = true }', "must be int"),
        ('[[passes]]\nname = "cleanup.optimize"\noptions = { iterations = 0 }', "iterations must be >= 1"),
        ('colour = "red"\n[[passes]]\nname = "cleanup.identity"', "unknown key 'colour'"),
        ('[[passes]]\nname = "cleanup.identity"\nspeed = 3', "unknown key 'speed'"),
        ("[[passes]]\noptions = {}", "missing 'name'"),
        ('description = "nothing"', "at least one pass"),
        ('target = "tpu"\n[[passes]]\nname = "cleanup.identity"', "unknown target 'tpu'"),
        ('[[passes]]\nname = "cleanup.identity"\n[verify]\nmin_output_cosine = "high"', "min_output_cosine"),
        ('[[passes]]\nname = "cleanup.identity"\n[verify]\nslack = 1', "unknown key 'slack'"),
        ("passes = 3", "'passes' must be list"),
        ('[[passes]]\nname = "cleanup.identity"\n[calibration]\nsamples = 0', "samples must be at least 1"),
        ('[[passes]]\nname = "cleanup.identity"\n[calibration]\nsamples = "all"', "samples must be int"),
        ('[[passes]]\nname = "cleanup.identity"\n[calibration]\nwindows = 8', "unknown key 'windows'"),
        ("[[passes]\nname=", "invalid TOML"),
    ],
)
def test_bad_recipes(tmp_path: Path, text: str, fragment: str):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        recipes.load(path)
    assert fragment in str(info.value)
    assert "bad.toml" in str(info.value)


def test_unknown_builtin_recipe_lists_the_known_ones():
    with pytest.raises(RecipeError, match=r"unknown recipe 'turbo'.*rtn-w8"):
        recipes.load("turbo")


def test_missing_recipe_file(tmp_path: Path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        recipes.load(tmp_path / "gone.toml")


def test_registry_documents_options():
    cls = registry.get("cleanup.fold-constants")
    assert registry.summary(cls).startswith("Evaluate subgraphs")
    assert ("input_size_limit", "int", 8192) in registry.option_fields(cls)
    assert "cleanup.optimize" in registry.names()


def test_target_table_with_options(tmp_path: Path):
    path = tmp_path / "t.toml"
    path.write_text('target = { name = "ort-cpu", optimize = "extended" }\n[[passes]]\nname = "cleanup.identity"\n')
    recipe = recipes.load(path)
    assert recipe.target == "ort-cpu" and recipe.target_options == {"optimize": "extended"}
    path.write_text('target = { name = "ort-cpu", optimize = "ludicrous" }\n[[passes]]\nname = "cleanup.identity"\n')
    with pytest.raises(RecipeError, match=r"t\.toml.*optimize"):
        recipes.load(path)
    path.write_text('target = { optimize = "basic" }\n[[passes]]\nname = "cleanup.identity"\n')
    with pytest.raises(RecipeError, match=r"target\.name must be str"):
        recipes.load(path)

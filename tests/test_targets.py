"""The registries decide: the CLI's targets and default recipes, the ladder's torch stages,
and what each target lowers with all come from ``qcompile.targets`` and ``qcompile.passes``."""

from __future__ import annotations

import click
import pytest

from qcompile.cli import compile as compile_command
from qcompile.errors import QcompileError
from qcompile.passes import PASS_REGISTRY, ladder_stages
from qcompile.recipes import DEFAULT_RECIPES, load_recipe
from qcompile.runtimes.parity import EXACT, QUALITY, STAGE_TOLERANCES
from qcompile.targets import TARGETS, get_target, target_names
from qcompile.targets.base import resolve


def _option(command: click.Command, name: str) -> click.Option:
    return next(p for p in command.params if p.name == name)


def test_cli_target_choices_are_the_registry():
    option = _option(compile_command, "target")
    assert list(option.type.choices) == target_names() == list(TARGETS)
    assert option.default == target_names()[0]
    recipe_help = _option(compile_command, "recipe").help
    for name, target in TARGETS.items():
        assert f"{target.default_recipe} for {name}" in recipe_help


@pytest.mark.parametrize("name", list(TARGETS))
def test_each_target_accepts_its_default_recipe_and_names_its_functions(name):
    target = get_target(name)
    assert DEFAULT_RECIPES[name] == target.default_recipe
    target.check(load_recipe(target.default_recipe))  # raises when the pair is invalid
    for reference in (target.translation, *target.post_export):
        assert callable(resolve(reference)), reference


def test_unknown_target_names_the_choices():
    with pytest.raises(QcompileError) as error:
        get_target("tensorrt-llm")
    assert all(name in error.value.hint for name in TARGETS)


def test_ladder_stages_come_from_the_passes():
    stages = ladder_stages()
    assert stages == {cls.ladder_stage: cls.ladder_check for cls in PASS_REGISTRY.values()
                      if cls.ladder_stage}
    # rounding is judged by a quality metric, packing by exactness
    assert STAGE_TOLERANCES[stages["fake-quant"]] is QUALITY
    assert STAGE_TOLERANCES[stages["lowered"]] is EXACT
    assert STAGE_TOLERANCES[stages["kv-quant"]] is QUALITY
    assert set(stages.values()) <= set(STAGE_TOLERANCES)

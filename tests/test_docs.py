"""Every policy shown in docs/cookbook.md loads and passes its own tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from policyplug import load_policy
from policyplug.tester import run_tests

COOKBOOK = Path(__file__).resolve().parent.parent / "docs" / "cookbook.md"
RECIPES = re.findall(r"```policy\n(.*?)```", COOKBOOK.read_text(), re.S)


def test_cookbook_has_recipes() -> None:
    assert len(RECIPES) >= 8


@pytest.mark.parametrize("text", RECIPES, ids=lambda t: t.split('"')[1])
def test_recipe_loads_and_its_tests_pass(text: str) -> None:
    policy = load_policy(text=text)
    outcomes = run_tests(policy)
    assert outcomes
    assert all(o.passed for o in outcomes), "\n".join(o.describe() for o in outcomes if not o.passed)

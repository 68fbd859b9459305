"""The ready policies under rules/: valid, their tests pass, every rule is exercised, canonical layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyplug import load_policy
from policyplug.formatter import format_file
from policyplug.tester import run_tests, uncovered_rules

RULES = Path(__file__).resolve().parent.parent / "rules"
POLICIES = sorted(RULES.glob("*.policy"))


def test_there_are_at_least_five_ready_policies() -> None:
    assert len(POLICIES) >= 5


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_policy_tests_pass_and_cover_every_rule(path: Path) -> None:
    policy = load_policy(path)
    outcomes = run_tests(policy)
    assert outcomes, f"{path.name} has no tests"
    failures = [o.describe() for o in outcomes if not o.passed]
    assert not failures, "\n".join(failures)
    assert uncovered_rules(policy, outcomes) == []


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_policy_is_in_canonical_layout(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert format_file(text, str(path)) == text

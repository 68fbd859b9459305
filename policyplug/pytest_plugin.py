"""pytest plugin: `pytest rules/` collects every `test` block of every *.policy file.

Registered through the `pytest11` entry point, so installing policyplug is enough. One pytest
item per test block; a failure shows expected vs decided, the deciding rule and the trace;
an invalid policy is a collection error carrying every diagnostic.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .compiler import load_policy
from .diagnostics import PolicyError
from .runtime import Policy
from .tester import TestOutcome, run_test


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("policyplug")
    group.addoption(
        "--no-policy-tests",
        action="store_true",
        default=False,
        help="do not collect test blocks from *.policy files",
    )


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    if file_path.suffix == ".policy" and not parent.config.getoption("--no-policy-tests"):
        return PolicyFileCollector.from_parent(parent, path=file_path)
    return None


class PolicyLoadError(Exception):
    pass


class PolicyFileCollector(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            raise PolicyLoadError(exc.format()) from None
        for test in policy.tests:
            yield PolicyTestItem.from_parent(self, name=test.name, policy=policy, test=test)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:  # type: ignore[override]
        if isinstance(excinfo.value, PolicyLoadError):
            return f"invalid policy:\n{excinfo.value}"
        return str(super().repr_failure(excinfo))


class PolicyTestFailure(Exception):
    def __init__(self, outcome: TestOutcome):
        super().__init__(outcome.describe())
        self.outcome = outcome


class PolicyTestItem(pytest.Item):
    def __init__(self, *, policy: Policy, test: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.policy = policy
        self.test = test

    def runtest(self) -> None:
        outcome = run_test(self.policy, self.test)
        if not outcome.passed:
            raise PolicyTestFailure(outcome)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:  # type: ignore[override]
        if isinstance(excinfo.value, PolicyTestFailure):
            return excinfo.value.outcome.describe(with_trace=True)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.test.location.line - 1, f"policy test: {self.test.name}"

"""Settings shared by every test: Hypothesis profiles and the unit / server / slow markers."""

import inspect
import os

import pytest
from hypothesis import settings

# CI runs a fixed set of examples (Hypothesis's built-in "ci" profile: derandomized, no example
# database) so that a landing is not failed by a bug the random search happens to meet that day;
# locally the search stays random, and docs/compiler.md says how to hunt with many more examples.
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


def _uses_real_servers(module: object) -> bool:
    """A test module that starts real servers: it lives under tests/integration or imports tests.servers."""
    path = getattr(module, "__file__", "") or ""
    if f"{os.sep}integration{os.sep}" in path:
        return True
    for value in vars(module).values():
        owner = value if inspect.ismodule(value) else inspect.getmodule(value)
        if owner is not None and owner.__name__.startswith("tests.servers"):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`-m unit` selects what needs no server and is not slow; `-m server` what starts a real one."""
    server_modules: dict[object, bool] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None:
            if module not in server_modules:
                server_modules[module] = _uses_real_servers(module)
            if server_modules[module]:
                item.add_marker(pytest.mark.server)
        if not item.get_closest_marker("server") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.unit)

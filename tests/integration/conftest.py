"""Fixtures shared by the integration tests."""

from tests.servers.prosody import prosody_server  # noqa: F401  (the fixture, by name)

"""Hosting a policy: what the decision service and the Kamailio adapter share.

A host holds the policy file's path, the folders its includes may come from, where `limit`
windows live, and the policy in force; it loads a policy, notices when the files it was read
from change, installs a new one (logging its warnings), and records a decision (audit, then usage).
How a host reloads is its own: the service loads in a worker thread and swaps on its event loop
(policyplug.service.server), the Kamailio adapter validates in its timer process and publishes a
snapshot to the workers (adapters/kamailio/policyplug_kemi.py).

The hosts subclass PolicyHost rather than hold one, so `self.policy` on their per-decision paths
stays one attribute read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .compiler import load_policy
from .loader import file_times
from .runtime import Policy


class PolicyHost:
    """The policy in force and where it came from. `policy` is None only until the first install."""

    policy: Any  # a Policy once installed (Any: hosts read it on their hot paths without checks)

    def __init__(
        self,
        policy_path: str | Path,
        *,
        limiter: Any = None,
        allowed_paths: Iterable[str | Path] = (),
        warn: Callable[[str], object],
        audit: Any = None,
        usage: Any = None,
    ):
        self.policy_path = Path(policy_path)
        self.allowed_paths = list(allowed_paths)
        # where `limit` windows live (policyplug.state): one shared limiter (Redis, Kamailio's
        # shared memory) for every policy loaded; None: each loaded policy counts in its own memory
        self.limiter = limiter
        self.warn = warn  # the host's log for policy warnings (Python logging, Kamailio's log)
        # an audit log with submit(event, decision) (and submit_encoded, for record's `encoded`), or None
        self.audit = audit
        self.usage = usage  # a usage store with count(event, decision, direction), or None
        self.policy = None
        self._mtimes: dict[Path, float] = {}

    # -- the policy files -------------------------------------------------------------------------

    def load(
        self, path: str | Path | None = None, *, allowed_paths: Iterable[str | Path] | None = None
    ) -> Policy:
        """Load and compile a policy (the host's file unless `path`), with the host's limiter.
        Raises PolicyError (invalid text) or OSError; nothing is installed."""
        return load_policy(
            self.policy_path if path is None else path,
            limiter=self.limiter,
            allowed_paths=self.allowed_paths if allowed_paths is None else list(allowed_paths),
        )

    def file_times(self) -> dict[Path, float]:
        """Modification times of the policy file and every file the policy in force read."""
        policy = self.policy
        return file_times([self.policy_path, *(policy.files if policy is not None else ())])

    def changed(self) -> bool:
        """Has the policy file, or a file the policy in force read, changed since last looked at?"""
        return self.file_times() != self._mtimes

    def mark_seen(self) -> None:
        """The files as they are now are dealt with: a text that did not load is not tried again
        until it changes once more."""
        self._mtimes = self.file_times()

    def install(self, policy: Policy) -> Any:
        """Put `policy` in force, note its files' times and log its warnings. Returns the policy it replaced."""
        old = self.policy
        self.policy = policy
        self.mark_seen()
        self.log_warnings(policy)
        return old

    def log_warnings(self, policy: Policy) -> None:
        for warning in policy.warnings:
            self.warn(warning.format())

    # -- a decision -------------------------------------------------------------------------------

    def record(self, event: Any, decision: Any, encoded: Any = None, policy: Any = None) -> bool:
        """Audit the decision, then count it for usage reports. Never raises for the log or the
        store (each counts and reports its own failures); False when the audit log says the record
        was not written.

        `encoded`: the decision already serialised by `audit.log.encode_decision` (the service's
        answer is made of it), handed to the log as it is, so a decision is serialised once.
        `policy`: the policy that decided (its `activation` gives the direction usage counts under);
        the one in force when not given."""
        written = True
        if self.audit is not None:
            if encoded is None:
                written = self.audit.submit(event, decision) is not False
            else:
                written = self.audit.submit_encoded(event, decision, encoded) is not False
        if self.usage is not None:
            self.usage.count(event, decision, (policy or self.policy).activation(event)["direction"])
        return written

"""Prometheus metrics of the decision service (prometheus-client), served on loopback by default."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.decisions = Counter(
            "policyplug_decisions",
            "Decisions by outcome and deciding rule",
            ["decision", "rule"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "policyplug_decision_seconds",
            "Time to decide one event",
            buckets=(2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2),
            registry=self.registry,
        )
        self.errors = Counter(
            "policyplug_evaluation_errors",
            "CEL evaluation errors met while deciding",
            ["rule"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "policyplug_reloads", "Policy reloads by result", ["result"], registry=self.registry
        )
        self.rules = Gauge("policyplug_policy_rules", "Rules in the loaded policy", registry=self.registry)
        self.audit_errors = Gauge(
            "policyplug_audit_write_errors", "Audit log write failures since start", registry=self.registry
        )
        self.audit_dropped = Gauge(
            "policyplug_audit_dropped",
            "Audit records dropped because the disk could not keep up",
            registry=self.registry,
        )
        self.refusals = Counter(
            "policyplug_component_refused",
            "Requests to the XMPP component from JIDs not allowed to make them (request: decide | command)",
            ["request"],
            registry=self.registry,
        )

    def component_refused(self, request: str) -> None:
        """A request the component answered `forbidden` (docs/service.md, who may ask)."""
        self.refusals.labels(request).inc()

    def watch_audit(self, audit: Any) -> None:
        """Export the audit writer's failure counters (read when Prometheus scrapes)."""
        self.audit_errors.set_function(lambda: audit.stats["errors"])
        self.audit_dropped.set_function(lambda: audit.stats["dropped"])

    def watch_state(self, limiter: Any) -> None:
        """Export the shared state's health (policyplug.state): failures and fail-mode answers."""
        state_errors = Gauge(
            "policyplug_state_errors",
            "Failed calls to the shared state (Redis) since start",
            registry=self.registry,
        )
        state_errors.set_function(lambda: limiter.stats["errors"])
        state_failed = Gauge(
            "policyplug_state_failed_limits",
            "`limit` clauses answered by --state-failure because the shared state was unreachable",
            ["mode"],
            registry=self.registry,
        )
        for mode in ("open", "closed"):

            def failed(key: str = f"failed_{mode}") -> float:
                return float(limiter.stats[key])

            state_failed.labels(mode).set_function(failed)
        state_down = Gauge(
            "policyplug_state_down", "1 while the shared state is unreachable", registry=self.registry
        )
        state_down.set_function(lambda: 1 if limiter.down else 0)

    def watch_directory(self, source: Any) -> None:
        """Export the LDAP directory source's health (policyplug.directory_ldap)."""
        failures = Gauge(
            "policyplug_directory_refresh_failures",
            "Directory refreshes that failed (the last good snapshot stayed in force)",
            registry=self.registry,
        )
        failures.set_function(lambda: source.stats["failures"])
        users = Gauge(
            "policyplug_directory_users", "Users in the directory snapshot in force", registry=self.registry
        )
        users.set_function(lambda: source.stats["users"])

    def observe(self, decision: Any, seconds: float) -> None:
        self.decisions.labels(decision.decision, decision.rule or "default").inc()
        self.latency.observe(seconds)
        for error in decision.errors:
            self.errors.labels(error["rule"]).inc()

    def reloaded(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def policy_loaded(self, policy: Any) -> None:
        self.rules.set(len(policy.rules))

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP; loopback unless the operator says otherwise."""
        start_http_server(port, addr=address, registry=self.registry)

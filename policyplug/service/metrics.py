"""Prometheus metrics of the decision service (prometheus-client), served on loopback by default."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.decisions = Counter("policyplug_decisions", "Decisions by outcome and deciding rule",
                                 ["decision", "rule"], registry=self.registry)
        self.latency = Histogram("policyplug_decision_seconds", "Time to decide one event",
                                 buckets=(2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2),
                                 registry=self.registry)
        self.errors = Counter("policyplug_evaluation_errors", "CEL evaluation errors met while deciding",
                              ["rule"], registry=self.registry)
        self.reloads = Counter("policyplug_reloads", "Policy reloads by result", ["result"], registry=self.registry)
        self.rules = Gauge("policyplug_policy_rules", "Rules in the loaded policy", registry=self.registry)
        self.audit_errors = Gauge("policyplug_audit_write_errors", "Audit log write failures since start",
                                  registry=self.registry)
        self.audit_dropped = Gauge("policyplug_audit_dropped", "Audit records dropped because the disk could "
                                   "not keep up", registry=self.registry)
        self.refusals = Counter("policyplug_component_refused",
                                "Requests to the XMPP component from JIDs not allowed to make them "
                                "(request: decide | command)", ["request"], registry=self.registry)

    def component_refused(self, request: str) -> None:
        """A request the component answered `forbidden` (docs/service.md, who may ask)."""
        self.refusals.labels(request).inc()

    def watch_audit(self, audit: Any) -> None:
        """Export the audit writer's failure counters (read when Prometheus scrapes)."""
        self.audit_errors.set_function(lambda: audit.stats["errors"])
        self.audit_dropped.set_function(lambda: audit.stats["dropped"])

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

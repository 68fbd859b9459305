"""The decision service: one loaded policy, swapped atomically on reload, shared by every transport.

Transports (the local socket, the XMPP component) hand it event JSON and get decision JSON
back. Reloads compile the new policy beside the old one; only a valid policy replaces the old,
an invalid one leaves the old in force and its diagnostics are logged, counted and shown by
`status`. Auditing and metrics never block or fail a decision.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FunctionType
from typing import Any

import orjson

from ..audit.log import encode_decision
from ..compiler import compile_policy
from ..diagnostics import PolicyError
from ..events import Event
from ..host import PolicyHost
from ..loader import load_model
from ..runtime import Policy

log = logging.getLogger("policyplug.service")

RELOAD_SWITCH_INTERVAL = 0.0001  # seconds; see DecisionService._load_in_thread
# Where the policy compiler's generated code lives (policyplug.cel.compile: compile() file names)
GENERATED_FILES = frozenset({"<policy>", "<rule>", "<cel>"})


def release_generated_code(policy: Policy) -> None:
    """Clear the namespaces of a policy that decides no more. Each namespace holds the functions
    compiled in it, which hold the namespace: a cycle only a full collection would free. Cleared,
    reference counting frees the old policy as soon as the last reference goes."""
    cleared: set[int] = set()

    def visit(function: Any, depth: int = 0) -> None:
        if not isinstance(function, FunctionType) or depth > 3:
            return
        if function.__code__.co_filename in GENERATED_FILES and id(function.__globals__) not in cleared:
            cleared.add(id(function.__globals__))
            function.__globals__.clear()
        for cell in function.__closure__ or ():  # compile_expression's wrapper holds the compiled function
            try:
                visit(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass

    for rule in policy.rules:
        visit(rule.match)
        for condition in rule.conditions:
            visit(condition.evaluate)
        if rule.limit is not None:
            visit(rule.limit.key)


def dispose_policy(policy: Policy) -> None:
    """Free a policy that decides no more, a piece at a time (in the reload thread).

    Freeing a 200-rule policy at once (its rules, index, caches and generated code: ~40,000 objects)
    is one C-level cascade of deallocations that holds the interpreter for 2-4 ms; on the event loop,
    or in any thread, every decision waits for it. Dropped a rule, a table, a cache entry at a time
    from Python code, the interpreter can pass to the event loop between pieces (see
    RELOAD_SWITCH_INTERVAL). Only what the policy's own compile made is taken apart; the limiter,
    directory and lists may be shared with the policy that replaces it and are left alone."""
    release_generated_code(policy)
    for cache in (policy._parties, policy._signatures, policy._selection, policy._candidates):
        while cache:
            cache.popitem()
    index, policy._index = policy._index, None
    if index is not None:
        for table in (index.plans, index.sizes):
            while table:
                table.popitem()
    del index
    policy._no_obligations = None  # type: ignore[assignment]
    policy.model = None
    rules = policy.rules
    while rules:
        rules.pop()


class DecisionService(PolicyHost):
    """The policy host of `policyplug serve` (policyplug.host: loading, file times, warnings)."""

    def __init__(
        self,
        policy_path: str | Path,
        *,
        audit: Any = None,
        usage: Any = None,
        metrics: Any = None,
        freeze_gc: bool = False,
        limiter: Any = None,
        directory_source: Any = None,
        allowed_paths: Iterable[str | Path] = (),
    ):
        super().__init__(
            policy_path,
            limiter=limiter,
            allowed_paths=allowed_paths,
            warn=lambda text: log.warning("%s", text),
            audit=audit,
            usage=usage,
        )
        policy = self.load()  # an invalid policy at start-up is fatal
        # users and groups from LDAP (policyplug.directory_ldap), overlaid on the policy's directory
        self.directory_source = directory_source
        if directory_source is not None:
            directory_source.apply(policy)
        self.install(policy)
        self.freeze_gc = freeze_gc
        if freeze_gc:
            self._settle_memory()
        self.metrics = metrics
        self._records = audit is not None or usage is not None  # is there anything to record to?
        self.started = time.time()
        self.decisions: Counter[str] = Counter()
        self.evaluation_errors = 0
        self.invalid_requests = 0
        self.reloads: Counter[str] = Counter()
        self.last_reload_error: str | None = None
        self._policy_members: dict[tuple[str, str], bytes] = {}  # serialised policy fields of answers
        # called with {"revision", "cacheable"} after a reload: the socket tells its clients, so
        # an adapter's decision cache never outlives the policy that made it
        self.reload_listeners: list[Any] = []
        if metrics is not None:
            metrics.policy_loaded(self.policy)
        # Reloads off the event loop (see reload_async): the one load running, and the future that
        # every request arriving meanwhile shares (one more load, after the running one).
        self._reload_worker: asyncio.Task[None] | None = None
        self._reload_waiting: asyncio.Future[dict[str, Any]] | None = None
        self._reload_reason = ""
        self._reload_executor: ThreadPoolExecutor | None = None

    # -- deciding ------------------------------------------------------------------------------------

    def decide_json(self, event_json: Any) -> dict[str, Any]:
        """Event JSON -> decision JSON. Raises EventError (an invalid request) naming the field."""
        return orjson.loads(self.decide_encoded(event_json))

    def decide_encoded(self, event_json: Any) -> bytes:
        """Event JSON -> decision JSON, serialised (UTF-8, keys sorted, policy fields last).

        The same serialisation of the decision goes into the audit record, so answering and
        auditing serialise a decision once. Raises EventError (an invalid request) naming the field.
        """
        event = Event.from_json(event_json)
        policy = self.policy  # one reference: a reload mid-decision cannot mix two policies
        if self.metrics is not None:
            started = time.perf_counter()
            decision = policy.decide(event)
            self.metrics.observe(decision, time.perf_counter() - started)
        else:
            decision = policy.decide(event)
        self.decisions[decision.decision] += 1
        if decision._errors:  # not .errors: that makes an empty list for every decision without any
            self.evaluation_errors += len(decision._errors)
        encoded = encode_decision(decision)
        if self._records:  # audit, then usage: as every host records (the log gets the answer's encoding)
            self.record(event, decision, encoded, policy)
        body, name, revision = encoded
        suffix = self._policy_members.get((name, revision))
        if suffix is None:
            suffix = self._policy_members[(name, revision)] = (
                b',"policy":' + orjson.dumps(name) + b',"policy_revision":' + orjson.dumps(revision) + b"}"
            )
        return body[:-1] + suffix if len(body) > 2 else b"{" + suffix[1:]

    def _settle_memory(self) -> None:
        """Move the objects alive now (the compiled policy: ~50,000 of them) out of the collector's way.

        Events held briefly for the audit writer get promoted to the oldest generation, so full
        collections run every second or so at 20,000 decisions/s; each traversed the whole policy and
        stalled every decision for 20-200 ms. Frozen objects are not traversed. At start-up only: a
        reload freezes the new policy without a full collection (see _install and
        _load_collecting_young), and the old one is freed by reference counting.
        """
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    # -- reloading -----------------------------------------------------------------------------------

    def _load_collecting_young(self) -> Policy:
        """The load of a reload, with the collector collecting young objects only.

        load_policy pauses the collector (a load's objects all stay alive), but a load also makes
        short-lived cyclic garbage (exceptions caught by the parser, with their frames); with the
        collector paused it would be frozen with the new policy below and never freed. Young
        collections (at most a few thousand objects each) free it as the load goes, and no full
        collection walks the growing new policy meanwhile, stalling the event loop."""
        thresholds = gc.get_threshold()
        # threshold 1 for the middle generation: each young collection takes both young generations,
        # at most ~1,500 objects (0.2 ms here); at the default 10, every tenth walked up to ten times
        # as many, holding the interpreter 2 ms while decisions waited
        gc.set_threshold(thresholds[0] or 700, 1, 1 << 30)
        try:
            return compile_policy(
                load_model(self.policy_path, allowed_paths=self.allowed_paths), limiter=self.limiter
            )
        finally:
            gc.set_threshold(*thresholds)

    def reload(self, reason: str = "request") -> dict[str, Any]:
        """Compile the policy anew and swap it in if valid; the old one stays otherwise. Synchronous:
        the service's transports use reload_async, which loads off the event loop."""
        try:
            loaded: Policy | BaseException = self.load()
        except (PolicyError, OSError) as exc:
            loaded = exc
        return self._install(loaded, reason)

    async def reload_async(self, reason: str = "request") -> dict[str, Any]:
        """Reload without stalling decisions: the policy is loaded and compiled in a worker thread
        while the old policy goes on answering on the event loop, and swapped in (one reference
        assignment, on the loop) only when it is ready. Requests that arrive while a load runs
        share one further load, started when the running one ends (it may have read the files
        before the change that prompted them), so 200 pipelined reloads cost two loads, not 200."""
        loop = asyncio.get_running_loop()
        if self._reload_waiting is None:
            self._reload_waiting = loop.create_future()
            self._reload_reason = reason
            if self._reload_worker is None or self._reload_worker.done():
                self._reload_worker = loop.create_task(self._reload_loop())
        return await asyncio.shield(self._reload_waiting)

    async def _reload_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reload_executor is None:
            self._reload_executor = ThreadPoolExecutor(1, thread_name_prefix="policyplug-reload")
        while self._reload_waiting is not None:
            waiting, reason = self._reload_waiting, self._reload_reason
            self._reload_waiting = None  # requests from now on wait for the next load
            try:
                loaded = await loop.run_in_executor(self._reload_executor, self._load_in_thread)
                answer = self._install(loaded, reason)
            except Exception as exc:  # a bug must not leave the requests waiting forever
                log.exception("reload (%s)", reason)
                answer = {
                    "ok": False,
                    "revision": self.policy.revision,
                    "diagnostics": f"internal error: {exc}",
                }
            if not waiting.done():
                waiting.set_result(answer)

    def _load_in_thread(self) -> Policy | BaseException:
        """The load, in the reload thread. Python's GIL passes between threads every switch
        interval (5 ms by default): while the load runs, it is shortened so that a decision waiting
        on the event loop gets the interpreter within a tenth of a millisecond."""
        previous = sys.getswitchinterval()
        sys.setswitchinterval(min(previous, RELOAD_SWITCH_INTERVAL))
        try:
            return self._load_collecting_young() if self.freeze_gc else self.load()
        except (PolicyError, OSError) as exc:
            return exc
        finally:
            sys.setswitchinterval(previous)

    @staticmethod
    def _dispose_in_thread(policy: Policy) -> None:
        previous = sys.getswitchinterval()
        sys.setswitchinterval(min(previous, RELOAD_SWITCH_INTERVAL))
        try:
            dispose_policy(policy)
        except Exception:  # what is left is freed by the collector; never a reason to stop reloading
            log.exception("freeing the previous policy")
        finally:
            sys.setswitchinterval(previous)

    def _install(self, loaded: Policy | BaseException, reason: str) -> dict[str, Any]:
        """Swap a loaded policy in (or record why there is none); on the event loop, between decisions."""
        try:
            if isinstance(loaded, BaseException):
                raise loaded
            new_policy = loaded
        except PolicyError as exc:
            self.reloads["invalid"] += 1
            self.last_reload_error = exc.format()
            self.mark_seen()  # do not retry the same broken text every second
            log.error(
                "reload (%s) rejected, keeping revision %s:\n%s",
                reason,
                self.policy.revision,
                self.last_reload_error,
            )
            if self.metrics is not None:
                self.metrics.reloaded("invalid")
            return {"ok": False, "revision": self.policy.revision, "diagnostics": self.last_reload_error}
        except OSError as exc:
            self.reloads["error"] += 1
            self.last_reload_error = str(exc)
            if self.metrics is not None:
                self.metrics.reloaded("error")
            return {"ok": False, "revision": self.policy.revision, "diagnostics": str(exc)}
        old_policy = self.policy
        old = old_policy.revision
        if self.directory_source is not None:
            self.directory_source.apply(new_policy)
            self.directory_source.wake()  # and read the directory again, as the docs promise on reload
        log.info("reload (%s): %s -> %s", reason, old, new_policy.revision)
        self.install(new_policy)  # and its warnings logged
        # Nothing decides with the old policy any more (decisions run on this loop, between calls
        # like this one): it is taken apart (its generated code's cycles broken, so reference
        # counting frees it) in the reload thread, a piece at a time, while decisions go on; and the
        # new policy is moved out of the collector's way. No full collection: it walked the whole
        # heap on the event loop (0.3-0.6 s for a 1,500-rule policy here), stalling every decision.
        if self._reload_executor is not None:
            self._reload_executor.submit(self._dispose_in_thread, old_policy)
        else:
            dispose_policy(old_policy)
        del old_policy
        self._policy_members.clear()  # one entry per revision answered: reloads must not grow it
        if self.freeze_gc:
            gc.collect(1)  # young garbage only (bounded, cheap): freeze must not keep it for good
            gc.freeze()
        self.last_reload_error = None
        self.reloads["ok"] += 1
        if self.metrics is not None:
            self.metrics.reloaded("ok")
            self.metrics.policy_loaded(new_policy)
        notice = {"revision": new_policy.revision, "cacheable": self.cacheable}
        for listener in list(self.reload_listeners):
            try:
                listener(notice)
            except Exception:  # one client's trouble must not stop the others hearing of it
                log.exception("reload listener")
        answer: dict[str, Any] = {"ok": True, "revision": new_policy.revision, "previous": old}
        if new_policy.warnings:
            answer["warnings"] = "\n".join(w.format() for w in new_policy.warnings)
        return answer

    def apply_directory(self) -> None:
        """A new directory snapshot arrived (policyplug.directory_ldap): decisions use it from now on."""
        if self.directory_source is not None:
            self.directory_source.apply(self.policy)
            if self.freeze_gc:
                self._settle_memory()  # a large snapshot is as many objects as the policy: out of gc's way too

    @property
    def cacheable(self) -> bool:
        """May an adapter cache decisions per (kind, from, to) until the next reload? Only when the
        policy reads nothing else, and no decision must reach the usage store or an audit log at
        level `all` (a cached decision never reaches the service)."""
        # with a directory refreshed from LDAP, a cached decision could outlive a group change
        return (
            self.policy.cacheable
            and self.usage is None
            and self.directory_source is None
            and (self.audit is None or getattr(self.audit, "level", "all") != "all")
        )

    async def watch(self, interval: float = 1.0) -> None:
        """Reload when the policy or any file it reads changes (polling: no extra dependency)."""
        while True:
            await asyncio.sleep(interval)
            try:
                if self.changed():
                    await self.reload_async("file change")
            except Exception:  # the watcher must outlive any surprise
                log.exception("policy watcher")

    # -- status -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        audit_stats = dict(self.audit.stats) if self.audit is not None else None
        return {
            "policy": self.policy.name,
            "revision": self.policy.revision,
            "path": str(self.policy_path),
            "rules": len(self.policy.rules),
            "uptime_seconds": round(time.time() - self.started, 1),
            "decisions": dict(self.decisions),
            "evaluation_errors": self.evaluation_errors,
            "invalid_requests": self.invalid_requests,
            "reloads": dict(self.reloads),
            "last_reload_error": self.last_reload_error,
            "audit": audit_stats,
            "cacheable": self.cacheable,
            "state": self.limiter.status() if hasattr(self.limiter, "status") else {"backend": "process"},
            "usage": self.usage.status() if hasattr(self.usage, "status") else None,
            "directory": self.directory_source.status() if self.directory_source is not None else None,
        }

    def close(self) -> None:
        if self.directory_source is not None:
            self.directory_source.stop()
        if self._reload_executor is not None:
            self._reload_executor.shutdown(wait=True, cancel_futures=True)
        if self.audit is not None:
            self.audit.close()
        if self.usage is not None:
            self.usage.close()

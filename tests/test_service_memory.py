"""The service keeps its compiled policy out of the garbage collector's way, and reloads do not leak."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from policyplug.service.server import DecisionService

POLICY = 'policy "mem"\nlocal domains ["acme.example"]\ndefault deny "no"\n\nrule internal:\n  when direction == "internal"\n  allow\n'


def test_policy_frozen_at_start_and_old_policy_collected_after_reload(tmp_path: Path) -> None:
    path = tmp_path / "mem.policy"
    path.write_text(POLICY)
    try:
        service = DecisionService(path, freeze_gc=True)
        assert gc.get_freeze_count() > 1000  # the compiled policy, among others
        old = weakref.ref(service.policy)
        path.write_text(POLICY.replace('"no"', '"not here"'))
        assert service.reload("test")["ok"]
        assert old() is None  # unfrozen and collected, even if it holds reference cycles
        assert gc.get_freeze_count() > 1000  # the new policy frozen in its turn
        decision = service.decide_json({"kind": "message", "from": "a@x.example", "to": "b@y.example"})
        assert decision["decision"] == "deny" and decision["reason"] == "not here"
    finally:
        gc.unfreeze()


def test_reload_async_frees_the_old_policy_in_the_reload_thread(tmp_path: Path) -> None:
    """The old policy is taken apart in the reload thread, a piece at a time (freed at once on the
    event loop it held every decision 2-4 ms); the new one decides, and what the two share (the
    limiter, the lists) is left whole."""
    import asyncio
    import threading

    from policyplug.service import server

    path = tmp_path / "mem.policy"
    text = (
        POLICY
        + 'list partners = ["p.example"]\n'
        + "".join(
            f'rule r{i}:\n  when recipient.domain in partners && size > {i}\n  deny "r{i}"\n'
            for i in range(50)
        )
    )
    path.write_text(text)
    disposed: list[str] = []
    real_dispose = server.dispose_policy

    def spy(policy: object) -> None:
        disposed.append(threading.current_thread().name)
        real_dispose(policy)  # type: ignore[arg-type]

    server.dispose_policy = spy  # type: ignore[assignment]
    try:
        from policyplug.limits import MemoryLimiter

        service = DecisionService(
            path, freeze_gc=True, limiter=MemoryLimiter()
        )  # one for every policy loaded
        event = {"kind": "message", "from": "a@acme.example", "to": "b@p.example", "size": 3}
        assert service.decide_json(event)["reason"] == "r0"
        old = weakref.ref(service.policy)
        limiter, lists = service.policy.limiter, service.policy.lists

        async def reload() -> dict:
            answer = await service.reload_async("test")
            # the next load waits behind the disposal in the one reload thread
            await asyncio.get_running_loop().run_in_executor(service._reload_executor, lambda: None)
            return answer

        path.write_text(text.replace('deny "r0"', 'deny "first"'))
        assert asyncio.run(reload())["ok"]
        assert old() is None
        assert disposed and all(name.startswith("policyplug-reload") for name in disposed)
        assert service.policy.limiter is limiter and service.policy.lists == lists == {
            "partners": ("p.example",)
        }
        assert service.decide_json(event)["reason"] == "first"
        service.close()
    finally:
        server.dispose_policy = real_dispose  # type: ignore[assignment]
        gc.unfreeze()


def test_remembered_answers_of_old_revisions_are_forgotten() -> None:
    """encode_decision remembers answers by their shape, which ends with the policy revision: a service
    reloading under traffic kept every old revision's answers (~2 KB each) until the cache's limit,
    memory that grew with every reload. Only the last few revisions' are kept."""
    from policyplug import Decision
    from policyplug.audit import record

    for n in range(50):
        for rule in ("a", "b", "c"):
            record.encode_decision(Decision("allow", rule, None, policy="p", policy_revision=f"rev{n}"))
    revisions = {shape[-1] for shape in record._ENCODED_DECISIONS}
    assert revisions == {f"rev{n}" for n in range(50 - record.ENCODED_REVISIONS_LIMIT, 50)}
    assert len(record._ENCODED_DECISIONS) == 3 * record.ENCODED_REVISIONS_LIMIT
    # an older revision answering again (two policies in one process) is serialised anew, and right
    again = Decision("deny", "a", "why", policy="p", policy_revision="rev0")
    assert record.encode_decision(again)[2] == "rev0" and b'"deny"' in record.encode_decision(again)[0]

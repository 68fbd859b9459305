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

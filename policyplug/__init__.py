"""policyplug: one policy language for XMPP and SIP servers.

The path a policy takes: source text (lexer) -> syntax tree (parser, nodes) -> checked model
(loader, cel.check) -> compiled policy (compiler, cel.compile, index) -> decision (runtime)
-> enforcement (adapters/) and audit (audit/, usage/).
"""

from .compiler import compile_policy, load_policy
from .decision import Decision, TraceStep
from .diagnostics import Diagnostic, PolicyError
from .events import Event, EventError
from .runtime import Policy

__all__ = [
    "load_policy",
    "compile_policy",
    "Event",
    "EventError",
    "Decision",
    "TraceStep",
    "Policy",
    "PolicyError",
    "Diagnostic",
]
__version__ = "0.1.0"

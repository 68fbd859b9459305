"""An audit log that many processes append to, one hash chain for all of them.

Servers that fork workers sharing no memory (Kamailio: every SIP worker runs its own Python)
cannot hand records to one writer thread. Each process appends its records itself, holding an
exclusive `flock` on a lock file beside the log while it writes: under the lock it learns the
previous record's hash (from the chain head kept in a shared mapping of the lock file, or from
the log's tail when that head does not describe the log), so the chain stays one chain, in file
order, across all workers. Either the workers write this way themselves (`SharedAuditLog`) or they
spool unchained lines and one timer process chains them (`AuditSpool` + `SpoolChainer`).

A record reaches the kernel with one `write` before the decision is enforced, so killing the
server loses nothing; the timer process (every 100 ms, adapters/kamailio/kamailio.cfg) fsyncs
the log, so a machine crash loses at most that interval. The format, rotation, sealing and
`policyplug audit verify` are those of the decision service's log (docs/audit.md). A failing
disk is counted in `stats`, logged, and never stops a decision.

The parts, as OPA's plugins/logs splits plugin, encoder and buffer:

- `locked_log`: the chained log file under a lock (`SharedAuditLog`), sealing included;
- `spool`: what a worker writes (`AuditSpool`), into its `ring` or a spool file;
- `ring`: a worker's spool reused in place (mmap);
- `chainer`: the timer process's side (`SpoolChainer`), moving spooled records into the log;
- `sink`: what the worker-side writers share (audit level, failures);
- `fork`: what a forked child resets.

Records are made by `policyplug.audit.record` (one encoder, one chaining function for all writers).
"""

from .chainer import OFFSETS_SLOT, SpoolChainer
from .fork import after_fork
from .locked_log import SharedAuditLog
from .ring import RING_BYTES, RING_HEADER, SpoolRing
from .spool import AuditSpool

__all__ = [
    "OFFSETS_SLOT",
    "RING_BYTES",
    "RING_HEADER",
    "AuditSpool",
    "SharedAuditLog",
    "SpoolChainer",
    "SpoolRing",
    "after_fork",
]

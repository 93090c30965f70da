"""The audit log: who did what and when (acknowledgements, threshold changes, replays run).

Append-only and tamper-evident: rows form a hash chain that ``verify`` walks, and the table
refuses UPDATE and DELETE. Other services record their actions with
``await vigil.audit.append(conn, actor, action, subject, details)``.
"""

from vigil.audit.chain import GENESIS, AuditEntry, ChainBreak
from vigil.audit.store import VerifyResult, append, list_entries, verify

__all__ = [
    "GENESIS",
    "AuditEntry",
    "ChainBreak",
    "VerifyResult",
    "append",
    "list_entries",
    "verify",
]

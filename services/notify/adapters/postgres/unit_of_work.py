"""One unit of work over PostgreSQL: a connection from the pool, a transaction on it, and the
notify repositories sharing both (``service_layer.unit_of_work.UnitOfWork``).

``async with uow:`` acquires the connection and begins the transaction; ``await uow.commit()``
commits it; leaving the block without a commit rolls it back. The connection goes back to the
pool either way. ``unit_of_work_factory`` is what the composition root gives the service
layer: a new ``PostgresUnitOfWork`` on the pool for each step.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

from services.notify.adapters.postgres.bundles import PostgresBundles
from services.notify.adapters.postgres.escalations import PostgresEscalations
from services.notify.adapters.postgres.heartbeats import PostgresHeartbeats
from services.notify.adapters.postgres.outbox import PostgresOutbox
from services.notify.adapters.postgres.policies import PostgresPolicies
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    DEFAULT_POLICY_REPEATS,
    DEFAULT_POLICY_WAIT_S,
)
from services.notify.service_layer.unit_of_work import UnitOfWorkFactory


class PostgresUnitOfWork:
    escalations: PostgresEscalations
    outbox: PostgresOutbox
    bundles: PostgresBundles
    policies: PostgresPolicies
    heartbeats: PostgresHeartbeats

    def __init__(
        self,
        pool: Any,
        *,
        fallback_email: str = DEFAULT_FALLBACK_EMAIL,
        default_wait_s: int = DEFAULT_POLICY_WAIT_S,
        default_repeats: int = DEFAULT_POLICY_REPEATS,
        transaction: bool = True,
    ) -> None:
        # asyncpg ships no type information; the pool is an asyncpg.Pool.
        self._pool = pool
        self._fallback_email = fallback_email
        self._default_wait_s = default_wait_s
        self._default_repeats = default_repeats
        # False: the repositories share one connection but each statement commits on its own
        # (reads of several statements that need no snapshot or lock: a policy, a timeline).
        self._transactional = transaction
        self._conn: Any = None
        self._transaction: Any = None
        # A statement of the transaction turned ``synchronous_commit`` off for it
        # (``PostgresBundles.claim_window``).
        self._without_flush = False

    async def __aenter__(self) -> PostgresUnitOfWork:
        self._conn = await self._pool.acquire()
        try:
            if self._transactional:
                self._transaction = self._conn.transaction()
                await self._transaction.start()
        except BaseException:
            await self._pool.release(self._conn)
            raise
        self.escalations = PostgresEscalations(self._conn, fallback_email=self._fallback_email)
        self.outbox = PostgresOutbox(self._conn, fallback_email=self._fallback_email)
        self.bundles = PostgresBundles(
            self._conn,
            fallback_email=self._fallback_email,
            commit_without_flush=self._committing_without_flush
            if self._transaction is not None
            else None,
        )
        self.heartbeats = PostgresHeartbeats(self._conn)
        self.policies = PostgresPolicies(
            self._conn, default_wait_s=self._default_wait_s, default_repeats=self._default_repeats
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._transaction is not None:
                await self.rollback()
        finally:
            conn, self._conn = self._conn, None
            await self._pool.release(conn)

    def _committing_without_flush(self) -> None:
        self._without_flush = True

    async def commit(self, *, durable: bool = True) -> None:
        """``durable=False``: this transaction's COMMIT does not wait for its write-ahead log
        to be flushed (``synchronous_commit`` off for it alone); the next commit that waits
        flushes it too, the log being written in order. A statement of the transaction may
        have turned it off already (``PostgresBundles.claim_window``): then a durable commit
        sets it back to the session's default first, and a commit that need not wait sends
        nothing more."""
        if self._transaction is not None:
            if durable and self._without_flush:
                await self._conn.execute("SET LOCAL synchronous_commit TO DEFAULT")
            elif not durable and not self._without_flush:
                await self._conn.execute("SET LOCAL synchronous_commit TO off")
            transaction, self._transaction = self._transaction, None
            await transaction.commit()

    async def rollback(self) -> None:
        if self._transaction is not None:
            transaction, self._transaction = self._transaction, None
            await transaction.rollback()


def unit_of_work_factory(
    pool: Any,
    *,
    fallback_email: str = DEFAULT_FALLBACK_EMAIL,
    default_wait_s: int = DEFAULT_POLICY_WAIT_S,
    default_repeats: int = DEFAULT_POLICY_REPEATS,
) -> UnitOfWorkFactory:
    """Units of work over ``pool`` (``service_layer.unit_of_work.UnitOfWorkFactory``), with the
    address paged for a team that has no on-call address of its own (``fallback_email``) and
    the default policy's figures for a team that has no policy."""

    def unit_of_work(*, transaction: bool = True) -> PostgresUnitOfWork:
        return PostgresUnitOfWork(
            pool,
            fallback_email=fallback_email,
            default_wait_s=default_wait_s,
            default_repeats=default_repeats,
            transaction=transaction,
        )

    return unit_of_work


if TYPE_CHECKING:
    from services.notify.service_layer.unit_of_work import UnitOfWork

    def _conforms(uow: PostgresUnitOfWork) -> UnitOfWork:
        return uow

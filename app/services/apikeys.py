"""API keys: generation, hashed storage, verification with a short in-process cache.

A key reads ``trw_<prefix>_<secret>``: the 8-character prefix is stored in clear (unique,
the lookup key), the whole key only as its SHA-256. Verification finds the row by prefix
and compares hashes in constant time.

Verified keys are cached in-process for ``CACHE_TTL_S`` (2 s) so authentication stays off
the database on the hot path. Revocation still takes effect at once: revoke_key() sends
``NOTIFY trawler_keys, '<key id>'`` in the revoking transaction, and every API process
(subscribed through its LISTEN connection, see app.api.deps) drops the key's entry when the
notification arrives, that is when the revocation commits; the revoking process also drops
it after its own commit. Without LISTEN (PgBouncer) or while the LISTEN connection is
down, ``CACHE_TTL_S`` bounds the delay; a lost LISTEN connection clears the whole cache.
A verification that was in flight while an entry was dropped does not cache its answer
(the cache's epoch moved on), so a lookup that read the key just before the revocation
committed cannot put it back.

A key in use is re-verified in the background during the last ``REFRESH_AHEAD_S`` of its
entry, so requests do not wait for the lookup every ``CACHE_TTL_S``; a re-verification
that finds the key revoked or gone drops the entry at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import string
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from sqlalchemy import event, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.database.models import ApiKey, KeyRole

logger = logging.getLogger(__name__)

KEY_SCHEME = "trw"
PREFIX_CHARS = 8
SECRET_CHARS = 40  # base62: ~238 bits
CACHE_TTL_S = 2.0
REFRESH_AHEAD_S = 0.5  # re-verify in the background when an entry has this long left
CACHE_MAX_ENTRIES = 10_000
LAST_USED_RESOLUTION_S = 60  # last_used_at is refreshed at most this often per key
NOTIFY_KEYS = "trawler_keys"  # payload: the id of a revoked key

_BASE62 = string.ascii_letters + string.digits
_KEY_RE = re.compile(rf"^{KEY_SCHEME}_([A-Za-z0-9]{{{PREFIX_CHARS}}})_([A-Za-z0-9]{{32,128}})$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key, the tenant whose jobs it sees, and its role."""

    key_id: uuid.UUID
    tenant: str
    role: KeyRole

    @property
    def is_admin(self) -> bool:
        return self.role == KeyRole.admin


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(length))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_prefix(key: str) -> str | None:
    """The lookup prefix of a well-formed key, or None."""
    match = _KEY_RE.match(key)
    return match.group(1) if match else None


class _KeyCache:
    """Verified keys by hash, each valid for CACHE_TTL_S. Bad keys are never cached, so a
    key created a moment ago works at once.

    `epoch` moves on whenever entries are dropped (revocations); put() with the epoch a
    verification started under refuses to cache once it moved."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Principal, float]] = {}
        self.epoch = 0

    def get(self, key_hash: str) -> Principal | None:
        return self.lookup(key_hash)[0]

    def lookup(self, key_hash: str) -> tuple[Principal | None, bool]:
        """(principal or None, whether the entry is due for re-verification)."""
        entry = self._entries.get(key_hash)
        if entry is None:
            return None, False
        principal, expires = entry
        left = expires - time.monotonic()
        if left <= 0:
            self._entries.pop(key_hash, None)
            return None, False
        return principal, left < REFRESH_AHEAD_S

    def discard(self, key_hash: str) -> None:
        self.epoch += 1
        self._entries.pop(key_hash, None)

    def put(self, key_hash: str, principal: Principal, epoch: int | None = None) -> None:
        if epoch is not None and epoch != self.epoch:
            return  # something was revoked while this key was being verified
        now = time.monotonic()
        if len(self._entries) >= CACHE_MAX_ENTRIES:
            self._entries = {h: e for h, e in self._entries.items() if e[1] > now}
            if len(self._entries) >= CACHE_MAX_ENTRIES:
                self._entries.clear()
        self._entries[key_hash] = (principal, now + CACHE_TTL_S)

    def discard_key(self, key_id: uuid.UUID) -> None:
        self.epoch += 1
        for key_hash in [h for h, (p, _) in self._entries.items() if p.key_id == key_id]:
            self._entries.pop(key_hash, None)

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()


cache = _KeyCache()


async def create_key(
    session: AsyncSession, name: str, tenant: str | None = None, admin: bool = False
) -> tuple[ApiKey, str]:
    """Store a new key; returns the row and the plaintext key, which is never seen again."""
    role = KeyRole.admin if admin else KeyRole.user
    for _ in range(5):
        prefix = _random_base62(PREFIX_CHARS)
        key = f"{KEY_SCHEME}_{prefix}_{_random_base62(SECRET_CHARS)}"
        # ON CONFLICT: a prefix collision (62^8 space) retries instead of aborting the
        # caller's transaction
        stmt = (
            insert(ApiKey)
            .values(
                id=uuid.uuid4(),
                name=name,
                tenant=tenant or name,
                role=role,
                prefix=prefix,
                key_hash=hash_key(key),
            )
            .on_conflict_do_nothing(index_elements=["prefix"])
            .returning(ApiKey)
        )
        row = (await session.scalars(stmt)).one_or_none()
        if row is not None:
            return row, key
    raise RuntimeError("could not allocate a unique API key prefix")


async def list_keys(session: AsyncSession, *, tenant: str | None = None) -> Sequence[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant == tenant)
    return (await session.scalars(stmt)).all()


async def get_key(session: AsyncSession, key_id: uuid.UUID) -> ApiKey | None:
    return await session.get(ApiKey, key_id)


async def revoke_key(session: AsyncSession, key_id: uuid.UUID) -> ApiKey | None:
    """Mark a key revoked (idempotent: the first revocation time is kept); None if unknown.

    Every process stops accepting the key when the caller's transaction commits: the
    NOTIFY below is delivered then, and this process drops its cache entry after the
    commit too (before it, a concurrent request could still verify and re-cache the key).
    """
    stmt = (
        update(ApiKey)
        .where(ApiKey.id == key_id)
        .values(revoked_at=text("coalesce(revoked_at, now())"))
        .returning(ApiKey)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    row = (await session.scalars(stmt)).one_or_none()
    if row is not None:
        await session.execute(
            text("SELECT pg_notify(:channel, :key)"), {"channel": NOTIFY_KEYS, "key": str(key_id)}
        )
    cache.discard_key(key_id)

    def _after_commit(_session: Session) -> None:
        cache.discard_key(key_id)

    event.listen(session.sync_session, "after_commit", _after_commit, once=True)
    return row


def on_key_notification(_channel: str, payload: str) -> None:
    """LISTEN callback for NOTIFY_KEYS: drop the revoked key; an empty payload (the LISTEN
    connection was lost, notifications may have been missed) drops every entry."""
    try:
        key_id = uuid.UUID(payload)
    except ValueError:
        cache.clear()
        return
    cache.discard_key(key_id)


_LOOKUP_SQL = text(
    "SELECT id, tenant, role, key_hash, revoked_at IS NOT NULL AS revoked, "
    "coalesce(last_used_at < now() - make_interval(secs => :fresh), true) AS stale "
    "FROM api_keys WHERE prefix = :prefix"
)
# SKIP LOCKED: concurrent requests with one key must not queue behind each other's
# row lock (held until their commit) just to record the same timestamp
_TOUCH_SQL = text(
    "UPDATE api_keys SET last_used_at = now() "
    "WHERE id = (SELECT id FROM api_keys WHERE id = :id FOR UPDATE SKIP LOCKED)"
)


def cached_principal(key: str) -> tuple[Principal | None, bool]:
    """From the cache only, no I/O: the principal of a key verified within the last
    CACHE_TTL_S (or None), and whether it is due for a background refresh (refresh())."""
    return cache.lookup(hash_key(key))


# Verifications in flight, by key hash: when an entry expires under load, every request
# with that key misses at once; one lookup serves them all instead of one each.
_lookups: dict[str, asyncio.Future[Principal | None]] = {}
_refreshes: set[asyncio.Task[None]] = set()


async def authenticate(session: AsyncSession, key: str) -> Principal | None:
    """The principal of a valid, unrevoked key; None for anything else.

    Core SQL on the session's connection, no ORM: this runs on every cache miss.
    """
    key_hash = hash_key(key)
    cached = cache.get(key_hash)
    if cached is not None:
        return cached
    prefix = parse_prefix(key)
    if prefix is None:
        return None
    while (pending := _lookups.get(key_hash)) is not None:
        # another request is verifying this key: take its answer (or its error); if it was
        # cancelled, the first waiter to wake verifies in its place
        await asyncio.wait([pending])
        if not pending.cancelled():
            return pending.result()
    return await _shared_verify(session, key_hash, prefix)


SessionScope = Callable[[], AbstractAsyncContextManager[AsyncSession]]


def refresh(session_scope: SessionScope, key: str) -> None:
    """Re-verify a cached key in the background (once at a time per key), in a unit of
    work of its own; the entry gets a new CACHE_TTL_S, or goes if the key was revoked."""
    key_hash = hash_key(key)
    prefix = parse_prefix(key)
    if prefix is None or key_hash in _lookups:
        return

    async def run() -> None:
        try:
            async with session_scope() as session:
                if await _shared_verify(session, key_hash, prefix) is None:
                    cache.discard(key_hash)
        except Exception as error:  # the entry just expires; the next request verifies
            logger.warning("background re-verification of an API key failed: %s", error)

    task = asyncio.get_running_loop().create_task(run(), name="trawler-apikey-refresh")
    _refreshes.add(task)
    task.add_done_callback(_refreshes.discard)


async def _shared_verify(session: AsyncSession, key_hash: str, prefix: str) -> Principal | None:
    """_verify, announced in _lookups so that concurrent misses wait for it."""
    lookup: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
    _lookups[key_hash] = lookup
    try:
        principal = await _verify(session, key_hash, prefix)
    except Exception as error:
        # the database failed us (an outage, most likely): the waiters get the same error
        # now rather than each trying again in turn, one timeout after another
        lookup.set_exception(error)
        lookup.exception()  # retrieved: no "never retrieved" noise when nobody waited
        raise
    except BaseException:
        # cancelled (the request went away): the first waiter verifies in its place
        lookup.cancel()
        raise
    else:
        lookup.set_result(principal)
    finally:
        if _lookups.get(key_hash) is lookup:
            del _lookups[key_hash]
    return principal


# compared against when no key has the prefix, so a miss costs what a wrong secret costs
_NO_KEY_HASH = hash_key("trw_00000000_" + "0" * SECRET_CHARS)


async def _verify(session: AsyncSession, key_hash: str, prefix: str) -> Principal | None:
    epoch = cache.epoch
    conn = await session.connection()
    row = (
        (await conn.execute(_LOOKUP_SQL, {"prefix": prefix, "fresh": LAST_USED_RESOLUTION_S}))
        .mappings()
        .one_or_none()
    )
    # constant time: the hash comparison never stops at the first differing character
    stored = row["key_hash"] if row is not None else _NO_KEY_HASH
    matches = hmac.compare_digest(stored.encode("ascii"), key_hash.encode("ascii"))
    if row is None or not matches or row["revoked"]:
        return None
    principal = Principal(key_id=row["id"], tenant=row["tenant"], role=KeyRole(row["role"]))
    if row["stale"]:
        await conn.execute(_TOUCH_SQL, {"id": row["id"]})
    cache.put(key_hash, principal, epoch)
    return principal

"""
The C{sql:} backend: users and their stored hashes in PostgreSQL (through
C{psycopg} 3) or SQLite (the standard library's C{sqlite3}), read with a
configured, parameterised query; and the same database as a source of the
addresses each login may send as (L{SQLDatabase.senders}).

Its settings are a small TOML file (L{loadSQLSettings})::

    driver = "postgresql"             # or "sqlite"
    dsn = "host=/run/postgresql dbname=mail user=mailgw"   # SQLite: the file
    password_query = "SELECT password FROM users WHERE login = %(user)s AND active"
    senders_query = "SELECT address FROM aliases WHERE owner = %(user)s"
    pool_size = 4
    timeout = 5
    mechanisms = ["PLAIN", "LOGIN"]   # and "CRAM-MD5", "SCRAM-SHA-256" (below)

Queries name their parameters in the driver's own style (PostgreSQL
C{%(user)s}, SQLite C{:user}); the values (C{user}, C{localpart},
C{domain}) are always passed to the driver apart from the query text,
never formatted into it. Queries run in a thread pool of C{pool_size}
threads, each taking a connection from a pool of as many; a database that
cannot be reached or fails a query raises L{SQLUnavailable}, which the
server answers 454 4.7.0.

C{mechanisms} lists what EHLO offers for this backend: PLAIN and LOGIN
serve every stored format; SCRAM-SHA-256 serves users whose value is
Dovecot's C{{SCRAM-SHA-256}} or a plain one; CRAM-MD5 only plain values
(so it needs C{allow_plain = true}). A user whose value cannot serve the
mechanism chosen gets 535 and the throttle counts no guess
(L{mailgw.auth.MechanismUnavailable}).
"""

from __future__ import annotations

import re
import threading
import tomllib
import urllib.parse
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailgw.auth.stored import StoredUser
from mailgw.auth.workers import Outages, SharedByKey, Workers

__all__ = ["SQLDatabase", "SQLSettings", "SQLSettingsError", "SQLUnavailable", "loadSQLSettings"]

DRIVERS = ("postgresql", "sqlite")
PARAMETERS = ("user", "localpart", "domain")
#: The most rows a senders query may return (more are ignored, and logged).
MAX_SENDERS = 1000
_PLACEHOLDER = {
    "postgresql": re.compile(r"%\((\w+)\)s"),
    "sqlite": re.compile(r"(?<![:\w]):([A-Za-z_]\w*)"),
}
_KEYS = {
    "driver", "dsn", "password_query", "senders_query", "pool_size", "timeout", "allow_plain",
    "mechanisms",
}  # fmt: skip
_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")


class SQLSettingsError(ValueError):
    """The settings file cannot be used; the message names file, key and problem."""


class SQLUnavailable(Exception):
    """
    The database cannot answer now (unreachable, query failed): transient,
    454 4.7.0. The message is for the log only.
    """


@attrs.frozen
class SQLSettings:
    """The settings of one SQL source (see the module docstring)."""

    driver: str
    dsn: str = attrs.field(repr=False)  # may hold a password
    passwordQuery: str
    sendersQuery: str = ""
    poolSize: int = 4
    timeout: float = 5.0
    allowPlain: bool = False
    source: str = "<sql>"
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")


def _checkQuery(path: str, key: str, driver: str, query: object, required: bool) -> str:
    if query is None and not required:
        return ""
    if not isinstance(query, str) or not query.strip():
        raise SQLSettingsError(f"{path}: {key}: must be a non-empty string")
    names = set(_PLACEHOLDER[driver].findall(query))
    unknown = names - set(PARAMETERS)
    if unknown:
        raise SQLSettingsError(
            f"{path}: {key}: unknown parameter(s) {', '.join(sorted(unknown))};"
            f" known: {', '.join(PARAMETERS)}"
        )
    if not names:
        style = "%(user)s" if driver == "postgresql" else ":user"
        raise SQLSettingsError(
            f"{path}: {key}: the query takes no parameter: write {style} where the login goes"
        )
    return query


def parseSQLSettings(data: dict[str, Any], path: str) -> SQLSettings:
    """@raise SQLSettingsError: a key is missing, unknown or of the wrong type."""
    unknown = set(data) - _KEYS
    if unknown:
        raise SQLSettingsError(f"{path}: {sorted(unknown)[0]}: unknown key")
    driver = data.get("driver")
    if driver not in DRIVERS:
        raise SQLSettingsError(f"{path}: driver: must be one of {', '.join(DRIVERS)}")
    dsn = data.get("dsn")
    if not isinstance(dsn, str) or not dsn:
        raise SQLSettingsError(f"{path}: dsn: must be a non-empty string")
    passwordQuery = _checkQuery(path, "password_query", driver, data.get("password_query"), True)
    sendersQuery = _checkQuery(path, "senders_query", driver, data.get("senders_query"), False)
    poolSize = data.get("pool_size", 4)
    if type(poolSize) is not int or not 1 <= poolSize <= 64:
        raise SQLSettingsError(f"{path}: pool_size: must be an integer from 1 to 64")
    timeout = data.get("timeout", 5)
    if type(timeout) not in (int, float) or not 0 < timeout <= 300:
        raise SQLSettingsError(f"{path}: timeout: must be a number of seconds, 0 < timeout <= 300")
    allowPlain = data.get("allow_plain", False)
    if type(allowPlain) is not bool:
        raise SQLSettingsError(f"{path}: allow_plain: must be true or false")
    mechanisms = _checkMechanisms(path, data.get("mechanisms", ["PLAIN", "LOGIN"]), allowPlain)
    return SQLSettings(
        driver, dsn, passwordQuery, sendersQuery, poolSize, float(timeout), allowPlain, path,
        mechanisms=mechanisms,
    )  # fmt: skip


def _checkMechanisms(path: str, value: object, allowPlain: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise SQLSettingsError(f"{path}: mechanisms: must be a non-empty list of names")
    names = [m.upper() for m in value]
    unknown = [m for m in names if m not in _MECHANISMS]
    if unknown:
        raise SQLSettingsError(
            f"{path}: mechanisms: unknown {unknown[0]!r}; known: {', '.join(_MECHANISMS)}"
        )
    if "CRAM-MD5" in names and not allowPlain:
        raise SQLSettingsError(
            f"{path}: mechanisms: CRAM-MD5 needs the passwords in clear: set allow_plain = true"
        )
    return tuple(m for m in _MECHANISMS if m in names)


def loadSQLSettings(path: str) -> SQLSettings:
    """
    Read the TOML settings file at ``path``.

    @raise SQLSettingsError: it cannot be read or used (names the file and key).
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise SQLSettingsError(f"{path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SQLSettingsError(f"{path}: not TOML: {e}") from None
    return parseSQLSettings(data, path)


def queryParameters(login: str) -> dict[str, str]:
    """The values a query may use: the login, and its parts around the last ``@``."""
    local, at, domain = login.rpartition("@")
    if not at:
        return {"user": login, "localpart": login, "domain": ""}
    return {"user": login, "localpart": local, "domain": domain}


def _connectPostgreSQL(settings: SQLSettings) -> Any:
    import psycopg

    # TCP keepalives: a server that vanished mid-query (no RST) is noticed
    # in seconds, not after the system's TCP timeout (libpq ignores them on
    # a Unix socket).
    seconds = max(1, round(settings.timeout))
    conn = psycopg.connect(
        settings.dsn, autocommit=True, connect_timeout=seconds,
        keepalives=1, keepalives_idle=seconds, keepalives_interval=1, keepalives_count=3,
    )  # fmt: skip
    # A query that hangs on the server is cancelled there (milliseconds).
    conn.execute(
        "SELECT set_config('statement_timeout', %s, false)", (str(int(settings.timeout * 1000)),)
    )
    return conn


def _connectSQLite(settings: SQLSettings) -> Any:
    import sqlite3

    # Read-only: the gateway never writes the user database.
    uri = "file:" + urllib.parse.quote(settings.dsn) + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=settings.timeout, check_same_thread=False)


def _driverErrors(driver: str) -> tuple[type[BaseException], ...]:
    if driver == "postgresql":
        import psycopg

        return (psycopg.Error,)
    import sqlite3

    return (sqlite3.Error,)


@attrs.define
class SQLDatabase:
    """
    Runs the configured queries in a bounded thread pool, each thread on a
    connection from a pool of at most ``settings.poolSize`` connections.

    ``reactor`` provides C{IReactorThreads} (for the Deferreds) and
    C{IReactorCore} (to start and stop the pool with the reactor).
    """

    settings: SQLSettings
    reactor: Any
    connect: Callable[[SQLSettings], Any] | None = None
    workers: Workers = attrs.field(init=False)
    _idle: list[Any] = attrs.field(init=False, factory=list)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _outages: Outages = attrs.field(init=False)
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self._outages = Outages(self.settings.source, "database", SQLUnavailable, self.log)
        if self.connect is None:
            self.connect = (
                _connectPostgreSQL if self.settings.driver == "postgresql" else _connectSQLite
            )
        self.workers = Workers(self.reactor, self.settings.poolSize, f"mailgw-sql-{id(self):x}")
        self.workers.onClose(self._closeIdle)

    def close(self) -> None:
        """Stop the threads and close the idle connections."""
        self.workers.close()

    def _closeIdle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.close()
            except Exception:
                pass

    def _take(self) -> tuple[Any, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        assert self.connect is not None
        return self.connect(self.settings), False

    def _give(self, conn: Any) -> None:
        with self._lock:
            if len(self._idle) < self.settings.poolSize:
                self._idle.append(conn)
                return
        conn.close()

    def _run(self, query: str, parameters: dict[str, str], limit: int) -> list[tuple[Any, ...]]:
        """Runs in a pool thread. @raise SQLUnavailable"""
        errors = _driverErrors(self.settings.driver)
        for attempt in (1, 2):
            reused = False
            try:
                conn, reused = self._take()
                try:
                    cursor = conn.execute(query, parameters)
                    rows = cursor.fetchmany(limit)
                    cursor.close()
                except BaseException:
                    conn.close()
                    raise
                self._give(conn)
                return [tuple(row) for row in rows]
            except errors as e:
                # A pooled connection may have died with a server restart:
                # one more try, on a new connection, before giving up.
                if reused and attempt == 1:
                    continue
                raise SQLUnavailable(f"{type(e).__name__}: {e}".strip()) from None
        raise AssertionError("unreachable")

    def _query(self, query: str, login: str, limit: int) -> defer.Deferred[list[tuple[Any, ...]]]:
        return self._outages.watch(
            self.workers.run(self._run, query, queryParameters(login), limit)
        )

    def fetchUser(self, login: str) -> defer.Deferred[StoredUser | None]:
        """
        The stored hash of ``login`` (the password query's first column;
        a second column, when present, is the login as the database
        spells it), or C{None} when the query returns no row, or more than
        one (logged: the query is ambiguous).

        @raise SQLUnavailable: (in the Deferred) the database cannot answer.
        """

        def found(rows: list[tuple[Any, ...]]) -> StoredUser | None:
            if not rows:
                return None
            if len(rows) > 1:
                self.log.error(
                    "{source}: password_query returned several rows for {login!r}: refused",
                    source=self.settings.source,
                    login=login,
                )
                return None
            row = rows[0]
            stored = row[0]
            if isinstance(stored, (bytes, memoryview)):
                stored = bytes(stored).decode("utf-8", "replace")
            if not isinstance(stored, str) or not stored:
                return None  # NULL or empty: no password, no login
            name = row[1] if len(row) > 1 and isinstance(row[1], str) and row[1] else login
            return StoredUser(name, stored)

        return self._query(self.settings.passwordQuery, login, 2).addCallback(found)

    def senders(self, login: str) -> defer.Deferred[list[str]]:
        """
        The entries (addresses, C{@domain}, C{*}) the senders query lists
        for ``login``: the first column of each row, NULLs skipped.

        @raise SQLUnavailable: (in the Deferred) the database cannot answer.
        @raise ValueError: no C{senders_query} is configured.
        """
        if not self.settings.sendersQuery:
            raise ValueError(f"{self.settings.source}: senders_query is not set")

        def listed(rows: list[tuple[Any, ...]]) -> list[str]:
            if len(rows) > MAX_SENDERS:
                self.log.warn(
                    "{source}: senders_query returned more than {n} rows for {login!r};"
                    " the rest are ignored",
                    source=self.settings.source,
                    n=MAX_SENDERS,
                    login=login,
                )
            return [str(row[0]) for row in rows[:MAX_SENDERS] if row and row[0] is not None]

        return self._query(self.settings.sendersQuery, login, MAX_SENDERS + 1).addCallback(listed)


_databases = SharedByKey()


def sharedDatabase(settings: SQLSettings, reactor: Any) -> SQLDatabase:
    """
    The open L{SQLDatabase} of ``settings`` on ``reactor``, made on first
    use: checkers made again by a reload, and the sender map of the same
    file, share its threads and connections.
    """
    return _databases.get(settings, reactor, lambda: SQLDatabase(settings, reactor))  # type: ignore[no-any-return]


def _leaseDatabase(settings: SQLSettings, reactor: Any) -> tuple[SQLDatabase, Callable[[], None]]:
    """L{sharedDatabase}, held until the returned release is called (by a retired checker)."""
    database = _databases.acquire(settings, reactor, lambda: SQLDatabase(settings, reactor))
    return database, lambda: _databases.release(settings, reactor, database)


def makeSQLChecker(settings: SQLSettings, reactor: Any) -> Any:
    """
    The C{sql:} checker: a L{StoredHashChecker} over the L{SQLDatabase} of
    ``settings`` (L{sharedDatabase}),
    verifying hashes in ``reactor``'s own thread pool (not the database's,
    so slow hashing never holds a connection). Retired (a reload replaced
    it), it lets go of the database: its pool closes once no checker holds
    it and its queries under way are done.
    """
    from mailgw.auth.stored import StoredHashChecker

    database, release = _leaseDatabase(settings, reactor)

    def runInThread(f: Any, *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return StoredHashChecker(
        database.fetchUser,
        runInThread,
        allowPlain=settings.allowPlain,
        name=settings.source,
        mechanisms=settings.mechanisms,
        release=release,
    )

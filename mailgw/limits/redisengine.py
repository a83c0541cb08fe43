"""
The shared counts on Redis (L{ISharedCounters}): every batch is one call
of a Lua script, atomic on the server, made with the ``redis`` package in
a thread of its own so that the reactor never waits for the network.

Each bucket is a hash ``NAMESPACE:TABLE:KEY`` with its level ``l`` and the
server's time ``t`` of its last change, expiring once it has leaked to 0;
the script reads the time from Redis (``TIME``), so the nodes' clocks do
not matter. One Redis (or a primary with replicas): the keys of a batch
are not spread over a Redis Cluster's slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailgw.interfaces import ISharedCounters
from mailgw.limits.shared import CounterChange
from mailgw.sharedconfig import RedisAddress

# KEYS: the buckets; ARGV: amount, leak per second and window of each.
# Returns each level after its change, as text (a Lua number would be cut to
# an integer on the way out).
LEAKY_BUCKETS = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i, key in ipairs(KEYS) do
  local amount = tonumber(ARGV[3 * i - 2])
  local rate = tonumber(ARGV[3 * i - 1])
  local window = tonumber(ARGV[3 * i])
  local level = 0
  local stored = redis.call('HMGET', key, 'l', 't')
  if stored[1] then
    local elapsed = now - tonumber(stored[2])
    if elapsed < 0 then elapsed = 0 end
    level = tonumber(stored[1]) - elapsed * rate
    if level < 0 then level = 0 end
  end
  if amount ~= 0 then
    level = level + amount
    if level <= 1e-9 then
      level = 0
      redis.call('DEL', key)
    else
      redis.call('HSET', key, 'l', string.format('%.17g', level), 't', string.format('%.17g', now))
      local life = window
      if rate > 0 then life = level / rate end
      redis.call('PEXPIRE', key, math.ceil(life * 1000) + 1000)
    end
  end
  out[i] = string.format('%.17g', level)
end
return out
"""


@implementer(ISharedCounters)
class RedisCounters:
    """
    The counts of ``namespace`` in the Redis at ``address``, reached with
    ``password`` (None: no AUTH), each call given up after ``timeout``
    seconds. Calls run one at a time in a thread of their own, started on
    the first call.
    """

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        namespace: str,
        password: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        import redis  # the optional dependency: only a configured backend needs it

        self._reactor = reactor
        self._namespace = namespace
        self.description = address.describe()
        common: dict[str, Any] = {
            "db": address.db,
            "password": password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        if address.path:
            pool = redis.ConnectionPool(
                connection_class=redis.UnixDomainSocketConnection, path=address.path, **common
            )
        else:
            pool = redis.ConnectionPool(host=address.host, port=address.port, **common)
        self._client = redis.Redis(connection_pool=pool)
        self._script = self._client.register_script(LEAKY_BUCKETS)
        self._threads = ThreadPool(0, 1, name="mailgw-shared-limits")

    def _key(self, change: CounterChange) -> str:
        return f"{self._namespace}:{change.spec.name}:{change.key}"

    def _run(self, keys: list[str], args: list[str]) -> list[float]:
        if not keys:
            self._client.ping()
            return []
        return [float(level) for level in self._script(keys=keys, args=args)]

    def apply(self, changes: Sequence[CounterChange]) -> Deferred[list[float]]:
        keys = [self._key(change) for change in changes]
        args = []
        for change in changes:
            spec = change.spec
            args += [repr(float(change.amount)), repr(spec.rate), repr(float(spec.window))]
        if not self._threads.started:
            self._threads.start()
        d: Deferred[list[float]] = deferToThreadPool(
            self._reactor, self._threads, self._run, keys, args
        )
        return d

    def close(self) -> Deferred[None]:
        if self._threads.started:
            self._threads.stop()  # waits for the call under way: at most the timeout
        self._client.connection_pool.disconnect()
        return succeed(None)

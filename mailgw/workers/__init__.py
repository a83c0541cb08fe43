"""
``[server] workers = N``: one supervising process and N worker processes on
one machine (docs/operations.md, "Workers").

- L{shards}: each worker's spool directory, and the single-process spool
  moved into shard 0.
- L{restart}: when a worker that died is started again (backoff).
- L{listeners}: the listening sockets, opened once by the supervisor and
  adopted by each worker.
- L{fanout}: the supervisor's control socket, fanned out to every worker's.
- L{supervisor}: the supervising service itself; L{child}: a worker's main.
"""

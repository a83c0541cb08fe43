"""
The account circuit breaker (docs/breaker.md): per account, a baseline
learnt from what the gateway sees, explainable rules that trip when the
last hour departs from it, and what a trip does (held mail, refused logins,
alerts).

Modules: ``config`` (the ``[breaker]`` settings), ``baseline`` (one
account's learnt figures and its last hour), ``rules`` (the rules, pure
functions of figures), ``breaker`` (L{IAccountBreaker} in memory),
``store`` (the state file in the spool directory and the persistent
breaker), ``alerts`` (the alert seam: log line, admin message, webhook),
``control`` (the control-socket commands of ``mailgw account``), ``build``
(the breaker of a configuration).
"""

"""
The queue API (docs/api.md) as a twisted.web resource, mounted at ``/api``
on the metrics listener when ``[api] token_file`` is set::

    GET    /api/v1/messages[?state=&sender=&account=&limit=]
    GET    /api/v1/messages/ID
    POST   /api/v1/messages/ID/hold | release | flush
    DELETE /api/v1/messages/ID
    GET    /api/v1/accounts/NAME

Every request needs ``Authorization: Bearer TOKEN`` (compared in constant
time; 401 otherwise). Changes are refused with 403 unless ``[api]
allow_changes``. Answers and errors are JSON; an error is ``{"error":
REASON}``, never a traceback or an exception's text.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mailgw.api.views import AccountSection, ApiError, listMessages, showAccount, showMessage
from mailgw.queue.spool import isQueueId

__all__ = ["ApiResource"]

_log = Logger()
ACTIONS = ("hold", "release", "flush")
MAX_NAME = 320


class ApiResource(Resource):
    """
    The API over ``queue`` (an L{IQueueView} and L{IQueueControl}: the
    queue runner, the same control the control socket uses).

    @param token: the bearer token.
    @param allowChanges: False answers hold, release, flush and delete with 403.
    @param quota: L{mailgw.limits.SubmissionQuota}, a function giving the
        one in force (a reload replaces it), or None.
    @ivar accountSections: the hook for more account state: name -> function
        of the account; the breaker adds ``"breaker"``.
    """

    isLeaf = True

    def __init__(
        self,
        token: bytes,
        queue: Any,
        *,
        allowChanges: bool = False,
        quota: Any = None,
        accountSections: Mapping[str, AccountSection] | None = None,
    ) -> None:
        super().__init__()
        if not token:
            raise ValueError("the API needs a token")
        self.token, self.queue, self.allowChanges = token, queue, allowChanges
        self.quota = quota
        self.accountSections: dict[str, AccountSection] = dict(accountSections or {})

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        try:
            self._authenticate(request)
            result = self._route(request)
        except ApiError as e:
            return _error(request, e.status, e.reason)
        except Exception:
            _log.failure("API bug answering {method}", method=request.method)
            return _error(request, 500, "internal error")
        if not isinstance(result, Deferred):
            return _json(request, 200, result)
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))

        def answer(value: Any) -> None:
            if finished:
                return  # the client left
            if isinstance(value, Failure):
                if value.check(ApiError):
                    body = _error(request, value.value.status, value.value.reason)
                else:
                    _log.failure("API request failed", value)
                    body = _error(request, 500, "the queue could not do it; see the log")
            else:
                body = _json(request, 200, value)
            request.write(body)
            request.finish()

        result.addBoth(answer)
        return NOT_DONE_YET

    def _authenticate(self, request: Request) -> None:
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        ok = scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        if not ok:
            request.setHeader(b"www-authenticate", b'Bearer realm="mailgw"')
            raise ApiError(401, "a valid bearer token is needed")

    def _route(self, request: Request) -> Any:
        path = [p for p in (request.postpath or []) if p]
        method = request.method
        if path[:1] != [b"v1"]:
            raise ApiError(404, "no such resource (the API is under /api/v1/)")
        path = path[1:]
        if path == [b"messages"]:
            self._allow(method, b"GET")
            return listMessages(self.queue.messages(), request.args or {})
        if len(path) == 2 and path[0] == b"messages":
            queueId = _queueId(path[1])
            if method == b"DELETE":
                return self._change("delete", queueId)
            self._allow(method, b"GET", b"DELETE")
            return showMessage(self._lookup(queueId))
        if (
            len(path) == 3
            and path[0] == b"messages"
            and path[2].decode("ascii", "replace") in ACTIONS
        ):
            self._allow(method, b"POST")
            return self._change(path[2].decode("ascii"), _queueId(path[1]))
        if len(path) == 2 and path[0] == b"accounts":
            self._allow(method, b"GET")
            name = _name(path[1])
            quota = self.quota() if callable(self.quota) else self.quota
            return showAccount(name, self.queue.messages(), quota, self.accountSections)
        raise ApiError(404, "no such resource")

    @staticmethod
    def _allow(method: bytes, *allowed: bytes) -> None:
        if method not in allowed:
            raise ApiError(405, f"use {' or '.join(m.decode() for m in allowed)}")

    def _lookup(self, queueId: str) -> Any:
        try:
            return self.queue.lookup(queueId)
        except KeyError:
            raise ApiError(404, "no such message in the queue") from None

    def _change(self, action: str, queueId: str) -> Deferred[dict[str, Any]]:
        if not self.allowChanges:
            raise ApiError(403, "the API is read-only ([api] allow_changes = false)")
        self._lookup(queueId)
        if action == "flush":
            d = maybeDeferred(self.queue.flush, [queueId])
        else:
            d = maybeDeferred(getattr(self.queue, action), queueId)

        def done(result: Any) -> dict[str, Any]:
            _log.info("API: {action} {queueId}", action=action, queueId=queueId)
            answer: dict[str, Any] = {"ok": True, "action": action, "queueId": queueId}
            if action == "flush":
                answer["count"] = result
            return answer

        def failed(failure: Failure) -> Failure:
            if failure.check(KeyError):
                raise ApiError(404, "no such message in the queue")
            return failure

        return d.addCallbacks(done, failed)


def _queueId(segment: bytes) -> str:
    text = segment.decode("ascii", "replace")
    if not isQueueId(text):
        raise ApiError(404, "no such message in the queue")
    return text


def _name(segment: bytes) -> str:
    try:
        name = segment.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the account name is not UTF-8") from None
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise ApiError(400, "not an account name")
    return name


def _json(request: Request, status: int, value: Any) -> bytes:
    request.setResponseCode(status)
    return json.dumps(value, ensure_ascii=False).encode("utf-8") + b"\n"


def _error(request: Request, status: int, reason: str) -> bytes:
    return _json(request, status, {"error": reason})

"""
L{MessageSigner}: the DKIM-Signature header fields for a message, added
as the relay reads the message for an upstream (docs/dkim.md says why
there).

The signing domain is the From: header field's (RFC 6376 and DMARC align
d= with it, RFC 7489 3.1): the envelope sender's domain is never used, as
a signature for it would not make the message pass DMARC. A message is
signed when it has exactly one From: field whose addresses share one
domain with at least one configured key; otherwise it goes unsigned, as it
came (a missing or doubled From: is not ours to repair).

The body is hashed as it is read (L{BodyHasher}); only the header section
(at most L{MAX_HEADER_SECTION} octets) is held in memory, for dkimpy to
sign. The relay then sends the signature fields and the stored bytes, byte
for byte.
"""

from __future__ import annotations

import base64
import email.utils
import re
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, BinaryIO

from twisted.logger import Logger
from zope.interface import implementer

from mailgw.dkim.canon import BodyHasher
from mailgw.dkim.config import signingDomain
from mailgw.dkim.keys import LoadedKey, loadKeys
from mailgw.interfaces import IMessageSigner

__all__ = ["MAX_HEADER_SECTION", "MessageSigner", "SignedFile"]

log = Logger()

#: The largest header section signed (the server's max_header_size is
#: 256 KiB by default); a message with more is relayed unsigned.
MAX_HEADER_SECTION = 1024 * 1024
READ_CHUNK = 64 * 1024
#: A From: field longer than this is not parsed (nor signed): the parser's
#: time grows with the field, which the sender writes.
MAX_FROM_FIELD = 64 * 1024

_CRLF = re.compile(rb"\r\n")


class SignedFile:
    """
    The file the relay reads: C{prefix} (the signature fields), then
    C{file} from where it stands. C{read(n)} returns C{n} octets until the
    end, as a regular file does (the relay takes a short read for the end).
    """

    def __init__(self, prefix: bytes, file: IO[bytes]) -> None:
        self._prefix = prefix
        self._file = file

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            data, self._prefix = self._prefix + self._file.read(), b""
            return data
        head, self._prefix = self._prefix[:size], self._prefix[size:]
        if len(head) == size:
            return head
        return head + self._file.read(size - len(head))

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return bool(self._file.closed)


@implementer(IMessageSigner)
class MessageSigner:
    """
    Signs for the sender domains of C{keys} (L{mailgw.dkim.keys.loadKeys}),
    each key with its own settings; a domain with several keys gets one
    signature for each.

    @param now: the clock of the t= tag (seconds since the epoch).
    """

    def __init__(self, keys: Sequence[LoadedKey], now: Callable[[], float] = time.time) -> None:
        self.keys = tuple(keys)
        self.now = now
        self._byDomain: dict[str, list[LoadedKey]] = {}
        for key in self.keys:
            self._byDomain.setdefault(key.signing.domain, []).append(key)

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self._byDomain)

    def open(self, opener: Callable[[str], BinaryIO], queueId: str) -> BinaryIO:
        """
        Blocking: reads the whole message once to hash it. See
        L{IMessageSigner.open}.
        """
        file = opener(queueId)
        try:
            prefix = self.signatures(file, queueId)
            if not prefix:
                file.seek(0)
                return file
            file.seek(0)
        except BaseException:
            file.close()
            raise
        return SignedFile(prefix, file)  # type: ignore[return-value]

    def sign(self, message: bytes) -> bytes:
        """The signature fields for C{message} (b"" when it is not signed)."""
        import io

        return self.signatures(io.BytesIO(message), "-")

    def signatures(self, file: IO[bytes], queueId: str) -> bytes:
        """
        The DKIM-Signature fields for the message in C{file} (read from its
        start to its end, or only its header section when it is not
        signed), newest first; b"" when the message is not signed.
        """
        head, rest = _headerSection(file)
        if head is None:
            log.warn(
                "{queueId}: not DKIM-signed: the header section is longer than {limit} octets",
                queueId=queueId,
                limit=MAX_HEADER_SECTION,
            )
            return b""
        import dkim

        try:
            headers = dkim.DKIM(head + b"\r\n").headers
        except dkim.MessageFormatError:
            log.warn("{queueId}: not DKIM-signed: malformed header section", queueId=queueId)
            return b""
        domain = _fromDomain(headers)
        keys = self._byDomain.get(domain or "", [])
        if not keys:
            return b""
        hashes = _bodyHashes(file, rest, {k.signing.canonicalization for k in keys})
        fields = [_signature(key, headers, hashes, int(self.now())) for key in keys]
        return b"".join(reversed(fields))


def _headerSection(file: IO[bytes]) -> tuple[bytes | None, bytes]:
    """
    (the header section up to the CRLF that ends its last field, what was
    read after the empty line); (None, b"") when it is too long. A message
    without an empty line is all header.
    """
    data = b""
    while True:
        if data.startswith(b"\r\n"):
            return b"", data[2:]
        end = data.find(b"\r\n\r\n")
        if end >= 0 and end + 2 <= MAX_HEADER_SECTION:
            return data[: end + 2], data[end + 4 :]
        if end >= 0 or len(data) > MAX_HEADER_SECTION:
            return None, b""
        chunk = file.read(READ_CHUNK)
        if not chunk:
            return data, b""
        data += chunk


def _fromDomain(headers: list[Any]) -> str | None:
    """The one domain of the one From: field, lower case A-labels; else None."""
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) != 1:
        return None
    if len(values[0]) > MAX_FROM_FIELD:
        return None
    text = _CRLF.sub(b"", values[0]).decode("utf-8", "replace")
    try:
        parsed = email.utils.getaddresses([text])
    except Exception:  # deeply nested comments raise RecursionError
        return None
    addresses = [address for _, address in parsed if "@" in address]
    domains = set()
    for address in addresses:
        try:
            domains.add(signingDomain(address.rpartition("@")[2]))
        except ValueError:
            return None
    return domains.pop() if len(domains) == 1 else None


def _bodyHashes(file: IO[bytes], first: bytes, canonicalizations: set[str]) -> dict[bool, bytes]:
    """The body hash for each body canonicalization wanted (relaxed: True)."""
    kinds = {c.endswith("relaxed") for c in canonicalizations}
    hashers = {relaxed: BodyHasher(relaxed) for relaxed in kinds}
    chunk = first
    while chunk:
        for hasher in hashers.values():
            hasher.update(chunk)
        chunk = file.read(READ_CHUNK)
    return {relaxed: hasher.digest() for relaxed, hasher in hashers.items()}


def _signature(key: LoadedKey, headers: list[Any], hashes: dict[bool, bytes], now: int) -> bytes:
    """One DKIM-Signature field, folded, ending with CRLF (dkimpy computes b=)."""
    import dkim
    from dkim.canonicalization import CanonicalizationPolicy
    from dkim.crypto import HASH_ALGORITHMS

    signing = key.signing
    algorithm = signing.algorithm.encode("ascii")
    present = [name.lower() for name, _ in headers]
    chosen = {*signing.headers, *signing.oversign}
    include = [name for name in present if name.decode("ascii", "replace") in chosen]
    include += [name.encode("ascii") for name in signing.oversign]
    c = signing.canonicalization.encode("ascii")
    bodyHash = hashes[signing.canonicalization.endswith("relaxed")]
    fields = [
        (b"v", b"1"),
        (b"a", algorithm),
        (b"c", c),
        (b"d", signing.domain.encode("ascii")),
        (b"s", signing.selector.encode("ascii")),
        (b"t", str(now).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(bodyHash)),
        # b= on a line of its own, as dkimpy's own sign() does.
        (b"b", b"0" * 60),
    ]
    signer = dkim.DKIM(signature_algorithm=algorithm, linesep=b"\r\n")
    signer.headers = headers
    signer.hasher = HASH_ALGORITHMS[algorithm]
    policy = CanonicalizationPolicy.from_c_value(c)
    value: bytes = signer.gen_header(fields, include, policy, b"DKIM-Signature", key.private)
    return b"DKIM-Signature: " + value


def makeSigner(config: Any, source: str) -> MessageSigner | None:
    """
    The signer for C{config} (a L{mailgw.dkim.config.DKIMConfig}), its keys
    read now; None when no domain is configured.

    @raise ConfigError: a key cannot be used (file, key and problem).
    """
    if not config.domains:
        return None
    signer = MessageSigner(loadKeys(config, source))
    log.info(
        "DKIM signing for {signatures}",
        signatures=", ".join(f"{d.domain} (s={d.selector}, {d.algorithm})" for d in config.domains),
    )
    return signer

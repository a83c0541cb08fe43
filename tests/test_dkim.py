"""
Tests for L{mailgw.dkim}: the [dkim] settings, the keys, the signer (its
signatures verified by dkimpy against an in-process DNS answer), and the
relay's seam (signatures added as the relay reads the message, the stored
bytes sent byte for byte after them).
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailgw.config import ConfigError, RelayConfig, configFromDict
from mailgw.dkim.config import DEFAULT_HEADERS, DomainSigning
from mailgw.dkim.keys import KeyProblem, generateKey, loadKey, loadKeys
from mailgw.dkim.signer import MAX_HEADER_SECTION, MessageSigner, SignedFile, makeSigner
from mailgw.interfaces import IMessageSigner
from mailgw.relay.relay import Relay
from mailgw.relay.routing import StaticResolver
from tests.dkimhelp import makeKey, recordsOf, signatureCount, verifyAll, writeKey
from tests.test_relay import FAST, makeMessage, smart
from tests.upstream import startUpstream

MESSAGE = (
    b"Received: from client (client [192.0.2.9])\r\n\tby gw.example.com; Sun, 29 Nov 2026\r\n"
    b"From: Alice <alice@Example.ORG>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: a  test\r\n"
    b"\t folded\r\n"
    b"Date: Sun, 29 Nov 2026 23:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello,  \r\n"
    b".leading dot\r\n"
    b"\tindented\r\n"
    b"\r\n"
    b"\r\n"
)


def dkimConfig(*entries: dict[str, Any]) -> Any:
    return configFromDict({"dkim": {"domains": list(entries)}}, source="test.toml").dkim


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = writeKey(self.mktemp(), "k.key")

    def entry(self, **kw: Any) -> dict[str, Any]:
        return {"domain": "example.org", "selector": "sel", "key_file": self.key, **kw}

    def error(self, *entries: dict[str, Any]) -> ConfigError:
        return self.assertRaises(ConfigError, dkimConfig, *entries)

    def test_defaults(self) -> None:
        """Relaxed/relaxed, rsa-sha256, RFC 6376's list, From oversigned."""
        [entry] = dkimConfig(self.entry(domain="Example.ORG.")).domains
        self.assertEqual(
            entry,
            DomainSigning("example.org", "sel", self.key, "rsa-sha256", DEFAULT_HEADERS, ("from",)),
        )
        self.assertEqual(entry.canonicalization, "relaxed/relaxed")
        self.assertIn("list-unsubscribe-post", entry.headers)

    def test_none(self) -> None:
        self.assertEqual(configFromDict({}).dkim.domains, ())

    def test_idnDomain(self) -> None:
        [entry] = dkimConfig(self.entry(domain="B\u00fccher.example")).domains
        self.assertEqual(entry.domain, "xn--bcher-kva.example")

    def test_errorsNameFileAndKey(self) -> None:
        cases = [
            (self.entry(algorithm="rsa-sha1"), "dkim.domains[0].algorithm"),
            (self.entry(selector="bad selector"), "dkim.domains[0].selector"),
            (self.entry(domain="not a domain"), "dkim.domains[0].domain"),
            (self.entry(headers=["subject"]), "dkim.domains[0].headers"),
            (self.entry(headers=["from", "received"]), "dkim.domains[0].headers"),
            (self.entry(oversign=["bad:name"]), "dkim.domains[0].oversign"),
            (self.entry(canonicalization="relaxed"), "dkim.domains[0].canonicalization"),
            (self.entry(keyfile="x"), "dkim.domains[0].keyfile"),
            ({"domain": "example.org", "selector": "s"}, "dkim.domains[0].key_file"),
        ]
        for data, key in cases:
            error = self.error(data)
            self.assertEqual((error.source, error.key), ("test.toml", key), data)

    def test_sameSelectorTwice(self) -> None:
        error = self.error(self.entry(), self.entry(algorithm="ed25519-sha256"))
        self.assertEqual(error.key, "dkim.domains[1].selector")

    def test_notAnArray(self) -> None:
        self.assertRaises(ConfigError, configFromDict, {"dkim": {"domains": {"a": 1}}})
        self.assertRaises(ConfigError, configFromDict, {"dkim": {"domain": "example.org"}})


class KeyTests(SynchronousTestCase):
    def signing(self, path: str, algorithm: str = "rsa-sha256") -> DomainSigning:
        return DomainSigning("example.org", "sel", path, algorithm)

    def problem(self, path: str, algorithm: str = "rsa-sha256") -> str:
        return str(self.assertRaises(KeyProblem, loadKey, self.signing(path, algorithm)))

    def write(self, data: bytes, mode: int = 0o600) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def test_wrongType(self) -> None:
        rsa = writeKey(self.mktemp(), "rsa.key")
        ed = writeKey(self.mktemp(), "ed.key", "ed25519-sha256")
        self.assertIn(
            "is an RSA key, but algorithm is ed25519-sha256", self.problem(rsa, "ed25519-sha256")
        )
        self.assertIn("is an Ed25519 key, but algorithm is rsa-sha256", self.problem(ed))

    def test_unreadable(self) -> None:
        path = self.mktemp()
        self.assertIn(f"cannot read {path}: No such file", self.problem(path))
        os.mkdir(path)
        self.assertIn("not a regular file", self.problem(path))

    def test_notAKey(self) -> None:
        self.assertIn("not a private key", self.problem(self.write(b"hello\n")))
        pem = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        self.assertIn("not a PEM private key", self.problem(self.write(pem)))

    def test_openToOthers(self) -> None:
        path = writeKey(self.mktemp(), "k.key")
        os.chmod(path, 0o644)
        self.assertIn("open to others", self.problem(path))
        os.chmod(path, 0o640)  # a group of its own (e.g. _mailgw) may read it
        loadKey(self.signing(path))

    def test_smallRSA(self) -> None:
        """RFC 8301 3.2 (a 768-bit key made by openssl: cryptography makes none that small)."""
        fixture = os.path.join(os.path.dirname(__file__), "fixtures", "dkim-rsa768.key")
        with open(fixture, "rb") as f:
            self.assertIn("768-bit RSA key", self.problem(self.write(f.read())))

    def test_encrypted(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        self.assertIn("is encrypted", self.problem(self.write(pem), "ed25519-sha256"))

    def test_formats(self) -> None:
        """PKCS#1 and PKCS#8 PEM, and dknewkey's base64 Ed25519 seed, all load."""
        from cryptography.hazmat.primitives import serialization

        pem, record = generateKey("rsa-sha256", 1024)
        key = serialization.load_pem_private_key(pem, None)
        pkcs8 = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.assertEqual(loadKey(self.signing(self.write(pkcs8))).record, record)
        seed = os.urandom(32)
        import base64

        loaded = loadKey(self.signing(self.write(base64.b64encode(seed) + b"\n"), "ed25519-sha256"))
        self.assertTrue(loaded.record.startswith("v=DKIM1; k=ed25519; p="))

    def test_configErrorNamesFileKeyAndProblem(self) -> None:
        good = writeKey(self.mktemp(), "good.key")
        config = dkimConfig(
            {"domain": "example.org", "selector": "a", "key_file": good},
            {"domain": "example.org", "selector": "b", "key_file": "/nonexistent/k.key"},
        )
        error = self.assertRaises(ConfigError, loadKeys, config, "test.toml")
        self.assertEqual(error.key, "dkim.domains[1].key_file")
        self.assertIn("/nonexistent/k.key", error.problem)
        self.assertIsNone(makeSigner(dkimConfig(), "test.toml"))


class SignerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.rsa = makeKey(self.directory, selector="rsa")
        self.ed = makeKey(self.directory, selector="ed", algorithm="ed25519-sha256")
        self.records = recordsOf([self.rsa, self.ed])

    def signed(self, signer: MessageSigner, message: bytes = MESSAGE) -> bytes:
        return signer.sign(message) + message

    def test_verifyObject(self) -> None:
        self.assertTrue(verifyObject(IMessageSigner, MessageSigner([self.rsa])))

    def test_rsaAndEd25519Verify(self) -> None:
        """One signature per key, each verified by dkimpy."""
        for keys in ([self.rsa], [self.ed], [self.rsa, self.ed]):
            signed = self.signed(MessageSigner(keys))
            self.assertEqual(verifyAll(signed, self.records), [True] * len(keys), keys)
            self.assertTrue(signed.endswith(MESSAGE))

    def test_fields(self) -> None:
        signature = MessageSigner([self.rsa], now=lambda: 1700000000.5).sign(MESSAGE)
        unfolded = signature.replace(b"\r\n ", b" ").decode()
        self.assertTrue(signature.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"))
        self.assertTrue(signature.endswith(b"\r\n"))
        for tag in ("c=relaxed/relaxed;", "d=example.org;", "s=rsa;", "t=1700000000;"):
            self.assertIn(tag, unfolded)
        # Every instance of a listed field, From once more (oversigned);
        # Received is never signed.
        self.assertIn("h=from : to : subject : date : message-id : from;", unfolded)

    def test_simpleCanonicalization(self) -> None:
        key = makeKey(self.directory, selector="simple", canonicalization="simple/simple")
        signed = self.signed(MessageSigner([key]))
        self.assertEqual(verifyAll(signed, recordsOf([key])), [True])
        self.assertIn(b"c=simple/simple", signed)

    def test_otherDomainNotSigned(self) -> None:
        signer = MessageSigner([self.rsa])
        for message in (
            MESSAGE.replace(b"alice@Example.ORG", b"alice@example.com"),
            MESSAGE.replace(b"alice@Example.ORG", b"alice@sub.example.org"),
            MESSAGE.replace(b"From: Alice <alice@Example.ORG>\r\n", b""),
            MESSAGE.replace(b"From:", b"From: a@example.org\r\nFrom:"),
            MESSAGE.replace(b"<alice@Example.ORG>", b"<alice@example.org>, eve@evil.test"),
            MESSAGE.replace(b"\r\n\r\n", b"\r\nnot a header\r\n\r\n", 1),
            MESSAGE.replace(b"Alice <", b"(" * 5000 + b"Alice <"),  # parser's RecursionError
            MESSAGE.replace(b"Alice <", b"x" * (64 * 1024) + b" <"),
        ):
            self.assertEqual(signer.sign(message), b"", message)

    def test_severalAddressesOneDomain(self) -> None:
        message = MESSAGE.replace(b"<alice@Example.ORG>", b"<alice@example.org>, carol@example.org")
        self.assertEqual(
            verifyAll(self.signed(MessageSigner([self.rsa]), message), self.records), [True]
        )

    def test_oversignedFromStopsAnAddedFrom(self) -> None:
        """
        A From: added above the signed one fails verification (h= names
        From once more than there are); so does a Subject: when Subject is
        oversigned, and it verifies when it is not (what oversigning prevents).
        """
        cases = [
            (("from",), b"From: Mallory <mallory@example.org>\r\n", False),
            (("from", "subject"), b"Subject: buy now\r\n", False),
            (("from",), b"Subject: buy now\r\n", True),
        ]
        for oversign, added, verifies in cases:
            key = makeKey(self.directory, selector="o", oversign=oversign)
            signature = MessageSigner([key]).sign(MESSAGE)
            unfolded = signature.replace(b"\r\n ", b" ")
            for name in oversign:
                # one more than the message has (one of each here)
                self.assertEqual(
                    unfolded.count(name.encode() + b" :")
                    + unfolded.count(b": " + name.encode() + b";"),
                    2,
                )
            self.assertEqual(verifyAll(signature + MESSAGE, recordsOf([key])), [True])
            tampered = signature + added + MESSAGE
            self.assertEqual(verifyAll(tampered, recordsOf([key])), [verifies], (oversign, added))

    def test_modifiedAfterSigning(self) -> None:
        signed = self.signed(MessageSigner([self.rsa, self.ed]))
        for before, after in (
            (b"Hello,", b"Hallo,"),  # the body
            (b"Subject: a  test", b"Subject: b  test"),  # a signed field
            (b"bob@example.net", b"eve@example.net"),
        ):
            tampered = signed.replace(before, after)
            self.assertEqual(verifyAll(tampered, self.records), [False, False], before)
        # What relaxed canonicalization forgives still verifies.
        relaxed = signed.replace(b"Hello,  \r\n", b"Hello,\r\n").replace(b"a  test", b"a test")
        self.assertEqual(verifyAll(relaxed, self.records), [True, True])

    def test_bigBodyHashedInChunks(self) -> None:
        body = b"".join(b"line %d \t with  spaces \r\n" % i for i in range(20000))
        message = MESSAGE + body
        self.assertGreater(len(message), 4 * 64 * 1024)
        signed = self.signed(MessageSigner([self.rsa, self.ed]), message)
        self.assertEqual(verifyAll(signed, self.records), [True, True])

    def test_headerSectionTooLong(self) -> None:
        big = b"X-Filler: " + b"x" * 998 + b"\r\n"
        message = MESSAGE.replace(
            b"\r\n\r\n", b"\r\n" + big * (MAX_HEADER_SECTION // len(big) + 1) + b"\r\n", 1
        )
        self.assertEqual(MessageSigner([self.rsa]).sign(message), b"")

    def test_openPrependsAndKeepsBytes(self) -> None:
        """open() gives the signatures, then the stored bytes as they are."""
        signer = MessageSigner([self.rsa])
        opened: list[io.BytesIO] = []

        def opener(queueId: str) -> io.BytesIO:
            opened.append(io.BytesIO(MESSAGE))
            return opened[-1]

        file = signer.open(opener, "Q1")
        data = file.read(7) + file.read(100000) + file.read(10)
        file.close()
        self.assertTrue(opened[0].closed)
        self.assertEqual(signatureCount(data), 1)
        self.assertTrue(data.endswith(MESSAGE))
        self.assertEqual(verifyAll(data, self.records), [True])
        # Not signed: the opener's own file, at its start.
        plain = signer.open(lambda q: io.BytesIO(MESSAGE.replace(b"Example.ORG", b"x.test")), "Q2")
        self.assertNotIsInstance(plain, SignedFile)
        self.assertEqual(plain.read(), MESSAGE.replace(b"Example.ORG", b"x.test"))

    def test_signedFileFullReads(self) -> None:
        """read(n) is n octets until the end, across the prefix's end (the relay's EOF test)."""
        for prefix in (b"", b"P" * 5, b"P" * 10):
            file = SignedFile(prefix, io.BytesIO(b"0123456789"))
            chunks = []
            while chunk := file.read(4):
                chunks.append(chunk)
            self.assertTrue(all(len(c) == 4 for c in chunks[:-1]))
            self.assertEqual(b"".join(chunks), prefix + b"0123456789")


class RelayTests(TestCase):
    """The relay's seam: what a real upstream on 127.0.0.1 receives."""

    timeout = 20

    @inlineCallbacks
    def deliver(self, body: bytes, signer: Any) -> Any:
        upstream = yield startUpstream(reactor)
        self.addCleanup(upstream.stop)
        relay = Relay(
            reactor,
            RelayConfig(default=smart("up")),
            StaticResolver(),
            "gw.example.com",
            lambda queueId: io.BytesIO(body),
            timeouts=FAST,
            endpointFactory=lambda d, t: TCP4ClientEndpoint(
                reactor, "127.0.0.1", upstream.portNumber, timeout=t
            ),
            signer=signer,
        )
        [result] = yield relay.deliver(makeMessage())
        return result, upstream.transactions

    @inlineCallbacks
    def test_signedByteForByte(self) -> Any:
        """Signature fields, then the stored bytes unchanged; a body over one read chunk."""
        directory = self.mktemp()
        keys = [
            makeKey(directory, selector="r"),
            makeKey(directory, selector="e", algorithm="ed25519-sha256"),
        ]
        body = MESSAGE + b".dots\r\n..\r\n" + b"y" * 900 + b"\r\n" * 100 + b"z" * 70000 + b"\r\n"
        result, [received] = yield self.deliver(body, MessageSigner(keys))
        self.assertTrue(result.success, result)
        self.assertEqual(signatureCount(received.data), 2)
        self.assertEqual(received.data[-len(body) :], body)
        self.assertEqual(verifyAll(received.data, recordsOf(keys)), [True, True])

    @inlineCallbacks
    def test_noSigner(self) -> Any:
        result, [received] = yield self.deliver(MESSAGE, None)
        self.assertEqual(received.data, MESSAGE)

    @inlineCallbacks
    def test_signerFailureIsTransient(self) -> Any:
        class Broken:
            def open(self, opener: Any, queueId: str) -> Any:
                raise OSError("signing failed")

        result, received = yield self.deliver(MESSAGE, Broken())
        self.assertFalse(result.success or result.permanent, result)
        self.assertEqual(received, [])
        self.flushLoggedErrors()


class DocumentedTests(SynchronousTestCase):
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def test_exampleAndReference(self) -> None:
        """etc/mailgw.toml's commented [[dkim.domains]], uncommented, is every default;
        docs/configuration.md documents every key."""
        import tomllib

        with open(os.path.join(self.ROOT, "etc", "mailgw.toml"), encoding="utf-8") as f:
            lines = f.read().split("# [[dkim.domains]]\n", 1)[1].splitlines()
        text = "[[dkim.domains]]\n" + "\n".join(x[2:] for x in lines if x.startswith("# "))
        [entry] = dkimConfig(tomllib.loads(text)["dkim"]["domains"][0]).domains
        self.assertEqual(entry, DomainSigning("example.org", "mail2026", entry.keyFile))
        with open(os.path.join(self.ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
            reference = f.read()
        for key in tomllib.loads(text)["dkim"]["domains"][0]:
            self.assertIn(f"| `{key}` |", reference)

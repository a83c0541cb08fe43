"""
Tests for L{mailgw.tls}.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailgw import tls


def _selfSigned(case: unittest.SynchronousTestCase, hostname: str = "mail.example.org"):
    base = case.mktemp()
    os.mkdir(base)
    cert, key = os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")
    case.assertTrue(tls.makeSelfSigned(cert, key, hostname))
    return cert, key


def _caAndLeaf(base: str) -> tuple[str, str, str]:
    """A CA, a leaf for 'localhost' signed by it; returns (chain, key, ca) paths."""
    now = datetime.datetime.now(datetime.UTC)

    def build(subject, issuer, publicKey, signer, ca):
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(publicKey)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
            .sign(signer, hashes.SHA256())
        )

    caKey = ec.generate_private_key(ec.SECP256R1())
    leafKey = ec.generate_private_key(ec.SECP256R1())
    caCert = build("test-ca", "test-ca", caKey.public_key(), caKey, True)
    leafCert = build("localhost", "test-ca", leafKey.public_key(), caKey, False)
    pem = serialization.Encoding.PEM
    os.mkdir(base)
    paths = [os.path.join(base, n) for n in ("chain.pem", "key.pem", "ca.pem")]
    with open(paths[0], "wb") as f:
        f.write(leafCert.public_bytes(pem) + caCert.public_bytes(pem))
    with open(paths[1], "wb") as f:
        f.write(
            leafKey.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with open(paths[2], "wb") as f:
        f.write(caCert.public_bytes(pem))
    return paths[0], paths[1], paths[2]


class SelfSignedTests(unittest.SynchronousTestCase):
    def test_createsCertificateAndPrivateKey(self) -> None:
        cert, key = _selfSigned(self)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        [certificate] = tls.loadCertificates(cert)
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["mail.example.org", "localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("127.0.0.1")]
        )
        self.assertIsInstance(certificate.public_key(), ec.EllipticCurvePublicKey)
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        self.assertAlmostEqual(lifetime.days, 825, delta=1)

    def test_neverOverwrites(self) -> None:
        cert, key = _selfSigned(self)
        before = [open(p, "rb").read() for p in (cert, key)]
        self.assertFalse(tls.makeSelfSigned(cert, key, "other.example.org"))
        self.assertEqual([open(p, "rb").read() for p in (cert, key)], before)

    def test_onlyOneFileExists(self) -> None:
        cert, key = _selfSigned(self)
        os.unlink(key)
        e = self.assertRaises(tls.TLSConfigError, tls.makeSelfSigned, cert, key, "x.example")
        self.assertEqual(e.path, key)
        self.assertFalse(os.path.exists(key))

    def test_ipAddressHostname(self) -> None:
        cert, _ = _selfSigned(self, hostname="192.0.2.7")
        [certificate] = tls.loadCertificates(cert)
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn(ipaddress.ip_address("192.0.2.7"), san.get_values_for_type(x509.IPAddress))


class ServerContextTests(unittest.SynchronousTestCase):
    def test_loadsSelfSigned(self) -> None:
        cert, key = _selfSigned(self)
        options = tls.serverContextFactory(cert, key)
        self.assertIsInstance(options.getContext(), SSL.Context)
        self.assertEqual(options.extraCertChain, [])

    def test_chainFollowsLeaf(self) -> None:
        chain, key, _ = _caAndLeaf(self.mktemp())
        options = tls.serverContextFactory(chain, key)
        self.assertEqual(options.certificate.get_subject().CN, "localhost")
        self.assertEqual([c.get_subject().CN for c in options.extraCertChain], ["test-ca"])

    def test_keyAndCertificateInOneFile(self) -> None:
        cert, key = _selfSigned(self)
        both = self.mktemp()
        with open(both, "wb") as f:
            f.write(open(key, "rb").read() + open(cert, "rb").read())
        tls.serverContextFactory(both, both).getContext()

    def test_mismatchedKey(self) -> None:
        cert, _ = _selfSigned(self)
        _, otherKey = _selfSigned(self)
        e = self.assertRaises(tls.TLSConfigError, tls.serverContextFactory, cert, otherKey)
        self.assertEqual(e.path, otherKey)
        self.assertIn("does not match", e.problem)

    def test_missingFiles(self) -> None:
        cert, key = _selfSigned(self)
        missing = self.mktemp()
        e = self.assertRaises(tls.TLSConfigError, tls.serverContextFactory, missing, key)
        self.assertEqual(str(e), f"{missing}: no such file")
        e = self.assertRaises(tls.TLSConfigError, tls.serverContextFactory, cert, missing)
        self.assertEqual(e.path, missing)

    def test_notPEM(self) -> None:
        cert, key = _selfSigned(self)
        junk = self.mktemp()
        with open(junk, "w") as f:
            f.write("hello\n")
        e = self.assertRaises(tls.TLSConfigError, tls.serverContextFactory, junk, key)
        self.assertIn("no PEM certificate", e.problem)
        e = self.assertRaises(tls.TLSConfigError, tls.serverContextFactory, cert, cert)
        self.assertIn("no PEM private key", e.problem)

    def test_encryptedKey(self) -> None:
        cert, key = _selfSigned(self)
        loaded = tls.loadPrivateKey(key)
        encrypted = self.mktemp()
        with open(encrypted, "wb") as f:
            f.write(
                loaded.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"secret"),
                )
            )
        e = self.assertRaises(tls.TLSConfigError, tls.serverContextFactory, cert, encrypted)
        self.assertIn("encrypted", e.problem)

    def test_unreadable(self) -> None:
        if os.geteuid() == 0:
            raise unittest.SkipTest("root reads every file")
        cert, key = _selfSigned(self)
        os.chmod(key, 0)
        e = self.assertRaises(tls.TLSConfigError, tls.serverContextFactory, cert, key)
        self.assertIn("permission denied", e.problem)

    def test_directory(self) -> None:
        cert, key = _selfSigned(self)
        e = self.assertRaises(
            tls.TLSConfigError, tls.serverContextFactory, cert, os.path.dirname(key)
        )
        self.assertIn("is a directory", e.problem)

    def test_badMinimumVersion(self) -> None:
        cert, key = _selfSigned(self)
        self.assertRaises(ValueError, tls.serverContextFactory, cert, key, "TLSv1.1")


def _handshake(serverContext: SSL.Context, clientContext: SSL.Context) -> SSL.Connection:
    """
    Run a TLS handshake in memory; return the server side, or raise the
    first SSL.Error either side raises.
    """
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    done = {server: False, client: False}
    for _ in range(20):
        for this, peer in ((client, server), (server, client)):
            if not done[this]:
                try:
                    this.do_handshake()
                    done[this] = True
                except SSL.WantReadError:
                    pass
            try:
                peer.bio_write(this.bio_read(65536))
            except SSL.WantReadError:
                pass
        if all(done.values()):
            return server
    raise AssertionError("handshake did not finish")


def _clientContext(version: int, maximum: int | None = None) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(maximum or version)
    # Let this OpenSSL offer old protocol versions, which its default
    # security level may forbid; the server must do the refusing.
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    return context


class ProtocolVersionTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.cert, self.key = _selfSigned(self)

    def test_tls12Accepted(self) -> None:
        server = _handshake(
            tls.serverContextFactory(self.cert, self.key).getContext(),
            _clientContext(SSL.TLS1_2_VERSION),
        )
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.2")

    def test_tls11Refused(self) -> None:
        # First show this OpenSSL can do TLS 1.1 at all, with a server that
        # allows it; otherwise a refusal would prove nothing.
        permissive = SSL.Context(SSL.TLS_METHOD)
        permissive.use_certificate_file(self.cert)
        permissive.use_privatekey_file(self.key)
        permissive.set_min_proto_version(SSL.TLS1_1_VERSION)
        permissive.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        try:
            _handshake(permissive, _clientContext(SSL.TLS1_1_VERSION))
        except SSL.Error as e:
            raise unittest.SkipTest(f"this OpenSSL cannot do TLS 1.1: {e}") from None
        serverContext = tls.serverContextFactory(self.cert, self.key).getContext()
        e = self.assertRaises(
            SSL.Error, _handshake, serverContext, _clientContext(SSL.TLS1_1_VERSION)
        )
        self.assertRegex(str(e).lower(), "protocol|version")

    def test_minimumTLS13(self) -> None:
        context = tls.serverContextFactory(self.cert, self.key, "TLSv1.3").getContext()
        self.assertRaises(SSL.Error, _handshake, context, _clientContext(SSL.TLS1_2_VERSION))
        server = _handshake(context, _clientContext(SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION))
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.3")


class ClientCreatorTests(unittest.SynchronousTestCase):
    def test_interface(self) -> None:
        cert, _ = _selfSigned(self)
        for creator in (tls.clientCreator("localhost"), tls.clientCreator("localhost", cert)):
            verifyObject(IOpenSSLClientConnectionCreator, creator)

    def test_missingCAFile(self) -> None:
        missing = self.mktemp()
        e = self.assertRaises(tls.TLSConfigError, tls.clientCreator, "localhost", missing)
        self.assertEqual(e.path, missing)


class DescribeTLSTests(unittest.SynchronousTestCase):
    def test_noTLS(self) -> None:
        self.assertEqual(tls.describeTLS(StringTransport()), (None, None))
        self.assertEqual(tls.describeTLS(object()), (None, None))

    def test_beforeHandshake(self) -> None:
        cert, key = _selfSigned(self)
        connection = SSL.Connection(tls.serverContextFactory(cert, key).getContext(), None)

        class Transport:
            def getHandle(self) -> SSL.Connection:
                return connection

        self.assertEqual(tls.describeTLS(Transport()), (None, None))


@implementer(IHandshakeListener)
class _Recorder(protocol.Protocol):
    """Records describeTLS after the handshake, then sends a greeting."""

    def __init__(self, startTLS=None) -> None:
        self.startTLSWith = startTLS
        self.handshook: defer.Deferred[tuple[str | None, str | None]] = defer.Deferred()
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.startTLSWith is not None:
            self.transport.startTLS(self.startTLSWith)

    def handshakeCompleted(self) -> None:
        self.handshook.callback(tls.describeTLS(self.transport))
        self.transport.write(b"hello")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)
        if not self.handshook.called:
            self.handshook.errback(reason)


class LoopbackTests(unittest.TestCase):
    """Real handshakes over 127.0.0.1."""

    def setUp(self) -> None:
        self.cert, self.key = _selfSigned(self)
        self.serverProtocols: list[_Recorder] = []
        self.addCleanup(self._serversClosed)

    def _serversClosed(self):
        for p in self.serverProtocols:
            p.handshook.addErrback(lambda failure: None)
        return defer.gatherResults([p.lost for p in self.serverProtocols])

    @defer.inlineCallbacks
    def _listen(self, startTLS: bool):
        context = tls.serverContextFactory(self.cert, self.key)

        def build(addr):
            p = _Recorder(context if startTLS else None)
            self.serverProtocols.append(p)
            return p

        factory = protocol.Factory.forProtocol(_Recorder)
        factory.buildProtocol = build
        if not startTLS:
            factory = TLSMemoryBIOFactory(context, False, factory)
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def _connect(self, portNumber, creator, startTLS: bool):
        client = _Recorder(creator if startTLS else None)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", portNumber)
        if not startTLS:
            endpoint = endpoints.wrapClientTLS(creator, endpoint)
        yield endpoints.connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.lost)
        result = yield client.handshook
        return client, result

    @defer.inlineCallbacks
    def _roundTrip(self, startTLS: bool):
        portNumber = yield self._listen(startTLS)
        creator = tls.clientCreator("localhost", caFile=self.cert)
        client, (version, cipher) = yield self._connect(portNumber, creator, startTLS)
        serverVersion, serverCipher = yield self.serverProtocols[0].handshook
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(cipher)
        self.assertEqual((serverVersion, serverCipher), (version, cipher))
        yield client.lost
        self.assertEqual(client.received, b"hello")

    def test_implicitTLS(self):
        return self._roundTrip(startTLS=False)

    def test_startTLS(self):
        return self._roundTrip(startTLS=True)

    @defer.inlineCallbacks
    def test_untrustedCertificateRefused(self):
        portNumber = yield self._listen(startTLS=False)
        otherCert, _ = _selfSigned(self)
        creator = tls.clientCreator("localhost", caFile=otherCert)
        yield self.assertFailure(self._connect(portNumber, creator, False), SSL.Error)

    @defer.inlineCallbacks
    def test_wrongNameRefused(self):
        portNumber = yield self._listen(startTLS=False)
        creator = tls.clientCreator("other.example.net", caFile=self.cert)
        yield self.assertFailure(self._connect(portNumber, creator, False), VerificationError)

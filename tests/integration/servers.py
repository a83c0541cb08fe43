"""
Throwaway PostgreSQL and OpenLDAP servers from Debian's packages for the
auth backend tests: each in its own temporary directory, on 127.0.0.1 and a
free port, stopped by its own pid (never the machine's own services).
``SkipTest`` names the missing package when the binaries are absent.
"""

from __future__ import annotations

import atexit
import datetime
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SkipTest

from tests.integration.support import freePort


def _which(name: str, patterns: list[str]) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(p for pattern in patterns for p in glob.glob(pattern))
    return candidates[-1] if candidates else None


def _waitForPort(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} does not listen on {port}:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class PostgreSQLServer:
    """
    A cluster made with ``initdb`` in a temporary directory, run by
    ``postgres`` itself (as the ``postgres`` user when we are root, since
    PostgreSQL refuses to run as root). ``superuserDSN`` connects as the
    superuser over TCP with ``password``.
    """

    password = "cluster secret"

    def __init__(self) -> None:
        initdb = _which("initdb", ["/usr/lib/postgresql/*/bin/initdb"])
        if initdb is None:
            raise SkipTest("PostgreSQL is not installed (Debian package postgresql)")
        self.bin = Path(initdb).resolve().parent
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise SkipTest(
                    "running as root and there is no postgres user to run PostgreSQL"
                ) from None
            self.user = "postgres"
        self.directory = Path(tempfile.mkdtemp(prefix="mailgw-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.port = freePort()
        self.process: subprocess.Popen[bytes] | None = None
        pwfile = self.directory / "pw"
        pwfile.write_text(self.password + "\n")
        if self.user is not None:
            shutil.chown(self.directory, self.user)
            shutil.chown(pwfile, self.user)
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--no-sync",
             "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
             "-E", "UTF8", "--locale=C"],
            check=True, capture_output=True, user=self.user, timeout=120,
        )  # fmt: skip
        # A backstop for a test whose clean-ups never ran (a timed-out one).
        atexit.register(self.close)
        self.start()

    @property
    def superuserDSN(self) -> str:
        return (
            f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres"
            f" password='{self.password}'"
        )

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1",
                 "-p", str(self.port), "-k", str(self.directory), "-F",
                 "-c", "max_connections=20", "-c", "shared_buffers=16MB"],
                stdout=log, stderr=subprocess.STDOUT, user=self.user,
            )  # fmt: skip
        _waitForPort(self.port, self.process, "postgres", self.log)
        self._waitReady()

    def _waitReady(self) -> None:
        """
        The port opens before the server takes sessions ("the database
        system is starting up"): wait until one is taken, on a busy machine
        too.
        """
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.superuserDSN, connect_timeout=2).close()
                return
            except psycopg.OperationalError as e:
                process = self.process
                if time.monotonic() > deadline or (process and process.poll() is not None):
                    log = self.log.read_text()
                    raise AssertionError(f"postgres takes no sessions: {e}\n{log}") from e
                time.sleep(0.1)

    def stop(self) -> None:
        _stop(self.process, signal.SIGINT)  # "fast" shutdown: ends the sessions too

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def sql(self, *statements: str, dbname: str = "postgres") -> None:
        import psycopg

        dsn = self.superuserDSN.replace("dbname=postgres", f"dbname={dbname}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.encode())


def makeCA(directory: Path, hostname: str = "localhost", ip: bool = True) -> dict[str, str]:
    """
    A CA certificate and a server certificate it signed, for ``hostname``
    (and, with ``ip``, 127.0.0.1).
    """
    now = datetime.datetime.now(datetime.UTC)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailgw test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(caName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname)]
                + ([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if ip else [])
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(caKey, hashes.SHA256())
    )
    paths = {n: str(directory / f"{n}.pem") for n in ("ca", "cert", "key")}
    Path(paths["ca"]).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    Path(paths["cert"]).write_bytes(server.public_bytes(serialization.Encoding.PEM))
    Path(paths["key"]).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class LDAPServer:
    """
    OpenLDAP's ``slapd`` with a slapd.conf of its own (back-mdb, suffix
    ``dc=example,dc=org``), loaded offline with ``slapadd`` from ``ldif``,
    listening with StartTLS (a generated CA) on ldap://127.0.0.1:port and
    ldaps://127.0.0.1:tlsPort.
    """

    suffix = "dc=example,dc=org"
    rootDN = "cn=admin,dc=example,dc=org"
    rootPassword = "root secret"

    def __init__(
        self, ldif: str, unauthenticatedBinds: bool = True, certificateName: str = "localhost"
    ) -> None:
        slapd = _which("slapd", ["/usr/sbin/slapd"])
        if slapd is None or not os.path.exists("/etc/ldap/schema/core.schema"):
            raise SkipTest("OpenLDAP is not installed (Debian packages slapd and ldap-utils)")
        slapadd = _which("slapadd", ["/usr/sbin/slapadd"])
        if slapadd is None:
            raise SkipTest("slapadd is not installed (Debian package slapd)")
        self.slapd = slapd
        self.directory = Path(tempfile.mkdtemp(prefix="mailgw-ldap-"))
        (self.directory / "db").mkdir()
        self.tls = makeCA(self.directory, certificateName, ip=certificateName == "localhost")
        self.port, self.tlsPort = freePort(), freePort()
        self.log = self.directory / "slapd.log"
        self.conf = self.directory / "slapd.conf"
        modules = "/usr/lib/ldap"
        schemas = "\n".join(
            f"include /etc/ldap/schema/{name}.schema"
            for name in ("core", "cosine", "inetorgperson", "nis")
        )
        # "allow bind_anon_dn": accept a DN without a password as an
        # unauthenticated bind, as some directories do: the hole the
        # backend must close itself.
        allow = "allow bind_anon_dn" if unauthenticatedBinds else ""
        self.conf.write_text(
            f"""{schemas}
{allow}
modulepath {modules}
moduleload back_mdb
pidfile {self.directory}/slapd.pid
argsfile {self.directory}/slapd.args
TLSCACertificateFile {self.tls["ca"]}
TLSCertificateFile {self.tls["cert"]}
TLSCertificateKeyFile {self.tls["key"]}
database mdb
maxsize 33554432
suffix "{self.suffix}"
rootdn "{self.rootDN}"
rootpw "{self.rootPassword}"
directory {self.directory}/db
access to attrs=userPassword
    by anonymous auth
    by self write
    by * none
access to * by users read by * none
"""
        )
        (self.directory / "data.ldif").write_text(ldif)
        subprocess.run(
            [slapadd, "-f", str(self.conf), "-l", str(self.directory / "data.ldif")],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)  # a backstop, as for PostgreSQLServer
        self.start()

    def start(self) -> None:
        urls = f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tlsPort}/"
        with open(self.log, "ab") as log:
            # -d 0: stay in the foreground (so the pid is slapd's), log nothing.
            self.process = subprocess.Popen(
                [self.slapd, "-f", str(self.conf), "-h", urls, "-d", "0"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _waitForPort(self.port, self.process, "slapd", self.log)
        _waitForPort(self.tlsPort, self.process, "slapd", self.log)

    def stop(self) -> None:
        _stop(self.process)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def closeLater(testCase: Any, server: PostgreSQLServer | LDAPServer) -> None:
    testCase.addCleanup(server.close)

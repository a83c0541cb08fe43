"""
Stored hash formats (mailgw.auth.hashes, mailgw.auth.shacrypt), checked
against values made by the reference tools: the SHA-crypt specification's
own vectors, OpenSSL's ``passwd``, ``mkpasswd`` (whois), Dovecot's
``doveadm pw`` and the ``bcrypt`` library; and, where those tools are
installed, against fresh values they make now.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import subprocess

import bcrypt
from twisted.trial.unittest import SkipTest, TestCase

from mailgw.auth.hashes import HashFormatError, hashScheme, verifyStored
from mailgw.auth.shacrypt import ShaCryptError, shaCrypt, verifyShaCrypt
from tests.integration.support import haveCommand

# (stored value, password), made by the tool named in the comment.
VECTORS = [
    # The specification's examples ("Unix crypt using SHA-256 and SHA-512").
    ("$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5", "Hello world!"),
    (
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdc"
        "bYEdFCoEOfaS35inz1",
        "Hello world!",
    ),
    # mkpasswd -m sha-512 -R 10000 'Hello world!' saltstringsaltst
    (
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/Urjm"
        "M0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
        "Hello world!",
    ),
    # mkpasswd -m sha-256 -R 2000 'pässword 1' abcdefghABCDEFGH
    ("$5$rounds=2000$abcdefghABCDEFGH$lwIJh6sTnfhKCK/cXnQOtCHo241Tdf9u5cxRzd3PED0", "pässword 1"),
    # doveadm pw -s SCHEME -p 'pässword 1'
    (
        "{SHA512-CRYPT}$6$/vz.v1oY6XKBCmmm$SopKNojxverAwhUH/fIyd5DhMHPJIkXsWd0Vq1dIb7dLTtRok"
        "H2xXwuWYGJQFbATxrDm77ToSW6.AhnHb8D0r/",
        "pässword 1",
    ),
    ("{SHA256-CRYPT}$5$VliAvX1j3pDygYt9$Q8H0DCB9x8ttmwpqIE5srZem5w7Xr2./jqBx7IrBY6/", "pässword 1"),
    (
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$bkZ0Ch0BK3XUC5sZJ6vMWw$5TYYGKtY3xNvb4T19W"
        "PNai5gVTJ7B9+K0yH/HJljDB8",
        "pässword 1",
    ),
    (
        "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$AEpeYeQVqfP6brqN3VAbhA$o+itkJweqDxxRn5ia/PV"
        "VHjgfX7C/EydYOkAMfQLDOw",
        "pässword 1",
    ),
    ("{BLF-CRYPT}$2y$05$io3VrIygPjnU4obvPw25eeQ6taDDCizbr2n3Pr7HjolEbj6CYSzLq", "pässword 1"),
    ("{CRYPT}$2y$05$qQL7pzy7HsZuv5dDlfcEaehapkxEh11WDRSWmX80m3cY7IsZvHbsm", "x"),
    (
        "{SSHA512}SnML9pwztSEAT7VdpRDFv8o4XzQRGxJdpkm7rhJPpbFB2RPNlRB/SMIwu6vq0EoHpBiG+dtIFKXr"
        "RZRQjcdl9rDAk0Y=",
        "pässword 1",
    ),
    ("{SSHA256}ZH6u/9IIgg4+yq99B7TIAU7iEmfnziWCddqizdtjuVlVO9ra", "pässword 1"),
    # openssl passwd -6 -salt saltstring 'Hello world!', bare and as {CRYPT}
    (
        "{CRYPT}$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLi"
        "BFdcbYEdFCoEOfaS35inz1",
        "Hello world!",
    ),
]


class VectorTests(TestCase):
    def test_vectors(self) -> None:
        """Each tool's value verifies with its password and with no other."""
        for stored, password in VECTORS:
            with self.subTest(stored=stored[:20]):
                self.assertTrue(verifyStored(stored, password.encode("utf-8")))
                self.assertFalse(verifyStored(stored, password.encode("utf-8") + b"x"))
                self.assertFalse(verifyStored(stored, password.upper().encode("utf-8")))

    def test_bcrypt(self) -> None:
        """The bcrypt library's $2b$ hashes, and its 72-byte limit kept as C does."""
        stored = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
        self.assertTrue(verifyStored(stored, b"secret"))
        self.assertFalse(verifyStored(stored, b"Secret"))
        long = b"a" * 72
        stored = bcrypt.hashpw(long, bcrypt.gensalt(4)).decode()
        self.assertTrue(verifyStored(stored, long + b"ignored, as crypt_blowfish does"))

    def test_shaCryptSpecRounds(self) -> None:
        """Rounds below 1000 are clamped (the specification); salt cut at 16."""
        # mkpasswd -m sha-256 -R 1000 'This is just a test' roundstoolow
        self.assertEqual(
            shaCrypt(b"This is just a test", "roundstoolow", 10, sha512=False),
            "$5$rounds=1000$roundstoolow$sNem/vUW2kw2NlR66SxQ3VpxErxIi/LoTfPKSmol2tD",
        )
        self.assertEqual(
            shaCrypt(b"Hello world!", "saltstringsaltstring", 10000, sha512=True),
            "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/Urjm"
            "M0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
        )

    def test_shaCryptMalformed(self) -> None:
        for bad in ["$6$salt", "$6$salt$short", "$7$salt$" + "a" * 86, "$5$s$" + "a" * 86]:
            self.assertRaises(ShaCryptError, verifyShaCrypt, bad, b"x")


class SchemeTests(TestCase):
    def test_plainRefusedByDefault(self) -> None:
        """A stored clear-text password is a database problem unless allowed."""
        for prefix in ("{PLAIN}", "{CLEAR}", "{plain}"):
            self.assertRaises(HashFormatError, verifyStored, prefix + "secret", b"secret")
            self.assertTrue(verifyStored(prefix + "secret", b"secret", allowPlain=True))
            self.assertFalse(verifyStored(prefix + "secret", b"secreT", allowPlain=True))

    def test_unknownFormats(self) -> None:
        """Unknown, weak or malformed values raise (never verify, never crash)."""
        for stored in [
            "secret",  # a bare clear-text password is no format at all
            "{MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ==",
            "{CRYPT}abJnggxhB/yWI",  # DES crypt
            "$1$salt$qJH7.N4xYta3aEG/dfqo/0",  # MD5 crypt
            "{SSHA512}not base64!",
            "{SSHA512}" + base64.b64encode(b"x" * 64).decode(),  # no salt
            "{ARGON2ID}$6$salt$x",
            "$argon2id$v=19$m=65536,t=3,p=1$broken",
            "{BLF-CRYPT}$2y$05$short",
            "$2b$99$" + "a" * 53,  # a cost bcrypt does not have
            "$2b$05$" + "a" * 52 + "!",
            "{SHA512-CRYPT}$5$VliAvX1j3pDygYt9$Q8H0DCB9x8ttmwpqIE5srZem5w7Xr2./jqBx7IrBY6/",
            "",
        ]:
            with self.subTest(stored=stored):
                self.assertRaises(HashFormatError, verifyStored, stored, b"secret")

    def test_ssha(self) -> None:
        salt = secrets.token_bytes(8)
        stored = (
            "{SSHA512}" + base64.b64encode(hashlib.sha512(b"pw" + salt).digest() + salt).decode()
        )
        self.assertTrue(verifyStored(stored, b"pw"))
        self.assertFalse(verifyStored(stored, b"pW"))

    def test_hashScheme(self) -> None:
        self.assertEqual(hashScheme("{ssha512}x"), "SSHA512")
        self.assertEqual(hashScheme("$2b$04$x"), "BLF-CRYPT")
        self.assertEqual(hashScheme("$6$x$y"), "SHA512-CRYPT")
        self.assertEqual(hashScheme("secret"), "")


def _tool(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


class LiveToolTests(TestCase):
    """Fresh values from the reference tools, with a random password each run."""

    def setUp(self) -> None:
        self.password = "pw " + secrets.token_urlsafe(12) + " ü"

    def test_openssl(self) -> None:
        if not haveCommand("openssl"):
            raise SkipTest("openssl is not installed")
        for option in ("-5", "-6"):
            stored = _tool("openssl", "passwd", option, self.password)
            self.assertTrue(verifyStored(stored, self.password.encode()), stored)
            self.assertFalse(verifyStored(stored, b"wrong"))

    def test_mkpasswd(self) -> None:
        if not haveCommand("mkpasswd"):
            raise SkipTest("mkpasswd is not installed (Debian package whois)")
        for method in ("sha-256", "sha-512", "bcrypt"):
            stored = _tool("mkpasswd", "-m", method, "-R", "5" if method == "bcrypt" else "6000",
                           self.password)  # fmt: skip
            self.assertTrue(verifyStored(stored, self.password.encode()), stored)
            self.assertFalse(verifyStored(stored, b"wrong"))

    def test_doveadm(self) -> None:
        if not haveCommand("doveadm"):
            raise SkipTest("doveadm is not installed (Debian package dovecot-core)")
        for scheme in ("SHA512-CRYPT", "SHA256-CRYPT", "ARGON2ID", "BLF-CRYPT", "SSHA512"):
            stored = _tool("doveadm", "pw", "-s", scheme, "-p", self.password)
            self.assertTrue(stored.startswith("{" + scheme + "}"), stored)
            self.assertTrue(verifyStored(stored, self.password.encode()), stored)
            self.assertFalse(verifyStored(stored, b"wrong"))

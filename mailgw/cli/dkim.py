"""
``mailgw dkim keygen`` (a new private key, and the DNS TXT record to
publish) and ``mailgw dkim show`` (the record each configured key expects,
to compare with what DNS serves). docs/dkim.md walks through both.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mailgw.cli.errors import CommandError

DEFAULT_CONFIG = "/etc/mailgw/mailgw.toml"
DEFAULT_DIRECTORY = "/etc/mailgw/dkim"


def addDKIMParser(subparsers: Any) -> None:
    """Add C{mailgw dkim keygen|show}."""
    parser = subparsers.add_parser(
        "dkim",
        help="DKIM keys: generate one, show the DNS records to publish",
        description="Generate DKIM signing keys and show the DNS TXT records they need.",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    keygen = actions.add_parser(
        "keygen",
        help="write a new private key and print its DNS TXT record",
        description="Write a new private key to DIRECTORY/DOMAIN.SELECTOR.key (mode 0600) "
        "and print the TXT record to publish at SELECTOR._domainkey.DOMAIN, as zone file "
        "lines. An existing file is never overwritten without --force.",
    )
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument("selector", metavar="SELECTOR")
    keygen.add_argument(
        "--algorithm",
        choices=("rsa-sha256", "ed25519-sha256"),
        default="rsa-sha256",
        help="default rsa-sha256 (ed25519-sha256, RFC 8463, is not verified by every "
        "receiver yet: sign with both)",
    )
    keygen.add_argument(
        "--bits", type=int, default=2048, help="RSA key size, 1024 to 4096 (default 2048)"
    )
    keygen.add_argument(
        "--directory", default=DEFAULT_DIRECTORY, help=f"default {DEFAULT_DIRECTORY}"
    )
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.set_defaults(func=keygenCommand)
    show = actions.add_parser(
        "show",
        help="print the DNS TXT record each configured key expects",
        description="Read every key of [dkim] and print the TXT record DNS must serve "
        "for it, as zone file lines; exit 1 if a key cannot be used.",
    )
    show.add_argument("--config", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    show.set_defaults(func=showCommand)


def keygenCommand(args: argparse.Namespace) -> int:
    from mailgw.dkim.config import signingDomain
    from mailgw.dkim.keys import generateKey, zoneLines

    try:
        domain = signingDomain(args.domain)
    except ValueError as e:
        raise CommandError(f"{args.domain}: {e}") from None
    selector = args.selector.lower()
    if not all(part.isascii() and part.replace("-", "").isalnum() for part in selector.split(".")):
        raise CommandError(f"{args.selector}: a selector is a DNS name such as 'mail2026'")
    if args.algorithm == "rsa-sha256" and not 1024 <= args.bits <= 4096:
        raise CommandError(f"--bits {args.bits}: must be from 1024 to 4096 (2048 recommended)")
    path = os.path.join(args.directory, f"{domain}.{selector}.key")
    if os.path.lexists(path) and not args.force:
        raise CommandError(f"{path}: already exists; give --force to replace it")
    pem, record = generateKey(args.algorithm, args.bits)
    try:
        os.makedirs(args.directory, mode=0o750, exist_ok=True)
        _writePrivate(path, pem, args.force)
    except FileExistsError:
        raise CommandError(f"{path}: already exists; give --force to replace it") from None
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror or e}") from None
    print(f"; {args.algorithm} private key written to {path} (mode 0600)")
    print(zoneLines(f"{selector}._domainkey.{domain}", record))
    return 0


def _writePrivate(path: str, data: bytes, replace: bool) -> None:
    """Write C{data} readable by its owner alone, durably; never over a file unless C{replace}."""
    target = f"{path}.new" if replace else path
    if replace and os.path.lexists(target):
        os.unlink(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.replace(target, path)


def showCommand(args: argparse.Namespace) -> int:
    from mailgw.config import ConfigError, loadConfig
    from mailgw.dkim.keys import keyProblems, zoneLines

    try:
        config = loadConfig(args.config)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    if not config.dkim.domains:
        print(f"; {args.config}: no [[dkim.domains]]: nothing is signed")
        return 0
    loaded, problems = keyProblems(config.dkim, config.source)
    for key in loaded:
        signing = key.signing
        print(f"; {signing.domain}: {signing.algorithm} with {signing.keyFile}")
        print(zoneLines(key.recordName, key.record))
    for problem in problems[:-1]:
        print(f"mailgw: {problem}", file=sys.stderr)
    if problems:
        raise CommandError(str(problems[-1]))
    return 0

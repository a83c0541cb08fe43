"""
What an operator must hear about the server certificate before clients do:
expired (the gateway refuses to start or reload with it), expiring within
14 days, or not valid for the configured host name (warnings).

Used at start-up and reload by L{mailgw.service.GatewayService} and by
``mailgw check-config``.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

import attrs
from cryptography import x509
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

#: A certificate expiring sooner than this gets a warning.
WARN_BEFORE = datetime.timedelta(days=14)


@attrs.frozen
class CertificateReport:
    """
    The problems with one certificate: ``errors`` forbid using it (it has
    expired), ``warnings`` are worth a log line.
    """

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _notAfter(certificate: x509.Certificate) -> datetime.datetime:
    return certificate.not_valid_after_utc


def _notBefore(certificate: x509.Certificate) -> datetime.datetime:
    return certificate.not_valid_before_utc


def _names(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    return names


def validFor(certificate: x509.Certificate, hostname: str) -> bool:
    """Whether a client that connects to ``hostname`` accepts ``certificate``'s names."""
    hostname = hostname.removesuffix(".")
    try:
        try:
            address = ipaddress.ip_address(hostname)
        except ValueError:
            verify_certificate_hostname(certificate, hostname)
        else:
            verify_certificate_ip_address(certificate, str(address))
    except (VerificationError, ValueError):
        return False
    except Exception:
        # service_identity raises its own errors for certificates without
        # any usable name (CertificateError); that is "not valid" too.
        return False
    return True


def checkCertificate(
    path: str,
    certificate: x509.Certificate,
    hostname: str,
    now: datetime.datetime | None = None,
) -> CertificateReport:
    """
    Check the leaf ``certificate`` (read from ``path``, named in the texts)
    for the host name the gateway announces.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    errors: list[str] = []
    warnings: list[str] = []
    notAfter = _notAfter(certificate)
    if notAfter <= now:
        errors.append(f"{path}: the certificate expired on {notAfter:%Y-%m-%d %H:%M} UTC")
    elif notAfter - now <= WARN_BEFORE:
        days = (notAfter - now).days
        warnings.append(
            f"{path}: the certificate expires on {notAfter:%Y-%m-%d %H:%M} UTC, in {days} "
            "day(s): renew it"
        )
    notBefore = _notBefore(certificate)
    if notBefore > now:
        warnings.append(f"{path}: the certificate is not valid before {notBefore:%Y-%m-%d} UTC")
    if hostname and not validFor(certificate, hostname):
        names = ", ".join(_names(certificate)) or "none"
        warnings.append(
            f"{path}: the certificate is not valid for {hostname} (it names: {names}); "
            "clients that check it will refuse to connect"
        )
    return CertificateReport(tuple(errors), tuple(warnings))


def configuredCertificateReport(config: Any, contextFactory: Any = None) -> CertificateReport:
    """
    The report on the leaf certificate of ``config.tls.certificate`` for
    ``config.fqdn()``: taken from ``contextFactory`` (a CertificateOptions
    that ``config.check()`` returned) when given, else read from the file.
    """
    certificate = getattr(contextFactory, "certificate", None)
    if certificate is not None:
        leaf = certificate.to_cryptography()
    else:
        from mailgw.tls import loadCertificates

        leaf = loadCertificates(config.tls.certificate)[0]
    return checkCertificate(config.tls.certificate, leaf, config.fqdn())

"""
The one log line of the AUTH throttle, in a fixed format that fail2ban and
its kind can match, whatever a client puts in its login.
"""

from __future__ import annotations

# Logins are counted and logged by their first this many characters: a
# longer one is no real login, and must not cost memory or log space.
LOGIN_LIMIT = 256


def _escape(text: str, quoted: bool) -> str:
    """
    ``text`` safe inside one log line: ``"`` and ``\\`` backslash-escaped,
    non-printable characters (and, outside quotes, space and ``=``, which
    separate fields) written as ``\\xHH``, ``\\uHHHH`` or ``\\UHHHHHHHH``.
    """
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and (quoted or ch not in " ="):
            out.append(ch)  # isprintable(): no control, format or separator characters
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def formatLogLine(
    address: str,
    network: str,
    login: str | None,
    failures: int,
    action: str,
    delay: float,
    reason: str,
) -> str:
    """
    The one line logged for each AUTH decision that delays, refuses or
    disconnects, for fail2ban and its kind to match::

        mailgw auth-throttle: client=203.0.113.7 network=203.0.113.0/24
        failures=11 action=disconnect delay=0.0 reason=address-budget login="bob"

    (on one line). The fields are always present and in this order; the
    login, the one field a client chooses, comes last, quoted, with ``"``
    and ``\\`` backslash-escaped and every non-printable character
    (CR, LF, NUL, U+2028 ...) written as ``\\xHH``, ``\\uHHHH`` or
    ``\\UHHHHHHHH``, and cut to its first 256 characters (then ``...``
    follows the closing quote). A missing login is ``login=""``.
    """
    text = login or ""
    cut = "..." if len(text) > LOGIN_LIMIT else ""
    return (
        f"mailgw auth-throttle: client={_escape(address, False)} "
        f"network={_escape(network, False)} failures={failures} action={action} "
        f'delay={delay:.1f} reason={reason} login="{_escape(text[:LOGIN_LIMIT], True)}"{cut}'
    )


def accountKey(login: str | None) -> str | None:
    """The key ``login`` is counted under: case-folded, cut to 256 characters."""
    # Cut before folding too: folding a 12 KB line would be wasted work.
    return None if login is None else login[:LOGIN_LIMIT].casefold()[:LOGIN_LIMIT]

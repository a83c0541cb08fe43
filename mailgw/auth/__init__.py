"""
Authentication: who a client is once SMTP AUTH succeeds.

mailgw authenticates through L{twisted.cred}: the SASL exchanges in
L{mailgw.server.sasl} build credentials, a L{twisted.cred.portal.Portal}
hands them to the configured checkers (any
L{twisted.cred.strcred.ICheckerFactory} plugin, chosen with
C{--auth TYPE:ARGS}), and L{mailgw.auth.realm.SubmitterRealm} turns the
avatar id into an L{mailgw.interfaces.ISubmitter}.

  - L{mailgw.auth.realm}: the avatar, the realm and L{makePortal}.
  - L{mailgw.auth.passwd}: the users file (argon2id hashes, optional CRAM-MD5
    secrets), its editing functions and its checker, L{PasswdChecker}.
"""

from twisted.cred.error import UnauthorizedLogin


class MechanismUnavailable(UnauthorizedLogin):
    """The mechanism cannot check this login (e.g. CRAM-MD5 without a secret)."""

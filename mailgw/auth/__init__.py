"""
Authentication: who a client is once SMTP AUTH succeeds.

mailgw authenticates through L{twisted.cred}: the SASL exchanges in
L{mailgw.server.sasl} build credentials, a L{twisted.cred.portal.Portal}
hands them to the configured checkers (any
L{twisted.cred.strcred.ICheckerFactory} plugin, chosen with
C{--auth TYPE:ARGS}), and L{mailgw.auth.realm.SubmitterRealm} turns the
avatar id into an L{mailgw.interfaces.ISubmitter}.

  - L{mailgw.auth.realm}: the avatar, the realm and L{makePortal}.
  - L{mailgw.auth.usersfile}: the users file's format (argon2id hashes,
    optional CRAM-MD5 secrets), read and written atomically;
  - L{mailgw.auth.passwd}: the C{passwd:} backend: editing the file
    (C{mailgw passwd}) and its checker, L{PasswdChecker}.
  - L{mailgw.auth.hashes} and L{mailgw.auth.shacrypt}: stored hashes
    (argon2, bcrypt, SHA-crypt, Dovecot C{{SCHEME}} values) verified;
  - L{mailgw.auth.stored}: a checker for backends that hand over a stored
    hash (verified off the reactor thread, behind L{mailgw.auth.cache});
  - L{mailgw.auth.sql}: the C{sql:} backend (PostgreSQL, SQLite);
  - L{mailgw.auth.ldap} and L{mailgw.auth.ldapconfig}: the C{ldap:} backend;
  - L{mailgw.auth.sendermap}: the sender login map read from those sources;
  - L{mailgw.auth.workers}: the bounded thread pools their clients run in;
  - L{mailgw.auth.mechanisms}: which SASL mechanisms a checker can serve
    (L{ISASLMechanisms}), and L{MechanismUnavailable}, the failure of a login
    the backend cannot check with the mechanism chosen.
"""

from mailgw.auth.mechanisms import ISASLMechanisms, MechanismUnavailable

__all__ = ["ISASLMechanisms", "MechanismUnavailable"]

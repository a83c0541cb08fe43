"""
Milters (the Sendmail/Postfix milter protocol, version 6) for the SMTP session: see
L{mailgw.milter.chain} and docs/milter.md.
"""

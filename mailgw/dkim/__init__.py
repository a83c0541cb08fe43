"""
DKIM signing built in (RFC 6376, RFC 8463), as docs/dkim.md describes.

- L{mailgw.dkim.config}: the ``[dkim]`` section, read by L{mailgw.config};
- L{mailgw.dkim.keys}: private keys read and checked, the DNS record, keygen;
- L{mailgw.dkim.canon}: the body hash, streamed (relaxed or simple);
- L{mailgw.dkim.signer}: L{MessageSigner}, the relay's L{IMessageSigner}.

This module imports nothing: L{mailgw.config} imports the config module
while the signer imports the keys, which need the values L{mailgw.config}
builds.
"""

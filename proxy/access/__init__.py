"""Access checks around core: hosts.py (the Host allowlist, pure) and jwt.py (the JWT
key material: key files, the JWKS fetcher, the revocation file, the verified-token cache;
the verification itself is proxy.core.jwt)."""

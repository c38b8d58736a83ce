"""Pure access decisions: networks, tokens and policy. No I/O here."""

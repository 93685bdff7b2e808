"""Protect: objections and opt-outs, pseudonyms, the haven zone, the identity vault, key rotation."""

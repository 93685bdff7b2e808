"""Dispose: retention and disposal (CoP 43d, 48-50)."""

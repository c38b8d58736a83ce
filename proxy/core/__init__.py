"""The sans-I/O core: pure functions and state over bytes, strings and numbers.

Nothing in this package imports asyncio, os, socket, ssl, subprocess or aiohttp, and nothing
outside ``proxy.core`` except the exception tree (``proxy.errors``):
tests/unit/test_core_imports.py enforces both. The I/O layer (front, upstream, server,
keystore) feeds these functions and carries out what they return.
"""

"""The kernel: user-facing errors, the message types, settings and typed caches.

Every other package may import this one; it imports none of them. Keep it light: no
LangChain, SQLAlchemy, Chroma or discord here.
"""

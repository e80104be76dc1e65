"""
The C{local} backend: the embedded default for a small team with no IM
system of its own.  Accounts, contacts and block lists live in SQLite
(L{imxd.backend.local.store}); the client API and the adapter itself come
in later work.
"""

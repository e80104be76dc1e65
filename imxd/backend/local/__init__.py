"""
The C{local} backend: the embedded default for a small team with no IM
system of its own.  Accounts, contacts and block lists live in SQLite
(L{imxd.backend.local.store}); L{imxd.backend.local.backend} is the adapter
and L{imxd.backend.local.api} the HTTP client API (C{docs/client-api.md}).
"""

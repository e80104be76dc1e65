"""
The C accelerator (C{imxd/wire/_speedups.c}), when it is built: for the
codec it takes the path a valid record takes and leaves everything else to
the Python codec in L{imxd.wire.records} and L{imxd.wire.framing}, which
is the reference; it also holds the Bloom filter of
L{imxd.store.seenfilter}.  C{IMXD_PURE_PYTHON=1} in the environment turns
it off.
"""

import os

#: The C module, or L{None}: not built, or turned off.
speedups = None

if not os.environ.get("IMXD_PURE_PYTHON"):
    try:
        from imxd.wire import _speedups as speedups
    except ImportError:
        pass

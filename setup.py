"""
Build script: everything but the optional C accelerator of the record
codec is declared in setup.cfg.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # Optional: without a C compiler imxd runs on the Python codec in
        # imxd/wire/records.py, which is the reference (docs/performance.md).
        Extension("imxd.wire._speedups", ["imxd/wire/_speedups.c"], optional=True),
    ]
)

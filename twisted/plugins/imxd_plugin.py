"""
The twistd dropin for imxd: C{twistd imxd --config etc/imxd.toml}.

The tap module is named lazily, so listing plugins stays cheap.
"""

from twisted.application.service import ServiceMaker

imxd = ServiceMaker(
    "imxd", "imxd.tap", "IMX federation server and Aggregator", "imxd"
)

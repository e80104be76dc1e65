"""
The C{twistd imxd} command: its options and the service it runs.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python import usage

from imxd.aggregator import Aggregator
from imxd.config import Config, ConfigError, loadConfig
from imxd.dialback import DialbackError, loadOrCreateSecret

__all__ = ["Options", "makeService"]

_log = Logger()


class Options(usage.Options):
    """
    Command-line options of C{twistd imxd}.

    After parsing, C{self["config"]} is the path and C{self.config} the
    validated L{Config}.
    """

    synopsis = "[-c FILE]"
    longdesc = (
        "Run an IMX federation server (Aggregator) for the domains listed in "
        "the configuration file. See docs/configuration.md."
    )
    optParameters = [
        ["config", "c", "etc/imxd.toml", "Path of the TOML configuration file."],
    ]

    config: Config

    def postOptions(self) -> None:
        """
        Load and validate the configuration.

        @raise SystemExit: with one line naming the file, key and problem
            when the configuration is not acceptable, so that twistd exits
            non-zero without a traceback.
        """
        try:
            self.config = loadConfig(self["config"])
        except ConfigError as error:
            raise SystemExit(f"imxd: {error}")


def makeService(options: Options, reactor: Any = None) -> Aggregator:
    """
    Build the imxd service tree: the L{Aggregator}, with one listener child
    (C{imx-listener-0}, C{imx-listener-1}, ...) per configured endpoint.

    This is the only place that uses the global reactor.  The state
    directory is created here (mode 0700) when it is missing.

    @param options: parsed L{Options}.
    @param reactor: the reactor to listen with and to give the peers as
        their clock; the global reactor when L{None} (as twistd calls it).
    @return: the L{Aggregator}.
    """
    from twisted.internet.endpoints import serverFromString

    if reactor is None:
        from twisted.internet import reactor

    from imxd.peer import PeerFactory, PeerSettings

    config = options.config
    server = config.server
    try:
        os.mkdir(server.stateDirectory, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise SystemExit(
            f"imxd: {config.path}: server.state_dir: cannot create"
            f" {server.stateDirectory}: {e.strerror or e}"
        )

    try:
        dialbackSecret = loadOrCreateSecret(server.dialbackSecretFile)
    except DialbackError as e:
        raise SystemExit(f"imxd: {config.path}: server.dialback_secret_file: {e}")

    aggregator = Aggregator(config, dialbackSecret)
    settings = PeerSettings(
        hostedDomains=aggregator.hostedDomains(),
        handshakeTimeout=server.timeouts.handshake,
        keepaliveInterval=server.timeouts.keepalive,
        idleTimeout=server.timeouts.idle,
        maxRecordSize=server.limits.maxRecordSize,
        software=server.software,
    )
    factory = PeerFactory(reactor, settings)
    for index, description in enumerate(server.listen):
        listener = _ListenerService(
            serverFromString(reactor, description), factory, description
        )
        listener.setName(f"imx-listener-{index}")
        listener.setServiceParent(aggregator)
    return aggregator


class _ListenerService(StreamServerEndpointService):
    """
    An IMX listener that logs one line saying where it listens, or why it
    could not.
    """

    def __init__(self, endpoint, factory, description: str) -> None:
        super().__init__(endpoint, factory)
        self.description = description

    def privilegedStartService(self) -> None:
        """
        Listen now.  A listener that cannot bind (port in use, address not
        available) stops start-up with one line and a non-zero exit, as an
        operator expects of a server that cannot do its job.

        @raise SystemExit: the endpoint refused to listen.
        """
        Service.privilegedStartService(self)
        refusals = []

        def refused(reason):
            if starting:
                refusals.append(reason)
                return None
            return self._failed(reason)

        starting = True
        self._waitingForPort = self.endpoint.listen(self.factory)
        self._waitingForPort.addCallbacks(self._listening, refused)
        starting = False
        if refusals:
            raise SystemExit(
                f"imxd: {self.name} cannot listen on {self.description}: "
                f"{refusals[0].getErrorMessage()}"
            )

    def _listening(self, port):
        address = port.getHost()
        where = (
            f"{address.host}:{address.port}"
            if hasattr(address, "port")
            else str(getattr(address, "name", address))
        )
        _log.info(
            "{name} listening on {where} ({description})",
            name=self.name,
            where=where,
            description=self.description,
        )
        return port

    def _failed(self, reason):
        if reason.check(CancelledError):
            return None
        _log.error(
            "{name} cannot listen on {description}: {error}",
            name=self.name,
            description=self.description,
            error=reason.getErrorMessage(),
        )
        return None

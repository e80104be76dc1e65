"""
The C{twistd imxd} command: its options and the service it runs.
"""

from __future__ import annotations

import gc
import os
import socket
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from imxd.aggregator import Aggregator
from imxd.backend import BackendError
from imxd.config import Config, ConfigError, loadConfig
from imxd.dialback import DialbackError, loadOrCreateSecret
from imxd.listener import ListenerService

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
    from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString

    if reactor is None:
        from twisted.internet import reactor

    from imxd.admin import AdminFactory
    from imxd.dialback import DialbackSecrets, DialbackTokens
    from imxd.discovery import Discovery, Target
    from imxd.federation import Federation
    from imxd.peer import PeerSettings
    from imxd.pool import tcpConnector
    from imxd.store import Database, StoreError
    from imxd.tls import TLSError, TLSPolicy

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

    try:
        tls = TLSPolicy.fromConfig(config)
    except TLSError as e:
        raise SystemExit(f"imxd: {config.path}: {e}")
    try:
        aggregator = Aggregator(config, dialbackSecret)
    except BackendError as e:
        raise SystemExit(f"imxd: {config.path}: {e}")
    settings = PeerSettings(
        hostedDomains=aggregator.hostedDomains(),
        handshakeTimeout=server.timeouts.handshake,
        keepaliveInterval=server.timeouts.keepalive,
        idleTimeout=server.timeouts.idle,
        maxRecordSize=server.limits.maxRecordSize,
        software=server.software,
    )
    try:
        database = Database(
            os.path.join(server.stateDirectory, DATABASE_NAME),
            reactor,
            server.queue.durability,
            threaded=True,
        )
    except StoreError as e:
        raise SystemExit(f"imxd: {config.path}: server.state_dir: {e}")
    resolver = makeResolver(reactor, server.dnsServers)
    discovery = Discovery(
        resolver,
        reactor,
        overrides={
            p.domain: Target(p.host, p.port) for p in config.peers if p.host is not None
        },
    )
    federation = Federation(
        reactor,
        settings,
        aggregator,
        DialbackTokens(dialbackSecret, nodeName()),
        DialbackSecrets(lifetime=server.timeouts.dialback),
        discovery,
        tcpConnector(reactor, resolver, server.timeouts.connect),
        server.limits,
        dialbackTimeout=server.timeouts.dialback,
        tls=tls,
        database=database,
        queue=server.queue,
    )
    aggregator.attachFederation(federation)
    for index, description in enumerate(server.listen):
        listener = ListenerService(
            serverFromString(reactor, description), federation, description
        )
        listener.setName(f"imx-listener-{index}")
        listener.setServiceParent(aggregator)
    admin = ListenerService(
        UNIXServerEndpoint(
            reactor, socketPath(config), mode=0o600, wantPID=True
        ),
        AdminFactory(reactor, settings, aggregator),
        f"unix:{server.adminSocket}",
    )
    admin.setName("admin")
    admin.setServiceParent(aggregator)
    for shared in aggregator.sharedBackendServices(reactor):
        shared.setServiceParent(aggregator)
    reactor.callWhenRunning(settleGarbageCollector)
    return aggregator


#: The cyclic collector's thresholds (Python's defaults: 700, 10, 10): the
#: young generation is collected after this many more allocations of
#: container objects than deallocations, each older one after 20
#: collections of the one below.  The first must exceed what the messages
#: in flight hold: below that, every collection scans them all and finds
#: almost nothing.  With 1,000 messages in flight, the whole route
#: (bench/path.py) spent 13.6 ms per 1,000 messages in the collector at
#: 10,000 and made no collection at all at 100,000.
GC_THRESHOLDS = (100_000, 20, 20)


def settleGarbageCollector() -> None:
    """
    Once the server runs: what exists now (modules, configuration, hosted
    domains) lives as long as the process, so it is frozen out of the
    cyclic garbage collector's scans, and the young generation is
    collected every L{GC_THRESHOLDS}[0] net allocations instead of every
    700 (per-message objects are freed by reference counting; the
    collector only finds the rare cycle).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def makeResolver(reactor: Any, servers: tuple) -> Any:
    """
    The resolver discovery and the pool use: C{/etc/hosts}, then the
    configured DNS servers, or the system's (C{/etc/resolv.conf}) when none
    are configured.

    @param servers: C{(ip, port)} pairs from C{server.dns_servers}.
    """
    from twisted.names import client, hosts, resolve

    if servers:
        dns = client.Resolver(servers=list(servers), reactor=reactor)
    else:
        dns = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    return resolve.ResolverChain([hosts.Resolver(), dns])


#: The file in the state directory holding the outbound queue, the dedupe
#: table and the presence subscriptions.
DATABASE_NAME = "imxd.sqlite3"

#: The longest path a UNIX socket address holds on common systems.
UNIX_PATH_MAX = 107


def socketPath(config: Config) -> str:
    """
    The admin socket's path as the server binds it: absolute, or relative
    to the current directory when the absolute path is longer than a UNIX
    socket address holds.

    @raise SystemExit: neither form is short enough.
    """
    path = config.server.adminSocket
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        return path
    relative = os.path.relpath(path)
    if len(os.fsencode(relative)) <= UNIX_PATH_MAX:
        return relative
    raise SystemExit(
        f"imxd: {config.path}: server.admin_socket: path longer than a UNIX "
        f"socket allows ({UNIX_PATH_MAX} bytes): {path}"
    )


def nodeName() -> str:
    """
    @return: this process's name in the dial-back tokens it issues: host
        name and process id.
    """
    return f"{socket.gethostname()[:200]}/{os.getpid()}"

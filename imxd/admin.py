"""
The admin endpoint (C{docs/protocol.md} section 16): a UNIX socket, mode
0600 in the state directory, speaking the IMX preamble, HELLO and framing,
on which the operator's C{imxctl} sends DRAIN and STATUS.  Peers never
reach it: it is not on the IMX listeners, and the file's permissions keep
out other local users.
"""

import attrs

from imxd.peer import PeerFactory, PeerProtocol, PeerState
from imxd.wire import Ack, Drain, Error, ErrorCode, Status, StatusResult

#: Seconds of silence before the admin endpoint drops a client.
ADMIN_IDLE = 300.0


class AdminProtocol(PeerProtocol):
    """
    One admin connection: DRAIN and STATUS, nothing else.
    """

    def _handleDrain(self, drain):
        """
        Redirect every peer to C{HOST:PORT}, stop the IMX listeners, and
        answer ACK.
        """
        self.factory.drain(drain.host, drain.port, drain.text)
        self.noteActivity()
        self.sendRecord(Ack(tags=(drain.tag,)))

    def _handleStatus(self, status):
        """
        Answer with the server's state and counters as C{name=value} lines.
        """
        lines = tuple(f"{name}={value}" for name, value in self.factory.status())
        self.noteActivity()
        self.sendRecord(StatusResult(tag=status.tag, attributes=lines))

    def refuseRecord(self, record):
        """
        Anything but DRAIN and STATUS (Data included) is not served here.
        """
        self.factory.count("records-refused")
        self.sendRecord(
            Error(
                tag=record.tag,
                code=ErrorCode.UNSUPPORTED,
                text=f"{type(record).__name__} is not served on the admin endpoint",
            )
        )


def _adminTables():
    """
    The peer protocol's state tables with DRAIN and STATUS served.
    """
    tables = dict(PeerProtocol.stateTables)
    tables[PeerState.OPEN] = {
        **tables[PeerState.OPEN],
        Drain: AdminProtocol._handleDrain,
        Status: AdminProtocol._handleStatus,
    }
    return tables


AdminProtocol.stateTables = _adminTables()


class AdminFactory(PeerFactory):
    """
    Builds L{AdminProtocol}s for one server.
    """

    protocol = AdminProtocol

    def __init__(self, clock, settings, aggregator):
        """
        @param clock: an L{IReactorTime} provider.
        @param settings: L{imxd.peer.PeerSettings} (the idle timeout is
            replaced by L{ADMIN_IDLE}).
        @param aggregator: the L{imxd.aggregator.Aggregator}, with its
            federation attached.
        """
        super().__init__(clock, attrs.evolve(settings, idleTimeout=ADMIN_IDLE))
        self.aggregator = aggregator

    def drain(self, host, port, text):
        """
        Redirect the peers and stop listening for new ones.
        """
        self.aggregator.federation.drain(host, port, text)
        for service in list(self.aggregator):
            if service.name and service.name.startswith("imx-listener-"):
                service.stopService()

    def status(self):
        """
        @return: the federation's status lines.
        """
        return self.aggregator.federation.status()

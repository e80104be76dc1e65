"""
Listening services that say where they listen, and stop start-up with one
line when they cannot.
"""

from __future__ import annotations

import os

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError
from twisted.logger import Logger

__all__ = ["ListenerService"]

_log = Logger()


class ListenerService(StreamServerEndpointService):
    """
    A listener (IMX, admin, client API) that logs one line saying where it
    listens, or why it could not.
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
            else os.fsdecode(getattr(address, "name", None) or str(address))
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

"""
C{imxctl}: the operator's command for a running imxd, over its admin
endpoint (the UNIX socket C{server.admin_socket}).

    imxctl [-c CONFIG | -s SOCKET] status
    imxctl [-c CONFIG | -s SOCKET] drain HOST PORT [--text TEXT]

It speaks the IMX framing with blocking sockets: one request, one answer.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Optional, Sequence

from imxd.config import ConfigError, loadConfig
from imxd.wire import (
    PREAMBLE,
    VERSION_MAX,
    VERSION_MIN,
    Ack,
    Close,
    Drain,
    Error,
    FrameDecoder,
    Hello,
    Status,
    StatusResult,
    WireError,
    decodeRecord,
    encodeRecord,
)

#: Seconds imxctl waits for the server at most.
TIMEOUT = 10.0


class AdminError(Exception):
    """
    The request could not be made or was refused.

    @ivar error: the peer's L{Error} record, if it refused.
    """

    def __init__(self, text: str, error: Optional[Error] = None) -> None:
        super().__init__(text)
        self.error = error


class BlockingPeer:
    """
    One blocking IMX connection: preamble and HELLO, then one request at a
    time.  C{imxctl} uses it on the admin socket; tests use it to speak
    raw IMX to a server.
    """

    @classmethod
    def unix(cls, path: str, timeout: float = TIMEOUT) -> "BlockingPeer":
        """
        Connect to a UNIX socket (the admin endpoint).

        @raise AdminError: the socket cannot be reached or does not speak
            IMX.
        """
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(timeout)
        directory, name = os.path.split(path)
        here = os.getcwd()
        try:
            # Connect by a short relative name: socket paths are limited
            # to about 107 bytes.
            if directory:
                os.chdir(directory)
            connection.connect(name)
        except OSError as e:
            connection.close()
            raise AdminError(f"cannot connect to {path}: {e.strerror or e}") from None
        finally:
            os.chdir(here)
        return cls(connection)

    def __init__(self, connection: socket.socket, toDomain: Optional[str] = None) -> None:
        """
        Exchange preamble and HELLO on a connected socket.

        @param toDomain: the domain named in HELLO, if any.
        @raise AdminError: the peer does not answer with HELLO.
        """
        self._socket = connection
        self._decoder = FrameDecoder(1 << 20, expectPreamble=True)
        self._pending: list = []
        hello = Hello(
            versionMin=VERSION_MIN,
            versionMax=VERSION_MAX,
            maxRecord=1 << 20,
            software="imxctl",
            toDomain=toDomain,
        )
        self._send(PREAMBLE + encodeRecord(hello))
        answer = self._next()
        if not isinstance(answer, Hello):
            raise AdminError(f"the server answered {type(answer).__name__}, not HELLO")

    def _send(self, data: bytes) -> None:
        """
        Write to the server.

        @raise AdminError: it has gone away.
        """
        try:
            self._socket.sendall(data)
        except OSError as e:
            raise AdminError(f"the server closed the connection: {e.strerror or e}") from None

    def _next(self):
        """
        @return: the next record from the server.
        """
        while not self._pending:
            try:
                data = self._socket.recv(65536)
            except OSError as e:
                raise AdminError(f"no answer: {e.strerror or e}") from None
            if not data:
                raise AdminError("the server closed the connection")
            try:
                self._pending.extend(decodeRecord(f) for f in self._decoder.feed(data))
            except WireError as e:
                raise AdminError(f"bad answer from the server: {e}") from None
        return self._pending.pop(0)

    def request(self, record):
        """
        Send one request (tag 1) and return its answer.

        @raise AdminError: the server answered ERROR.
        """
        self._send(encodeRecord(record))
        while True:
            answer = self._next()
            if isinstance(answer, Error):
                raise AdminError(
                    f"refused: {answer.code} {answer.text or ''}".strip(), answer
                )
            if isinstance(answer, Ack) and record.tag in answer.tags:
                return answer
            if getattr(answer, "tag", 0) == record.tag and answer.response:
                return answer

    def close(self) -> None:
        """
        Close in order.
        """
        try:
            self._socket.sendall(encodeRecord(Close()))
        except OSError:
            pass
        self._socket.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imxctl", description="Control a running imxd through its admin socket."
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-c", "--config", default="etc/imxd.toml",
        help="imxd's configuration file, to find the admin socket (default: %(default)s)",
    )
    where.add_argument("-s", "--socket", help="the admin socket's path")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="print the server's state and counters")
    drain = commands.add_parser(
        "drain", help="redirect every peer to HOST:PORT and stop accepting new ones"
    )
    drain.add_argument("host", help="where peers should reconnect (address or name)")
    drain.add_argument("port", type=int, help="the TCP port there")
    drain.add_argument("--text", help="a reason, shown in the peers' logs")
    user = commands.add_parser(
        "user", help="manage the accounts of a domain on the local backend"
    )
    actions = user.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="create an account")
    add.add_argument("address")
    add.add_argument("--alias", help="the display name")
    passwd = actions.add_parser("passwd", help="set an account's password")
    passwd.add_argument("address")
    for command in (add, passwd):
        command.add_argument(
            "--password-stdin", action="store_true",
            help="read the password from the first line of stdin, not a prompt",
        )
    actions.add_parser("remove", help="delete an account and all kept for it").add_argument(
        "address"
    )
    actions.add_parser("list", help="list a domain's accounts").add_argument("domain")
    return parser


def localStore(config, domain: str):
    """
    Open the account store of a hosted domain served by the local backend.

    @param config: the L{imxd.config.Config}.
    @param domain: a domain name or an address of that domain.
    @raise AdminError: the domain is not hosted or not on the local backend.
    """
    from imxd.address import AddressError, normaliseDomain
    from imxd.backend.local.store import AccountStore

    try:
        name = normaliseDomain(domain.rpartition("@")[2])
    except AddressError as e:
        raise AdminError(f"{domain}: {e}") from None
    for table in config.domains:
        if table.name == name:
            if table.backend != "local":
                raise AdminError(f"{name} uses the {table.backend} backend, not local")
            return AccountStore(table.backendOptions["database"])
    raise AdminError(f"{name} is not hosted in {config.path}")


def readPassword(fromStdin: bool, stdin=None) -> str:
    """
    @return: a password from stdin's first line, or from a prompt asked
        twice.
    @raise AdminError: empty, or the two entries differ.
    """
    import getpass

    if fromStdin:
        password = (stdin or sys.stdin).readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise AdminError("the passwords differ")
    if not password:
        raise AdminError("the password may not be empty")
    return password


def userCommand(options, stdin=None) -> None:
    """
    Run C{imxctl user ...} on the local backend's database (the server
    need not run; it sees changes at once).
    """
    from imxd.backend.local.store import AccountError

    config = loadConfig(options.config)
    target = options.domain if options.action == "list" else options.address
    store = localStore(config, target)
    try:
        if options.action == "list":
            for address in store.users(target):
                print(address)
        elif options.action == "remove":
            store.removeUser(options.address)
            print(f"removed {options.address}")
        else:
            password = readPassword(options.password_stdin, stdin)
            if options.action == "add":
                address = store.addUser(options.address, password, options.alias)
                print(f"added {address}")
            else:
                store.setPassword(options.address, password)
                print(f"password set for {options.address}")
    except AccountError as e:
        raise AdminError(str(e)) from None
    finally:
        store.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Run one command; print its result or one line of error.

    @return: the exit status: 0 on success, 1 on failure.
    """
    options = _parser().parse_args(argv)
    try:
        if options.command == "user":
            userCommand(options)
            return 0
        path = options.socket or loadConfig(options.config).server.adminSocket
        client = BlockingPeer.unix(path)
        try:
            if options.command == "status":
                answer = client.request(Status(tag=1))
                if not isinstance(answer, StatusResult):
                    raise AdminError(f"unexpected answer {type(answer).__name__}")
                for line in answer.attributes:
                    print(line)
            else:
                if not 1 <= options.port <= 65535:
                    raise AdminError(f"port {options.port} is not 1-65535")
                client.request(
                    Drain(tag=1, host=options.host, port=options.port, text=options.text)
                )
                print(f"draining: peers redirected to {options.host}:{options.port}")
        finally:
            client.close()
    except (AdminError, ConfigError) as e:
        print(f"imxctl: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

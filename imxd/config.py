"""
The imxd configuration file: TOML, validated once at start-up.

L{loadConfig} reads a file and L{parseConfig} validates an already-parsed
document; both return one immutable L{Config} or raise L{ConfigError}, whose
one-line message names the file, the dotted key and the problem, for example::

    etc/imxd.toml: domain[1].name: duplicate of domain[0].name ('alpha.test')

The schema is written once, as tables of L{_Key} rows below, and documented
for operators in C{docs/configuration.md}; keep the two in step.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import attrs

from imxd.address import Address, AddressError, normaliseDomain
from imxd.backend import backendKinds, validateBackendOptions

__all__ = [
    "ConfigError",
    "Config",
    "ServerConfig",
    "TimeoutsConfig",
    "LimitsConfig",
    "PeerConfig",
    "DomainConfig",
    "PolicyConfig",
    "TLSConfig",
    "loadConfig",
    "parseConfig",
    "DEFAULT_PORT",
    "TLS_MODES",
]

DEFAULT_PORT = 5275
"""The IMX port used when neither discovery nor configuration names one."""

TLS_MODES = ("off", "offered", "required")
"""The TLS policies, strictest last: C{server.tls.policy},
C{domain.policy.tls} and C{peer.tls}."""


class ConfigError(Exception):
    """
    The configuration is not acceptable.

    @ivar path: the configuration file, as it was named to L{loadConfig}.
    @ivar key: the dotted key at fault, e.g. C{"domain[2].name"} or
        C{"server.timeouts.idle"}; L{None} when the file as a whole is at
        fault (missing, unreadable, not TOML).
    @ivar problem: what is wrong, in one line.
    """

    def __init__(self, path: str, key: Optional[str], problem: str) -> None:
        """
        @param path: see L{ConfigError.path}.
        @param key: see L{ConfigError.key}.
        @param problem: see L{ConfigError.problem}.
        """
        super().__init__(path, key, problem)
        self.path = path
        self.key = key
        self.problem = " ".join(str(problem).split())

    def __str__(self) -> str:
        if self.key is None:
            return f"{self.path}: {self.problem}"
        return f"{self.path}: {self.key}: {self.problem}"


@attrs.frozen
class TimeoutsConfig:
    """
    C{[server.timeouts]}: durations in seconds, all greater than zero.

    @ivar handshake: from TCP connect until HELLO is done.
    @ivar dialback: for one dial-back to complete.
    @ivar idle: without Data before an orderly close.
    @ivar keepalive: of silence before a PING is sent.
    @ivar connect: for one outbound TCP connect to one target.
    """

    handshake: float = 10.0
    dialback: float = 15.0
    idle: float = 600.0
    keepalive: float = 60.0
    connect: float = 10.0


@attrs.frozen
class LimitsConfig:
    """
    C{[server.limits]}: positive integers.

    @ivar maxRecordSize: largest record body accepted, in bytes.
    @ivar maxConnectionsTotal: open peer connections, inbound and outbound.
    @ivar maxConnectionsPerAddress: inbound connections from one source
        address.
    @ivar maxConnectionsPerDomain: connections authenticated for one remote
        domain.
    @ivar maxPendingDialbacksPerAddress: unfinished dial-backs for
        connections from one source address.
    @ivar maxOutboundPerPeer: outbound connections opened to one peer.
    @ivar maxRequestsInProgress: records one hosted domain may be handling
        at once; more are refused for now with C{resource-limit}.
    @ivar domainRate: Data requests per second accepted from one
        authenticated remote domain (token bucket, 0: no limit).
    @ivar domainBurst: the bucket's size: requests accepted at once after
        a quiet spell.
    @ivar rateExemptDomains: remote domains without a rate limit
        (approved notification services, draft 6.4 item 4).
    """

    maxRecordSize: int = 65536
    maxConnectionsTotal: int = 1000
    maxConnectionsPerAddress: int = 16
    maxConnectionsPerDomain: int = 4
    maxPendingDialbacksPerAddress: int = 8
    maxOutboundPerPeer: int = 2
    maxRequestsInProgress: int = 10000
    domainRate: int = 10000
    domainBurst: int = 20000
    rateExemptDomains: tuple[str, ...] = ()


@attrs.frozen
class QueueConfig:
    """
    C{[server.queue]}: the durable outbound queue and the dedupe window
    (C{docs/reliability.md}).

    @ivar durability: C{"full"} (each grouped commit reaches the disk
        before messages are accepted) or C{"normal"} (it reaches the
        operating system: safe when imxd is killed, not on power loss).
    @ivar giveUpAfter: seconds a message is retried before it is reported
        failed.
    @ivar retryInitial: seconds of the first wait after a destination
        failed; each failure in a row doubles it.
    @ivar retryMax: the longest wait between two tries of a destination.
    @ivar window: messages in flight to one destination at most.
    @ivar maxQueued: messages held at most; more are refused for now.
    @ivar dedupeWindow: seconds a received MESSAGE_ID is remembered, at
        least C{giveUpAfter}.
    @ivar writeBehind: seconds a message accepted from a backend waits
        before it is written to the queue (it is sent at once; one
        answered in that time is never written); 0 writes it with the next
        turn's commit.
    """

    durability: str = "full"
    giveUpAfter: float = 86400.0
    retryInitial: float = 5.0
    retryMax: float = 300.0
    window: int = 5000
    maxQueued: int = 1000000
    dedupeWindow: float = 172800.0
    writeBehind: float = 0.05


@attrs.frozen
class TLSConfig:
    """
    C{[server.tls]}: TLS towards peers, for the whole process.

    @ivar policy: the default of every hosted domain's C{policy.tls}:
        C{"off"}, C{"offered"} or C{"required"}.
    @ivar verify: whether peers' certificates are checked (a peer's
        C{tls_verify} overrides it).
    @ivar caFile: absolute path of a PEM bundle of trusted CAs, or L{None}
        for the system's.
    """

    policy: str = "offered"
    verify: bool = True
    caFile: Optional[str] = None


@attrs.frozen
class ServerConfig:
    """
    C{[server]}: settings of the whole process.

    @ivar stateDirectory: absolute path of the state directory.
    @ivar dialbackSecretFile: absolute path of the dial-back secret.
    @ivar adminSocket: absolute path of the admin endpoint's UNIX socket.
    @ivar listen: Twisted server endpoint descriptions, at least one.
    @ivar dnsServers: C{(ip, port)} pairs; empty means the system resolver.
    @ivar software: product token announced in HELLO.
    @ivar timeouts: the L{TimeoutsConfig}.
    @ivar limits: the L{LimitsConfig}.
    @ivar tls: the L{TLSConfig}.
    @ivar queue: the L{QueueConfig}.
    """

    stateDirectory: str
    dialbackSecretFile: str
    adminSocket: str
    listen: tuple[str, ...]
    dnsServers: tuple[tuple[str, int], ...]
    software: str
    timeouts: TimeoutsConfig
    limits: LimitsConfig
    tls: TLSConfig = TLSConfig()
    queue: QueueConfig = QueueConfig()


@attrs.frozen
class PeerConfig:
    """
    One C{[[peer]]}: what is set for one remote domain: a static address
    used instead of discovery, and overrides of the TLS policy.

    @ivar domain: the normalised remote domain.
    @ivar host: host name or IP address to connect to, or L{None} to use
        discovery.
    @ivar port: TCP port.
    @ivar tls: C{"off"}, C{"offered"} or C{"required"} for every hosted
        domain's traffic with this peer, or L{None} to leave each hosted
        domain's policy.
    @ivar tlsVerify: whether this peer's certificate is checked, or L{None}
        for C{server.tls.verify}.
    """

    domain: str
    host: Optional[str] = None
    port: int = DEFAULT_PORT
    tls: Optional[str] = None
    tlsVerify: Optional[bool] = None


@attrs.frozen
class PolicyConfig:
    """
    C{[domain.policy]}: what one hosted domain accepts.

    @ivar blockedDomains: normalised remote domains refused, without
        duplicates, in the order written.
    @ivar tls: C{"off"}, C{"offered"} or C{"required"} (left out:
        C{server.tls.policy}).
    @ivar accountRate: messages per second one user of the domain may send
        (token bucket, 0: no limit; draft 6.4 item 4).
    @ivar accountBurst: the bucket's size.
    @ivar rateExempt: addresses of the domain without a rate limit.
    """

    blockedDomains: tuple[str, ...] = ()
    tls: str = "offered"
    accountRate: int = 20
    accountBurst: int = 100
    rateExempt: tuple[str, ...] = ()


@attrs.frozen
class DomainConfig:
    """
    One C{[[domain]]}: a hosted domain.

    @ivar name: the normalised domain name.
    @ivar backend: the backend kind, registered in L{imxd.backend}.
    @ivar backendOptions: the options validated by that kind, read-only.
    @ivar certificate: absolute path of the PEM certificate, or L{None}.
    @ivar key: absolute path of the PEM private key, or L{None}.
    @ivar policy: the L{PolicyConfig}.
    @ivar subscriptionTimeout: seconds a granted presence subscription to
        one of this domain's users lasts unless renewed.
    @ivar maxMessageSize: largest message BODY accepted, in octets.
    @ivar acceptedTypes: media types accepted in MESSAGE, lower-case.
    """

    name: str
    backend: str
    backendOptions: Mapping[str, Any]
    certificate: Optional[str]
    key: Optional[str]
    policy: PolicyConfig
    subscriptionTimeout: int = 1800
    maxMessageSize: int = 32768
    acceptedTypes: tuple[str, ...] = ("text/plain", "text/html-lite")


@attrs.frozen
class Config:
    """
    A whole validated configuration: one immutable value, swapped as a
    whole when the configuration is reloaded.

    @ivar path: the file it was read from.
    @ivar server: the L{ServerConfig}.
    @ivar domains: the hosted domains, in the order written, at least one.
    @ivar peers: the static peers, in the order written.
    """

    path: str
    server: ServerConfig
    domains: tuple[DomainConfig, ...]
    peers: tuple[PeerConfig, ...] = ()

    def domain(self, name: str) -> Optional[DomainConfig]:
        """
        @param name: a normalised domain name.
        @return: the hosted domain of that name, or L{None}.
        """
        for domain in self.domains:
            if domain.name == name:
                return domain
        return None


def loadConfig(path: str) -> Config:
    """
    Read and validate a configuration file.

    Relative paths inside it are taken relative to the directory that holds
    it.

    @param path: the file's path.
    @return: the validated L{Config}.
    @raise ConfigError: if the file is missing, unreadable, not TOML or not
        valid.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, None, "is a directory, not a file") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not valid UTF-8: {e.reason}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, None, f"TOML syntax error: {e}") from None
    return parseConfig(data, path, os.path.dirname(os.path.abspath(path)))


def parseConfig(
    data: Mapping[str, Any], path: str, baseDirectory: str | os.PathLike[str]
) -> Config:
    """
    Validate a parsed configuration document.

    @param data: the document, as C{tomllib} returns it.
    @param path: the file name to show in errors and keep in
        L{Config.path}.
    @param baseDirectory: the directory that relative paths are relative to.
    @return: the validated L{Config}.
    @raise ConfigError: at the first mistake found.
    """
    where = _Where(path, "", os.path.abspath(os.fspath(baseDirectory)))
    values = _readTable(data, _TOP, where)
    values["domains"] = _resolveTLSPolicies(values, where)
    config = Config(path=path, **values)
    hosted = {domain.name: i for i, domain in enumerate(config.domains)}
    for i, peer in enumerate(config.peers):
        if peer.domain in hosted:
            raise where.child("peer").item(i).child("domain").error(
                f"{peer.domain!r} is hosted here (domain[{hosted[peer.domain]}])"
                " and cannot also be a peer"
            )
    return config


def _resolveTLSPolicies(values: dict, where: _Where) -> tuple:
    """
    Give every hosted domain that leaves C{policy.tls} out the server's
    C{tls.policy}, and check that a domain requiring TLS can offer it.

    @return: the domains.
    """
    default = values["server"].tls.policy
    domains = []
    for i, domain in enumerate(values["domains"]):
        here = where.child("domain").item(i).child("policy").child("tls")
        if domain.policy.tls is None:
            here = where.child("server").child("tls").child("policy")
            domain = attrs.evolve(
                domain, policy=attrs.evolve(domain.policy, tls=default)
            )
        if domain.policy.tls == "required" and not domain.certificate:
            raise here.error(
                f"'required' needs certificate and key for {domain.name}"
                f" (domain[{i}])"
            )
        domains.append(domain)
    if not any(domain.certificate for domain in domains):
        for i, peer in enumerate(values["peers"]):
            if peer.tls == "required":
                raise where.child("peer").item(i).child("tls").error(
                    "'required' needs a hosted domain with certificate and key,"
                    " so that this peer can connect over TLS"
                )
    return tuple(domains)


# The schema machinery.  A checker is called as check(value, where) with the
# raw TOML value and returns the value to keep, or raises where.error(...).

_Checker = Callable[[Any, "_Where"], Any]
_REQUIRED = object()


@attrs.frozen
class _Where:
    """
    Where in the configuration a value sits, to name it in errors.

    @ivar path: the configuration file.
    @ivar key: the dotted key, C{""} at the top.
    @ivar baseDirectory: what relative paths are relative to.
    """

    path: str
    key: str
    baseDirectory: str

    def child(self, name: str) -> "_Where":
        return attrs.evolve(self, key=f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> "_Where":
        return attrs.evolve(self, key=f"{self.key}[{index}]")

    def error(self, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key, problem)

    def resolve(self, name: str) -> str:
        return os.path.normpath(os.path.join(self.baseDirectory, name))


@attrs.frozen
class _Key:
    """
    One row of a schema table.

    @ivar name: the TOML key.
    @ivar attribute: the attribute of the config object it fills.
    @ivar check: its L{_Checker}.
    @ivar default: the raw TOML value used when the key is absent (it is
        checked like a written one), or C{_REQUIRED}.
    """

    name: str
    attribute: str
    check: _Checker
    default: Any = _REQUIRED


def _readTable(data: Any, keys: tuple[_Key, ...], where: _Where) -> dict:
    """
    Check a TOML table against a schema table.

    @return: the checked values by attribute name.
    """
    if not isinstance(data, dict):
        raise where.error(f"expected a table, got {_describe(data)}")
    known = {key.name: key for key in keys}
    for name in data:
        if name not in known:
            raise where.child(name).error(
                f"unknown key (known here: {', '.join(known)})"
            )
    values = {}
    for key in keys:
        here = where.child(key.name)
        if key.name in data:
            raw = data[key.name]
        elif key.default is _REQUIRED:
            raise here.error("missing (required)")
        else:
            raw = key.default
        values[key.attribute] = key.check(raw, here)
    return values


def _describe(value: Any) -> str:
    """
    @return: the TOML type of C{value} and, when short, the value itself.
    """
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})" if len(value) <= 40 else "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _table(
    cls: type,
    *keys: _Key,
    finish: Optional[Callable[[dict, _Where], dict]] = None,
) -> _Checker:
    """
    @return: a checker of a nested table that builds C{cls} from C{keys};
        C{finish(values, where)} may check and adjust the values first.
    """

    def check(value: Any, where: _Where) -> Any:
        values = _readTable(value, keys, where)
        if finish is not None:
            values = finish(values, where)
        return cls(**values)

    return check


def _arrayOfTables(
    table: _Checker, minimum: int = 0, uniqueBy: Optional[tuple[str, str]] = None
) -> _Checker:
    """
    @param table: the checker of each element.
    @param minimum: the fewest elements allowed.
    @param uniqueBy: C{(attribute, key)}: no two elements may have the same
        value of C{attribute}, reported at C{key} of the later one.
    @return: a checker of an array of tables, giving a L{tuple}.
    """

    def check(value: Any, where: _Where) -> tuple:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            name = where.key.rsplit(".", 1)[-1]
            raise where.error(
                f"expected an array of tables ([[{name}]]), got {_describe(value)}"
            )
        if len(value) < minimum:
            name = where.key.rsplit(".", 1)[-1]
            raise where.error(f"at least {minimum} [[{name}]] table(s) required")
        result = []
        seen: dict[Any, int] = {}
        for i, element in enumerate(value):
            checked = table(element, where.item(i))
            if uniqueBy is not None:
                attribute, key = uniqueBy
                identity = getattr(checked, attribute)
                if identity in seen:
                    raise where.item(i).child(key).error(
                        f"duplicate of {where.key}[{seen[identity]}].{key}"
                        f" ({identity!r})"
                    )
                seen[identity] = i
            result.append(checked)
        return tuple(result)

    return check


def _listOf(item: _Checker, minimum: int = 0, unique: bool = False) -> _Checker:
    """
    @return: a checker of an array whose elements C{item} checks, giving a
        L{tuple}; with C{unique}, repeated elements are kept once.
    """

    def check(value: Any, where: _Where) -> tuple:
        if not isinstance(value, list):
            raise where.error(f"expected an array, got {_describe(value)}")
        if len(value) < minimum:
            raise where.error(f"at least {minimum} required")
        result = tuple(item(element, where.item(i)) for i, element in enumerate(value))
        if unique:
            result = tuple(dict.fromkeys(result))
        return result

    return check


def _string(value: Any, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {_describe(value)}")
    return value


def _nonEmptyString(value: Any, where: _Where) -> str:
    value = _string(value, where)
    if not value:
        raise where.error("must not be empty")
    return value


def _integer(minimum: int, maximum: Optional[int] = None) -> _Checker:
    """
    @return: a checker of an integer (not a boolean) in C{minimum..maximum}.
    """

    def check(value: Any, where: _Where) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.error(f"expected an integer, got {_describe(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            if maximum is None:
                raise where.error(f"must be at least {minimum}, got {value}")
            raise where.error(f"must be from {minimum} to {maximum}, got {value}")
        return value

    return check


def _positiveNumber(value: Any, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"expected a number of seconds, got {_describe(value)}")
    if not (math.isfinite(value) and value > 0):
        raise where.error(f"must be a finite number greater than 0, got {value}")
    return float(value)


def _delay(maximum: float) -> _Checker:
    """
    @return: a checker of a number of seconds from 0 to C{maximum}.
    """

    def check(value: Any, where: _Where) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(f"expected a number of seconds, got {_describe(value)}")
        if not (math.isfinite(value) and 0 <= value <= maximum):
            raise where.error(f"must be from 0 to {maximum:g} seconds, got {value}")
        return float(value)

    return check


def _oneOf(*choices: str) -> _Checker:
    """
    @return: a checker of a string that is one of C{choices}.
    """

    def check(value: Any, where: _Where) -> str:
        value = _string(value, where)
        if value not in choices:
            raise where.error(
                f"must be one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value

    return check


def _optional(check: _Checker) -> _Checker:
    """
    @return: a checker that keeps L{None} (a key left out) and otherwise
        applies C{check}.
    """

    def optional(value: Any, where: _Where) -> Any:
        return None if value is None else check(value, where)

    return optional


def _boolean(value: Any, where: _Where) -> bool:
    if not isinstance(value, bool):
        raise where.error(f"expected true or false, got {_describe(value)}")
    return value


def _domainName(value: Any, where: _Where) -> str:
    value = _string(value, where)
    try:
        return normaliseDomain(value)
    except AddressError as e:
        raise where.error(str(e)) from None


def _hostName(value: Any, where: _Where) -> str:
    value = _nonEmptyString(value, where)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    try:
        return normaliseDomain(value)
    except AddressError as e:
        raise where.error(f"not an IP address, and {e}") from None


def _ipLiteral(text: str, where: _Where, original: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise where.error(
            f"bad DNS server {original!r}: expected an IP address,"
            " optionally with ':port' ('[v6]:port' for IPv6)"
        ) from None


def _dnsServer(value: Any, where: _Where) -> tuple[str, int]:
    """
    Check C{"ip"}, C{"ip:port"}, C{"v6"} or C{"[v6]:port"}.

    @return: C{(ip, port)}; the port is 53 when not given.
    """
    value = _nonEmptyString(value, where)
    host, port = value, "53"
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise where.error(f"bad DNS server {value!r}: expected '[v6]:port'")
        host, port = inside, rest[1:] if rest else "53"
    elif value.count(":") == 1:
        host, port = value.split(":")
    host = _ipLiteral(host, where, value)
    if not (port.isdigit() and port.isascii() and 1 <= int(port) <= 65535):
        raise where.error(f"bad DNS server {value!r}: port must be from 1 to 65535")
    return host, int(port)


def endpointProblem(value: str) -> "str | None":
    """
    Check a Twisted server endpoint description by parsing it against a
    reactor that does nothing.

    @return: L{None} when it is valid, else the reason, one line.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        # Parsing only keeps the reactor for later: none is needed (and
        # twisted.internet.testing would load the test framework into
        # the server).
        endpoint = serverFromString(object(), value)
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        return f"bad endpoint {value!r}: {reason}"
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"bad endpoint {value!r}: port must be from 0 to 65535"
    return None


def _endpoint(value: Any, where: _Where) -> str:
    value = _nonEmptyString(value, where)
    problem = endpointProblem(value)
    if problem is not None:
        raise where.error(problem)
    return value


def _software(value: Any, where: _Where) -> str:
    value = _nonEmptyString(value, where)
    if len(value) > 64 or not value.isascii() or not value.isprintable() or " " in value:
        raise where.error(
            "must be a product token: up to 64 printable ASCII characters,"
            " no spaces"
        )
    return value


def _optionalPath(value: Any, where: _Where) -> Optional[str]:
    """
    @return: the absolute path, or L{None} for C{""}.
    """
    value = _string(value, where)
    return where.resolve(value) if value else None


def _existingFile(value: Any, where: _Where) -> Optional[str]:
    """
    Check an optional path that, when given, names a readable file.
    """
    path = _optionalPath(value, where)
    if path is None:
        return None
    if not os.path.exists(path):
        raise where.error(f"file not found: {path}")
    if not os.path.isfile(path):
        raise where.error(f"not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise where.error(f"file not readable: {path}")
    return path


def _stateDirectory(value: Any, where: _Where) -> str:
    path = where.resolve(_nonEmptyString(value, where))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise where.error(f"not a directory: {path}")
    elif not os.path.isdir(os.path.dirname(path)):
        raise where.error(f"its parent directory does not exist: {path}")
    return path


def _finishServer(values: dict, where: _Where) -> dict:
    state = values["stateDirectory"]
    secret = values["dialbackSecretFile"]
    if secret is None:
        secret = os.path.join(state, "dialback.secret")
    else:
        here = where.child("dialback_secret_file")
        if os.path.isdir(secret):
            raise here.error(f"is a directory: {secret}")
        parent = os.path.dirname(secret)
        if parent != state and not os.path.isdir(parent):
            raise here.error(f"its directory does not exist: {parent}")
    admin = values["adminSocket"]
    if admin is None:
        admin = os.path.join(state, "admin.sock")
    else:
        parent = os.path.dirname(admin)
        if parent != state and not os.path.isdir(parent):
            raise where.child("admin_socket").error(
                f"its directory does not exist: {parent}"
            )
    return {**values, "dialbackSecretFile": secret, "adminSocket": admin}


def _finishQueue(values: dict, where: _Where) -> dict:
    if values["dedupeWindow"] < values["giveUpAfter"]:
        raise where.child("dedupe_window").error(
            "must be at least give_up_after, or a message sent again late"
            " could be delivered twice"
        )
    if values["retryMax"] < values["retryInitial"]:
        raise where.child("retry_max").error("must be at least retry_initial")
    return values


def _address(value: Any, where: _Where) -> str:
    text = _nonEmptyString(value, where)
    try:
        return str(Address.parse(text))
    except AddressError as e:
        raise where.error(f"not an address: {e}") from None


def _finishPeer(values: dict, where: _Where) -> dict:
    if values["host"] is None and values["tls"] is None and values["tlsVerify"] is None:
        raise where.error("sets nothing: give host, tls or tls_verify")
    return values


def _finishDomain(values: dict, where: _Where) -> dict:
    if values["certificate"] and not values["key"]:
        raise where.child("key").error("required when certificate is given")
    if values["key"] and not values["certificate"]:
        raise where.child("certificate").error("required when key is given")
    for address in values["policy"].rateExempt:
        if Address.parse(address).domain != values["name"]:
            raise where.child("policy").child("rate_exempt").error(
                f"{address} is not an address of {values['name']}"
            )
    try:
        options = validateBackendOptions(
            values["backend"], values["backendOptions"], where.baseDirectory
        )
    except ValueError as e:
        raise where.child("backend_options").error(str(e)) from None
    return {**values, "backendOptions": MappingProxyType(dict(options))}


_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*\Z")


def _mediaType(value: Any, where: _Where) -> str:
    value = _nonEmptyString(value, where).lower()
    if not _MEDIA_TYPE.match(value):
        raise where.error(f"not a media type (type/subtype): {value!r}")
    return value


def _backendKind(value: Any, where: _Where) -> str:
    value = _nonEmptyString(value, where)
    kinds = backendKinds()
    if value not in kinds:
        raise where.error(
            f"unknown backend kind {value!r} (known: {', '.join(sorted(kinds))})"
        )
    return value


def _backendOptions(value: Any, where: _Where) -> dict:
    if not isinstance(value, dict):
        raise where.error(f"expected a table, got {_describe(value)}")
    return value


_TIMEOUTS = _table(
    TimeoutsConfig,
    _Key("handshake", "handshake", _positiveNumber, 10.0),
    _Key("dialback", "dialback", _positiveNumber, 15.0),
    _Key("idle", "idle", _positiveNumber, 600.0),
    _Key("keepalive", "keepalive", _positiveNumber, 60.0),
    _Key("connect", "connect", _positiveNumber, 10.0),
)

_LIMITS = _table(
    LimitsConfig,
    _Key("max_record_size", "maxRecordSize", _integer(16384, 16777216), 65536),
    _Key("max_connections_total", "maxConnectionsTotal", _integer(1), 1000),
    _Key("max_connections_per_address", "maxConnectionsPerAddress", _integer(1), 16),
    _Key("max_connections_per_domain", "maxConnectionsPerDomain", _integer(1), 4),
    _Key(
        "max_pending_dialbacks_per_address",
        "maxPendingDialbacksPerAddress",
        _integer(1),
        8,
    ),
    _Key("max_outbound_per_peer", "maxOutboundPerPeer", _integer(1), 2),
    _Key("max_requests_in_progress", "maxRequestsInProgress", _integer(1), 10000),
    _Key("domain_rate", "domainRate", _integer(0), 10000),
    _Key("domain_burst", "domainBurst", _integer(1), 20000),
    _Key(
        "rate_exempt_domains",
        "rateExemptDomains",
        _listOf(_domainName, unique=True),
        [],
    ),
)

_QUEUE = _table(
    QueueConfig,
    _Key("durability", "durability", _oneOf("full", "normal"), "full"),
    _Key("give_up_after", "giveUpAfter", _positiveNumber, 86400.0),
    _Key("retry_initial", "retryInitial", _positiveNumber, 5.0),
    _Key("retry_max", "retryMax", _positiveNumber, 300.0),
    _Key("window", "window", _integer(1, 100000), 5000),
    _Key("max_queued", "maxQueued", _integer(1), 1000000),
    _Key("dedupe_window", "dedupeWindow", _positiveNumber, 172800.0),
    _Key("write_behind", "writeBehind", _delay(1.0), 0.05),
    finish=_finishQueue,
)

_TLS = _table(
    TLSConfig,
    _Key("policy", "policy", _oneOf(*TLS_MODES), "offered"),
    _Key("verify", "verify", _boolean, True),
    _Key("ca_file", "caFile", _existingFile, ""),
)

_SERVER = _table(
    ServerConfig,
    _Key("state_dir", "stateDirectory", _stateDirectory, "state"),
    _Key("dialback_secret_file", "dialbackSecretFile", _optionalPath, ""),
    _Key("admin_socket", "adminSocket", _optionalPath, ""),
    _Key(
        "listen",
        "listen",
        _listOf(_endpoint, minimum=1),
        ["tcp:port=5275:interface=127.0.0.1"],
    ),
    _Key("dns_servers", "dnsServers", _listOf(_dnsServer), []),
    _Key("software", "software", _software, "imxd"),
    _Key("timeouts", "timeouts", _TIMEOUTS, {}),
    _Key("limits", "limits", _LIMITS, {}),
    _Key("tls", "tls", _TLS, {}),
    _Key("queue", "queue", _QUEUE, {}),
    finish=_finishServer,
)

_PEER = _table(
    PeerConfig,
    _Key("domain", "domain", _domainName),
    _Key("host", "host", _optional(_hostName), None),
    _Key("port", "port", _integer(1, 65535), DEFAULT_PORT),
    _Key("tls", "tls", _optional(_oneOf(*TLS_MODES)), None),
    _Key("tls_verify", "tlsVerify", _optional(_boolean), None),
    finish=_finishPeer,
)

_POLICY = _table(
    PolicyConfig,
    _Key("blocked_domains", "blockedDomains", _listOf(_domainName, unique=True), []),
    _Key("tls", "tls", _optional(_oneOf(*TLS_MODES)), None),
    _Key("account_rate", "accountRate", _integer(0), 20),
    _Key("account_burst", "accountBurst", _integer(1), 100),
    _Key("rate_exempt", "rateExempt", _listOf(_address, unique=True), []),
)

_DOMAIN = _table(
    DomainConfig,
    _Key("name", "name", _domainName),
    _Key("backend", "backend", _backendKind),
    _Key("backend_options", "backendOptions", _backendOptions, {}),
    _Key("certificate", "certificate", _existingFile, ""),
    _Key("key", "key", _existingFile, ""),
    _Key("policy", "policy", _POLICY, {}),
    _Key("subscription_timeout", "subscriptionTimeout", _integer(60, 86400), 1800),
    _Key("max_message_size", "maxMessageSize", _integer(1024, 16 * 1024 * 1024), 32768),
    _Key(
        "accepted_types",
        "acceptedTypes",
        _listOf(_mediaType, minimum=1, unique=True),
        ["text/plain", "text/html-lite"],
    ),
    finish=_finishDomain,
)

_TOP = (
    _Key("server", "server", _SERVER, {}),
    _Key(
        "domain", "domains", _arrayOfTables(_DOMAIN, 1, uniqueBy=("name", "name")), []
    ),
    _Key("peer", "peers", _arrayOfTables(_PEER, uniqueBy=("domain", "domain")), []),
)

"""
Backend adapters: the boundary between imxd and a private IM system.

Each adapter registers itself under a I{kind} name (the C{backend} key of a
C{[[domain]]} table in the configuration).  A registration pairs a factory,
which builds the adapter for one hosted domain, with an option validator,
which checks the domain's C{backend_options} table at start-up so that a
mistake is reported before anything runs.

Kinds shipped with imxd are registered when this package is imported.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs

__all__ = [
    "BackendError",
    "BackendRegistration",
    "registerBackend",
    "unregisterBackend",
    "backendKinds",
    "lookupBackend",
    "validateBackendOptions",
    "refuseUnknownOptions",
    "listenOption",
]

class BackendError(Exception):
    """
    A backend cannot be built: its message is one line for the operator,
    naming the domain and the problem.  imxd stops at start-up with it.
    """


BackendFactory = Callable[..., Any]
OptionsValidator = Callable[[Mapping[str, Any], str], dict]


@attrs.frozen
class BackendRegistration:
    """
    One registered kind of backend adapter.

    @ivar kind: the name used in configuration files, e.g. C{"memory"}.
    @ivar factory: called as C{factory(domainConfig)} with a
        L{imxd.config.DomainConfig} whose C{backendOptions} have already been
        validated; returns an object providing
        L{imxd.backend.interfaces.IBackend}.
    @ivar validateOptions: called with the raw C{backend_options} mapping
        and the directory relative paths are taken from; returns the
        normalised options as a new L{dict} or raises L{ValueError} with a
        one-line reason.
    @ivar makeServices: L{None}, or called at start-up as
        C{makeServices(backends, reactor)} with every adapter of this kind;
        returns the process-wide services they share (listeners, for
        example), which become children of the Aggregator.
    """

    kind: str
    factory: BackendFactory
    validateOptions: OptionsValidator
    makeServices: Optional[Callable[..., Iterable[Any]]] = None


_registry: dict[str, BackendRegistration] = {}


def registerBackend(
    kind: str,
    factory: BackendFactory,
    validateOptions: OptionsValidator,
    makeServices: Optional[Callable[..., Iterable[Any]]] = None,
) -> BackendRegistration:
    """
    Register a kind of backend adapter.

    @param kind: the kind name; a non-empty string not registered before.
    @param factory: see L{BackendRegistration.factory}.
    @param validateOptions: see L{BackendRegistration.validateOptions}.
    @param makeServices: see L{BackendRegistration.makeServices}.
    @return: the new registration.
    @raise ValueError: if C{kind} is empty or already registered.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError("backend kind must be a non-empty string")
    if kind in _registry:
        raise ValueError(f"backend kind {kind!r} is already registered")
    registration = BackendRegistration(kind, factory, validateOptions, makeServices)
    _registry[kind] = registration
    return registration


def unregisterBackend(kind: str) -> None:
    """
    Forget a kind of backend adapter (for tests that register their own).

    @param kind: a registered kind name.
    @raise KeyError: if C{kind} is not registered.
    """
    del _registry[kind]


def backendKinds() -> frozenset[str]:
    """
    @return: the names of every registered kind.
    """
    return frozenset(_registry)


def lookupBackend(kind: str) -> BackendRegistration:
    """
    Find the registration of a kind.

    @param kind: a kind name.
    @return: its L{BackendRegistration}.
    @raise KeyError: if C{kind} is not registered; the message lists the
        known kinds.
    """
    try:
        return _registry[kind]
    except KeyError:
        raise KeyError(_unknownKind(kind)) from None


def validateBackendOptions(
    kind: str, options: Mapping[str, Any], baseDirectory: str = "."
) -> dict:
    """
    Check the options of a backend of the given kind.

    @param kind: a kind name.
    @param options: the C{backend_options} table from the configuration.
    @param baseDirectory: the directory relative paths in the options are
        taken from (the configuration file's).
    @return: the normalised options as a new L{dict}.
    @raise ValueError: with a one-line reason, if the kind is unknown or the
        options are not acceptable to it.
    """
    registration = _registry.get(kind)
    if registration is None:
        raise ValueError(_unknownKind(kind))
    return registration.validateOptions(options, baseDirectory)


def refuseUnknownOptions(options: Mapping[str, Any], known) -> None:
    """
    For option validators: refuse an option the backend does not know.

    @raise ValueError: naming the first unknown option and the known ones.
    """
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")


def listenOption(options: Mapping[str, Any], default: str) -> str:
    """
    For option validators: the C{listen} option, a Twisted server endpoint
    description (C{default} when absent).

    @raise ValueError: it is not text or not a valid description.
    """
    from imxd.config import endpointProblem

    listen = options.get("listen", default)
    if not isinstance(listen, str) or not listen:
        raise ValueError("listen: expected a Twisted server endpoint description")
    problem = endpointProblem(listen)
    if problem is not None:
        raise ValueError(f"listen: {problem}")
    return listen


def _unknownKind(kind: str) -> str:
    known = ", ".join(sorted(_registry)) or "none"
    return f"unknown backend kind {kind!r} (known: {known})"


def _imported(module: str, name: str) -> Callable[..., Any]:
    """
    @return: a callable that imports C{module} the first time it is
        called and then calls C{module.name} (dotted names allowed), so
        that a kind's code (the C{local} backend's web stack, for one) is
        loaded only by servers that host a domain of that kind.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        target: Any = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        return target(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"{module}.{name}"
    return call


def _registerBuiltins() -> None:
    from imxd.backend import link, memory, spool

    registerBackend("memory", memory.MemoryBackend.fromConfig, memory.validateOptions)
    registerBackend("spool", spool.SpoolBackend.fromConfig, spool.validateOptions)
    registerBackend(
        "local",
        _imported("imxd.backend.local.backend", "LocalBackend.fromConfig"),
        _imported("imxd.backend.local.backend", "validateOptions"),
        _imported("imxd.backend.local.api", "clientAPIServices"),
    )
    registerBackend(
        "link", link.LinkBackend.fromConfig, link.validateOptions, link.linkServices
    )


_registerBuiltins()

"""
IMX addresses: C{local@domain} (IMX draft, sections 4.2.1 and 4.2.2).

The domain is an Internet domain name (RFC 1034) and may be international:
it is canonicalised with IDNA 2008 and UTS #46 mapping to its lower-case
ASCII (A-label) form.  The local part is ours to define: it is Unicode,
NFC-normalised and case-folded, so addresses compare case-insensitively.
The exact rules are written down in C{docs/addresses.md}; keep the two in
step.

Everything that can go wrong raises L{AddressError} (a L{ValueError}), and
nothing else, whatever the input.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from functools import lru_cache
from typing import NoReturn

import attrs
import idna

__all__ = [
    "AddressError",
    "Address",
    "parseAddress",
    "normaliseDomain",
    "displayDomain",
    "MAX_INPUT_LENGTH",
    "MAX_LOCAL_LENGTH",
    "MAX_ADDRESS_OCTETS",
    "MAX_DOMAIN_OCTETS",
    "MAX_LABEL_OCTETS",
]

MAX_INPUT_LENGTH = 1024

#: The local part that sends delivery failure reports (protocol.md 12.6).
POSTMASTER = "postmaster"
"""
Longest text, in characters, looked at at all: anything longer is refused
before any normalisation work is done.
"""

MAX_LOCAL_LENGTH = 64
"""
Longest local part, in characters (code points) after normalisation.
"""

MAX_ADDRESS_OCTETS = 256
"""
Longest canonical C{local@domain}, in octets of UTF-8.
"""

MAX_DOMAIN_OCTETS = 253
"""
Longest canonical (ASCII) domain, in octets, without a trailing dot.
"""

MAX_LABEL_OCTETS = 63
"""
Longest label of a canonical (ASCII) domain, in octets.
"""

_ATS = frozenset("@\N{SMALL COMMERCIAL AT}\N{FULLWIDTH COMMERCIAL AT}")

# Unicode general categories refused in a local part, and how to name them.
_FORBIDDEN_CATEGORIES = {
    "Cc": "control character",
    "Cf": "format character",
    "Cs": "surrogate",
    "Co": "private-use character",
    "Cn": "unassigned code point",
}

# Printable ASCII except space and "@": a local part made only of these
# needs neither normalisation nor per-character checks, only lower-casing.
_plainAsciiLocal = re.compile(r"[!-?A-~]+").fullmatch

# A final label that some resolvers or URL parsers would read as (part of)
# an IPv4 address: decimal, or hexadecimal with a 0x prefix.
_numericLabel = re.compile(r"[0-9]+|0x[0-9a-f]*").fullmatch


class AddressError(ValueError):
    """
    Text that is not a valid IMX address, domain or local part.

    The message is one line of English naming the bad input and what is
    wrong with it, fit to show to a user or log.
    """


class _PartError(AddressError):
    """
    A part of an address is invalid.

    Raised by the normalisers; L{Address.parse} catches it and re-raises a
    plain L{AddressError} that names the whole address instead.

    @ivar reason: what is wrong, without the input (e.g. C{"empty label"}).
    @ivar part: which part is wrong: C{"local part"}, C{"domain"} or
        C{"address"}.
    """

    def __init__(self, text: str, part: str, reason: str) -> None:
        super().__init__(f"{_quote(text)} is not a valid {part}: {reason}")
        self.part = part
        self.reason = reason


def _quote(value: object) -> str:
    """
    Quote user input for an error message: one line, and not too long.
    """
    if isinstance(value, (str, bytes)) and len(value) > 80:
        return f"{value[:60]!r}... ({len(value)} long)"
    return repr(value)


def _describeCharacter(char: str) -> str:
    """
    Name a character for an error message, e.g. C{"U+0007"} or
    C{"U+00A0 (NO-BREAK SPACE)"}.
    """
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X} ({name})" if name else f"U+{ord(char):04X}"


def _checkType(value: object, what: str) -> str:
    """
    Return C{value} as a plain L{str}, or refuse it.

    @raise AddressError: C{value} is not a L{str}.
    """
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise AddressError(
            f"{_quote(bytes(value))} is not a valid {what}: it is bytes, not"
            " text; decode it first (Address.fromBytes decodes UTF-8)"
        )
    raise AddressError(
        f"{_quote(value)} is not a valid {what}: expected str, got"
        f" {type(value).__name__}"
    )


def _normaliseLocal(value: object) -> str:
    """
    Canonicalise a local part: NFC, case fold, NFC again, then check it.

    @param value: the local part as given.
    @return: the canonical local part.
    @raise AddressError: C{value} is not a valid local part (a L{_PartError}
        when C{value} is text).
    """
    text = _checkType(value, "local part")

    def fail(reason: str) -> NoReturn:
        raise _PartError(text, "local part", reason)

    if not text:
        fail("it is empty")
    if len(text) > MAX_INPUT_LENGTH:
        fail(f"longer than {MAX_INPUT_LENGTH} characters")
    if _plainAsciiLocal(text):
        # Fast path: nothing to normalise and nothing forbidden; ASCII
        # case folding is lower-casing.
        local = text.lower()
    else:
        # Case folding can leave text that is not NFC (U+FB06 U+0323 folds
        # to "st" + U+0323, which NFC then composes), so normalise again
        # to make the result canonical and the whole step idempotent.
        local = unicodedata.normalize(
            "NFC", unicodedata.normalize("NFC", text).casefold()
        )
        for char in local:
            if char in _ATS:
                fail(f"it contains {_describeCharacter(char)}; '@' is reserved")
            if char.isspace():
                fail(f"it contains whitespace {_describeCharacter(char)}")
            category = unicodedata.category(char)
            if category in _FORBIDDEN_CATEGORIES:
                fail(
                    f"it contains {_FORBIDDEN_CATEGORIES[category]}"
                    f" {_describeCharacter(char)}"
                )
    if len(local) > MAX_LOCAL_LENGTH:
        fail(
            f"longer than {MAX_LOCAL_LENGTH} characters"
            f" ({len(local)} after normalisation)"
        )
    return local


def _domainFailure(text: str, error: Exception) -> str:
    """
    Explain why C{idna.encode(text, uts46=True)} refused C{text}.

    Only called on the error path, so it may repeat work.

    @param text: the domain as given.
    @param error: what L{idna.encode} raised.
    @return: the reason to report.
    """
    try:
        mapped = idna.uts46_remap(text, std3_rules=False)
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        return f"not valid IDNA ({e})"
    labels = mapped.split(".")
    if len(labels) > 1 and labels[-1] == "":
        del labels[-1]
    total = len(labels) - 1
    for label in labels:
        if not label:
            return "it has an empty label"
        try:
            encoded = idna.alabel(label)
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            # Report the length first if that is wrong, however else the
            # label is wrong: it is the plainer reason.
            try:
                encoded = (
                    label.encode("ascii")
                    if label.isascii()
                    else b"xn--" + label.encode("punycode")
                )
            except UnicodeError:
                encoded = b""
            if len(encoded) <= MAX_LABEL_OCTETS:
                return f"label {_quote(label)} is not valid IDNA ({e})"
        if len(encoded) > MAX_LABEL_OCTETS:
            return (
                f"label {_quote(label)} is longer than {MAX_LABEL_OCTETS}"
                f" octets ({len(encoded)} in ASCII form)"
            )
        total += len(encoded)
    if total > MAX_DOMAIN_OCTETS:
        return f"longer than {MAX_DOMAIN_OCTETS} octets ({total} in ASCII form)"
    return f"not valid IDNA ({error})"


def _normaliseDomainUncached(text: str) -> str:
    """
    Canonicalise a domain; see L{normaliseDomain}.

    @param text: the domain as given, a plain L{str} of at most
        L{MAX_INPUT_LENGTH} characters.
    @return: the canonical domain.
    @raise _PartError: C{text} is not a valid domain.
    """

    def fail(reason: str) -> NoReturn:
        raise _PartError(text, "domain", reason)

    if not text:
        fail("it is empty")
    for char in text:
        if char.isspace():
            fail(f"it contains whitespace {_describeCharacter(char)}")
    if ":" in text or text.startswith("["):
        try:
            ipaddress.ip_address(text[1:-1] if text.startswith("[") else text)
        except ValueError:
            if ":" in text:
                fail("it contains ':' (a domain has no port)")
        else:
            fail("it is an IP address literal; an IMX domain must be a name")
    try:
        encoded = idna.encode(text, uts46=True)
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        failure = _domainFailure(text, e)
    else:
        failure = None
    if failure is not None:
        fail(failure)
    # IDNA keeps one trailing dot (the root); the canonical form drops it.
    if encoded.endswith(b"."):
        encoded = encoded[:-1]
    domain = encoded.decode("ascii").lower()
    if not domain:
        fail("it is empty")
    labels = domain.split(".")
    for label in labels:
        if not label:
            fail("it has an empty label")
        if len(label) > MAX_LABEL_OCTETS:
            fail(f"label {_quote(label)} is longer than {MAX_LABEL_OCTETS} octets")
    if len(domain) > MAX_DOMAIN_OCTETS:
        fail(f"longer than {MAX_DOMAIN_OCTETS} octets ({len(domain)})")
    if _numericLabel(labels[-1]):
        fail(
            "it is an IP address literal (its last label is a number);"
            " an IMX domain must be a name"
        )
    return domain


# Exceptions are not cached by lru_cache: an invalid domain is checked (and
# refused) afresh every time.
_normaliseDomainCached = lru_cache(maxsize=4096)(_normaliseDomainUncached)


def normaliseDomain(text: str) -> str:
    """
    Return the canonical form of a domain name.

    The steps, in order: refuse non-text, empty text, text longer than
    L{MAX_INPUT_LENGTH} characters, whitespace and IPv6 literals; map and
    encode with IDNA 2008 and UTS #46 (C{idna.encode(text, uts46=True)}:
    case folding, width folding, ideographic full stops become dots, and
    Unicode labels become A-labels); drop one trailing dot; lower-case;
    then check the limits (labels of 1 to 63 octets, at most 253 octets in
    all) and refuse a numeric last label (an IPv4 literal).  Single-label
    names such as C{localhost} are allowed.

    @param text: a domain name, Unicode or ASCII, e.g. C{"Bücher.example."}.
    @return: the lower-case ASCII form, e.g. C{"xn--bcher-kva.example"}.
    @raise AddressError: C{text} is not a valid domain name.
    """
    text = _checkType(text, "domain")
    if len(text) > MAX_INPUT_LENGTH:
        raise _PartError(text, "domain", f"longer than {MAX_INPUT_LENGTH} characters")
    return _normaliseDomainCached(text)


def displayDomain(asciiDomain: str) -> str:
    """
    Return the Unicode (U-label) form of a domain, for showing to people.

    Never compare or store this form: use L{normaliseDomain} for that.

    @param asciiDomain: a domain, normally in canonical ASCII form (any
        form L{normaliseDomain} accepts will do).
    @return: the domain with its A-labels decoded, e.g. C{"bücher.example"}
        for C{"xn--bcher-kva.example"}.
    @raise AddressError: C{asciiDomain} is not a valid domain name.
    """
    domain = normaliseDomain(asciiDomain)
    try:
        return idna.decode(domain)
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        raise _PartError(asciiDomain, "domain", f"not valid IDNA ({e})") from None


def _checkAddressLength(local: str, domain: str) -> None:
    """
    Refuse a canonical address longer than L{MAX_ADDRESS_OCTETS}.

    @raise _PartError: it is too long.
    """
    # Each character is at most 4 octets: skip the encoding when it cannot
    # matter.
    if 4 * len(local) + 1 + len(domain) <= MAX_ADDRESS_OCTETS:
        return
    size = len(local.encode("utf-8")) + 1 + len(domain)
    if size > MAX_ADDRESS_OCTETS:
        raise _PartError(
            f"{local}@{domain}",
            "address",
            f"longer than {MAX_ADDRESS_OCTETS} octets of UTF-8 ({size})",
        )


@attrs.frozen
class Address:
    """
    An IMX address, C{local@domain}, in canonical form.

    Two addresses are the same address exactly when they are equal.
    Constructing one canonicalises both parts, so
    C{Address("Bob", "Bücher.example")} is
    C{Address(local="bob", domain="xn--bcher-kva.example")}.

    @ivar local: the local part: NFC, case-folded, 1 to 64 characters.
    @ivar domain: the domain in canonical lower-case ASCII form (see
        L{normaliseDomain}).

    @raise AddressError: (from the constructor) a part is invalid, or the
        whole is longer than L{MAX_ADDRESS_OCTETS} octets of UTF-8.
    """

    local: str = attrs.field(converter=_normaliseLocal)
    domain: str = attrs.field(converter=normaliseDomain)

    def __attrs_post_init__(self) -> None:
        _checkAddressLength(self.local, self.domain)

    def __str__(self) -> str:
        """
        @return: C{local@domain}, the canonical text form.
        """
        return f"{self.local}@{self.domain}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """
        Parse the text form of an address, C{local@domain}.  Valid
        addresses are remembered (L{PARSED_ADDRESSES} of them): the same
        text parses once.

        @param text: the address; only L{str} is accepted (see
            L{Address.fromBytes} for bytes).  Nothing is stripped.
        @return: the canonical address.
        @raise AddressError: C{text} is not a valid address; the message
            names C{text} and says what is wrong.
        """
        if type(text) is str and cls is Address:
            return _parseCached(text)
        return cls._parse(text)

    @classmethod
    def _parse(cls, text: str) -> Address:
        text = _checkType(text, "address")

        def fail(reason: str) -> NoReturn:
            raise AddressError(f"{_quote(text)} is not a valid address: {reason}")

        if not text:
            fail("it is empty")
        if len(text) > MAX_INPUT_LENGTH:
            fail(f"longer than {MAX_INPUT_LENGTH} characters")
        if text[0].isspace() or text[-1].isspace():
            fail("leading or trailing whitespace (it is not stripped)")
        ats = text.count("@")
        if ats == 0:
            fail("no '@' (an address is local@domain)")
        if ats > 1:
            fail("more than one '@'")
        local, domain = text.split("@")
        if not local:
            fail("empty local part")
        if not domain:
            fail("empty domain")
        try:
            return cls(local, domain)
        except _PartError as e:
            part, reason = e.part, e.reason
        fail(reason if part == "address" else f"invalid {part}: {reason}")

    @classmethod
    def fromBytes(cls, data: bytes) -> Address:
        """
        Parse an address received as UTF-8 octets.

        @param data: the address in UTF-8 (L{bytes}, L{bytearray} or
            L{memoryview}); decoding is strict.
        @return: the canonical address.
        @raise AddressError: C{data} is not valid UTF-8, or the text is not
            a valid address.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise AddressError(
                f"{_quote(data)} is not a valid address: expected bytes, got"
                f" {type(data).__name__}"
            )
        data = bytes(data)
        if len(data) > 4 * MAX_INPUT_LENGTH:
            raise AddressError(
                f"{_quote(data)} is not a valid address: longer than"
                f" {MAX_INPUT_LENGTH} characters"
            )
        try:
            text = data.decode("utf-8", "strict")
        except UnicodeDecodeError as e:
            raise AddressError(
                f"{_quote(data)} is not a valid address: not valid UTF-8"
                f" ({e.reason} at octet {e.start})"
            ) from None
        return cls.parse(text)


#: How many valid addresses L{Address.parse} remembers.
PARSED_ADDRESSES = 65536

# Addresses are immutable, so one parsed value serves every caller; an
# invalid one raises each time (lru_cache does not keep exceptions).
_parseCached = lru_cache(maxsize=PARSED_ADDRESSES)(Address._parse)


def parseAddress(text: str) -> Address:
    """
    Parse the text form of an address; the same as L{Address.parse}.

    @param text: the address, C{local@domain}, as L{str}.
    @return: the canonical address.
    @raise AddressError: C{text} is not a valid address.
    """
    return Address.parse(text)

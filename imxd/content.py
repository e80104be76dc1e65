"""
Message content at the edge (draft section 5, C{docs/protocol.md} 12.2):
where a message enters imxd from a client, its body is built or checked
against the MIME subset and C{text/html-lite} is sanitised with nh3.
Servers in transit never call this: they route on the envelope.

Bodies are composed by hand, not with the stdlib C{email} generator, so a
very long line travels octet for octet (C{set_content} would re-wrap it as
quoted-printable).  Submitted bodies are read with the stdlib header parser.
"""

from __future__ import annotations

import functools
import re

import attrs

from imxd.address import Address, AddressError
from imxd.peer import Refused
from imxd.wire import ErrorCode

#: The media types of the subset.
PLAIN = "text/plain"
HTML_LITE = "text/html-lite"
MEDIA_TYPES = (PLAIN, HTML_LITE)

#: text/html-lite: the tags allowed; everything else is removed (its text
#: is kept, except inside script and style).
HTML_LITE_TAGS = frozenset(
    {"a", "b", "blockquote", "br", "code", "em", "i", "li", "ol", "p", "pre",
     "s", "span", "strong", "sub", "sup", "u", "ul"}
)

#: text/html-lite: the attributes allowed, per tag.
HTML_LITE_ATTRIBUTES = {"a": {"href", "title"}, "span": {"title"}}

#: text/html-lite: the URL schemes allowed in C{href}.
HTML_LITE_SCHEMES = frozenset({"http", "https", "mailto", "imx"})

_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_HEADER_VALUE = re.compile(r"[^\x00-\x1f\x7f]*\Z")


@attrs.frozen
class Content:
    """
    A body that passed the edge checks.

    @ivar mediaType: C{text/plain} or C{text/html-lite}.
    @ivar contentType: the CONTENT_TYPE for the MESSAGE record.
    @ivar body: the MIME entity, octets.
    @ivar text: the content as text (sanitised, for html-lite).
    @ivar headers: the C{X-} headers, in order.
    """

    mediaType: str
    contentType: str
    body: bytes
    text: str
    headers: tuple = ()


def sanitiseHtmlLite(html):
    """
    @return: C{html} reduced to the html-lite subset by nh3: only
        L{HTML_LITE_TAGS} and L{HTML_LITE_ATTRIBUTES}, links only to
        L{HTML_LITE_SCHEMES}.
    """
    # Imported here: servers without a client-facing backend never load it.
    import nh3

    return nh3.clean(
        html,
        tags=set(HTML_LITE_TAGS),
        attributes={tag: set(names) for tag, names in HTML_LITE_ATTRIBUTES.items()},
        url_schemes=set(HTML_LITE_SCHEMES),
        link_rel="noopener noreferrer",
    )


@functools.lru_cache(maxsize=256)
def mediaTypeOf(contentType):
    """
    @return: the C{type/subtype} of a Content-Type value, lower-case,
        without parameters (remembered for the last 256 values: a busy
        domain sees the same few on every message).
    """
    return contentType.split(";", 1)[0].strip().lower()


def _mediaType(value):
    mediaType = mediaTypeOf(value)
    if mediaType not in MEDIA_TYPES:
        raise Refused(
            ErrorCode.MEDIA_TYPE_REFUSED,
            f"{mediaType or 'no type'} is not accepted: only text/plain and "
            "text/html-lite (no attachments or binary parts)",
        )
    return mediaType


def _checkHeader(name, value):
    if not name.lower().startswith("x-") or not _HEADER_NAME.match(name):
        raise Refused(
            ErrorCode.MALFORMED, f"header {name!r}: only X- headers may be added"
        )
    if not _HEADER_VALUE.match(value):
        raise Refused(ErrorCode.MALFORMED, f"header {name}: control characters")


def compose(sender, recipient, text, mediaType=PLAIN, headers=(), maxSize=None):
    """
    Build the body of a message a client sends: From and To equal to the
    envelope, the content type, C{X-} headers, an empty line and the text
    (UTF-8, 8bit, never re-wrapped).  html-lite is sanitised first.

    @param headers: C{(name, value)} pairs; each name must start with C{X-}.
    @param maxSize: the largest body allowed, octets, or L{None}.
    @return: the L{Content}.
    @raise Refused: C{media-type-refused}, C{malformed} or
        C{message-too-large}.
    """
    mediaType = _mediaType(mediaType)
    headers = tuple((str(n), str(v)) for n, v in headers)
    for name, value in headers:
        _checkHeader(name, value)
    if mediaType == HTML_LITE:
        text = sanitiseHtmlLite(text)
    contentType = f"{mediaType}; charset=utf-8"
    lines = [
        f"From: {sender}",
        f"To: {recipient}",
        f"Content-Type: {contentType}",
        "Content-Transfer-Encoding: 8bit",
        *(f"{name}: {value}" for name, value in headers),
    ]
    body = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + text.encode("utf-8")
    _checkSize(body, maxSize)
    return Content(mediaType, contentType, body, text, headers)


def _checkSize(body, maxSize):
    if maxSize is not None and len(body) > maxSize:
        raise Refused(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"{len(body)} octets; at most {maxSize} are accepted",
        )


def check(sender, recipient, body, maxSize=None):
    """
    Check a complete MIME body a client submits against the subset, and
    return it rebuilt (html-lite sanitised, only From, To, Content-Type,
    Content-Transfer-Encoding and X- headers kept).

    @raise Refused: C{malformed} (no From or To, bad headers),
        C{sender-mismatch} (From or To differ from the envelope),
        C{media-type-refused} (other types, multipart, base64),
        C{invalid-utf8}, or C{message-too-large}.
    """
    _checkSize(body, maxSize)
    head, separator, content = _split(body)
    message = _headers(head)
    if message.defects:
        raise Refused(ErrorCode.MALFORMED, f"bad header block: {message.defects[0]!r}")
    for field, expected in (("From", sender), ("To", recipient)):
        values = message.get_all(field) or []
        if len(values) != 1:
            raise Refused(ErrorCode.MALFORMED, f"exactly one {field} header is required")
        try:
            same = str(Address.parse(values[0].strip())) == str(Address.parse(expected))
        except AddressError as e:
            raise Refused(ErrorCode.MALFORMED, f"{field}: {e}") from None
        if not same:
            raise Refused(
                ErrorCode.SENDER_MISMATCH, f"{field} header differs from the envelope"
            )
    mediaType = _mediaType(message.get("Content-Type", PLAIN))
    charset = (message.get_param("charset") or "utf-8").lower()
    if charset not in ("utf-8", "us-ascii"):
        raise Refused(ErrorCode.MEDIA_TYPE_REFUSED, f"charset {charset} (only utf-8)")
    encoding = (message.get("Content-Transfer-Encoding") or "8bit").strip().lower()
    if encoding not in ("7bit", "8bit"):
        raise Refused(
            ErrorCode.MEDIA_TYPE_REFUSED,
            f"Content-Transfer-Encoding {encoding}: binary content is not accepted",
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(ErrorCode.INVALID_UTF8, "the body is not UTF-8") from None
    extra = [
        (name, str(value))
        for name, value in message.items()
        if name.lower().startswith("x-")
    ]
    return compose(sender, recipient, text, mediaType, extra, maxSize)


def _split(body):
    """
    @return: C{(head, separator, content)}: the header block and the
        content around the first empty line (CRLF or LF).
    """
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, content = body.partition(separator)
        if found:
            return head, found, content
    raise Refused(ErrorCode.MALFORMED, "no empty line after the headers")


def _headers(head):
    """
    Parse a header block as UTF-8 text, so that every value is a string
    (non-ASCII values included).

    @raise Refused: C{invalid-utf8}, or C{malformed} if unreadable.
    """
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(ErrorCode.INVALID_UTF8, "the headers are not UTF-8") from None
    import email.parser  # here: parsing happens only at the client edge
    import email.policy

    try:
        return email.parser.HeaderParser(policy=email.policy.compat32).parsestr(
            text + "\r\n\r\n"
        )
    except Exception as e:  # the parser is lenient; this is a safety net
        raise Refused(ErrorCode.MALFORMED, f"unreadable headers: {e}") from None


def read(body):
    """
    Read a body for display: its media type, C{X-} headers and text.  Used
    where a message leaves imxd to a client; tolerant of what other
    servers send (unknown headers are ignored).

    @return: a L{Content}.
    @raise Refused: C{malformed} or C{invalid-utf8}.
    """
    head, _, content = _split(body)
    message = _headers(head)
    contentType = message.get("Content-Type", f"{PLAIN}; charset=utf-8")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(ErrorCode.INVALID_UTF8, "the body is not UTF-8") from None
    mediaType = mediaTypeOf(contentType)
    headers = tuple(
        (name, str(value)) for name, value in message.items() if name.lower().startswith("x-")
    )
    return Content(mediaType, contentType, body, text, headers)

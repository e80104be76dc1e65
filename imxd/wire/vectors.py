"""
Known-answer test vectors: one record of every type, as published in
C{docs/protocol.md}.  The test suite checks that each encodes to the hex in
the document and decodes back; C{python -m imxd.wire.vectors} prints the
document's vector section.
"""

from imxd.wire.constants import ErrorCode
from imxd.wire.fields import FIELD_HEADER, iterateFields
from imxd.wire.framing import HEADER_SIZE
from imxd.wire.records import (
    Ack,
    Attributes,
    Close,
    DialbackKey,
    DialbackResult,
    DialbackSecret,
    DialbackVerify,
    Delivered,
    DomainAttributesGet,
    Drain,
    Error,
    Hello,
    LinkAuth,
    Message,
    Notify,
    Ping,
    Pong,
    Publish,
    Redirect,
    Renew,
    Report,
    StartTLS,
    StartTLSProceed,
    Status,
    StatusResult,
    Subscribe,
    SubscriptionState,
    Unsubscribe,
    UserAttributesGet,
    encodeRecord,
)

_TOKEN = bytes.fromhex("01") + b"node1" + bytes(range(16))
_SECRET = bytes(range(0xA0, 0xB0))

#: C{(name, record)} for every record type, in registry order.
VECTORS = (
    (
        "HELLO",
        Hello(
            versionMin=1,
            versionMax=1,
            capabilities=("dialback", "starttls"),
            maxRecord=65536,
            software="imxd/0.1",
        ),
    ),
    ("PING", Ping(tag=1)),
    ("PONG", Pong(tag=1)),
    ("CLOSE", Close(text="idle")),
    (
        "ERROR",
        Error(tag=7, code=ErrorCode.RELAY_DENIED, text="c.example is not hosted here"),
    ),
    ("ACK", Ack(tags=(5, 6, 7))),
    (
        "REDIRECT",
        Redirect(host="192.0.2.7", port=5275, text="draining"),
    ),
    ("STARTTLS", StartTLS(tag=2)),
    ("STARTTLS_PROCEED", StartTLSProceed(tag=2)),
    (
        "DIALBACK_KEY",
        DialbackKey(tag=3, fromDomain="b.example", toDomain="a.example", token=_TOKEN),
    ),
    (
        "DIALBACK_VERIFY",
        DialbackVerify(
            tag=9,
            fromDomain="a.example",
            toDomain="b.example",
            token=_TOKEN,
            secret=_SECRET,
        ),
    ),
    (
        "DIALBACK_SECRET",
        DialbackSecret(fromDomain="b.example", toDomain="a.example", secret=_SECRET),
    ),
    (
        "DIALBACK_RESULT",
        DialbackResult(tag=3, fromDomain="b.example", toDomain="a.example"),
    ),
    (
        "MESSAGE",
        Message(
            tag=7,
            sender="bob@b.example",
            recipient="alice@a.example",
            messageId="m-1",
            contentType="text/plain",
            body=b"From: bob@b.example\r\nTo: alice@a.example\r\n\r\nhi",
            attributes=("alias=Bob",),
        ),
    ),
    (
        "SUBSCRIBE",
        Subscribe(
            tag=10, subscriber="bob@b.example", publisher="alice@a.example", expires=1800
        ),
    ),
    (
        "RENEW",
        Renew(
            tag=11, subscriber="bob@b.example", publisher="alice@a.example", expires=1800
        ),
    ),
    (
        "UNSUBSCRIBE",
        Unsubscribe(tag=12, subscriber="bob@b.example", publisher="alice@a.example"),
    ),
    (
        "SUBSCRIPTION_STATE",
        SubscriptionState(
            tag=10,
            response=True,
            publisher="alice@a.example",
            subscriber="bob@b.example",
            state="granted",
            expires=1800,
        ),
    ),
    (
        "NOTIFY",
        Notify(
            tag=13,
            publisher="alice@a.example",
            subscribers=("bob@b.example", "carol@b.example"),
            presence="away",
            status="lunch",
        ),
    ),
    (
        "USER_ATTRIBUTES_GET",
        UserAttributesGet(
            tag=14, requester="bob@b.example", target="alice@a.example", names=("alias",)
        ),
    ),
    (
        "DOMAIN_ATTRIBUTES_GET",
        DomainAttributesGet(tag=15, requester="b.example", target="a.example"),
    ),
    (
        "ATTRIBUTES",
        Attributes(
            tag=14, target="alice@a.example", attributes=("alias=Alice",), ttl=300
        ),
    ),
    ("LINK_AUTH", LinkAuth(tag=1, domain="a.example", secret=_SECRET)),
    (
        "PUBLISH",
        Publish(tag=2, user="alice@a.example", presence="away", status="at lunch"),
    ),
    (
        "REPORT",
        Report(
            tag=3,
            sender="alice@a.example",
            recipient="bob@b.example",
            messageId="m-1",
            code=ErrorCode.UNKNOWN_USER,
            text="no such user",
        ),
    ),
    ("DELIVERED", Delivered(tags=(2, 4))),
    ("DRAIN", Drain(tag=1, host="192.0.2.8", port=5275)),
    ("STATUS", Status(tag=2)),
    ("STATUS_RESULT", StatusResult(tag=2, attributes=("connections=3",))),
)


def vectorHexLines(record):
    """
    Lay a record's bytes out for reading: the header on one line, then one
    line per field.

    @return: lines of space-separated hex octets.
    """
    data = encodeRecord(record)
    lines = [data[:HEADER_SIZE].hex(" ")]
    body = data[HEADER_SIZE:]
    offset = 0
    for _identifier, raw in iterateFields(body):
        size = FIELD_HEADER.size + len(raw)
        lines.append(body[offset : offset + size].hex(" "))
        offset += size
    return lines


def _plain(value):
    """
    @return: C{value} with enum members as plain integers, for display.
    """
    return int(value) if isinstance(value, int) else value


def vectorMarkdown():
    """
    @return: the vector section of C{docs/protocol.md}, as Markdown.
    """
    out = []
    for name, record in VECTORS:
        fields = ", ".join(
            f"{spec.field.name}={_plain(getattr(record, spec.attribute))!r}"
            for spec in record.FIELDS
            if getattr(record, spec.attribute) not in (None, ())
        )
        out.append(f"#### {name}\n")
        out.append(
            f"Tag {record.tag}, flags 0x{int(record.flags):04x}"
            + (f"; {fields}" if fields else "; no fields")
            + ".\n"
        )
        out.append(f"```imx-vector {name}")
        out.extend(vectorHexLines(record))
        out.append("```\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(vectorMarkdown())

"""
A link backend (C{docs/protocol.md} section 19) for one domain: it echoes
every message to its sender, grants every subscription, prints reports::

    python docs/examples/echo_backend.py tcp:127.0.0.1:5280 example.test SECRET
"""

import sys
import uuid

from twisted.internet import defer, task

from imxd.link import LinkClient, LinkHandler
from imxd.wire import Message


class EchoHandler(LinkHandler):
    """
    Echoes messages, grants subscriptions, prints reports.

    @ivar client: the L{LinkClient} that echoes are sent through.
    """

    client = None

    def deliverMessage(self, message):
        """Accept C{message} and echo it."""
        self.echo(self.client, message)

    def echo(self, client, message):
        """
        Send C{message}'s content back to its sender, from its recipient,
        under a new MESSAGE_ID.  An echo (marked C{X-Echo}) and a failure
        report (from C{postmaster}) are not echoed, so echoes never loop.

        @return: the L{Deferred} of the echo's sending, or L{None}.
        """
        body = message.body
        headers, content = body.split(b"\r\n\r\n", 1) if b"\r\n\r\n" in body else (b"", body)
        if b"\nx-echo:" in b"\n" + headers.lower() or message.sender.startswith("postmaster@"):
            return None
        head = (f"From: {message.recipient}\r\nTo: {message.sender}\r\n"
                f"Content-Type: {message.contentType}\r\nX-Echo: {message.messageId}\r\n\r\n")
        echo = Message(sender=message.recipient, recipient=message.sender,
                       messageId=f"echo-{uuid.uuid4().hex}",
                       contentType=message.contentType, body=head.encode("utf-8") + content)
        sent = client.sendMessage(echo)
        return sent.addErrback(lambda f: print("echo refused:", f.getErrorMessage()))

    def decideSubscription(self, subscriber, publisher):
        """Everyone may see everyone's presence."""
        return "granted"

    def deliveryReport(self, report):
        """Print what became of an echo."""
        outcome = "delivered" if report.code is None else f"failed: {report.code} {report.text}"
        print(f"{report.messageId} to {report.recipient}: {outcome}")


def main(reactor, endpoint, domain, secret):
    """Serve C{domain} over the link at C{endpoint} until interrupted."""
    handler = EchoHandler()
    client = handler.client = LinkClient(reactor, endpoint, {domain: secret}, handler)
    client.startService()
    reactor.addSystemEventTrigger("before", "shutdown", client.stopService)
    linked = client.whenLinked()
    linked.addCallbacks(lambda _: print(f"serving {domain}; Ctrl-C stops"), _refused)
    return linked.addCallback(lambda _: defer.Deferred())


def _refused(failure):
    sys.exit(f"imxd refused the link: {failure.getErrorMessage()}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or not 16 <= len(sys.argv[3].encode("utf-8")) <= 64:
        sys.exit(f"usage: {sys.argv[0]} ENDPOINT DOMAIN SECRET (16 to 64 octets)")
    task.react(main, sys.argv[1:])

"""
Tests for the envelope checks of L{imxd.router}: the domain pair of a Data
record and the MESSAGE_ID rule.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imxd.peer import Refused
from imxd.router import dataPair, printableId
from imxd.wire import ErrorCode, Message, Notify

#: The rule as protocol.md states it: printable ASCII, 0x21 to 0x7e.
PRINTABLE = re.compile("[\x21-\x7e]+")


def message(sender="alice@a.test", recipient="bob@b.test", messageId="m-1"):
    return Message(
        sender=sender, recipient=recipient, messageId=messageId, contentType="text/plain", body=b"hi"
    )


class PrintableIdTests(SynchronousTestCase):
    """
    L{printableId} is the MESSAGE_ID rule.
    """

    @settings(max_examples=500, deadline=None)
    @given(st.text(alphabet=st.characters(max_codepoint=0x2FF), max_size=20))
    def test_agreesWithRule(self, text):
        """
        Any text passes exactly when every character is 0x21 to 0x7e and
        there is at least one.
        """
        self.assertEqual(printableId(text), PRINTABLE.fullmatch(text) is not None)

    def test_edges(self):
        """
        Space, DEL, a control character, a non-ASCII letter and the empty
        id fail; the ends of the range pass.
        """
        for text in (" ", "a b", "a\x7f", "a\tb", "caf\xe9", ""):
            self.assertFalse(printableId(text), repr(text))
        self.assertTrue(printableId("!~"))

    def test_notText(self):
        """
        Only a string can be a MESSAGE_ID (a backend in process could hand
        over anything): other values fail, without raising.
        """
        for value in (None, 0, 5, b"abc", b"", ["m-1"]):
            self.assertFalse(printableId(value), repr(value))


class DataPairTests(SynchronousTestCase):
    """
    L{dataPair} gives the canonical domains of a record's sender and
    recipients, or refuses it as malformed.
    """

    def test_message(self):
        """
        A MESSAGE's pair is its sender's and its recipient's domains,
        canonical.
        """
        self.assertEqual(dataPair(message("Alice@A.Test", "bob@B.TEST")), ("a.test", "b.test"))

    def test_messageIdNotPrintable(self):
        """
        A MESSAGE whose MESSAGE_ID is not printable ASCII is malformed.
        """
        for messageId in ("m 1", "m\x7f", "m\xe9", None, b"m-1"):
            with self.assertRaises(Refused) as caught:
                dataPair(message(messageId=messageId))
            self.assertEqual(caught.exception.code, ErrorCode.MALFORMED)
            self.assertIn("MESSAGE_ID", caught.exception.text)

    def test_badAddressNamesField(self):
        """
        A MESSAGE with an invalid sender or recipient is malformed, and the
        refusal names the field.
        """
        for sender, recipient, field in (("no-at-sign", "bob@b.test", "FROM"), ("alice@a.test", "@b.test", "TO")):
            with self.assertRaises(Refused) as caught:
                dataPair(message(sender, recipient))
            self.assertEqual(caught.exception.code, ErrorCode.MALFORMED)
            self.assertTrue(caught.exception.text.startswith(f"{field}: "), caught.exception.text)

    def test_notifySpansOneDomain(self):
        """
        A NOTIFY's recipients must share a domain.
        """
        notify = Notify(publisher="alice@a.test", subscribers=("bob@b.test", "carol@c.test"), presence="online")
        with self.assertRaises(Refused) as caught:
            dataPair(notify)
        self.assertEqual(caught.exception.code, ErrorCode.MALFORMED)
        self.assertEqual(
            dataPair(Notify(publisher="alice@a.test", subscribers=("bob@b.test",), presence="online")),
            ("a.test", "b.test"),
        )

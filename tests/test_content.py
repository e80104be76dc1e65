"""
Tests for L{imxd.content}: the MIME subset and html-lite at the edge.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imxd.content import (
    HTML_LITE,
    HTML_LITE_TAGS,
    PLAIN,
    check,
    compose,
    read,
    sanitiseHtmlLite,
)
from imxd.peer import Refused
from imxd.wire import ErrorCode

A = "alice@a.test"
B = "bob@b.test"


def mime(*headers, body=b"hello"):
    return b"\r\n".join(h.encode() for h in headers) + b"\r\n\r\n" + body


class ComposeTests(SynchronousTestCase):
    """
    Bodies built for messages clients send.
    """

    def test_plain(self):
        """
        From and To equal the envelope; the type is declared with its
        charset; the text follows an empty line.
        """
        content = compose(A, B, "hello")
        self.assertEqual(content.contentType, "text/plain; charset=utf-8")
        self.assertEqual(
            content.body,
            b"From: alice@a.test\r\nTo: bob@b.test\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\nhello",
        )

    def test_longLineByteForByte(self):
        """
        A very long line is carried octet for octet: no folding, no
        quoted-printable.
        """
        line = "\u00e9" + "x" * 20000 + "\u00e9"
        content = compose(A, B, line)
        self.assertTrue(content.body.endswith(line.encode("utf-8")))
        self.assertNotIn(b"=\r\n", content.body)
        self.assertEqual(read(content.body).text, line)

    def test_xHeaders(self):
        """
        X- headers are carried through, in order.
        """
        content = compose(A, B, "hi", headers=[("X-Mood", "fine"), ("X-Client", "imx/1")])
        self.assertEqual(read(content.body).headers, (("X-Mood", "fine"), ("X-Client", "imx/1")))

    def test_otherHeaderRefused(self):
        """
        Only X- headers may be added: Subject or a second From is refused.
        """
        for name in ("Subject", "From", "Bcc"):
            error = self.assertRaises(Refused, compose, A, B, "hi", headers=[(name, "x")])
            self.assertEqual(error.code, ErrorCode.MALFORMED)

    def test_headerInjection(self):
        """
        A header value with a line break is refused, so no header can be
        smuggled in.
        """
        error = self.assertRaises(
            Refused, compose, A, B, "hi", headers=[("X-A", "x\r\nBcc: eve@e.test")]
        )
        self.assertEqual(error.code, ErrorCode.MALFORMED)

    def test_otherTypesRefused(self):
        """
        Anything but text/plain and text/html-lite is refused.
        """
        for mediaType in ("image/png", "text/html", "multipart/mixed", "application/pdf"):
            error = self.assertRaises(Refused, compose, A, B, "x", mediaType)
            self.assertEqual(error.code, ErrorCode.MEDIA_TYPE_REFUSED)

    def test_tooLarge(self):
        """
        A body over the limit is refused with message-too-large.
        """
        error = self.assertRaises(Refused, compose, A, B, "x" * 2000, maxSize=1000)
        self.assertEqual(error.code, ErrorCode.MESSAGE_TOO_LARGE)

    def test_htmlLiteSanitised(self):
        """
        html-lite keeps its tags and loses scripts, event handlers and
        javascript: links.
        """
        content = compose(
            A,
            B,
            '<b onclick="steal()">hi</b><script>alert(1)</script>'
            '<a href="javascript:alert(1)">x</a><a href="https://ok.test/">y</a>'
            '<img src="https://track.test/p.gif">',
            HTML_LITE,
        )
        self.assertEqual(content.mediaType, HTML_LITE)
        self.assertIn("<b>hi</b>", content.text)
        for bad in ("script", "onclick", "javascript", "<img"):
            self.assertNotIn(bad, content.text)
        self.assertIn('href="https://ok.test/"', content.text)


class CheckTests(SynchronousTestCase):
    """
    Complete MIME bodies submitted by clients.
    """

    def test_valid(self):
        """
        A body in the subset is accepted and rebuilt the same way.
        """
        content = check(A, B, mime(f"From: {A}", f"To: {B}", "X-Tag: 1"))
        self.assertEqual(content.mediaType, PLAIN)
        self.assertEqual(content.text, "hello")
        self.assertEqual(content.headers, (("X-Tag", "1"),))

    def test_envelopeMismatch(self):
        """
        From or To headers that differ from the envelope are refused.
        """
        for headers in ((f"From: eve@e.test", f"To: {B}"), (f"From: {A}", "To: eve@e.test")):
            error = self.assertRaises(Refused, check, A, B, mime(*headers))
            self.assertEqual(error.code, ErrorCode.SENDER_MISMATCH)

    def test_caseInsensitiveMatch(self):
        """
        Headers equal to the envelope once normalised are accepted.
        """
        check(A, B, mime("From: Alice@A.TEST", f"To: {B}"))

    def test_missingHeaders(self):
        """
        From and To are required, once each.
        """
        for headers in ((f"To: {B}",), (f"From: {A}",), (f"From: {A}", f"From: {A}", f"To: {B}")):
            error = self.assertRaises(Refused, check, A, B, mime(*headers))
            self.assertEqual(error.code, ErrorCode.MALFORMED)

    def test_attachmentsAndBinaryRefused(self):
        """
        Attachments (multipart) and binary transfer encodings are refused.
        """
        for header in (
            "Content-Type: multipart/mixed; boundary=x",
            "Content-Transfer-Encoding: base64",
        ):
            error = self.assertRaises(
                Refused, check, A, B, mime(f"From: {A}", f"To: {B}", header)
            )
            self.assertEqual(error.code, ErrorCode.MEDIA_TYPE_REFUSED)

    def test_notUtf8(self):
        """
        A body that is not UTF-8 is refused.
        """
        error = self.assertRaises(
            Refused, check, A, B, mime(f"From: {A}", f"To: {B}", body=b"\xff\xfe")
        )
        self.assertEqual(error.code, ErrorCode.INVALID_UTF8)

    def test_noSeparator(self):
        """
        Headers with no empty line after them are malformed.
        """
        error = self.assertRaises(Refused, check, A, B, b"From: a@a.test")
        self.assertEqual(error.code, ErrorCode.MALFORMED)

    def test_subjectDropped(self):
        """
        Headers outside the subset (Subject) are not carried.
        """
        content = check(A, B, mime(f"From: {A}", f"To: {B}", "Subject: hi"))
        self.assertNotIn(b"Subject", content.body)

    def test_htmlSanitised(self):
        """
        A submitted html-lite body is sanitised.
        """
        content = check(
            A,
            B,
            mime(
                f"From: {A}",
                f"To: {B}",
                "Content-Type: text/html-lite; charset=utf-8",
                body=b"<i>ok</i><script>x()</script>",
            ),
        )
        self.assertEqual(content.text, "<i>ok</i>")


class SanitiserPropertyTests(SynchronousTestCase):
    """
    Whatever goes in, nothing active comes out.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                ["<script>", "</script>", "<b>", "</b>", "<a href='javascript:x'>", "<a href=\"http://x\">",
                 "</a>", "onerror=", "<img src=x onerror=alert(1)>", "<style>", "<iframe>", "text", "<", ">",
                 "\"", "'", "<svg onload=x>", "<p>", "&lt;script&gt;"]
            ),
            max_size=30,
        )
    )
    def test_nothingActive(self, parts):
        """
        No script, style, iframe, img or svg tag, no event handler and no
        javascript: link survives.
        """
        out = sanitiseHtmlLite("".join(parts)).lower()
        for tag in re.findall(r"<\s*/?\s*([a-z0-9]+)", out):
            self.assertIn(tag, HTML_LITE_TAGS)
        self.assertIsNone(re.search(r"<[^>]*\son[a-z]+\s*=", out))
        self.assertIsNone(re.search(r"<[^>]*href\s*=\s*[\"']?\s*javascript:", out))

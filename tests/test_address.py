"""
Tests for L{imxd.address}.
"""

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imxd.address import (
    MAX_ADDRESS_OCTETS,
    Address,
    AddressError,
    displayDomain,
    normaliseDomain,
    parseAddress,
)

# Property tests: the first call into idna loads its tables, so no deadline.
propertySettings = settings(deadline=None, max_examples=300)


class ErrorAssertions:
    """
    Mixin: assert that something raises L{AddressError} with a message.
    """

    def assertAddressError(self, fragment, f, *args):
        """
        Assert that C{f(*args)} raises L{AddressError} whose message is one
        line and contains C{fragment}.

        @return: the message.
        """
        e = self.assertRaises(AddressError, f, *args)
        message = str(e)
        self.assertIn(fragment, message)
        self.assertNotIn("\n", message)
        return message


class NormaliseDomainTests(ErrorAssertions, SynchronousTestCase):
    """
    Tests for L{normaliseDomain}.
    """

    def test_ascii(self):
        """
        A lower-case ASCII domain is already canonical.
        """
        self.assertEqual(normaliseDomain("example.com"), "example.com")

    def test_upperCase(self):
        """
        Upper-case letters are lowered.
        """
        self.assertEqual(normaliseDomain("Example.COM"), "example.com")

    def test_idna(self):
        """
        A Unicode label becomes its lower-case A-label.
        """
        self.assertEqual(normaliseDomain("bücher.example"), "xn--bcher-kva.example")
        self.assertEqual(normaliseDomain("BÜCHER.Example"), "xn--bcher-kva.example")

    def test_aLabel(self):
        """
        An A-label is kept, lower-cased.
        """
        self.assertEqual(
            normaliseDomain("XN--BCHER-KVA.example"), "xn--bcher-kva.example"
        )

    def test_nonTransitional(self):
        """
        IDNA 2008 processing is non-transitional: C{ß} is kept, not mapped to
        C{ss}.
        """
        self.assertEqual(normaliseDomain("faß.de"), "xn--fa-hia.de")

    def test_widthAndDots(self):
        """
        Full-width letters are mapped to ASCII and ideographic full stops
        separate labels.
        """
        self.assertEqual(normaliseDomain("ｅｘａｍｐｌｅ。com"), "example.com")

    def test_trailingDot(self):
        """
        One trailing dot, ASCII or ideographic, is dropped.
        """
        self.assertEqual(normaliseDomain("example.com."), "example.com")
        self.assertEqual(normaliseDomain("example.com\u3002"), "example.com")

    def test_twoTrailingDots(self):
        """
        Two trailing dots make an empty label.
        """
        self.assertAddressError("empty label", normaliseDomain, "example.com..")

    def test_emptyLabel(self):
        """
        An empty label is refused.
        """
        self.assertAddressError("empty label", normaliseDomain, "a..b")
        self.assertAddressError("empty label", normaliseDomain, ".a")
        self.assertAddressError("empty label", normaliseDomain, ".")

    def test_empty(self):
        """
        The empty string is refused.
        """
        self.assertAddressError(
            "'' is not a valid domain: it is empty", normaliseDomain, ""
        )

    def test_singleLabel(self):
        """
        A single-label name is allowed.
        """
        self.assertEqual(normaliseDomain("localhost"), "localhost")
        self.assertEqual(normaliseDomain("Test."), "test")

    def test_labelTooLong(self):
        """
        A label of 63 octets is allowed; one of 64 is refused.
        """
        self.assertEqual(normaliseDomain("a" * 63 + ".test"), "a" * 63 + ".test")
        message = self.assertAddressError(
            "longer than 63 octets", normaliseDomain, "a" * 64 + ".test"
        )
        self.assertIn("is not a valid domain", message)

    def test_unicodeLabelTooLong(self):
        """
        The label length limit applies to the A-label.
        """
        self.assertAddressError(
            "longer than 63 octets (66 in ASCII form)",
            normaliseDomain,
            "ü" * 60 + ".test",
        )

    def test_domainTooLong(self):
        """
        A domain of 253 octets is allowed; one of 254 is refused.
        """
        ok = ".".join(["a" * 63] * 3 + ["b" * 61])
        self.assertEqual(len(ok), 253)
        self.assertEqual(normaliseDomain(ok), ok)
        self.assertEqual(normaliseDomain(ok + "."), ok)
        self.assertAddressError("longer than 253 octets", normaliseDomain, ok + "b")

    def test_inputTooLong(self):
        """
        Text longer than 1024 characters is refused outright.
        """
        self.assertAddressError(
            "longer than 1024 characters", normaliseDomain, "a." * 600 + "test"
        )

    def test_ipv4Literal(self):
        """
        IPv4 literals, and any name whose last label is a number, are
        refused.
        """
        for text in [
            "192.0.2.1",
            "192.0.2.1.",
            "１９２.０.２.１",
            "127.1",
            "0x7f.1",
            "a.0x10",
            "123",
        ]:
            self.assertAddressError("IP address literal", normaliseDomain, text)

    def test_numericInnerLabel(self):
        """
        Numeric labels other than the last are allowed.
        """
        self.assertEqual(normaliseDomain("1.2.3.example"), "1.2.3.example")

    def test_ipv6Literal(self):
        """
        IPv6 literals, bracketed or not, are refused.
        """
        for text in ["[2001:db8::1]", "2001:db8::1", "::1"]:
            self.assertAddressError("IP address literal", normaliseDomain, text)

    def test_port(self):
        """
        A port is refused.
        """
        self.assertAddressError("no port", normaliseDomain, "example.com:5269")

    def test_whitespace(self):
        """
        Whitespace anywhere is refused.
        """
        for text in ["exa mple.com", " example.com", "example.com\n", "a\u3000b"]:
            self.assertAddressError("whitespace", normaliseDomain, text)

    def test_invalidIDNA(self):
        """
        Text that IDNA 2008 refuses is refused, naming the label.
        """
        for text, fragment in [
            ("a_b.test", "label 'a_b' is not valid IDNA"),
            ("-a.test", "label '-a' is not valid IDNA"),
            ("xn--zz.test", "label 'xn--zz' is not valid IDNA"),
            ("ab--cd.test", "label 'ab--cd' is not valid IDNA"),
            ("a\x00b", "not valid IDNA"),
            ("\ud800.test", "not valid IDNA"),
        ]:
            self.assertAddressError(fragment, normaliseDomain, text)

    def test_notText(self):
        """
        Bytes and other non-text values are refused with L{AddressError}.
        """
        self.assertAddressError("bytes, not text", normaliseDomain, b"example.com")
        self.assertAddressError("expected str, got NoneType", normaliseDomain, None)

    def test_errorsRepeat(self):
        """
        An invalid domain is refused every time it is seen, though valid
        ones are cached.
        """
        for _ in range(3):
            self.assertRaises(AddressError, normaliseDomain, "a..b")

    def test_strSubclass(self):
        """
        A subclass of L{str} is accepted and a plain L{str} returned.
        """

        class Text(str):
            pass

        result = normaliseDomain(Text("Example.com"))
        self.assertIs(type(result), str)
        self.assertEqual(result, "example.com")


class DisplayDomainTests(ErrorAssertions, SynchronousTestCase):
    """
    Tests for L{displayDomain}.
    """

    def test_uLabels(self):
        """
        A-labels are shown as Unicode.
        """
        self.assertEqual(displayDomain("xn--bcher-kva.example"), "bücher.example")
        self.assertEqual(displayDomain("xn--fa-hia.de"), "faß.de")

    def test_ascii(self):
        """
        An ASCII domain is shown as is.
        """
        self.assertEqual(displayDomain("example.com"), "example.com")

    def test_invalid(self):
        """
        An invalid domain is refused.
        """
        self.assertAddressError("not a valid domain", displayDomain, "xn--zz.test")


class ParseTests(ErrorAssertions, SynchronousTestCase):
    """
    Tests for L{Address.parse} and L{parseAddress}.
    """

    def test_simple(self):
        """
        C{local@domain} gives an address with those parts, and L{str} gives
        the text back.
        """
        address = Address.parse("bob@example.com")
        self.assertEqual(address.local, "bob")
        self.assertEqual(address.domain, "example.com")
        self.assertEqual(str(address), "bob@example.com")

    def test_parseAddress(self):
        """
        L{parseAddress} is L{Address.parse}.
        """
        self.assertEqual(
            parseAddress("Bob@Example.com"), Address.parse("bob@example.com")
        )
        self.assertAddressError("more than one '@'", parseAddress, "a@b@c")

    def test_caseInsensitive(self):
        """
        Upper-case letters in both parts are lowered.
        """
        self.assertEqual(str(Address.parse("BoB@EXAMPLE.Com")), "bob@example.com")

    def test_caseFolding(self):
        """
        The local part is case-folded, not just lowered.
        """
        self.assertEqual(Address.parse("STRASSE@x.test").local, "strasse")
        self.assertEqual(Address.parse("Straße@x.test").local, "strasse")
        self.assertEqual(
            Address.parse("ΣΊΣΥΦΟΣ@x.test"), Address.parse("σίσυφος@x.test")
        )

    def test_idnaDomain(self):
        """
        The domain is in canonical ASCII form.
        """
        self.assertEqual(
            str(Address.parse("jürgen@Bücher.example.")),
            "jürgen@xn--bcher-kva.example",
        )

    def test_nfc(self):
        """
        Composed and decomposed spellings of a local part are the same
        address, stored composed.
        """
        composed = Address.parse("caf\u00e9@x.test")
        decomposed = Address.parse("cafe\u0301@x.test")
        self.assertEqual(composed, decomposed)
        self.assertEqual(hash(composed), hash(decomposed))
        self.assertEqual(composed.local, "caf\u00e9")

    def test_nfcAfterCaseFolding(self):
        """
        The local part is NFC again after case folding, which can undo NFC.
        """
        # U+FB06 (LATIN SMALL LIGATURE ST) folds to "st"; the U+0323 after it
        # then composes with the "t".
        local = Address.parse("\ufb06\u0323@x.test").local
        self.assertEqual(local, "s\u1e6d")
        self.assertTrue(unicodedata.is_normalized("NFC", local))
        self.assertEqual(Address.parse(f"{local}@x.test").local, local)

    def test_noCompatibilityMapping(self):
        """
        Only NFC is applied: compatibility forms such as full-width letters
        are different characters.
        """
        self.assertNotEqual(Address.parse("ｂｏｂ@x.test"), Address.parse("bob@x.test"))

    def test_punctuationAllowed(self):
        """
        Punctuation, including C{/}, C{.}, C{+}, and quotes, is allowed in the
        local part.
        """
        text = "a/b.c+d'e\"f!#$%&*=?^_`{|}~-@x.test"
        self.assertEqual(str(Address.parse(text)), text)

    def test_noAt(self):
        """
        Text without C{@} is refused.
        """
        self.assertAddressError(
            "'bob' is not a valid address: no '@'", Address.parse, "bob"
        )

    def test_doubleAt(self):
        """
        Text with more than one C{@} is refused.
        """
        self.assertEqual(
            self.assertAddressError("", Address.parse, "bob@@x.test"),
            "'bob@@x.test' is not a valid address: more than one '@'",
        )
        self.assertAddressError("more than one '@'", Address.parse, "a@b@x.test")

    def test_compatibilityAt(self):
        """
        The small and full-width commercial at signs are refused in the local
        part too.
        """
        for at in "\ufe6b\uff20":
            self.assertAddressError("'@' is reserved", Address.parse, f"a{at}b@x.test")

    def test_missingParts(self):
        """
        An empty local part, domain, or whole is refused.
        """
        self.assertAddressError("empty local part", Address.parse, "@x.test")
        self.assertAddressError("empty domain", Address.parse, "bob@")
        self.assertAddressError("empty local part", Address.parse, "@")
        self.assertAddressError(
            "'' is not a valid address: it is empty", Address.parse, ""
        )

    def test_surroundingWhitespace(self):
        """
        Leading or trailing whitespace is refused, not stripped.
        """
        for text in [" bob@x.test", "bob@x.test ", "bob@x.test\n", "\u00a0bob@x.test"]:
            self.assertAddressError(
                "leading or trailing whitespace", Address.parse, text
            )

    def test_innerWhitespace(self):
        """
        Whitespace inside either part is refused, naming the character.
        """
        self.assertAddressError(
            "invalid local part: it contains whitespace U+0020 (SPACE)",
            Address.parse,
            "bob smith@x.test",
        )
        self.assertAddressError(
            "U+2003 (EM SPACE)", Address.parse, "bob\u2003smith@x.test"
        )
        self.assertAddressError("U+0009", Address.parse, "bob\tsmith@x.test")
        self.assertAddressError(
            "invalid domain: it contains whitespace", Address.parse, "bob@x .test"
        )
        self.assertAddressError("whitespace", Address.parse, "bob @x.test")

    def test_controlCharacter(self):
        """
        Control characters are refused.
        """
        for char in "\x00\x07\x7f\x9b":
            message = self.assertAddressError(
                "control character", Address.parse, f"a{char}b@x.test"
            )
            self.assertIn(f"U+{ord(char):04X}", message)

    def test_otherForbiddenCategories(self):
        """
        Format characters, surrogates, private-use characters and unassigned
        code points are refused.
        """
        for char, fragment in [
            ("\u200b", "format character U+200B"),
            ("\u202e", "format character U+202E"),
            ("\ufeff", "format character U+FEFF"),
            ("\udc80", "surrogate U+DC80"),
            ("\ue000", "private-use character U+E000"),
            ("\U0010fffd", "private-use character"),
            ("\u0378", "unassigned code point U+0378"),
            ("\uffff", "unassigned code point U+FFFF"),
        ]:
            self.assertAddressError(fragment, Address.parse, f"a{char}b@x.test")

    def test_localTooLong(self):
        """
        A local part of 64 characters is allowed; one of 65 is refused.
        """
        self.assertEqual(Address.parse("a" * 64 + "@x.test").local, "a" * 64)
        self.assertAddressError(
            "longer than 64 characters", Address.parse, "a" * 65 + "@x.test"
        )

    def test_localLengthAfterNormalisation(self):
        """
        The local part's length is counted after normalisation.
        """
        # 64 decomposed é (128 code points) compose to 64 characters.
        self.assertEqual(Address.parse("e\u0301" * 64 + "@x.test").local, "\u00e9" * 64)
        # 33 ß fold to 66 characters.
        self.assertAddressError(
            "(66 after normalisation)", Address.parse, "ß" * 33 + "@x.test"
        )

    def test_addressTooLong(self):
        """
        The whole canonical address may be at most 256 octets of UTF-8.
        """
        domain = ".".join(["a" * 63] * 3)  # 191 octets
        local = "\u00e9" * 32  # 64 octets
        text = f"{local}@{domain}"
        self.assertEqual(len(text.encode("utf-8")), MAX_ADDRESS_OCTETS)
        self.assertEqual(str(Address.parse(text)), text)
        message = self.assertAddressError(
            "longer than 256 octets of UTF-8 (257)", Address.parse, "a" + text
        )
        self.assertTrue(message.startswith("'a\u00e9"))

    def test_domainTooLong(self):
        """
        The domain and label limits apply, and the message names the whole
        address.
        """
        message = self.assertAddressError(
            "invalid domain: label", Address.parse, "bob@" + "a" * 64 + ".test"
        )
        self.assertTrue(message.startswith("'bob@aaa"))
        self.assertAddressError(
            "longer than 253 octets",
            Address.parse,
            "b@" + ".".join(["a" * 63] * 4),
        )

    def test_inputTooLong(self):
        """
        Text longer than 1024 characters is refused outright, and the
        message quotes only the start of it.
        """
        message = self.assertAddressError(
            "longer than 1024 characters", Address.parse, "a" * 2000 + "@x.test"
        )
        self.assertIn("(2007 long)", message)
        self.assertLess(len(message), 200)

    def test_ipLiteral(self):
        """
        A domain that is an IP address literal is refused.
        """
        self.assertAddressError(
            "invalid domain: it is an IP address literal",
            Address.parse,
            "bob@192.0.2.1",
        )
        self.assertAddressError(
            "IP address literal", Address.parse, "bob@[2001:db8::1]"
        )

    def test_invalidDomain(self):
        """
        An invalid domain is refused, naming the whole address.
        """
        message = self.assertAddressError(
            "invalid domain:", Address.parse, "bob@a_b.test"
        )
        self.assertTrue(message.startswith("'bob@a_b.test' is not a valid address"))

    def test_bytesRefused(self):
        """
        Bytes are refused by L{Address.parse}, pointing at
        L{Address.fromBytes}.
        """
        self.assertAddressError("Address.fromBytes", Address.parse, b"bob@x.test")

    def test_nonTextRefused(self):
        """
        Values that are neither text nor bytes are refused with
        L{AddressError}.
        """
        self.assertAddressError("expected str, got int", Address.parse, 42)
        self.assertAddressError("expected str, got NoneType", Address.parse, None)

    def test_addressErrorIsValueError(self):
        """
        L{AddressError} is a L{ValueError}.
        """
        self.assertTrue(issubclass(AddressError, ValueError))


class FromBytesTests(ErrorAssertions, SynchronousTestCase):
    """
    Tests for L{Address.fromBytes}.
    """

    def test_utf8(self):
        """
        UTF-8 bytes are decoded and parsed.
        """
        self.assertEqual(
            Address.fromBytes("Jürgen@Bücher.example".encode("utf-8")),
            Address.parse("jürgen@xn--bcher-kva.example"),
        )
        self.assertEqual(
            Address.fromBytes(bytearray(b"bob@x.test")), Address.parse("bob@x.test")
        )

    def test_invalidUTF8(self):
        """
        Bytes that are not strict UTF-8 are refused, naming the bytes and
        the octet.
        """
        self.assertEqual(
            self.assertAddressError("", Address.fromBytes, b"b\xffb@x.test"),
            "b'b\\xffb@x.test' is not a valid address: not valid UTF-8"
            " (invalid start byte at octet 1)",
        )
        # Encoded surrogates and overlong forms are not UTF-8.
        self.assertAddressError(
            "not valid UTF-8", Address.fromBytes, b"\xed\xa0\x80@x.test"
        )
        self.assertAddressError(
            "not valid UTF-8", Address.fromBytes, b"\xc0\xc0@x.test"
        )
        self.assertAddressError("not valid UTF-8", Address.fromBytes, b"bob@x.test\xc3")

    def test_invalidAddress(self):
        """
        Valid UTF-8 that is not a valid address is refused.
        """
        self.assertAddressError("more than one '@'", Address.fromBytes, b"a@@x.test")

    def test_notBytes(self):
        """
        Text is refused by L{Address.fromBytes}.
        """
        self.assertAddressError(
            "expected bytes, got str", Address.fromBytes, "bob@x.test"
        )


class ConstructorTests(ErrorAssertions, SynchronousTestCase):
    """
    Tests for constructing L{Address} from its parts.
    """

    def test_canonicalises(self):
        """
        The constructor canonicalises both parts.
        """
        self.assertEqual(
            Address("Bob", "Bücher.Example."),
            Address(local="bob", domain="xn--bcher-kva.example"),
        )

    def test_invalidParts(self):
        """
        Invalid parts are refused, naming the part.
        """
        self.assertAddressError(
            "'b@b' is not a valid local part", Address, "b@b", "x.test"
        )
        self.assertAddressError("'' is not a valid local part", Address, "", "x.test")
        self.assertAddressError("'a..b' is not a valid domain", Address, "bob", "a..b")
        self.assertAddressError(
            "is not a valid address: longer than 256",
            Address,
            "\u00e9" * 64,
            ".".join(["a" * 63] * 3),
        )

    def test_frozen(self):
        """
        Addresses are immutable and hashable.
        """
        address = Address.parse("bob@x.test")
        self.assertRaises(AttributeError, setattr, address, "local", "eve")
        self.assertEqual({address: 1}[Address.parse("BOB@X.TEST")], 1)


# Text that looks somewhat like addresses, so that properties are exercised
# on valid ones as well as invalid ones.
localParts = st.text(
    st.characters(
        exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"),
        exclude_characters="@\ufe6b\uff20",
    ),
    min_size=1,
    max_size=70,
)
labels = st.one_of(
    st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True),
    st.sampled_from(
        [
            "bücher",
            "faß",
            "ＥＸＡＭＰＬＥ",
            "пример",
            "例え",
            "xn--bcher-kva",
            "XN--ZCA",
        ]
    ),
)
domains = st.builds(
    lambda parts, dot: ".".join(parts) + dot,
    st.lists(labels, min_size=1, max_size=5),
    st.sampled_from(["", ".", "\u3002"]),
)
addressLike = st.one_of(
    st.builds(lambda l, d: f"{l}@{d}", localParts, domains),
    st.text(),
    st.text(st.sampled_from("aA@.-é\u0301 \x00\ud800\uff20ß\u3002:[]1")),
)


class PropertyTests(SynchronousTestCase):
    """
    Properties of parsing that hold for any input.
    """

    @propertySettings
    @given(addressLike)
    def test_idempotent(self, text):
        """
        Parsing the text form of a parsed address gives the same address,
        whose text form is unchanged.
        """
        try:
            address = Address.parse(text)
        except AddressError:
            return
        again = Address.parse(str(address))
        self.assertEqual(again, address)
        self.assertEqual(str(again), str(address))
        self.assertLessEqual(len(str(address).encode("utf-8")), MAX_ADDRESS_OCTETS)
        self.assertTrue(unicodedata.is_normalized("NFC", address.local))

    @propertySettings
    @given(st.one_of(addressLike, st.text(max_size=2000)))
    def test_parsesOrAddressError(self, text):
        """
        Any text either parses or raises L{AddressError}, never anything
        else.
        """
        try:
            result = Address.parse(text)
        except AddressError as e:
            self.assertNotIn("\n", str(e))
        else:
            self.assertIsInstance(result, Address)

    @propertySettings
    @given(
        st.one_of(
            st.binary(), addressLike.map(lambda t: t.encode("utf-8", "surrogatepass"))
        )
    )
    def test_bytesParseOrAddressError(self, data):
        """
        Any bytes either parse or raise L{AddressError}.
        """
        try:
            result = Address.fromBytes(data)
        except AddressError:
            pass
        else:
            self.assertEqual(result, Address.parse(data.decode("utf-8")))

    @propertySettings
    @given(st.one_of(domains, st.text()))
    def test_domainIdempotent(self, text):
        """
        A canonical domain is its own canonical form, and so is the
        canonical form of its display form.
        """
        try:
            domain = normaliseDomain(text)
        except AddressError:
            return
        self.assertEqual(normaliseDomain(domain), domain)
        self.assertTrue(domain.isascii())
        self.assertEqual(domain, domain.lower())
        self.assertEqual(normaliseDomain(displayDomain(domain)), domain)

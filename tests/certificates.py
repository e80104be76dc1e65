"""
Certificates for TLS tests: a trustme CA per test, and leaves for any
domains written as PEM files in the test's directory.
"""

from __future__ import annotations

import os

import trustme


class CertificatesMixin:
    """
    A CA (C{self.ca}, trusted through C{self.caFile}) and a way to issue
    and write certificates.
    """

    def setUp(self):
        super().setUp()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.ca = trustme.CA()
        self.caFile = self.write("ca.pem", self.ca.cert_pem)

    def write(self, name, blob):
        """
        Write a trustme blob into the test's directory.

        @return: its path.
        """
        path = os.path.join(self.directory, name)
        blob.write_to_path(path)
        return path

    def certificate(self, name, *domains, ca=None, **validity):
        """
        @return: C{(certificate path, key path)} of a leaf for C{domains},
            issued by C{ca} (the test's CA by default).
        """
        leaf = (ca or self.ca).issue_cert(*domains, **validity)
        return (
            self.write(f"{name}.pem", leaf.cert_chain_pems[0]),
            self.write(f"{name}.key", leaf.private_key_pem),
        )

    def selfSigned(self, name):
        """
        @return: C{(certificate path, key path)} of a self-signed
            certificate that no test trusts.
        """
        lonely = trustme.CA()
        return (
            self.write(f"{name}.pem", lonely.cert_pem),
            self.write(f"{name}.key", lonely.private_key_pem),
        )

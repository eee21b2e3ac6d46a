"""Every async test runs on uvloop, the loop lbproxy runs on in production; no test asks a DNS server.

Tests send traffic to 127.0.0.1 only, and that holds for name lookups too: `RES_OPTIONS=attempts:0`
makes glibc's resolver send no query at all, so a name under `.invalid` (RFC 6761) fails at once
("Temporary failure in name resolution") instead of reaching the machine's DNS server. `localhost`
still resolves, from /etc/hosts. It is set before any lookup of this process, and subprocesses
(`lbproxy check`, `lbproxy run`) inherit it.

`certificate` is a self-signed certificate for localhost, for the TLS listeners of any test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
import uvloop
from pytest_asyncio.plugin import LoopFactory

from lbproxy import build

os.environ["RES_OPTIONS"] = "attempts:0"


def pytest_report_header(config: pytest.Config) -> str:
    """Which build the tests run against: `make test` runs them on both (issue #19)."""
    return f"lbproxy build: {build.described()} ({build.PURE_VARIABLE}={os.environ.get(build.PURE_VARIABLE, '')})"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, LoopFactory]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key: (cert, key)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        import datetime

        from cryptography import x509  # type: ignore[import-not-found,unused-ignore]
        from cryptography.hazmat.primitives import hashes, serialization  # type: ignore[import-not-found,unused-ignore]
        from cryptography.hazmat.primitives.asymmetric import rsa  # type: ignore[import-not-found,unused-ignore]
        from cryptography.x509.oid import NameOID  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("cannot make a test certificate: neither the cryptography package nor openssl is available")
        subprocess.run(
            [
                *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days", "1"),
                *("-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return cert, key
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key

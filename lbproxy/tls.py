"""TLS contexts: the http listeners' (certificates from their files, SNI picks) and the pools' (to the servers).

`inspect` reads a certificate and its key as the config names them and says what is wrong before
anything listens: a key that is not the certificate's, a certificate that has expired or that has no
name. The names come from the certificate itself (its DNS subject alternative names, else its common
name), never from the config. `ListenerContexts` holds the `ssl.SSLContext` a listener's socket was
made with (the first certificate: a client that sends no SNI, or a name no certificate has, gets it)
and one more context per other certificate; its `sni_callback` hands each handshake the context of
the certificate whose name matches the server name (exact first, then a `*.` wildcard for one label,
as RFC 6125 §6.4.3 lets a client accept). A reload swaps the table and reloads the first certificate
in place, so new handshakes get the new set and connections already open keep theirs.

Every context offers ALPN `http/1.1` (lbproxy speaks HTTP/1.1 only) and takes the listener's lowest
version and, for TLS 1.2, its ciphers. `UpstreamTls` holds a pool's client contexts, one per server
(`ServerContext`, which resumes the server's TLS sessions): the servers' certificates verified
against the pool's CA (or the system's) for the pool's `server_name`, and lbproxy's own certificate
for servers that ask for one. The module reads files and builds contexts; it never opens a socket.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from lbproxy.config import PoolTlsConfig, TlsConfig

VERSIONS: Final = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
ALPN: Final = ["http/1.1"]


class TlsError(Exception):
    """A certificate or key that cannot serve: the message names the file."""


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate as its file says: where it and its key are, the names it serves, when it expires."""

    cert: Path
    key: Path
    names: tuple[str, ...]  # lower-case DNS names, wildcards as written (`*.example.com`)
    not_after: datetime.datetime  # UTC


def inspect(cert: Path, key: Path, now: datetime.datetime | None = None) -> Certificate:
    """Read `cert` (PEM, the leaf first) and `key`; raises TlsError on a file that cannot serve."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError) as error:
        raise TlsError(f"{cert}: not a PEM certificate ({error})") from None
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise TlsError(f"{key}: not an unencrypted PEM private key ({error})") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.DER, public) != leaf.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise TlsError(f"{key}: this key is not the key of {cert}")
    now = now or datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc <= now:
        raise TlsError(f"{cert}: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    names = _names(leaf)
    if not names:
        raise TlsError(f"{cert}: names no host (no DNS subject alternative name, no common name)")
    return Certificate(cert, key, names, leaf.not_valid_after_utc)


def _names(leaf: x509.Certificate) -> tuple[str, ...]:
    try:
        alternative = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(attribute.value).lower() for attribute in common)
    return tuple(name.lower() for name in alternative.get_values_for_type(x509.DNSName))


def expiries(certificates: tuple[Certificate, ...]) -> tuple[tuple[str, float], ...]:
    """(name, when its certificate expires, as a Unix time) for each name a listener serves: what the
    metrics and the status page show."""
    seen: dict[str, float] = {}
    for certificate in certificates:
        for name in certificate.names:
            seen.setdefault(name, certificate.not_after.timestamp())
    return tuple(seen.items())


def unreachable(certificates: list[Certificate]) -> list[tuple[Certificate, Certificate]]:
    """(certificate, the earlier one that takes every name of it) for each certificate SNI can never
    pick; the first is always reachable (no SNI)."""
    found = []
    for index, certificate in enumerate(certificates[1:], 1):
        for earlier in certificates[:index]:
            if all(name in earlier.names for name in certificate.names):
                found.append((certificate, earlier))
                break
    return found


def context(certificate: Certificate, settings: TlsConfig) -> ssl.SSLContext:
    """A server context for one certificate; raises TlsError (with the file) if OpenSSL refuses it."""
    made = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    made.minimum_version = VERSIONS[settings.min_version]
    made.set_alpn_protocols(ALPN)
    try:
        if settings.ciphers is not None:
            made.set_ciphers(settings.ciphers)
        made.load_cert_chain(certificate.cert, certificate.key)
    except ssl.SSLError as error:
        raise TlsError(f"{certificate.cert}: {error}") from None
    if settings.client_ca is not None:  # mutual TLS: no handshake without a certificate from this CA
        made.verify_mode = ssl.CERT_REQUIRED
        try:
            made.load_verify_locations(settings.client_ca)
        except (OSError, ssl.SSLError) as error:
            raise TlsError(f"{settings.client_ca}: not a CA file ({error})") from None
    return made


def upstream_context(settings: PoolTlsConfig) -> ServerContext:
    """A pool's context for one of its servers; raises TlsError (naming the file) on a CA or a client
    certificate that cannot be loaded."""
    made = ServerContext(ssl.PROTOCOL_TLS_CLIENT)  # as ssl.create_default_context makes it, in our class
    try:
        if settings.ca is not None:
            made.load_verify_locations(settings.ca)
        else:
            made.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as error:
        raise TlsError(f"{settings.ca}: not a CA file ({error})") from None
    if not settings.verify:
        made.check_hostname = False
        made.verify_mode = ssl.CERT_NONE
    if settings.client_cert is not None:
        try:
            made.load_cert_chain(settings.client_cert, settings.client_key)
        except (OSError, ssl.SSLError) as error:
            raise TlsError(f"{settings.client_cert}: cannot be lbproxy's client certificate ({error})") from None
    made.set_alpn_protocols(ALPN)
    return made


class ServerContext(ssl.SSLContext):
    """A client context for one server, which offers each new connection the server's latest TLS
    session, so that a new connection resumes instead of making a full handshake.

    asyncio's and uvloop's `create_connection` take no session, but their SSL protocol makes each
    connection's `SSLObject` with this `wrap_bio`, where a session can be given. The session is taken
    from the connection made before, once it holds a ticket (TLS 1.3 sends it after the handshake);
    a server that refuses it costs a full handshake, as without it. A server that resumes only by
    session id (TLS 1.2 without tickets) is not resumed.
    """

    latest: ssl.SSLObject | None = None  # the last connection made with this context
    session: ssl.SSLSession | None = None  # the newest session with a ticket

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        latest = self.latest
        if latest is not None:
            newest = latest.session
            if newest is not None and newest.has_ticket:
                self.session = newest
        made = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session or self.session)
        self.latest = made
        return made


class UpstreamTls:
    """A pool's TLS to its servers: one `ServerContext` per server (each resumes its own sessions),
    all made from the pool's settings. Kept across a reload that leaves the settings alone, so the
    servers' idle connections and sessions stay usable."""

    __slots__ = ("settings", "contexts")

    def __init__(self, settings: PoolTlsConfig) -> None:
        self.settings = settings  # checked when the config was loaded (config.py calls upstream_context)
        self.contexts: dict[tuple[str, int], ServerContext] = {}

    def context_for(self, host: str, port: int) -> ServerContext:
        """The context of the server at `host:port` (as the config writes it)."""
        made = self.contexts.get((host, port))
        if made is None:
            made = self.contexts[(host, port)] = upstream_context(self.settings)
        return made


class ListenerContexts:
    """The contexts of one TLS listener: the socket's own (the first certificate) and, by name, the others'."""

    __slots__ = ("context", "exact", "wildcards")

    def __init__(self, settings: TlsConfig) -> None:
        self.context = context(settings.certificates[0], settings)
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcards: dict[str, ssl.SSLContext] = {}
        self._fill(settings)

    def reload(self, settings: TlsConfig) -> None:
        """New handshakes get the new certificates: the first reloaded into the socket's context in
        place, the others' table replaced at once; open connections keep what they had. (A change of
        `client_ca` on or off gives the listener a new socket instead: see runtime._socket_changed.)"""
        made = self.context
        made.minimum_version = VERSIONS[settings.min_version]
        if settings.ciphers is not None:
            made.set_ciphers(settings.ciphers)
        made.load_cert_chain(settings.certificates[0].cert, settings.certificates[0].key)
        if settings.client_ca is not None:
            made.load_verify_locations(settings.client_ca)
        self._fill(settings)

    def _fill(self, settings: TlsConfig) -> None:
        # One certificate: nothing to pick, and no call into Python on every handshake.
        self.context.sni_callback = self._pick if len(settings.certificates) > 1 else None
        exact: dict[str, ssl.SSLContext] = {}
        wildcards: dict[str, ssl.SSLContext] = {}
        for index, certificate in enumerate(settings.certificates):
            made = self.context if index == 0 else context(certificate, settings)
            for name in certificate.names:
                if name.startswith("*."):
                    wildcards.setdefault(name[2:], made)
                else:
                    exact.setdefault(name, made)
        self.exact, self.wildcards = exact, wildcards

    def _pick(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, made: ssl.SSLContext) -> None:
        """OpenSSL's SNI callback: the certificate for `server_name`, the first one when none matches."""
        if server_name is None:
            return
        name = server_name.lower()
        chosen = self.exact.get(name)
        if chosen is None:
            dot = name.find(".")
            if dot > 0:
                parent = name[dot + 1 :]
                chosen = self.wildcards.get(parent)
        if chosen is not None and chosen is not self.context:
            connection.context = chosen


# RFC 4514 short names of the attributes a client certificate's subject usually has
_SHORT: Final = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
    "userId": "UID",
}


def subject(peer: dict[str, object] | None) -> str:
    """A verified client certificate's subject as RFC 4514 writes it (`CN=alice,O=Example`), from what
    `ssl` gives (`getpeercert()`); characters that could break a header line are escaped (\\XX)."""
    if not peer:
        return ""
    parts = []
    for rdn in reversed(peer.get("subject", ())):  # type: ignore[call-overload]
        for name, value in rdn:
            escaped = "".join(
                f"\\{ord(char):02X}" if ord(char) < 0x20 or ord(char) == 0x7F or ord(char) > 0x7E else char
                for char in str(value)
            )
            for special in ',+"<>;':
                escaped = escaped.replace(special, "\\" + special)
            parts.append(f"{_SHORT.get(name, name)}={escaped}")
    return ",".join(parts)

"""The OPC UA application instance certificate of the agent, generated once and kept under data_dir.

OPC UA secure channels (Basic256Sha256 Sign / SignAndEncrypt) need a client certificate whose
SubjectAltName carries the client's application URI (OPC 10000-4 §6.1, OPC 10000-6 §6.2.2).
:func:`ensure_client_certificate` creates, on first start::

    data_dir/pki/                 mode 0700
    data_dir/pki/client_key.pem   RSA 2048, PKCS#8, unencrypted, mode 0600
    data_dir/pki/client_cert.der  self-signed, 5 years, SAN = application URI + host name

and reuses them on later starts. A certificate that expired, or that names another
application URI (the host was renamed), is re-issued with the same key, so a server that
trusts the key by thumbprint must re-trust it; this is logged at WARNING.

Every device shares the pair: an OPC UA client is one application, whatever it talks to. Its
application URI is the one the client sends as ``ApplicationUri`` in CreateSession, and servers
refuse a certificate whose SubjectAltName URI differs (BadCertificateUriInvalid; ThingsBoard IoT
Gateway #1677): both come from :func:`application_uri`.

Server certificates (trust on first use, or pinned)
    The server's certificate decides who gets the user's password (it is encrypted to the
    server's key), so it is checked before anything secret is sent. A device may pin it
    (``devices[].server_certificate``, a PEM or DER file). Otherwise the first certificate an
    endpoint presents is trusted and kept, as SSH keeps known hosts::

        data_dir/pki/trusted/<host>_<port>.der    trusted on first use, per endpoint host and port
        data_dir/pki/rejected/<host>_<port>.der   the last certificate refused for that endpoint

    A pinned certificate overrides the trusted one. A server that presents another certificate
    is refused (:func:`mismatch`); the message names both thumbprints and how to accept the new
    one: pin the rejected file, or delete the trusted one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import socket
import threading
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

CERT_FILE = "client_cert.der"
KEY_FILE = "client_key.pem"
TRUSTED_DIR = "trusted"
REJECTED_DIR = "rejected"
VALID_DAYS = 5 * 365
KEY_SIZE = 2048  # Basic256Sha256 allows 2048..4096 bit keys

# Two devices connecting at the same first start must not write two different key/cert pairs.
_LOCK = threading.Lock()


class ClientCertificate(NamedTuple):
    """Where the client's certificate and key live, and the certificate's SHA-1 thumbprint."""

    cert_path: Path
    key_path: Path
    thumbprint: str


def application_uri(host: str | None = None) -> str:
    """The agent's OPC UA application URI; the certificate and the client must agree on it."""
    return f"urn:{host or socket.gethostname()}:edge-agent"


def thumbprint(der: bytes) -> str:
    """OPC UA's certificate thumbprint: SHA-1 of the DER encoding, as hex."""
    return hashlib.sha1(der).hexdigest()


def ensure_client_certificate(data_dir: Path, app_uri: str, host: str | None = None) -> ClientCertificate:
    """Return the client certificate under ``data_dir/pki``, creating or renewing it when needed.

    Blocking (RSA key generation takes a moment): call it through ``asyncio.to_thread``.
    Raises OSError when the files cannot be read or written, ValueError when they are corrupt.
    """
    host = host or socket.gethostname()
    pki = data_dir / "pki"
    with _LOCK:
        pki.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path, cert_path = pki / KEY_FILE, pki / CERT_FILE
        key = _load_or_create_key(key_path)
        cert = _load_certificate(cert_path)
        if cert is None or _needs_renewal(cert, key, app_uri):
            cert = _create_certificate(key, app_uri, host)
            _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.DER), 0o644)
            logger.info("created OPC UA client certificate %s for %s", cert_path, app_uri)
        der = cert.public_bytes(serialization.Encoding.DER)
    return ClientCertificate(cert_path, key_path, thumbprint(der))


def _load_or_create_key(path: Path) -> rsa.RSAPrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: expected an RSA private key")
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_atomic(path, pem, 0o600)
    logger.info("created OPC UA client key %s", path)
    return key


def _load_certificate(path: Path) -> x509.Certificate | None:
    if not path.exists():
        return None
    return x509.load_der_x509_certificate(path.read_bytes())


def _needs_renewal(cert: x509.Certificate, key: rsa.RSAPrivateKey, app_uri: str) -> bool:
    reason = ""
    if cert.public_key() != key.public_key():
        reason = "it does not match the private key"
    elif cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        reason = f"it expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    elif app_uri not in _uris(cert):
        reason = f"it names {_uris(cert)} instead of {app_uri}"
    if reason:
        logger.warning("re-issuing the OPC UA client certificate: %s; servers must trust the new one",
                       reason)
    return bool(reason)


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def _create_certificate(key: rsa.RSAPrivateKey, app_uri: str, host: str) -> x509.Certificate:
    """A self-signed application instance certificate as OPC 10000-6 §6.2.2 describes it."""
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "edge-agent"),
        x509.NameAttribute(NameOID.DOMAIN_COMPONENT, host),
    ])
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a server clock a little behind
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(app_uri), x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=True, key_encipherment=True,
            data_encipherment=True, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a key behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # exactly this mode, whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- server certificates


class ServerTrust(NamedTuple):
    """The server certificate a device expects: DER bytes (None: none yet, trust on first use),
    where it comes from (``pinned`` or ``trusted``) and its file."""

    der: bytes | None
    source: str
    path: Path


def endpoint_file_name(endpoint: str) -> str:
    """``opc.tcp://10.0.0.5:4840/x`` -> ``10.0.0.5_4840.der``: the trust store's name for an endpoint."""
    parts = urlsplit(endpoint)
    host = re.sub(r"[^A-Za-z0-9.-]", "-", parts.hostname or "localhost")
    return f"{host}_{parts.port or 4840}.der"


def certificate_der(data: bytes) -> bytes:
    """A PEM or DER certificate as DER; ValueError when it is neither."""
    if b"-----BEGIN CERTIFICATE-----" in data:
        cert = x509.load_pem_x509_certificate(data)
    else:
        cert = x509.load_der_x509_certificate(data)
    return cert.public_bytes(serialization.Encoding.DER)


def expected_server_certificate(data_dir: Path, endpoint: str, pinned: Path | None) -> ServerTrust:
    """The certificate to hold the server to: the pinned file, else the one trusted on first use.

    Blocking (file reads): call it through ``asyncio.to_thread``. OSError when a file cannot be
    read, ValueError when it is not a certificate.
    """
    if pinned is not None:
        return ServerTrust(certificate_der(pinned.read_bytes()), "pinned", pinned)
    path = data_dir / "pki" / TRUSTED_DIR / endpoint_file_name(endpoint)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ServerTrust(None, "trusted", path)
    return ServerTrust(certificate_der(data), "trusted", path)


def trust_on_first_use(path: Path, der: bytes) -> None:
    """Keep ``der`` as the endpoint's trusted certificate (``path`` from :func:`expected_server_certificate`)."""
    with _LOCK:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():  # another device on the same endpoint may have been first
            _write_atomic(path, der, 0o644)


def keep_rejected(data_dir: Path, endpoint: str, der: bytes) -> Path:
    """Save a refused server certificate where an operator can inspect (and pin) it."""
    path = data_dir / "pki" / REJECTED_DIR / endpoint_file_name(endpoint)
    with _LOCK:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != der:
            _write_atomic(path, der, 0o644)
    return path


def describe(der: bytes) -> str:
    """``SHA-1 <thumbprint> (CN=..., valid until YYYY-MM-DD)`` for messages."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return f"SHA-1 {thumbprint(der)} (not a readable certificate)"
    return f"SHA-1 {thumbprint(der)} ({cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc:%Y-%m-%d})"


def mismatch(endpoint: str, trust: ServerTrust, offered: bytes, rejected: Path) -> str:
    """Why a server's certificate is refused, and how an operator accepts it if the change is wanted."""
    assert trust.der is not None
    if trust.source == "pinned":
        origin = f"pinned in {trust.path}"
        accept = f'point devices[].server_certificate at "{rejected}" (or copy that file over {trust.path})'
    else:
        origin = f"trusted on first use, kept in {trust.path}"
        accept = (f'pin it with devices[].server_certificate = "{rejected}", or delete {trust.path} to '
                  "trust the certificate the server presents next")
    return (f"the server at {endpoint} presented certificate {describe(offered)}, but {describe(trust.der)} "
            f"is expected ({origin}); refusing to connect (the offered certificate is saved as {rejected}). "
            f"If the server's certificate was replaced on purpose, accept the new one: {accept}")

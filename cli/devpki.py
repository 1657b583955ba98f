"""The development PKI of ``topology up`` (adr/0021): a CA, the server's certificate, and a
client certificate for each demo cell and for an admin, so mutual TLS works with one command.

Files, under ``<data dir>/tls/`` (PEM; keys are written 0600)::

    ca.pem                          the CA: TOPOLOGY_TLS_CLIENT_CA, and the CA clients trust
    server.pem, server-key.pem      TOPOLOGY_TLS_CERT / TOPOLOGY_TLS_KEY (SANs: localhost, 127.0.0.1, ::1)
    <cell id>.pem, <cell id>-key.pem   a cell's client certificate (URI SAN topology://cell/<cell id>)
    admin.pem, admin-key.pem        the admin's (URI SAN topology://admin): acts for any cell

A directory that already holds every file is reused as it is (a client configured with
them keeps working across restarts). For development only: the CA's key sits beside it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from topology_store.core.access import ADMIN_URI, CELL_URI_PREFIX

VALID_DAYS = 825
SERVER_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPki:
    directory: Path
    ca: Path
    server: KeyPair
    clients: dict[str, KeyPair]  # cell id (or "admin") -> its client certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "topology-store development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_ca(common_name: str = "topology-store development CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], common_name: str, *,
          hosts: Sequence[str] = (), uris: Sequence[str] = ()) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf signed by ``ca``: a server certificate for ``hosts``, or a client one naming ``uris``."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names += [x509.UniformResourceIdentifier(uri) for uri in uris]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def write_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path) -> KeyPair:
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # Created 0600 from the start: the key is never readable by others, not even for a moment.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return KeyPair(cert_path, key_path)


def dev_pki(directory: Path, cells: Sequence[str]) -> DevPki:
    """The PKI under ``directory`` for ``cells`` (created when a file is missing; see the module docstring)."""
    pairs = {name: KeyPair(directory / f"{name}.pem", directory / f"{name}-key.pem")
             for name in ("server", "admin", *cells)}
    ca_path = directory / "ca.pem"
    pki = DevPki(directory, ca_path, pairs["server"], {n: p for n, p in pairs.items() if n != "server"})
    if ca_path.exists() and all(p.cert.exists() and p.key.exists() for p in pairs.values()):
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    ca = new_ca()
    write_pair(*ca, ca_path, directory / "ca-key.pem")
    write_pair(*issue(ca, "topology-store server", hosts=SERVER_HOSTS), pairs["server"].cert, pairs["server"].key)
    write_pair(*issue(ca, "admin", uris=[ADMIN_URI]), pairs["admin"].cert, pairs["admin"].key)
    for cell in cells:
        write_pair(*issue(ca, cell, uris=[f"{CELL_URI_PREFIX}{cell}"]), pairs[cell].cert, pairs[cell].key)
    return pki

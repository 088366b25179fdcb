"""`specray tls-certs`: a CA and one certificate for every node, enough to run mutual TLS between the router, the
target and the draft workers (config section `tls`) on a test cluster.

Production clusters bring their own PKI (cert-manager in Kubernetes, mounted as a secret at the same path in every
pod): all specray needs is a CA bundle, a certificate and its key per node, and a DNS name every certificate
carries in its subjectAltName (`tls.server_name`). One certificate shared by all nodes is fine: each worker both
serves and dials, so it must be valid for server and client authentication alike.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "node.pem", "node-key.pem"


def tls_files(directory: str | Path) -> dict[str, str]:
    """The file entries of the `tls` config section for a directory written by `write_certs`."""
    d = Path(directory).expanduser().resolve()
    return {"ca_file": str(d / CA_FILE), "cert_file": str(d / CERT_FILE), "key_file": str(d / KEY_FILE)}


def tls_section(directory: str | Path) -> dict[str, str]:
    """The whole `tls` section for such a directory; server_name is the certificate's first DNS name, so a set
    written with `--server-name X` works without repeating X."""
    from workers.wire import certificate_dns_names

    files = tls_files(directory)
    try:
        names = certificate_dns_names(Path(files["cert_file"]).read_bytes())
    except OSError as e:
        raise ValueError(f"--tls-dir: cannot read {files['cert_file']}: {e.strerror or e}") from None
    except ValueError:  # not a certificate: GrpcTLS.from_files says which file, later
        names = []
    return files | {"server_name": names[0] if names else "specray"}


def write_certs(out: str | Path, server_name: str = "specray", days: int = 30,
                ca_name: str = "specray test CA") -> dict[str, str]:
    """Write ca.pem, ca-key.pem, node.pem and node-key.pem (EC P-256) into `out`; returns `tls_files(out)`."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # pragma: no cover - a dependency of ray's own dependencies here
        raise ValueError("specray tls-certs needs the 'cryptography' package: pip install cryptography") from None

    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: {e.strerror or e}") from None
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name(ca_name)).issuer_name(name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName(server_name), x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name(server_name)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))

    def write(filename: str, data: bytes, private: bool = False) -> None:
        path = out / filename
        if path.exists():
            path.unlink()  # a fresh file gets the mode below from the start
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    pem = serialization.Encoding.PEM
    key_pem = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                   encryption_algorithm=serialization.NoEncryption())
    write(CA_FILE, ca.public_bytes(pem))
    write("ca-key.pem", ca_key.private_bytes(**key_pem), private=True)
    write(CERT_FILE, cert.public_bytes(pem))
    write(KEY_FILE, key.private_bytes(**key_pem), private=True)
    return tls_files(out)


def add_tls_certs_parser(sub) -> None:
    p = sub.add_parser("tls-certs", help="write a test CA and a node certificate for mutual TLS between workers "
                                         "(ca-key.pem signs more: keep it off the nodes)")
    p.add_argument("--out", required=True, help="directory for ca.pem, ca-key.pem, node.pem, node-key.pem")
    p.add_argument("--server-name", default="specray", help="DNS name in the certificate (config tls.server_name)")
    p.add_argument("--days", type=int, default=30, help="validity in days")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    import json

    if args.days < 1:
        raise ValueError("--days must be at least 1")
    try:
        files = write_certs(args.out, args.server_name, args.days)
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot write the certificates: {e.strerror or e}") from None
    print(json.dumps({"tls": {**files, "server_name": args.server_name}}, indent=2))
    return 0

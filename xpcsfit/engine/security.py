"""TLS for xpcsfit's clusters: certificates (``xpcsfit certs DIR``) and Dask's Security.

Every cluster spec that reaches beyond this machine (slurm, pbs, kubernetes; a local
spec bound to another address) runs its scheduler, workers and clients over ``tls://``
with mutual authentication: each side shows a certificate signed by one CA, and Dask
refuses unencrypted connections (``require_encryption``). One certificate serves the
scheduler, the workers and the client: they are one user's processes.

:func:`make_certificates` writes, into one directory,

- ``ca.pem``, ``ca-key.pem``: the CA (ECDSA P-256, self-signed). ``ca-key.pem`` only signs;
  keep it off the cluster's shared file system if you can.
- ``cert.pem``, ``key.pem``: one certificate signed by the CA, for server and client use,
  valid for localhost, 127.0.0.1, ::1 and this host's names (Dask checks certificates
  against the CA only, not host names, so the same files work on every node).
- ``xpcsfit-certs.json``: what it wrote (sha256 per file), so that a second run may
  replace its own files and refuses to replace anything else.

Key files are mode 0600; every file is written atomically (:mod:`xpcsfit.io.atomic`).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
from pathlib import Path

from xpcsfit.errors import ConfigError
from xpcsfit.io.atomic import atomic_file

CA, CA_KEY, CERT, KEY = "ca.pem", "ca-key.pem", "cert.pem", "key.pem"
RECORD = "xpcsfit-certs.json"


def default_certificate_directory() -> Path:
    """Where ``xpcsfit certs`` writes without DIR and where specs without ``tls:`` look:
    ``$XDG_CONFIG_HOME/xpcsfit/certs`` (default ``~/.config/xpcsfit/certs``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "xpcsfit" / "certs"


def make_certificates(directory, *, hosts: tuple[str, ...] = (), days: int = 365) -> dict[str, Path]:
    """Write a CA and one certificate signed by it into ``directory`` (created, mode 0700).

    Parameters
    ----------
    directory : str or Path
    hosts : tuple of str
        Further DNS names or IP addresses the certificate names (besides localhost,
        127.0.0.1, ::1 and this host's name and FQDN).
    days : int
        Validity of the CA and the certificate, from now (>= 1).

    Returns
    -------
    dict
        {"ca": Path, "ca_key": Path, "cert": Path, "key": Path}.

    Raises
    ------
    ConfigError
        If one of the four files exists and was not written by this function (per the
        directory's ``xpcsfit-certs.json``), or ``days`` < 1, or the directory cannot be written.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ConfigError(f"certs: --days {days}: must be at least 1")
    directory = Path(directory).expanduser().absolute()
    paths = {"ca": directory / CA, "ca_key": directory / CA_KEY, "cert": directory / CERT, "key": directory / KEY}
    _refuse_foreign_files(directory, paths.values())

    now = datetime.datetime.now(datetime.timezone.utc)
    # Backdated a little: a node whose clock is behind still accepts a fresh certificate.
    start, end = now - datetime.timedelta(minutes=10), now + datetime.timedelta(days=days)
    host = socket.gethostname()
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xpcsfit"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"xpcsfit CA ({host})")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xpcsfit"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_alt_names(host, hosts)), critical=False)
        # One certificate for every role: the scheduler and workers serve, everyone connects.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    contents = {"ca": ca_cert.public_bytes(serialization.Encoding.PEM), "ca_key": key_pem(ca_key),
                "cert": cert.public_bytes(serialization.Encoding.PEM), "key": key_pem(key)}
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, data in contents.items():
            _write(paths[name], data, private=name.endswith("key"))
        record = {p.name: hashlib.sha256(contents[n]).hexdigest() for n, p in paths.items()}
        _write(directory / RECORD, json.dumps(record, indent=1).encode(), private=False)
    except OSError as exc:
        raise ConfigError(f"certs: cannot write {directory} ({exc.strerror or exc})") from None
    return paths


def _alt_names(host: str, extra: tuple[str, ...]) -> list:
    """SubjectAlternativeName entries: localhost, loopback IPs, this host's names, ``extra``."""
    from cryptography import x509

    names, seen = [], set()
    for name in ("localhost", "127.0.0.1", "::1", host, socket.getfqdn(), *extra):
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def _refuse_foreign_files(directory: Path, paths) -> None:
    """ConfigError if a file about to be written exists and is not one this module wrote."""
    try:
        record = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    for path in paths:
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            ours = record.get(path.name) == hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            ours = False
        if not ours:
            raise ConfigError(f"certs: {path} exists and was not written by xpcsfit certs; "
                              "not replacing it (remove it, or choose another directory)")


def _write(path: Path, data: bytes, *, private: bool) -> None:
    with atomic_file(path) as tmp:
        if private:
            os.chmod(tmp, 0o600)  # before the key is in it
        tmp.write_bytes(data)


def check_tls_files(ca: Path, cert: Path, key: Path, where: str) -> None:
    """Check up front that the CA, the certificate and its key exist and load.

    Raises
    ------
    ConfigError
        One line naming ``where`` (e.g. "cluster spec cluster/slurm.yaml") and the file
        that is missing or not PEM, or a key that does not match the certificate.
    """
    for name, path in (("ca", ca), ("cert", cert), ("key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{where}: tls {name} {path}: no such file "
                              f"(make the certificates with `xpcsfit certs {Path(path).parent}`)")
    try:
        ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{where}: tls ca {ca}: not a PEM certificate ({exc})") from None
    try:
        ssl.create_default_context().load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}: tls cert {cert} with key {key}: not a matching PEM certificate "
                          f"and key ({exc})") from None
    except PermissionError as exc:
        raise ConfigError(f"{where}: tls {exc.filename}: cannot read ({exc.strerror})") from None


def security(ca: Path, cert: Path, key: Path):
    """``distributed.security.Security`` for every role with one certificate, encryption required.

    Parameters
    ----------
    ca, cert, key : Path
        PEM files (as written by :func:`make_certificates`); not read here.
    """
    from distributed.security import Security

    ca, cert, key = str(ca), str(cert), str(key)
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key, require_encryption=True)


def dask_tls_environment(ca: Path, cert: Path, key: Path) -> dict[str, str]:
    """Environment variables of Dask's own configuration (``distributed.comm.tls.*``) that
    make a Dask client, scheduler or worker use these files without options.

    This is how ``xpcsfit fit --scheduler tls://HOST:PORT`` gets its certificates: a
    ``Client`` given no Security reads them from Dask's configuration (environment
    variables, or the same keys in ``~/.config/dask/*.yaml``).
    """
    ca, cert, key = str(ca), str(cert), str(key)
    env = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": ca, "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
    for role in ("CLIENT", "SCHEDULER", "WORKER"):
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = cert
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = key
    return env

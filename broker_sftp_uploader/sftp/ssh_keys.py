"""SSH login material: the private key (``SFTP.PRIVATE_KEY``), the known_hosts file, and the login.

Every problem is reported as one line naming the file and the config key to fix: a key file that
cannot be used raises ``KeyFileError`` (exit 12), a known_hosts file that cannot be used and a
refused login raise ``SftpError`` (exit 14). Nothing here ever echoes a secret or a file's content.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from paramiko.pkey import UnknownKeyType

from broker_sftp_uploader.state.atomic import atomic_write
from broker_sftp_uploader.config import SECRET_VARIABLES, read_bounded_file, warn_if_exposed
from broker_sftp_uploader.errors import KeyFileError, SftpError

logger = logging.getLogger(__name__)

KEY_FILE_LIMIT = 1024 * 1024  # an RSA-16384 key is ~13 KiB; anything this big is the wrong file
_OPENSSH_BEGIN = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_BODY = re.compile(rb"-----BEGIN OPENSSH PRIVATE KEY-----(.*?)-----END OPENSSH PRIVATE KEY-----",
                           re.DOTALL)
_PEM_BEGIN = re.compile(rb"-----BEGIN (RSA |EC |DSA |ENCRYPTED |)PRIVATE KEY-----")
_PUBLIC_KEY = re.compile(rb"\s*((ssh|ecdsa|sk)-\S+ AAAA|-----BEGIN (RSA )?PUBLIC KEY-----"
                         rb"|---- BEGIN SSH2 PUBLIC KEY)")
# paramiko's key class for each key type cryptography can load.
_KEY_CLASSES = ((ed25519.Ed25519PrivateKey, paramiko.Ed25519Key),
                (ec.EllipticCurvePrivateKey, paramiko.ECDSAKey),
                (rsa.RSAPrivateKey, paramiko.RSAKey))


def ssh_fingerprint(key: paramiko.PKey) -> str:
    """Return an SSH host or public key's SHA256 fingerprint as OpenSSH prints it (``SHA256:…``)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


# --- the private key -------------------------------------------------------------------------------------


def load_private_key(path: Path, passphrase: str | None) -> paramiko.PKey:
    """Given ``SFTP.PRIVATE_KEY`` and its passphrase, return the key (ed25519, ECDSA or RSA; OpenSSH or PEM).

    Logs a warning when group or others may read the file, and when a passphrase is given for a key
    that is not encrypted.

    :raises KeyFileError: the file is missing, unreadable, not a private key, of an unsupported type,
        encrypted without a passphrase given, or the passphrase does not decrypt it.
    """
    what = f"SSH private key {path} (SFTP.PRIVATE_KEY)"
    data, mode = _read_key_file(path, what)
    encrypted = _is_encrypted(data)
    if encrypted is None:
        raise KeyFileError(f"{what} {_not_a_key(data)}")
    warn_if_exposed(path, mode, what)
    if encrypted and passphrase is None:
        raise KeyFileError(f"{what} is encrypted; give its passphrase in SFTP.PRIVATE_KEY_PASSPHRASE, "
                           "SFTP.PRIVATE_KEY_PASSPHRASE_FILE or the environment variable "
                           f"{SECRET_VARIABLES['SFTP.PRIVATE_KEY_PASSPHRASE']}")
    if not encrypted and passphrase is not None:
        logger.warning("%s is not encrypted, so SFTP.PRIVATE_KEY_PASSPHRASE is not used", what)
        passphrase = None
    password = None if passphrase is None else passphrase.encode("utf-8")
    try:
        if _OPENSSH_BEGIN in data:
            loaded = serialization.load_ssh_private_key(data, password)
        else:
            loaded = serialization.load_pem_private_key(data, password)
    except UnsupportedAlgorithm:
        raise KeyFileError(f"{what} is of a type this tool does not support; use an ed25519, ECDSA or RSA "
                           "key") from None
    except (ValueError, TypeError):
        if encrypted:
            raise KeyFileError(f"the passphrase (SFTP.PRIVATE_KEY_PASSPHRASE) does not decrypt {what}; check "
                               "it, or the key file is damaged") from None
        raise KeyFileError(f"{what} is damaged or not a valid private key") from None
    for crypto_class, key_class in _KEY_CLASSES:
        if isinstance(loaded, crypto_class):
            try:
                # paramiko takes every supported type in OpenSSH format; the passphrase is applied already.
                text = loaded.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()).decode("ascii")
                return key_class.from_private_key(io.StringIO(text))
            except (paramiko.SSHException, ValueError):
                break  # e.g. an ECDSA curve other than the NIST ones SSH uses
    raise KeyFileError(f"{what} is of a type this tool does not support; use an ed25519, ECDSA or RSA key")


def _read_key_file(path: Path, what: str) -> tuple[bytes, int]:
    """Return the content of key file ``path`` and its ``st_mode``."""
    return read_bounded_file(path, KEY_FILE_LIMIT, what, ", so it is not a private key", error=KeyFileError)


def _is_encrypted(data: bytes) -> bool | None:
    """Tell whether key file ``data`` is encrypted; None if it is no private key in OpenSSH or PEM format."""
    if match := _OPENSSH_BODY.search(data):
        try:
            blob = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except binascii.Error:
            return False  # damaged: loading says so
        # "openssh-key-v1\0", then the cipher name as an SSH string; "none" means not encrypted.
        magic = b"openssh-key-v1\x00"
        if not blob.startswith(magic) or len(blob) < len(magic) + 4:
            return False
        length = int.from_bytes(blob[len(magic):len(magic) + 4], "big")
        return blob[len(magic) + 4:len(magic) + 4 + length] != b"none"
    if match := _PEM_BEGIN.search(data):
        return match.group(1) == b"ENCRYPTED " or b"Proc-Type: 4,ENCRYPTED" in data
    return None


def _not_a_key(data: bytes) -> str:
    """Say why ``data`` is not a private key, with what to do."""
    if _PUBLIC_KEY.match(data):
        return "holds a public key; SFTP.PRIVATE_KEY needs the private one (usually the name without .pub)"
    if data.startswith(b"PuTTY-User-Key-File-"):
        return ("is a PuTTY key; convert it to OpenSSH format with "
                "`puttygen KEY.ppk -O private-openssh -o KEY` and point SFTP.PRIVATE_KEY at the result")
    return "is not a private key in OpenSSH or PEM format"


# --- known_hosts -------------------------------------------------------------------------------------------


@dataclass
class KnownHosts:
    """A known_hosts file's keys: ``host_keys`` for paramiko, ``revoked`` from its ``@revoked`` lines."""

    path: Path
    host_keys: paramiko.HostKeys = field(default_factory=paramiko.HostKeys)
    revoked: list[paramiko.PKey] = field(default_factory=list)

    def check_not_revoked(self, host: str, key: paramiko.PKey) -> None:
        """:raises SftpError: ``key`` is marked ``@revoked`` in the file."""
        if any(key == revoked for revoked in self.revoked):
            raise SftpError(f"the host key of {host} ({key.get_name()} {ssh_fingerprint(key)}) is marked "
                            f"@revoked in {self.path}; do not connect until the server's admin has given it "
                            "a new key")

    def record(self, host_name: str, key: paramiko.PKey) -> None:
        """Append ``host_name``'s key to the file atomically, keeping every other line as it was.

        :raises SftpError: the file cannot be written.
        """
        try:
            try:
                old = self.path.read_bytes()
                mode = stat.S_IMODE(self.path.stat().st_mode)
            except FileNotFoundError:
                old, mode = b"", 0o644
            if old and not old.endswith(b"\n"):
                old += b"\n"
            with atomic_write(self.path, mode=mode) as handle:
                handle.write(old + f"{host_name} {key.get_name()} {key.get_base64()}\n".encode("ascii"))
        except OSError as error:
            raise SftpError(f"cannot record the host key of {host_name} in {self.path}: "
                            f"{error.strerror or error}; make its folder writable or pin the key there in "
                            "advance (ssh-keyscan)") from None


def known_hosts_bytes(path: Path) -> bytes | None:
    """Return the content of known_hosts file ``path``, or None if it cannot be read (missing, say): a
    snapshot to tell whether a login recorded a host key in it."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def load_known_hosts(path: Path, host_keys: paramiko.HostKeys | None = None) -> KnownHosts:
    """Read known_hosts file ``path`` (a missing file is empty) in OpenSSH's format into ``host_keys``
    (e.g. an ``SSHClient``'s; default a new set).

    Hashed host names are understood; lines of key types paramiko does not know are skipped (and
    kept in the file); ``@cert-authority`` lines are ignored (this client uses no host certificates).

    :raises SftpError: the file is unreadable, a directory, or has a line that is not a valid entry
        (the message names the file and the line number, never the line's text).
    """
    known = KnownHosts(path) if host_keys is None else KnownHosts(path, host_keys)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return known
    except IsADirectoryError:
        raise SftpError(f"known_hosts file {path} is a directory; remove it or point SFTP.KNOWN_HOSTS at a "
                        "file (a missing file is created at the first connection)") from None
    except OSError as error:
        raise SftpError(f"cannot read known_hosts file {path}: {error.strerror or error}; fix that file or "
                        "SFTP.KNOWN_HOSTS") from None
    for number, raw in enumerate(data.split(b"\n"), start=1):
        problem = _add_line(known, raw)
        if problem:
            raise SftpError(f"known_hosts file {path}, line {number}: {problem}; fix or delete that line "
                            "(`ssh-keyscan -p PORT HOST` prints the server's keys)")
    return known


def _add_line(known: KnownHosts, raw: bytes) -> str | None:
    """Add one known_hosts line to ``known``; return what is wrong with it, or None."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "not UTF-8 text"
    if not line or line.startswith("#"):
        return None
    fields = line.split()
    marker = fields.pop(0) if fields[0].startswith("@") else None
    if marker not in (None, "@revoked", "@cert-authority"):
        return "unknown marker (only @revoked and @cert-authority exist)"
    if len(fields) < 3:
        return "not an entry of the form 'HOSTS KEY-TYPE BASE64-KEY'"
    names, key_type, blob = fields[:3]
    try:
        key_bytes = base64.b64decode(blob, validate=True)
    except binascii.Error:
        return "the key is not valid base64"
    try:
        key = paramiko.PKey.from_type_string(key_type, key_bytes)
    except UnknownKeyType:
        logger.debug("skipping a known_hosts entry of key type %s, which paramiko does not support", key_type)
        return None
    except Exception:  # noqa: BLE001 - untrusted bytes: whatever the key parser raises means "not a key"
        return f"the key is not a valid {key_type} key"
    if marker == "@revoked":
        known.revoked.append(key)
    elif marker is None:
        for name in names.split(","):
            known.host_keys.add(name, key.get_name(), key)
    return None


# --- the login ---------------------------------------------------------------------------------------------


class Login(paramiko.AuthStrategy):
    """Log in with the configured key, password or both, and nothing else (no agent, no ``~/.ssh``).

    With both, the key goes first; a server that demands both (``AuthenticationMethods
    publickey,password``) answers the key with a partial success and then gets the password.
    Before any credential is sent, the server's key is checked against the ``@revoked`` ones.
    """

    def __init__(self, server: str, username: str, password: str | None, key: paramiko.PKey | None,
                 key_path: Path | None, known_hosts: KnownHosts):
        super().__init__(ssh_config=paramiko.SSHConfig())
        self.server, self.username, self.password = server, username, password
        self.where = f"{username}@{server}"
        self.key, self.key_path, self.known_hosts = key, key_path, known_hosts

    def __repr__(self) -> str:
        return f"Login({self.where})"  # never the password

    def get_sources(self):  # pragma: no cover - authenticate() below does not use sources
        return iter(())

    def authenticate(self, transport: paramiko.Transport) -> list:
        """Authenticate on ``transport``; return ``[]``.

        :raises SftpError: the server's key is revoked, or the login was refused (naming what was
            refused and which config key to check).
        """
        self.known_hosts.check_not_revoked(self.server, transport.get_remote_server_key())
        attempts = []
        if self.key is not None:
            attempts.append(("publickey", lambda: transport.auth_publickey(self.username, self.key)))
        if self.password is not None:
            attempts.append(("password", lambda: transport.auth_password(self.username, self.password)))
        accepted: list[str] = []
        refused: dict[str, list[str] | None] = {}
        further: list[str] | None = None  # what the server still demands after a partial success
        for method, attempt in attempts:
            if further is not None and method not in further:
                continue
            try:
                further = list(attempt())
            except paramiko.BadAuthenticationType as error:
                refused[method] = list(error.allowed_types)
                continue
            except paramiko.AuthenticationException as error:
                if "timeout" in str(error).lower():
                    raise  # no answer is not a refusal
                refused[method] = None
                continue
            accepted.append(method)
            if not further:
                logger.info("logged in as %s with %s", self.where, " and ".join(accepted))
                return []
        raise SftpError(self._refusal(accepted, refused, further or []))

    def _refusal(self, accepted: list[str], refused: dict[str, list[str] | None], further: list[str]) -> str:
        """The one line saying what the server refused and what to check."""
        key = f"the key {self.key_path} (SFTP.PRIVATE_KEY)"
        login = f"SFTP login as {self.where}"
        if accepted and not refused:
            missing = ("SFTP.PASSWORD" if "password" in further
                       else "SFTP.PRIVATE_KEY" if "publickey" in further else None)
            done = key if accepted == ["publickey"] else "the password"
            names = {"publickey": "a key", "password": "a password"}
            demand = f"also demands {' or '.join(names.get(method, method) for method in further) or 'more'}"
            return (f"{login}: the server accepted {done} but {demand}; "
                    + (f"set {missing}" if missing else "this tool logs in by key and password only"))
        if accepted:
            if "password" in refused:
                return f"{login}: the server accepted {key} but refused the password; check SFTP.PASSWORD"
            return (f"{login}: the server accepted the password but refused {key}; add its public key to the "
                    "user's authorized_keys on the server")
        if "publickey" in refused and "password" in refused:
            return (f"{login} was refused with both {key} and the password; check SFTP.USERNAME, "
                    "SFTP.PRIVATE_KEY and SFTP.PASSWORD")
        if "publickey" in refused:
            allowed = refused["publickey"]
            if allowed is not None:
                return (f"{login}: the server does not accept key login for this user (it offers "
                        f"{', '.join(allowed)}); set SFTP.PASSWORD or check SFTP.USERNAME")
            return (f"{login} was refused with {key}; add its public key to the user's authorized_keys on "
                    "the server, or check SFTP.USERNAME")
        allowed = refused.get("password")
        if allowed is not None:
            return (f"{login}: the server does not accept password login for this user (it offers "
                    f"{', '.join(allowed)}); set SFTP.PRIVATE_KEY or check SFTP.USERNAME")
        return f"{login} was refused; check SFTP.USERNAME and SFTP.PASSWORD"

"""Dropbear's SSH server with Green End's SFTP server (Debian packages ``dropbear-bin`` and
``gesftpserver``) on 127.0.0.1: SSH and SFTP without any OpenSSH code, with one password user.

Dropbear runs the SFTP subsystem from a path fixed when it was built (Debian's: ``/usr/lib/sftp-server``,
OpenSSH's server there), and it logs users in from ``/etc/passwd`` and ``/etc/shadow``. So that the
machine stays as it is, dropbear runs in a private mount namespace (``unshare --mount``) in which
``gesftpserver`` is bind-mounted over that path and a passwd and a shadow file of our own over the
machine's: the only user is ``receiver`` (the uid of ``nobody``, a random password, its home the served
root, where gesftpserver starts, so that relative paths resolve there). Nothing is mounted, written or
added outside the namespace and ``base_dir``.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import subprocess
from pathlib import Path

from test_resources.password_sftp import PasswordSftpServer
from test_resources.server_process import ServerUnavailable, find_program

FIX_HINT = "run as root after `apt-get install -y dropbear-bin gesftpserver openssl`"
GESFTPSERVER = Path("/usr/libexec/gesftpserver")
# In the namespace: the files of our own in place of the machine's, then dropbear in the foreground.
MOUNT_THEN_SERVE = ('mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/shadow '
                    '&& mount --bind "$3" "$4" && shift 4 && exec "$@"')


class DropbearUnavailable(ServerUnavailable):
    """Dropbear with gesftpserver cannot be launched here (missing packages or not root)."""


def _tool(name: str) -> str:
    """Absolute path of a required program; :raises DropbearUnavailable: it is not installed."""
    return find_program(name, DropbearUnavailable, FIX_HINT)


def sftp_subsystem_path(dropbear: str) -> str:
    """The SFTP server path built into the ``dropbear`` binary (it has no option to change it).

    :raises DropbearUnavailable: the binary names none, or nothing is there to mount over.
    """
    found = re.search(rb"(/[\w/.-]*sftp-server)\x00", Path(dropbear).read_bytes())
    if found is None:
        raise DropbearUnavailable(f"{dropbear} names no sftp-server path; it was built without SFTP")
    path = found.group(1).decode()
    if not os.path.exists(path):  # a bind mount needs a file to cover; the machine's is not changed
        raise DropbearUnavailable(f"dropbear runs SFTP from {path}, which does not exist; "
                                  "install it with `apt-get install -y openssh-sftp-server`")
    return path


class DropbearSftpServer(PasswordSftpServer):
    """Dropbear serving gesftpserver over ``base_dir/sftp``; use as a context manager."""

    name = "dropbear"

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self.host_key_path = self.base_dir / "dropbear_ed25519_host_key"
        self._passwd = self.base_dir / "passwd"
        self._shadow = self.base_dir / "shadow"
        self._owner = (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)

    @staticmethod
    def check_available() -> None:
        """:raises DropbearUnavailable: not root, a program or gesftpserver missing, or no mount namespace."""
        if os.geteuid() != 0:
            raise DropbearUnavailable(f"dropbear switches users and mounts in its own namespace as root; "
                                      f"{FIX_HINT}")
        for name in ("dropbearkey", "unshare", "mount", "openssl"):
            _tool(name)
        sftp_subsystem_path(_tool("dropbear"))
        if not os.access(GESFTPSERVER, os.X_OK):
            raise DropbearUnavailable(f"{GESFTPSERVER} not found; {FIX_HINT}")
        namespace = subprocess.run([_tool("unshare"), "--mount", "--propagation", "private", "true"],
                                   capture_output=True, text=True, check=False)
        if namespace.returncode != 0:  # e.g. a container without CAP_SYS_ADMIN
            raise DropbearUnavailable(f"no private mount namespace here: {namespace.stderr.strip()}")

    def folder(self, name: str) -> Path:
        """Local path of folder ``name`` under the served root, created writable for the SFTP user."""
        path = super().folder(name)
        os.chown(path, *self._owner)
        return path

    def _prepare(self) -> None:
        """The served root (reachable by the user), the user's passwd line and a dropbear host key."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.sftp_root.mkdir(exist_ok=True)
        os.chown(self.sftp_root, *self._owner)
        for parent in self.sftp_root.parents:  # e.g. a 0700 mkdtemp folder: search permission only
            if not (mode := parent.stat().st_mode) & 0o001:
                parent.chmod(mode & 0o7777 | 0o001)

        hashed = subprocess.run([_tool("openssl"), "passwd", "-6", "-stdin"], input=self.password, text=True,
                                capture_output=True, check=True).stdout.strip()
        uid, gid = self._owner
        # The hash stands in the passwd line: dropbear uses it when shadow has no entry for the user.
        self._passwd.write_text(f"root:x:0:0:root:/root:/bin/sh\n"
                                f"{self.username}:{hashed}:{uid}:{gid}::{self.sftp_root}:/bin/sh\n")
        self._passwd.chmod(0o600)
        self._shadow.write_text("")
        self._shadow.chmod(0o600)

        self.host_key_path.unlink(missing_ok=True)
        subprocess.run([_tool("dropbearkey"), "-t", "ed25519", "-f", str(self.host_key_path)],
                       capture_output=True, check=True)
        public = subprocess.run([_tool("dropbearkey"), "-y", "-f", str(self.host_key_path)],
                                capture_output=True, text=True, check=True).stdout
        key_line = next(line for line in public.splitlines() if line.startswith("ssh-ed25519 "))
        self.host_public_key_line = " ".join(key_line.split()[:2])

    def _command(self, port: int) -> list[str]:
        dropbear = _tool("dropbear")
        return [_tool("unshare"), "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                MOUNT_THEN_SERVE, "mount-then-serve", str(self._passwd), str(self._shadow), str(GESFTPSERVER),
                sftp_subsystem_path(dropbear),
                dropbear, "-F", "-E", "-m", "-w", "-j", "-k",  # no motd, root logins or forwarding
                "-P", str(self.base_dir / "dropbear.pid"), "-p", f"{self.host}:{port}",
                "-r", str(self.host_key_path)]

    def _ready(self, log_text: str, port: int) -> bool:
        return "Not backgrounding" in log_text

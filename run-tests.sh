#!/usr/bin/env bash
# Runs the test suite on a fresh machine: installs what the tests need (as root: OpenSSH's sshd and
# ProFTPD from Debian; this package with its test extras from PyPI into the project's own virtualenv
# .venv/, created on first use, so the machine's Python is left as it was), then pytest. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$PWD/.venv}

# OpenSSH's sshd (and its ssh client, for SFTP.TRANSPORT = "openssh"), and ProFTPD's mod_sftp as a second
# SFTP server implementation (tests start both themselves on 127.0.0.1; the packages' own services are
# not used); systemd-analyze checks the example units; zsh and fish the shell completion; tinyproxy
# (the program alone) is the forward proxy of the broker tests; rclone's `serve sftp` a third SFTP server,
# Dropbear with Green End's gesftpserver a fourth (no OpenSSH code; run in a private mount namespace).
if [[ ! -x /usr/sbin/sshd || ! -x /usr/bin/ssh || ! -x /usr/sbin/proftpd || ! -e /usr/lib/proftpd/mod_sftp.so \
      || ! -x /usr/bin/systemd-analyze || ! -x /usr/bin/zsh || ! -x /usr/bin/fish || ! -x /usr/bin/tinyproxy \
      || ! -x /usr/bin/rclone || ! -x /usr/sbin/dropbear || ! -x /usr/libexec/gesftpserver ]]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    openssh-server openssh-sftp-server openssh-client proftpd-core proftpd-mod-crypto openssl systemd zsh fish \
    tinyproxy-bin rclone dropbear-bin gesftpserver >/dev/null
  systemctl disable --now proftpd >/dev/null 2>&1 || true
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
export PATH="$VENV/bin:$PATH"   # the console-script test finds the venv's broker-sftp-uploader
exec "$VENV/bin/python" -m pytest -q "$@"

#!/usr/bin/env bash
# Runs the test suite on a fresh machine: installs what the tests need (as root: OpenSSH's sshd from
# Debian, this package with its test extras from PyPI), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [[ ! -x /usr/sbin/sshd ]]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-sftp-server >/dev/null
fi
"$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
exec "$PYTHON" -m pytest -q "$@"

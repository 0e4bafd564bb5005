#!/usr/bin/env bash
# End-to-end run of the original broker-sftp-uploader integration scenario (docs/broker-api.md §6)
# against the broker emulator and a real OpenSSH sshd on 127.0.0.1, with hard assertions.
# Sets itself up on a fresh machine (as root: apt openssh-server + curl; this package and the test
# resources' needs into the project's virtualenv .venv/, so the machine's Python is left as it was),
# stops at the first failed expectation with a non-zero exit, and cleans up every process it started.
set -euo pipefail

cd "$(dirname "$0")"
VENV=${VENV:-$PWD/.venv}
PYTHON="$VENV/bin/python"
# Run this checkout's code, whatever else is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
bsu() { "$PYTHON" -m broker_sftp_uploader "$@"; }
ADMIN_KEY="xxxAdmin1234"
CLIENT_1="xxxApiKey123"
CLIENT_2="xxxApiKey567"
QUERY_TYPE="application/vnd.aktin.query.request+xml"

step() { printf '\033[1;33m== %s\033[0m\n' "$*"; }
fail() { printf '\033[1;31mFAILED: %s\033[0m\n' "$*" >&2; exit 1; }
expect() { # expect NAME EXPECTED ACTUAL
  [[ "$2" == "$3" ]] || fail "$1: expected '$2', got '$3'"
  printf '   ok: %s = %s\n' "$1" "$3"
}

# --- set-up on a fresh machine -------------------------------------------------------------
if ! command -v sshd >/dev/null && [[ ! -x /usr/sbin/sshd ]] || ! command -v curl >/dev/null; then
  step "installing openssh-server and curl"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-sftp-server curl >/dev/null
fi
if ! "$PYTHON" -c "import broker_sftp_uploader, paramiko, lxml, requests" 2>/dev/null; then
  step "installing broker-sftp-uploader into $VENV"
  [[ -x "$PYTHON" ]] || python3 -m venv "$VENV"
  "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]' >/dev/null
fi

WORK=$(mktemp -d /tmp/bsu-integration.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_for_file() { # wait_for_file PATH PID
  local i
  for i in $(seq 1 150); do
    [[ -s "$1" ]] && return 0
    kill -0 "$2" 2>/dev/null || fail "process $2 died before writing $1"
    sleep 0.1
  done
  fail "timed out waiting for $1"
}

# --- the broker emulator and sshd ----------------------------------------------------------
step "starting the broker emulator and sshd"
"$PYTHON" -m test_resources.broker_emulator --port 0 --port-file "$WORK/broker.port" >"$WORK/broker.log" 2>&1 &
PIDS+=($!)
wait_for_file "$WORK/broker.port" "${PIDS[-1]}"
BROKER="http://127.0.0.1:$(cat "$WORK/broker.port")"
"$PYTHON" -m test_resources.sshd --base-dir "$WORK/sshd" --folder rki >"$WORK/sshd.out" 2>&1 &
PIDS+=($!)
wait_for_file "$WORK/sshd/sshd.json" "${PIDS[-1]}"
sshd_field() { "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$WORK/sshd/sshd.json" "$1"; }
SFTP_PORT=$(sshd_field port)
SFTP_USER=$(sshd_field password_user)
SFTP_PASSWORD=$(sshd_field password)
REMOTE="$(sshd_field sftp_root)/rki"
echo "   broker $BROKER, sshd 127.0.0.1:$SFTP_PORT"

# --- the uploader's working folder, key and config (the original format, plus SFTP.PORT) ----
mkdir -p "$WORK/opt"
bsu keygen "$WORK/opt/rki.key"
cat >"$WORK/opt/settings.toml" <<EOF
[BROKER]
URL = "$BROKER"
API_KEY = "$ADMIN_KEY"

[REQUESTS]
TAG = "rki"

[SFTP]
HOST = "127.0.0.1"
PORT = $SFTP_PORT
USERNAME = "$SFTP_USER"
PASSWORD = "$SFTP_PASSWORD"
TIMEOUT = "25"
FOLDERNAME = "rki"

[SECURITY]
PATH_ENCRYPTION_KEY = "rki.key"

[MISC]
WORKING_DIR = "."
EOF
chmod 600 "$WORK/opt/settings.toml"   # it holds secrets: a readable one draws a warning on every run

# --- the broker side, as the original test's curl scripts do it ------------------------------
publish_new_request() { # publish_new_request TAG
  local body location id
  body="<queryRequest xmlns=\"http://aktin.org/ns/exchange\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><id>1337</id><reference>2020-01-01T00:00:00.000Z</reference><scheduled>2020-01-01T12:00:00.000Z</scheduled><query><title>Title of request</title><description>Description of request</description><principal><name>Name of creator</name><organisation>Organisation of creator</organisation><email>Email of createor</email><phone/><tags><tag>$1</tag></tags></principal><schedule xsi:type=\"repeatedExecution\"><duration>-P6M</duration><interval/><intervalHours/><id>1</id></schedule><sql xmlns=\"http://aktin.org/ns/i2b2/sql\"><source type=\"application/sql\">SELECT * FROM fhir_observation</source></sql></query></queryRequest>"
  location=$(curl -sS -i -H "Authorization: Bearer $ADMIN_KEY" -H "Content-Type: $QUERY_TYPE" \
    -X POST -d "$body" "$BROKER/broker/request" | grep -oE 'broker/request/[0-9]{1,2}')
  id=${location##*/}
  expect "publish request $id" 204 "$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $ADMIN_KEY" -X POST "$BROKER/broker/request/$id/publish")"
}
count_requests() { curl -sS -H "Authorization: Bearer $1" "$BROKER/broker/my/request" | grep -o 'id' | wc -l | tr -d ' '; }
count_nodes() { echo $(( $(curl -sS -H "Authorization: Bearer $ADMIN_KEY" "$BROKER/broker/node" | grep -o 'id' | wc -l) / 2 )); }
node_post() { # node_post KEY PATH
  expect "POST $2" 204 "$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $1" -X POST "$BROKER$2")"
}
submit_result() { # submit_result KEY ID
  expect "PUT result $2" 204 "$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $1" -H "Content-Type: text/csv" -X PUT -d 'a;b\n1;2\n3;4\n' "$BROKER/aggregator/my/request/$2/result")"
  node_post "$1" "/broker/my/request/$2/status/completed"
}
run_uploader() { (cd "$WORK/opt" && bsu sync -c settings.toml -v) || fail "uploader exited $?"; }
count_in() { grep -o "<$1>" "$2" | wc -l | tr -d ' '; }
count_zips() { find "$REMOTE" -maxdepth 1 -name '*.zip' | wc -l | tr -d ' '; }

step "broker creates 3 requests tagged rki and 3 tagged default"
for i in 0 1 2; do publish_new_request rki; publish_new_request default; done
step "client 1 sees 6 requests; the broker sees 1 node"
expect "requests for client 1" 6 "$(count_requests "$CLIENT_1")"
expect "connected nodes" 1 "$(count_nodes)"
step "client 1 submits results for all 6 and marks them completed"
for i in 0 1 2 3 4 5; do submit_result "$CLIENT_1" "$i"; done

step "uploader run 1"
run_uploader
expect "entries in local status.xml" 3 "$(count_in request-status "$WORK/opt/status.xml")"
expect "zip files on the SFTP server" 3 "$(count_zips)"
expect "entries in remote status.xml" 3 "$(count_in request-status "$REMOTE/status.xml")"

step "broker adds one rki and one default request and deletes request 0"
publish_new_request rki
publish_new_request default
expect "DELETE request 0" 204 "$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $ADMIN_KEY" -X DELETE "$BROKER/broker/request/0")"
step "client 2 sees 7 requests, retrieves 1..5; the broker sees 2 nodes"
expect "requests for client 2" 7 "$(count_requests "$CLIENT_2")"
for i in 1 2 3 4 5; do node_post "$CLIENT_2" "/broker/my/request/$i/status/retrieved"; done
expect "connected nodes" 2 "$(count_nodes)"

step "uploader run 2"
run_uploader
expect "entries in local status.xml" 4 "$(count_in request-status "$WORK/opt/status.xml")"
expect "updated entries in local status.xml" 2 "$(count_in last-update "$WORK/opt/status.xml")"
expect "deleted entries in local status.xml" 1 "$(count_in deleted "$WORK/opt/status.xml")"
expect "entries in remote status.xml" 4 "$(count_in request-status "$REMOTE/status.xml")"
expect "zip files on the SFTP server" 3 "$(count_zips)"
expect "export_0.zip on the SFTP server" 0 "$(find "$REMOTE" -name export_0.zip | wc -l | tr -d ' ')"
expect "export_2.zip on the SFTP server" 1 "$(find "$REMOTE" -name export_2.zip | wc -l | tr -d ' ')"
expect "completion of request 2" "0.5" "$("$PYTHON" -c 'import sys; from lxml import etree; print(etree.parse(sys.argv[1]).xpath("string(//request-status[id=2]/completion)"))' "$WORK/opt/status.xml")"

step "export_2.zip decrypts with plain Fernet.decrypt to the bundle"
"$PYTHON" - "$WORK/opt/rki.key" "$REMOTE/export_2.zip" <<'EOF' || fail "export_2.zip does not decrypt to the expected zip"
import io, sys, zipfile
from cryptography.fernet import Fernet
key = open(sys.argv[1], "rb").read().strip()
token = open(sys.argv[2], "rb").read()
assert not zipfile.is_zipfile(io.BytesIO(token)), "uploaded file is not encrypted"
bundle = zipfile.ZipFile(io.BytesIO(Fernet(key).decrypt(token)))
names = bundle.namelist()
assert names == ["status.xml", "request.xml", "definition.xml", "0_result.txt"], names
assert bundle.read("0_result.txt") == b"a;b\\n1;2\\n3;4\\n", bundle.read("0_result.txt")
print("   ok: export_2.zip holds", ", ".join(names))
EOF

step "uploader run 3 without broker changes uploads nothing"
before=$(stat -c %i.%Y.%s "$REMOTE"/export_*.zip "$REMOTE/status.xml" | sort | md5sum)
output=$(cd "$WORK/opt" && bsu sync -c settings.toml 2>&1) || fail "run 3 exited $?"
expect "output of a quiet run" "" "$output"
expect "remote files unchanged" "$before" "$(stat -c %i.%Y.%s "$REMOTE"/export_*.zip "$REMOTE/status.xml" | sort | md5sum)"

step "no temporary files left behind"
expect "leftovers in the working folder" "" "$(find "$WORK/opt" -name '.*' -type f ! -name '.' | tr '\n' ' ')"
expect "leftovers on the SFTP server" "" "$(find "$REMOTE" -name '.*' -type f | tr '\n' ' ')"

printf '\033[0;32mintegration test passed\033[0m\n'

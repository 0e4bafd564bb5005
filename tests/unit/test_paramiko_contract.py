"""The contract with paramiko's private API: ``sftp/paramiko_internals.py`` is the only module that uses it,
and everything it uses is there, in the shape it calls, in the installed paramiko.

A failure here names the paramiko version and what changed. The fix goes into paramiko_internals.py
(or the range of paramiko declared in pyproject.toml), nowhere else. The behaviour is checked against
OpenSSH's real sftp-server, spoken to over its pipes as the openssh transport does (no SSH, no root).
"""

from __future__ import annotations

import ast
import inspect
import os
import socket
import subprocess
import textwrap
from pathlib import Path

import paramiko
import paramiko.sftp
import pytest

from test_resources import sftp_server

PACKAGE = Path(__file__).resolve().parents[2] / "broker_sftp_uploader"
INTERNALS = PACKAGE / "sftp" / "paramiko_internals.py"
PARAMIKO = Path(paramiko.__file__).resolve().parent
# The module of paramiko's SFTP protocol numbers and BaseSFTP, which paramiko does not document.
PROTOCOL_MODULE = "paramiko.sftp"
ADAPT = "adapt broker_sftp_uploader/sftp/paramiko_internals.py to it, or keep paramiko below this version"


def changed(what: str) -> str:
    """The message of a broken contract: the version, what changed, where to fix it."""
    return f"paramiko {paramiko.__version__} changed its private API: {what}; {ADAPT}"


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# --- the names used, and their shape ------------------------------------------------------------------------

# paramiko.sftp's names and the values they have in the SFTP protocol (draft-ietf-secsh-filexfer-02).
PROTOCOL_NUMBERS = {"CMD_INIT": 1, "CMD_VERSION": 2, "CMD_OPEN": 3, "CMD_CLOSE": 4, "CMD_WRITE": 6,
                    "CMD_LSTAT": 7, "CMD_STAT": 17, "CMD_RENAME": 18, "CMD_STATUS": 101, "CMD_HANDLE": 102,
                    "CMD_ATTRS": 105, "CMD_EXTENDED": 200, "SFTP_FLAG_WRITE": 0x02, "SFTP_FLAG_CREATE": 0x08,
                    "SFTP_FLAG_TRUNC": 0x10, "SFTP_OK": 0, "SFTP_FAILURE": 4, "SFTP_OP_UNSUPPORTED": 8}
# SFTPClient's private methods that paramiko_internals calls, with the parameters it passes.
PRIVATE_METHODS = {
    "_async_request": ["self", "fileobj", "t", "*args"],  # (reply object, request kind, its arguments)
    "_read_response": ["self", "waitfor=None"],  # called without arguments: read one reply
    "_convert_status": ["self", "msg"],  # a status message: raise, or nothing for OK
    # ExtensionAwareSftpClient overrides _send_version and speaks the exchange with these two
    "_send_version": ["self"],
    "_send_packet": ["self", "t", "packet"],
    "_read_packet": ["self"],
    "_write_all": ["self", "out"],  # send_write hands its own framed packet to it
}


def test_the_protocol_numbers_used_are_there_with_their_values():
    for name, value in PROTOCOL_NUMBERS.items():
        assert getattr(paramiko.sftp, name, None) == value, changed(f"paramiko.sftp.{name} is not {value}")


def parameters(function) -> list[str]:
    shown = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            shown.append(f"*{parameter.name}")
        elif parameter.default is not parameter.empty:
            shown.append(f"{parameter.name}={parameter.default!r}")
        else:
            shown.append(parameter.name)
    return shown


@pytest.mark.parametrize("name", PRIVATE_METHODS)
def test_the_private_methods_used_take_what_is_passed(name):
    method = getattr(paramiko.SFTPClient, name, None)
    assert callable(method), changed(f"SFTPClient.{name} is gone")
    expected = PRIVATE_METHODS[name]
    assert parameters(method) == expected, changed(
        f"SFTPClient.{name} takes ({', '.join(parameters(method))}), not ({', '.join(expected)})")


def test_a_write_is_numbered_and_filed_as_paramiko_files_its_own_requests():
    """send_write frames a WRITE itself: it takes the number under SFTPClient._lock from request_number,
    files its reply in _expecting under it (where _read_response looks it up) and counts on, exactly as
    _async_request does."""
    setup = inspect.getsource(paramiko.SFTPClient.__init__)
    for assigned in ("self.request_number = 1", "self._lock = threading.Lock()", "self._expecting = "):
        assert assigned in setup, changed(f"SFTPClient.__init__ no longer sets {assigned.split(' =')[0]}")
    numbering = inspect.getsource(paramiko.SFTPClient._async_request)
    for step in ("self._lock.acquire()", "msg.add_int(self.request_number)", "num = self.request_number",
                 "self._expecting[num] = fileobj", "self.request_number += 1"):
        assert step in numbering, changed(f"SFTPClient._async_request no longer does {step}")
    lookup = inspect.getsource(paramiko.SFTPClient._read_response)
    assert "self._expecting[num]" in lookup, changed("_read_response no longer finds a reply in _expecting")


def test_attributes_are_read_from_a_reply_and_packed_into_a_request():
    """SFTPAttributes._from_msg(message) reads a STAT's answer; _async_request packs an SFTPAttributes
    argument (the OPEN's empty attributes) with its _pack."""
    reader = getattr(paramiko.SFTPAttributes, "_from_msg", None)
    assert callable(reader) and parameters(reader) == ["msg", "filename=None", "longname=None"], changed(
        "SFTPAttributes._from_msg(msg) is gone or takes other arguments")
    packs = [call for call in calls_in(paramiko.SFTPClient._async_request)
             if ast.unparse(call.func) == "item._pack"]
    assert packs, changed("SFTPClient._async_request no longer packs an SFTPAttributes argument")


def calls_in(function) -> list[ast.Call]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def test_replies_are_handed_to_the_hook_of_the_object_filed_with_the_request():
    """StatusReply._async_response(kind, message, number) is called by paramiko, not by us."""
    hooks = [call for call in calls_in(paramiko.SFTPClient._read_response)
             if isinstance(call.func, ast.Attribute) and call.func.attr == "_async_response"]
    assert [len(call.args) for call in hooks] == [3], changed(
        "SFTPClient._read_response no longer calls fileobj._async_response(t, msg, num)")


def test_the_client_asks_for_the_version_through_the_overridden_method():
    """SFTPClient.__init__ calls self._send_version(), which ExtensionAwareSftpClient replaces, and
    from_transport builds the class it is called on."""
    version_calls = [call for call in calls_in(paramiko.SFTPClient.__init__)
                     if ast.unparse(call.func) == "self._send_version" and not call.args]
    assert len(version_calls) == 1, changed("SFTPClient.__init__ no longer calls self._send_version()")
    builds = [call for call in calls_in(paramiko.SFTPClient.from_transport)
              if ast.unparse(call.func) == "cls"]
    assert len(builds) == 1, changed("SFTPClient.from_transport no longer builds cls(channel)")
    # channel_is_closed reads a Channel's closed and eof_received, which paramiko sets in Channel.__init__
    channel_setup = inspect.getsource(paramiko.Channel.__init__)
    assert "self.closed =" in channel_setup and "self.eof_received =" in channel_setup, changed(
        "paramiko.Channel no longer has closed and eof_received")


def channel_methods_called_by_paramiko() -> set[str]:
    """The methods paramiko's SFTP code calls on the channel under an SFTPClient (``sock``)."""
    called = set()
    for name in ("sftp.py", "sftp_client.py", "sftp_file.py"):
        for node in ast.walk(ast.parse((PARAMIKO / name).read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "sock":
                called.add(node.attr)
    return called


# What paramiko may call on a channel that a PipeChannel need not have, and why.
CHANNEL_ONLY = {
    "get_transport": "called only when the channel is a real paramiko Channel",
    "gettimeout": "only from SFTPFile.gettimeout, which the package never calls",
    "setblocking": "only from SFTPFile.setblocking, which the package never calls",
}


def test_the_pipe_channel_has_every_method_paramiko_calls_on_a_channel():
    from broker_sftp_uploader.sftp.paramiko_internals import PipeChannel

    missing = channel_methods_called_by_paramiko() - set(dir(PipeChannel)) - set(CHANNEL_ONLY)
    assert not missing, changed(f"its SFTP code now calls {sorted(missing)} on the channel, which "
                                "PipeChannel does not have")


def test_the_channel_scan_finds_what_paramiko_calls_today():
    """The scan itself: it sees the calls this tool relies on (else the test above proves nothing)."""
    assert {"send", "recv", "close", "get_name"} <= channel_methods_called_by_paramiko()


# --- the behaviour, against OpenSSH's sftp-server -----------------------------------------------------------


def test_pipelined_writes_land_and_each_reply_reaches_its_own_request(tmp_path):
    from broker_sftp_uploader.sftp.paramiko_internals import open_new_file, send_close, send_stat, send_write

    chunks = [bytes([number]) * 1000 for number in range(4)] + [os.urandom(200_000)]  # one of many pipe reads
    (tmp_path / "file").write_bytes(b"an older, longer content to be emptied by the open" * 200)
    with sftp_server.sftp_client(tmp_path) as client:
        handle = open_new_file(client, "file")
        replies = [send_write(client, handle, 1000 * number, chunk) for number, chunk in enumerate(chunks)]
        closing = send_close(client, handle)  # sent behind the writes, before any reply is read
        sized = send_stat(client, "file")
        sized.wait(client)  # reads all seven replies (OpenSSH answers in order): each to its own object
        arrived = [reply.packet is not None for reply in (*replies, closing)]
        statuses = [reply.status for reply in (*replies, closing, sized)]
        for reply in (*replies, closing):
            reply.raise_unless_ok(client)
        size = sized.attributes(client).st_size
        missing = send_stat(client, "absent", follow_links=False).wait(client).attributes(client)
    assert arrived == [True] * 6, changed("a reply did not reach the object filed with its request")
    assert statuses == [0] * 7
    assert (size, missing) == (204_000, None), changed("a STAT's answer is read otherwise")
    assert (tmp_path / "file").read_bytes() == b"".join(chunks), changed("pipelined writes did not land")


def test_an_open_the_server_refuses_raises_what_paramiko_raises(tmp_path):
    from broker_sftp_uploader.sftp.paramiko_internals import open_new_file

    with sftp_server.sftp_client(tmp_path) as client, pytest.raises(FileNotFoundError):
        open_new_file(client, "no-such-folder/file")
    with sftp_server.sftp_client(tmp_path, "-R") as client, pytest.raises(PermissionError):
        open_new_file(client, "file")
    assert list(tmp_path.iterdir()) == []


def test_status_codes_and_the_errors_paramiko_raises_for_them(tmp_path):
    from broker_sftp_uploader.sftp.paramiko_internals import (
        STATUS_FAILURE,
        STATUS_OP_UNSUPPORTED,
        StatusReply,
        plain_rename,
        posix_rename,
    )

    (tmp_path / "old").write_bytes(b"old")
    (tmp_path / "new").write_bytes(b"new")
    with sftp_server.sftp_client(tmp_path) as client:
        missing = posix_rename(client, "absent", "elsewhere")
        existing = plain_rename(client, "new", "old")  # OpenSSH never replaces with a plain rename
        unknown = StatusReply.request(client, paramiko.sftp.CMD_EXTENDED, "no-such-extension@example.com")
        done = posix_rename(client, "new", "old")
        assert (missing.status, existing.status, unknown.status, done.status) == (2, STATUS_FAILURE,
                                                                                  STATUS_OP_UNSUPPORTED, 0)
        with pytest.raises(FileNotFoundError):
            missing.raise_unless_ok(client)
        with pytest.raises(OSError) as failure:
            existing.raise_unless_ok(client)
        assert type(failure.value) is OSError, changed("a FAILURE status raises another type")
        done.raise_unless_ok(client)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old").read_bytes() == b"new"

    with sftp_server.sftp_client(tmp_path, "-R") as client:  # read-only: every change is refused
        refused = posix_rename(client, "old", "other")
        with pytest.raises(PermissionError):
            refused.raise_unless_ok(client)


def test_the_version_reply_keeps_the_servers_extensions(tmp_path):
    from broker_sftp_uploader.sftp.paramiko_internals import (
        ExtensionAwareSftpClient,
        channel_is_closed,
        server_extensions,
        server_version,
    )

    with sftp_server.sftp_client(tmp_path) as client:
        assert isinstance(client, ExtensionAwareSftpClient)
        assert server_version(client) == 3
        assert server_extensions(client)["posix-rename@openssh.com"] == b"1"
        assert client.listdir(".") == []  # the exchange left the session usable
        assert not channel_is_closed(client)
        process = client.get_channel()._process
        process.kill()
        process.wait()
        assert channel_is_closed(client)
    with sftp_server.sftp_client(tmp_path, "-P", "posix-rename") as client:  # denied: left out of the list
        assert "posix-rename@openssh.com" not in server_extensions(client)
        assert "hardlink@openssh.com" in server_extensions(client)


@pytest.mark.parametrize(("code", "lost"), [(255, True), (0, False), (1, False)])
def test_an_ssh_child_lost_its_connection_only_when_it_exits_with_255(code, lost):
    """ssh exits 255 for its own failures (a dead connection), else with the remote subsystem's code."""
    from broker_sftp_uploader.sftp.paramiko_internals import PipeChannel, connection_is_lost

    process = subprocess.Popen(["sh", "-c", f"exit {code}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    channel = PipeChannel(process, 5)
    process.wait()

    class Client:  # what connection_is_lost asks of an SFTPClient
        def get_channel(self):
            return channel

    assert connection_is_lost(Client()) is lost
    channel.close()


def test_a_transport_that_stopped_is_a_lost_connection():
    """connection_is_lost asks a Channel for its Transport and that Transport whether it is active."""
    from broker_sftp_uploader.sftp.paramiko_internals import connection_is_lost

    left, right = socket.socketpair()
    transport = paramiko.Transport(left)

    class Channel:  # a paramiko Channel's face: closed, eof_received, get_transport()
        closed = eof_received = False

        def get_transport(self):
            return transport

    class Client:
        def get_channel(self):
            return Channel()

    assert connection_is_lost(Client())  # a transport never started is not active
    transport.close()
    right.close()


def version_reply(*pairs: bytes, version: int = 3) -> bytes:
    return version.to_bytes(4, "big") + b"".join(len(part).to_bytes(4, "big") + part for part in pairs)


def test_a_hostile_version_reply_cannot_raise_or_grow_without_bound():
    from broker_sftp_uploader.sftp.paramiko_internals import MAX_EXTENSIONS, parse_version_reply

    assert parse_version_reply(version_reply(b"a@x", b"1", b"b@x", b"2")) == (3, {"a@x": b"1", "b@x": b"2"})
    truncated = version_reply(b"a@x", b"1") + (1000).to_bytes(4, "big") + b"short"
    assert parse_version_reply(truncated) == (3, {"a@x": b"1"})
    assert parse_version_reply(version_reply(b"\xff\xfe", b"")) == (3, {"\ufffd\ufffd": b""})
    many = version_reply(*(part for number in range(1000) for part in (f"e{number}".encode(), b"")))
    assert len(parse_version_reply(many)[1]) == MAX_EXTENSIONS
    with pytest.raises(paramiko.SFTPError):
        parse_version_reply(b"\x00\x00")


def test_a_reply_that_is_not_a_status_is_refused(tmp_path):
    from broker_sftp_uploader.sftp.paramiko_internals import StatusReply

    stat_request = 17  # the server answers it with ATTRS
    with sftp_server.sftp_client(tmp_path) as client:
        with pytest.raises(paramiko.SSHException, match="expected an SFTP status reply, got packet type 105"):
            StatusReply.request(client, stat_request, ".")
        assert client.listdir(".") == []  # the session goes on


# --- nothing else touches paramiko's private API ------------------------------------------------------------


def paramiko_private_names() -> tuple[set[str], set[str]]:
    """Every private name in paramiko's source, and those it reaches on objects other than ``self``
    (hooks such as ``_async_response``, which a class of ours would define)."""
    names, foreign = set(), set()
    for path in PARAMIKO.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and is_private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Name) and is_private(node.id):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and is_private(node.attr):
                names.add(node.attr)
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    foreign.add(node.attr)
    return names, foreign


def private_uses(path: Path, names: set[str], hooks: set[str]) -> list[str]:
    """Where module ``path`` reaches into paramiko's private API: ``obj._name`` with a paramiko private
    name (on ``self`` too in a subclass of a paramiko class), a method defined as one of paramiko's
    hooks, ``getattr(obj, "_name")``, an import of a private name or of paramiko's protocol module, an
    ``SFTPClient`` built over a channel of its own (which relies on what paramiko calls on a channel)."""
    uses = []

    def visit(node: ast.AST, in_paramiko_subclass: bool) -> None:
        line = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ClassDef):
            in_paramiko_subclass = any(ast.unparse(base).startswith("paramiko.") for base in node.bases)
            for statement in node.body:
                if isinstance(statement, ast.FunctionDef) and statement.name in hooks:
                    uses.append(f"{path.name}:{statement.lineno}: defines paramiko's hook {statement.name}")
        elif isinstance(node, ast.Attribute):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if node.attr in names and (not on_self or in_paramiko_subclass):
                uses.append(f"{line}: {ast.unparse(node)}")
            if ast.unparse(node) == PROTOCOL_MODULE:
                uses.append(f"{line}: {PROTOCOL_MODULE}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value in names:
            uses.append(f"{line}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("paramiko.SFTPClient", "SFTPClient"):
            uses.append(f"{line}: builds {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paramiko"):
            if node.module == PROTOCOL_MODULE:
                uses.append(f"{line}: imports from {PROTOCOL_MODULE}")
            uses.extend(f"{line}: imports {alias.name}" for alias in node.names if is_private(alias.name))
        elif isinstance(node, ast.Import):
            uses.extend(f"{line}: imports {alias.name}" for alias in node.names
                        if alias.name == PROTOCOL_MODULE or any(map(is_private, alias.name.split("."))))
        for child in ast.iter_child_nodes(node):
            visit(child, in_paramiko_subclass)

    visit(ast.parse(path.read_text()), False)
    return uses


def test_no_other_module_touches_paramikos_private_api():
    names, hooks = paramiko_private_names()
    uses = [use for path in sorted(PACKAGE.rglob("*.py")) if path != INTERNALS
            for use in private_uses(path, names, hooks)]
    assert not uses, ("paramiko's private API is used outside sftp/paramiko_internals.py; move it there:\n"
                      + "\n".join(uses))


def test_the_guard_sees_every_kind_of_private_use(tmp_path):
    """The check itself: each way of reaching into paramiko is reported, a class's own state is not."""
    names, hooks = paramiko_private_names()
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import paramiko\n"
        "from paramiko.sftp import CMD_WRITE\n"
        "class Reply:\n"
        "    def _async_response(self, t, msg, num):\n"
        "        self._lock = None\n"
        "def send(client):\n"
        "    client._read_response()\n"
        "    getattr(client, '_convert_status')\n"
        "    return paramiko.sftp.CMD_STATUS\n"
        "class Policy(paramiko.MissingHostKeyPolicy):\n"
        "    def missing_host_key(self, client, hostname, key):\n"
        "        self._log(1, 'x')\n"
        "client = paramiko.SFTPClient(pipe)\n")
    assert private_uses(probe, names, hooks) == [
        "probe.py:2: imports from paramiko.sftp",
        "probe.py:4: defines paramiko's hook _async_response",
        "probe.py:7: client._read_response",
        "probe.py:8: getattr(client, '_convert_status')",
        "probe.py:9: paramiko.sftp",
        "probe.py:12: self._log",
        "probe.py:13: builds paramiko.SFTPClient(pipe)",
    ]

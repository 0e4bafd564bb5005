"""A TCP proxy on 127.0.0.1 that breaks the network between the uploader and its SFTP server on demand.

Three modes, switched at any time (each switch starts the byte counts anew):

* ``pass_through()``: every byte is forwarded, and counted (``bytes_forwarded``, both directions of all
  connections), so a test can measure how much an uninterrupted run sends;
* ``cut_after(limit)``: every connection is reset (RST, as a crashed NAT or a killed server would) once
  ``limit`` bytes went through it, counting both directions;
* ``reset_connections()``: reset every open connection now (a NAT that dropped an idle session);
* ``freeze_after(limit)``: a partition. Once a connection has carried ``limit`` bytes, nothing more is
  forwarded on any connection, old or new: no RST, no FIN, no data, the sockets stay open until the proxy
  closes. ``frozen_at`` is the ``time.monotonic()`` of the freeze.

Used as a context manager; ``host`` and ``port`` are where clients connect.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

CHUNK = 64 * 1024


class TcpFaultProxy:
    """Forwards connections to ``target_host:target_port``, cutting or freezing them as told."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._connections: list[_Connection] = []
        self._mode = "pass"
        self._limit = 0
        self.bytes_forwarded = 0
        self.frozen_at: float | None = None
        self._thawed = threading.Event()
        self._thawed.set()
        self._acceptor = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)

    def __enter__(self) -> TcpFaultProxy:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def pass_through(self) -> None:
        """Forward everything again (a frozen connection stays frozen: only new ones work)."""
        self._switch("pass", 0)

    def cut_after(self, limit: int) -> None:
        """Reset each connection once ``limit`` bytes went through it."""
        self._switch("cut", limit)

    def freeze_after(self, limit: int) -> None:
        """Freeze every connection once one of them carried ``limit`` bytes."""
        self._switch("freeze", limit)

    def _switch(self, mode: str, limit: int) -> None:
        with self._lock:
            self._mode, self._limit = mode, limit
            self.bytes_forwarded = 0
            self.frozen_at = None
            frozen, self._thawed = self._thawed, threading.Event()
            self._thawed.set()
        frozen.set()  # the pumps of frozen connections end (they drop what they held)

    def reset_connections(self) -> None:
        """Reset (RST) every connection open now; new ones are forwarded as the mode says."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.reset()

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closed.set()
        self._thawed.set()
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _close(sock)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            connection = _Connection(self, client, server)
            with self._lock:
                self._connections.append(connection)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=connection.pump, args=(source, sink), name="fault-proxy-pump",
                                 daemon=True).start()

    def _admit(self, connection: _Connection, size: int) -> tuple[int, threading.Event | None]:
        """How many of ``size`` bytes ``connection`` may forward now, and the event to wait for when the
        network is frozen (None: not frozen)."""
        with self._lock:
            if self.frozen_at is not None:
                return 0, self._thawed
            allowed = size
            if self._mode in ("cut", "freeze"):
                allowed = max(0, min(size, self._limit - connection.carried))
                if allowed < size and self._mode == "freeze":
                    self.frozen_at = time.monotonic()
                    self._thawed = threading.Event()
            connection.carried += allowed
            self.bytes_forwarded += allowed
            return allowed, None


class _Connection:
    """One client's connection and the byte count it carried (both directions)."""

    def __init__(self, proxy: TcpFaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.carried = 0

    def pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Forward ``source`` to ``sink`` until either ends, the limit cuts them, or the network freezes."""
        try:
            while data := source.recv(CHUNK):
                allowed, frozen = self.proxy._admit(self, len(data))
                if frozen is not None or (allowed < len(data) and self.proxy._mode == "freeze"):
                    if allowed:
                        sink.sendall(data[:allowed])
                    self._hold()
                    return
                sink.sendall(data[:allowed])
                if allowed < len(data):  # cut: reset both ends, the rest is never delivered
                    self.reset()
                    return
        except OSError:
            pass
        for sock in (source, sink):  # one side ended: pass the end on
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _hold(self) -> None:
        """Frozen: forward nothing and keep both sockets open until the proxy is switched or closed."""
        self.proxy._thawed.wait()
        with self.proxy._lock:
            thawed = self.proxy.frozen_at is None
        if thawed:  # a switch ended the partition; this connection stays dead, like after a real one
            self.reset()

    def reset(self) -> None:
        """Close both ends with an RST."""
        for sock in (self.client, self.server):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # wakes a pump blocked reading it (without sending anything): the kernel releases, and
                # thus resets, the socket only once no thread is in a call on it
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass

"""A TCP relay on 127.0.0.1 whose link can go silent: a node that reaches NATS through it can be cut off from the
stream while the NATS cluster itself stays whole (no election, no other node affected).

`cut()` holds every byte either way; the connections stay open, as behind a link that stopped carrying packets,
so the client notices nothing but silence. `restore()` lets the held bytes through, in order. `close()` ends every
connection and thread it started.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


class Relay:
    """Accepts on `port` and relays each connection to 127.0.0.1:`target`."""

    def __init__(self, target: int) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._start(self._accept)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self._open.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._open.set()  # release the pumps held by a cut, so they end
        for sock in [self._listener, *self._sockets]:  # shutdown wakes a thread blocked in accept or recv on it
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed by the other side already
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
        for sock in [self._listener, *self._sockets]:
            sock.close()

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                return  # the listener was closed
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            if self._closed:  # accepted as `close` began: it closes these too, once this thread has ended
                return
            self._start(self._pump, client, upstream)
            self._start(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._open.wait()  # cut: the bytes wait here, and what follows them in the kernel's buffers
                if self._closed:
                    return
                sink.sendall(data)
        except OSError:
            return  # a side closed: the connection is over

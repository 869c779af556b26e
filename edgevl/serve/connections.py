"""How long a client's connection may take, and the uvicorn server that enforces it.

    header_s      the request line and headers must arrive within this long of the connection opening (or of
                  the first byte of its next request): uvicorn has no such limit, so a client that sends half
                  its headers and waits kept its connection for ever (TimedH11Protocol closes it)
    (the body)    ServerSettings.body_timeout_s, the app's own: RequestBodyLimit (serve/errors.py) answers 408 to
                  a body that has not arrived whole in time and closes the connection
    keep_alive_s  an idle connection between requests is closed after this long (uvicorn's timeout_keep_alive)

`server_config` is the one place `edgevl serve` (and the tests' live servers) build uvicorn's Config.
"""

from __future__ import annotations

from dataclasses import dataclass


DEFAULT_BODY_TIMEOUT_S = 60.0      # ServerSettings.body_timeout_s


@dataclass(frozen=True)
class ConnectionTimeouts:
    header_s: float = 10.0
    keep_alive_s: float = 5.0


def timed_h11_protocol(header_s: float):
    """uvicorn's h11 protocol with a deadline on each request's line and headers."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        """A connection whose next request has not been read whole (h11: the client is still IDLE) `header_s`
        after the connection opened, or after the first byte of that request, is closed."""

        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()                      # the headers are in: the body has its own deadline
            elif self._header_timer is None:
                self._arm()                         # the first bytes of a next request on a kept-alive connection

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol


def server_config(app, host: str, port: int, timeouts: ConnectionTimeouts = ConnectionTimeouts(),
                  log_level: str = "warning"):
    """uvicorn's Config for `app`, with the header and keep-alive timeouts (the body's is the app's own)."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=timed_h11_protocol(timeouts.header_s),
                          timeout_keep_alive=timeouts.keep_alive_s)

"""TLS for the reactor: a `Transport` that speaks TLS over a plain socket.

PROTOCOL.md, "TLS". The reactor reads and writes every connection
through `conn.sock` (`recv`, `send`, `close`, `fileno`). A plain
connection's `sock` is its socket; a TLS connection's is a `TLSTransport`:
an `ssl.SSLObject` between two `ssl.MemoryBIO`s, over the raw non-blocking
socket. So the broadcast (`connection.Writer`) calls `conn.sock.send(data)`
for both kinds without a branch, and every TLS member encrypts the turn's
batch once, in that call (one write per WRITE_CHUNK).

Why memory BIOs rather than an `ssl.SSLSocket`: with an SSLSocket, OpenSSL
writes to the socket itself, and a write that raises SSLWantWriteError has
already consumed part of the buffer (it was encrypted, some records sent).
CPython sets SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER but not
SSL_MODE_ENABLE_PARTIAL_WRITE, so the retry must pass the same bytes from
the same start, at least as long (tried: a copy or a longer buffer works;
a shorter one fails with BAD_LENGTH; one with its front dropped is accepted
and silently corrupts the stream). Our output buffer is a bytearray that
shrinks from the front by what `send` returned, so that would hold, but
only as long as nothing else touches it in between. Here instead
`SSLObject.write` goes into a memory BIO, which never blocks: it takes the
whole chunk and returns its length, always (no SSLWantWriteError exists in
this mode). Only ciphertext waits for the kernel, in this transport's own
`cipher` buffer, with a plain socket's partial-write rules; the plaintext
not yet encrypted stays in the connection's output buffer, where the output
limit and budget see it. Encrypting at most WRITE_CHUNK at a time bounds
the ciphertext held here.

What the reactor must know, the transport says through `notify` (called
only when it changes; door.TLSPort passes it on to the `Schedule`, and
door.TLSKind answers the loop's questions from these): `wants_write`
(ciphertext is left for the kernel: a read can want a write, e.g. the
handshake's reply to a ClientHello); `established` (before it, a write
waits for reads: the handshake must finish first); `holds_input` (input
already taken from the kernel but not yet handed out, so the reactor
must read again without waiting for select). After the handshake a write
never waits for a read: TLS 1.3 has no renegotiation, and TLS 1.2
renegotiation is refused (OP_NO_RENEGOTIATION).
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from connection import Transport  # a socket, or door.AfterHeader

# PROTOCOL.md: "A handshake that does not finish within 10 s ... closes
# that connection".
HANDSHAKE_TIMEOUT: Final = 10.0
# Plaintext encrypted per step of a send: four full TLS records (16 KiB of
# plaintext each). The ciphertext left when the kernel is full is at most
# about this much per connection.
WRITE_CHUNK: Final = 64 * 1024


class TLSConfigError(Exception):
    """The certificate or key cannot be loaded (unreadable, not PEM, or
    not a pair)."""


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """The TLS listener: its port (0 picks a free one), the certificate
    chain and key files (PEM), and the handshake deadline."""

    port: int
    cert: str
    key: str
    handshake_timeout: float = HANDSHAKE_TIMEOUT


def _no_password() -> bytes:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal,
    # blocking the loop (SIGHUP reloads inside it).
    raise TLSConfigError("the key is encrypted: a key without a passphrase is needed")


def load_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for `cert` and `key`: TLS 1.2 or newer, no
    renegotiation. TLSConfigError says why not."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # OpenSSL 3 refuses client-initiated renegotiation already; saying so
    # keeps it true on any OpenSSL, and with it a write never waits for a
    # read once the handshake is done.
    context.options |= ssl.OP_NO_RENEGOTIATION
    # A TCP end without close_notify is the end of input, as on the plain
    # port: TLS clients cannot half-close otherwise (after sending
    # close_notify, OpenSSL refuses the answers), and ncat does not send it.
    # Without this, OpenSSL 3 answers it with a fatal alert, and nothing
    # more could be sent: no answers to the last lines.
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except TLSConfigError:
        raise
    except ssl.SSLError as error:
        raise TLSConfigError(f"{cert} and {key}: {error.reason or error}") from None
    except OSError as error:
        # load_cert_chain does not say which of the two files it was.
        unreadable = [path for path in dict.fromkeys((cert, key)) if not os.access(path, os.R_OK)]
        where = " and ".join(unreadable) or f"{cert} or {key}"
        raise TLSConfigError(f"{where}: {error.strerror or error}") from None
    return context


def error_detail(error: OSError) -> str:
    """A short reason for the log: OpenSSL's words without the C source line."""
    if isinstance(error, ssl.SSLError):
        return str(error.reason or error.strerror or error).lower().replace("_", " ")
    return error.strerror or str(error)


class TLSTransport:
    """One TLS connection, as a connection.Transport. `recv` drives the
    handshake, then returns plaintext; `send` takes plaintext and returns
    how much of it was encrypted (all of it is then on its way). Errors are
    a socket's: BlockingIOError means later, any other OSError (SSLError is
    one) ends the connection."""

    __slots__ = (
        "raw",
        "_tls",
        "_incoming",
        "_outgoing",
        "cipher",
        "established",
        "holds_input",
        "notify",
        "_eof",
        "_failed",
    )

    def __init__(self, raw: Transport, context: ssl.SSLContext) -> None:
        self.raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.cipher = b""  # ciphertext the kernel has not taken yet
        self.established = False
        # Input taken from the kernel and not handed out yet: an end of
        # input that came with data, or (defensively) decrypted bytes left
        # in the SSL object. select cannot see it.
        self.holds_input = False
        # Set by the reactor: called when `wants_write`, `established` or
        # `holds_input` changed.
        self.notify: Callable[[], None] = _nothing
        self._eof = False  # the end of input is known, and not handed out yet
        self._failed: OSError | None = None

    @property
    def wants_write(self) -> bool:
        return bool(self.cipher)

    def fileno(self) -> int:
        return self.raw.fileno()

    def version(self) -> str | None:
        return self._tls.version()

    # --- reading --------------------------------------------------------

    def recv(self, size: int, /) -> bytes:
        """At most one recv from the kernel, then every complete record in
        the incoming BIO, decrypted. The recv tops the BIO up to `size`
        bytes of ciphertext at most (it may hold the start of a record from
        last time), and plaintext is never longer than its ciphertext, so
        the result nearly always fits in `size`, and what stays behind is
        the start of one record, whose rest the kernel has still to deliver
        (select will say so). Nearly: OpenSSL may hold the start of a record
        in its own buffer, which `pending` does not count. Then the read
        stops at `size` with whole records left in the BIO and perhaps
        nothing in the kernel: `holds_input` says so, and the next call
        reads those before the kernel. (A test of a 300 KB burst caught a
        connection stalled there.)"""
        if self._failed is not None:
            raise self._failed
        was_holding = self.holds_input
        was_writing = bool(self.cipher)
        was_established = self.established
        self.holds_input = False
        try:
            if self._eof:
                self._eof = False
                return b""
            if self.cipher:
                self._flush_raw()  # e.g. the rest of the handshake's reply
            if not was_holding:  # else what is held is read first, the kernel after
                # BlockingIOError: nothing came.
                data = self.raw.recv(max(1, size - self._incoming.pending))
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
            if not self.established and not self._handshake():
                raise BlockingIOError("TLS handshake in progress")
            return self._decrypt(size)
        except ssl.SSLError as error:
            self._fail(error)
            raise
        finally:
            if (
                self.holds_input != was_holding
                or bool(self.cipher) != was_writing
                or self.established != was_established
            ):
                self.notify()

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._take_output()
            return False
        self.established = True
        self._take_output()  # the server's last flight (and TLS 1.3 tickets)
        return True

    def _decrypt(self, size: int) -> bytes:
        pieces: list[bytes] = []
        total = 0
        while total < size:
            try:
                piece = self._tls.read(size - total)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                piece = b""
            if not piece:
                # close_notify, or the TCP end without one (see
                # load_context): the end of input, as on the plain port,
                # handed out after the data that came with it. (Python
                # returns b"" for a close_notify rather than raising.)
                self._eof = True
                break
            pieces.append(piece)
            total += len(piece)
        self._take_output()  # a read may answer (alerts, a key update)
        if total >= size and (self._tls.pending() or self._incoming.pending):
            self.holds_input = True  # stopped by the bound: see `recv`
        if not pieces:
            if self._eof:
                self._eof = False
                return b""
            raise BlockingIOError("no complete TLS record yet")
        if self._eof:
            self.holds_input = True  # the end of input comes next time
        return b"".join(pieces)

    # --- writing --------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, /) -> int:
        """Encrypt what the kernel can take now, a chunk at a time, and
        return how much of `data` that was (the ciphertext of the last
        chunk may wait in `cipher`). Nothing is taken while ciphertext is
        still waiting, nor before the handshake is done."""
        if self._failed is not None:
            raise self._failed
        was_writing = bool(self.cipher)
        try:
            if self.cipher and not self._flush_raw():
                raise BlockingIOError("TLS output waiting for the kernel")
            if not self.established:
                raise BlockingIOError("TLS handshake in progress")
            size = len(data)
            if size <= WRITE_CHUNK:  # the common case: one write, one send
                self._tls.write(data)
                self._take_output()
                self._flush_raw()
                return size
            taken = 0
            with memoryview(data) as view:
                while taken < size:
                    chunk = view[taken : taken + WRITE_CHUNK]
                    taken += self._tls.write(chunk)
                    chunk.release()  # the caller may resize `data` next
                    self._take_output()
                    if not self._flush_raw():
                        break
            return taken
        except ssl.SSLError as error:
            # SSLWantReadError included: after the handshake a write could
            # only want a read during a renegotiation, which is refused.
            self._fail(error)
            raise
        finally:
            if bool(self.cipher) != was_writing:
                self.notify()

    def flush(self) -> None:
        """Send the waiting ciphertext (the socket became writable)."""
        if self._failed is not None:
            raise self._failed
        if self.cipher:
            self._flush_raw()
            if not self.cipher:
                self.notify()

    def _take_output(self) -> None:
        if self._outgoing.pending:
            self.cipher += self._outgoing.read()

    def _flush_raw(self) -> bool:
        """Send `cipher`; True once all of it is gone."""
        if self.cipher:
            try:
                sent = self.raw.send(self.cipher)
            except (BlockingIOError, InterruptedError):
                return False
            self.cipher = self.cipher[sent:]
        return not self.cipher

    def _fail(self, error: OSError) -> None:
        # After a fatal error the SSL object is unusable; the reactor's retry
        # (a buffered send after a failed broadcast send) meets the same error.
        self._failed = error
        self._take_output()  # OpenSSL's alert, sent on a best-effort basis
        if self.cipher:
            with contextlib.suppress(OSError):
                self._flush_raw()

    # --- closing --------------------------------------------------------

    def close(self) -> None:
        """Say close_notify if the kernel takes it at once, then close."""
        if self.established and self._failed is None and self.raw.fileno() >= 0:
            # SSLWantReadError: the peer's close_notify is not awaited.
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            with contextlib.suppress(OSError):
                self._take_output()
                self._flush_raw()
        self.raw.close()


def _nothing() -> None:
    pass

#!/usr/bin/env python3
"""The chat room a Python developer would write with the websockets
library, as bench.py's comparison target (--websockets-lib): the library's
documented broadcast pattern, a set of connections and
`broadcast(CONNECTIONS, message)`, speaking as much of the chat protocol
as bench.py uses.

    python3 bench_websockets_server.py PORT [HOST]

USERNAME name joins (no reply), SEND message goes to every other member
as "RECEIVE name message", anything else is answered "ERROR Unrecognised
command." (bench.py's proof that what came before was processed). Each
WebSocket message is one line, as on chat.py's web port. The library's
keepalive pings are off: bench.py's receivers do not answer them, and a
run may last longer than its 20 s. Not a chat server: no limits, no
checks, for benchmarks only.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

CONNECTIONS: set[ServerConnection] = set()


async def handler(websocket: ServerConnection) -> None:
    name = ""
    # A client that leaves without the closing handshake, as bench.py's do,
    # is not worth a traceback in the log.
    with contextlib.suppress(ConnectionClosed):
        try:
            async for message in websocket:
                line = message if isinstance(message, str) else message.decode(errors="replace")
                verb, _, rest = line.partition(" ")
                if verb == "USERNAME" and not name:
                    name = rest
                    CONNECTIONS.add(websocket)
                elif verb == "SEND" and name:
                    broadcast(CONNECTIONS - {websocket}, f"RECEIVE {name} {rest}")
                else:
                    await websocket.send("ERROR Unrecognised command.")
        finally:
            CONNECTIONS.discard(websocket)


async def main(port: int, host: str) -> None:
    async with serve(handler, host, port, ping_interval=None) as server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or not sys.argv[1].isdigit():
        sys.exit("usage: bench_websockets_server.py PORT [HOST]")
    host = sys.argv[2] if len(sys.argv) == 3 else "127.0.0.1"
    asyncio.run(main(int(sys.argv[1]), host))

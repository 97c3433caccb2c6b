"""Who may call the server, and how much one request may send.

``check_exposure(host, api_key)`` refuses a server listening beyond loopback without an API key:
past this machine anyone who reaches the port would run the model and make the server fetch
from Label Studio with its token. ``Guard`` is the app's outermost middleware: a request
without the key gets a 401 before its body is read, and a body over ``max_body`` bytes a 413 as
soon as its Content-Length says so, or, sent in chunks, as soon as that many bytes have
arrived; it is never read in full. Without a key (loopback only), a request must name this
machine in its Host header: a web page whose name an attacker re-points at 127.0.0.1 (DNS
rebinding) would otherwise call the server from the user's browser and read the answers.
Errors are JSON ``{"error": message}``, as everywhere.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import socket

from ..errors import BadInput

API_KEY_ENV = "REGIONCLIP_API_KEY"
API_KEY_HEADER = "X-API-Key"


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` (an IP address or a name) stands for is a loopback one:
    127.0.0.0/8, ::1, ``localhost``. ``0.0.0.0``, ``::``, a name that does not resolve: False."""
    host = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None) if host else []
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(str(a[4][0]).split("%")[0]).is_loopback for a in found)


def check_exposure(host: str, api_key: str | None) -> None:
    """``BadInput`` unless the server stays on this machine or has an API key."""
    if not api_key and not is_loopback(host):
        raise BadInput(f"--host {host} listens beyond this machine: give an API key (--api-key or "
                       f"{API_KEY_ENV}) that clients must send, or listen on 127.0.0.1")


def host_name(header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:9090`` -> ``::1``, ``Localhost:80`` -> ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def names_this_machine(name: str) -> bool:
    """``localhost`` or a loopback address, without a DNS lookup (an attacker's name may resolve to one)."""
    if name in ("localhost", "localhost.") or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _BodyTooLarge(Exception):
    """Raised into the app's read of the body once it passes the limit."""


class Guard:
    """ASGI middleware: the API key (when one is set) and the body limit, before the app sees a request.

    The key is accepted as ``Authorization: Bearer KEY``, as the password of HTTP basic auth
    (Label Studio's ML backend connection sends one; any user name), or as ``X-API-Key: KEY``,
    and compared in constant time.
    """

    def __init__(self, app, *, max_body: int, api_key: str | None = None, local_hosts_only: bool = False) -> None:
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None
        self.local_hosts_only = local_hosts_only

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}
        host = headers.get(b"host", b"").decode("latin-1")
        if self.local_hosts_only and host and not names_this_machine(host_name(host)):
            return await _error(scope, receive, send, 421, f"the Host header {host!r} does not name this machine: a "
                                "server without an API key answers requests to localhost or 127.0.0.1 only")
        if self.key is not None and not self._authorized(headers):
            return await _error(scope, receive, send, 401, "this server needs an API key: send it as "
                                "'Authorization: Bearer KEY', as the basic-auth password, or as X-API-Key",
                                {"WWW-Authenticate": 'Basic realm="regionclip"'})
        too_large = f"the request body is larger than the server's limit of {self.max_body} bytes"
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return await _error(scope, receive, send, 400, "the Content-Length header is not a number")
        if int(length) > self.max_body:
            return await _error(scope, receive, send, 413, too_large)
        received, over, started = 0, False, False

        async def counted():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    over = True
                    raise _BodyTooLarge()
            return message

        async def unless_over(message) -> None:
            nonlocal started
            if over:
                return  # whatever the app makes of the cut body, the client hears of the limit
            started = True
            await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _error(scope, receive, send, 413, too_large)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = [headers.get(API_KEY_HEADER.lower().encode(), b"")]
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer":
            given.append(value.strip())
        elif scheme.lower() == b"basic":
            try:
                given.append(base64.b64decode(value.strip(), validate=True).partition(b":")[2])
            except binascii.Error:
                pass
        ok = False
        for candidate in given:  # every candidate compared: no early exit
            ok |= hmac.compare_digest(candidate, self.key)
        return ok


async def _error(scope, receive, send, status: int, message: str, headers: dict | None = None) -> None:
    from starlette.responses import JSONResponse  # here: check_exposure runs before the serve extra is needed

    await JSONResponse({"error": message}, status_code=status, headers=headers)(scope, receive, send)

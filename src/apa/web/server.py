"""`apa serve`: a web page where people rate a diffusion prior's images, one aligned session each.

    apa serve --prior mnist [--host 127.0.0.1] [--port 8000] [--data-dir DIR] [align flags ...]

The API (JSON; every refusal is ``{"error": "..."}`` with a 4xx status):
  POST /api/sessions                                   start a session -> {"token": ...}
  GET  /api/sessions/{token}                           where it stands: phase, round, budget, history
  POST /api/sessions/{token}/rounds/{r}/ratings        {"ratings": [1..5 or null, ...]}: rate round r
  POST /api/sessions/{token}/retry                     run a failed background step again
  GET  /api/sessions/{token}/rounds/{r}/images/{p}.png round r's p-th shown image
  GET  /api/sessions/{token}/rounds/{r}/grid.png       all of round r's images
  GET  /api/sessions/{token}/final.png                 the aligned sampler's samples, once done
  GET  /api/sessions/{token}/final.zip                 each of them as a PNG, in a zip
  GET  /api/sessions/{token}/report/{file}             the session's report: report.html, its images
The page itself is static (``apa/web/static``) and keeps the token in the URL fragment and in
localStorage, so closing the tab or restarting the server loses nothing.
"""

# No postponed annotations here: FastAPI reads the route functions' annotations (Request is imported inside).

import argparse
import base64
import binascii
import ctypes
import ctypes.util
import ipaddress
import json
import logging
import os
import socket
import threading
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from apa.flags import add_align_flags, config_from_args
from apa.session import SessionError, components
from apa.session.checks import validate_new
from apa.web import sessions
from apa.web.sessions import WebError

MAX_BODY = 64 * 1024  # bytes; larger request bodies are refused with 413
MAX_GIVEN, MAX_GIVEN_BODY = 16, 4 * 1024 * 1024  # images a session may start from, and their request's bytes
HEADER_TIMEOUT_S = 10.0  # a connection must send a request's line and headers within this long, or it is closed
KEEP_ALIVE_S = 5  # a connection idle this long after a response is closed (uvicorn's timeout_keep_alive)
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
log = logging.getLogger("apa.web")


def static_file(name: str) -> bytes:
    """One of the page's own files (a fixed list; nothing named by a request is opened)."""
    return (resources.files("apa.web") / "static" / name).read_bytes()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


async def read_limited(request: Any, limit: int = MAX_BODY) -> bytes:
    """The request's body, refused with 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise WebError(400, "the Content-Length header is not a whole number")
    if declared is not None and int(declared) > limit:
        raise WebError(413, f"the request body must be at most {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise WebError(413, f"the request body must be at most {limit} bytes")
    return bytes(body)


def require_json(request: Any, what: str) -> None:
    """415 unless the request says its body is JSON; ``what`` names what it carries."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise WebError(415, f"send {what} as JSON with the header Content-Type: application/json")


def parse_json(body: bytes, shape: str) -> Any:
    """``body`` as JSON; 400 if unreadable or nested past Python's limit (``shape``: what to send instead)."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise WebError(400, f"the request body is not valid JSON ({str(e)[:120]})") from e
    except RecursionError as e:
        raise WebError(400, f"the request body nests too deeply; send {shape}") from e


async def read_json(request: Any) -> Any:
    """The request's JSON body: 413 past MAX_BODY bytes, 415 if not sent as JSON, 400 if unreadable."""
    require_json(request, "the ratings")
    return parse_json(await read_limited(request), '{"ratings": [...]}')


async def read_given_body(request: Any) -> list[bytes]:
    """The images a session starts from: an empty body (none), or JSON {"examples": [data URL or base64, ...]}
    of at most MAX_GIVEN_BODY bytes; 400/413/415/422 with one line otherwise."""
    body = await read_limited(request, MAX_GIVEN_BODY)
    if not body.strip():
        return []
    require_json(request, "the images you like")
    items = parse_json(body, '{"examples": [...]}')
    try:
        items = items.get("examples", [])
        if not (isinstance(items, list) and len(items) <= MAX_GIVEN and all(isinstance(x, str) for x in items)):
            raise ValueError
        return [base64.b64decode(x.split(",", 1)[1] if x.startswith("data:") else x, validate=True) for x in items]
    except (ValueError, AttributeError, IndexError, binascii.Error) as e:
        raise WebError(422, f"send {{\"examples\": [...]}}: at most {MAX_GIVEN} images, each a data URL or "
                            "base64 text") from e


def number(text: str, what: str) -> int:
    """A round or image number from the path: plain digits only (no sign, no decimals), else 422."""
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise WebError(422, f"the {what} number must be a whole number from 0, not {text[:20]!r}")
    return int(text)


def error_handlers(app: Any) -> None:
    """Every refusal as ``{"error": message}`` with its status."""
    # the web extra: loaded when a server runs, so `apa` works without it
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(WebError)
    async def web_error(request, exc: WebError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = "no such page or API endpoint" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def failure(request, exc: Exception):  # the details (paths, say) go to the log, not to the client
        log.exception("request failed")
        return JSONResponse({"error": f"the server failed on this request ({type(exc).__name__}); "
                                      "its operator can see why in the server's log"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        where = "; ".join(f"{'/'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:3])
        return JSONResponse({"error": f"malformed request ({where}); round and image numbers are whole numbers"},
                            status_code=422)


def security_headers(app: Any) -> None:
    """No framing, no sniffing, no referrer; API answers are never cached."""
    @app.middleware("http")
    async def headers(request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        if "cache-control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response


def page_routes(app: Any) -> None:
    # the web extra: loaded when a server runs, so `apa` works without it
    from fastapi.responses import Response

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def index():
        return Response(static_file("index.html"), media_type=STATIC["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in STATIC or name == "index.html":
            return Response(b'{"error": "no such file"}', status_code=404, media_type="application/json")
        return Response(static_file(name), media_type=STATIC[name])


def api_routes(app: Any, manager: Any) -> None:
    # the web extra: loaded when a server runs, so `apa` works without it
    from fastapi import Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response

    def png(data: bytes) -> Response:  # a round's images never change once sampled
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @app.post("/api/sessions", status_code=201)
    async def start(request: Request):
        given = await read_given_body(request)  # images the person already likes, if any
        return {"token": await run_in_threadpool(manager.create, given)}

    @app.get("/api/sessions/{token}")
    def state(token: str):
        return manager.state(token)

    @app.post("/api/sessions/{token}/rounds/{r}/ratings")
    async def rate(token: str, r: str, request: Request):
        body = await read_json(request)
        return await run_in_threadpool(manager.submit, token, number(r, "round"), body)

    @app.post("/api/sessions/{token}/taste-changed")
    def taste_changed(token: str):
        return manager.taste_changed(token)

    @app.post("/api/sessions/{token}/retry")
    def retry(token: str):
        return manager.retry(token)

    @app.get("/api/sessions/{token}/rounds/{r}/images/{p}.png")
    def image(token: str, r: str, p: str):
        return png(manager.image_png(token, number(r, "round"), number(p, "image")))

    @app.get("/api/sessions/{token}/rounds/{r}/grid.png")
    def round_grid(token: str, r: str):
        return png(manager.grid_png(token, number(r, "round")))

    @app.get("/api/sessions/{token}/final.png")
    def final(token: str):
        return png(manager.final_png(token))


def report_routes(app: Any, manager: Any) -> None:
    """The finished session's report and downloads (the token's own files only; names from a fixed pattern)."""
    # the web extra: loaded when a server runs, so `apa` works without it
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response

    @app.get("/api/sessions/{token}/final.zip")
    async def final_zip(token: str):
        data = await run_in_threadpool(manager.final_zip, token)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="apa-final-images.zip"'})

    @app.get("/api/sessions/{token}/report/{name:path}")
    def report(token: str, name: str):
        data, media_type = manager.report_file(token, name)
        return Response(data, media_type=media_type)


def create_app(manager: Any, allowed_hosts: list[str] | None = None) -> Any:
    """The FastAPI app over a SessionManager; ``allowed_hosts`` (Host header names) guards against DNS rebinding."""
    # the web extra: loaded when a server runs, so `apa` works without it
    from fastapi import FastAPI
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="apa", docs_url=None, redoc_url=None, openapi_url=None)
    error_handlers(app)
    security_headers(app)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    page_routes(app)
    api_routes(app, manager)
    report_routes(app, manager)
    app.state.manager = manager
    return app


# ---------------------------------------------------------------- the command


def loopback_hosts(host: str) -> list[str] | None:
    """Host names a loopback-bound server answers to (None: any, for a server bound to a public address)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return ["127.0.0.1", "localhost", "[::1]", "::1"] if loopback else None


def check_server_flags(args: argparse.Namespace) -> None:
    """The server's own settings, refused before anything is written or bound."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be from 1 to 65535, got {args.port}")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.max_sessions < 1:
        raise ValueError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    window = getattr(args, "batch_window", 0.0)
    if not (window == window and 0.0 <= window <= 10.0):
        raise ValueError(f"--batch-window must be from 0 to 10 seconds, got {window}")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or one line saying why there cannot be one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host}: not an address this machine can bind ({e}); use 127.0.0.1, or 0.0.0.0 "
                         "for every interface") from e
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); another server may "
                         "hold it: stop it or choose another --port") from e
    return sock


def header_deadline_protocol() -> type:
    """uvicorn's h11 protocol with a deadline on every request's line and headers: a connection that has
    sent no complete request HEADER_TIMEOUT_S after it opened, or after its last response, is closed,
    so silent or slowly-writing clients hold no sockets (uvicorn closes idle ones only after a response)."""
    # the web extra: loaded when a server runs, so `apa` works without it
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self.loop.call_later(HEADER_TIMEOUT_S, self._expire, self.cycle)

        def _expire(self, cycle) -> None:
            """Close unless a request arrived since (a new cycle) or the one in progress is still answered."""
            waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def uvicorn_config(app: Any, **settings: Any) -> Any:
    """The uvicorn settings `apa serve` runs with: the header deadline and the keep-alive timeout."""
    # the web extra: loaded when a server runs, so `apa` works without it
    import uvicorn

    settings.setdefault("access_log", False)
    return uvicorn.Config(app, http=header_deadline_protocol(), timeout_keep_alive=KEEP_ALIVE_S, **settings)


def serve_config(args: argparse.Namespace) -> Any:
    """The align flags as a configuration, with a person (feedback 'human') as the user."""

    feedback = getattr(args, "feedback", None)  # absent unless given
    if feedback not in (None, "human"):
        raise ValueError(f"apa serve collects ratings from people; drop --feedback {feedback} "
                         "(use `apa align` for simulated users)")
    cfg = config_from_args(args)
    return replace(cfg, feedback=replace(cfg.feedback, name="human"))


def warm_up() -> None:
    """Import what the first refit needs (torch's optimisers pull in a large module on first use)."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


M_ARENA_MAX = -8  # glibc's mallopt parameter


def return_freed_memory(arenas: int = 2) -> bool:
    """Let the worker threads share ``arenas`` malloc arenas. glibc otherwise gives each thread its
    own (up to 8 per core), and each keeps the round-sized tensors its thread touched after they
    are freed (measured: docs/results.md). False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        # the web extra: loaded when a server runs, so `apa` works without it
        import uvicorn

    except ImportError as e:
        raise SessionError(f"apa serve needs the web extra ({e}); install it with "
                           "`.venv/bin/pip install -e '.[web]' torch==2.13.0`") from e

    check_server_flags(args)
    if args.ray:
        return serve_on_ray(args)
    return_freed_memory()
    cfg = serve_config(args)  # every section checked as it is built
    validate_new(cfg)  # and no --forget-before: a new session has no rounds to forget
    window = args.batch_window or None  # 0: no batching
    shared = components.build(cfg, window)  # a missing prior fails here, before the server starts or writes anything;
    # held while the server runs, every session shares this prior (apa.session.components)
    sock = bind(args.host, args.port)  # a port in use or an unknown host, too
    try:
        manager = sessions.SessionManager(Path(args.data_dir), cfg, workers=args.workers,
                                          fixed_seed=getattr(args, "seed", None) is not None,  # absent unless given
                                          max_sessions=args.max_sessions,
                                          batch_window=window, database=args.database)
        app = create_app(manager, loopback_hosts(args.host))
        threading.Thread(target=warm_up, name="apa-web-warm-up", daemon=True).start()
        shown_host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"apa serve: sessions in {manager.data_dir.resolve()}; open http://{shown_host}:{args.port}/", flush=True)
        uvicorn.Server(uvicorn_config(app, log_level=args.log_level)).run(sockets=[sock])
    finally:
        sock.close()
        del shared


def serve_on_ray(args: argparse.Namespace) -> None:
    """`apa serve --ray ADDRESS`: the same page as a Ray Serve application (apa.web.cluster), every
    session in the PostgreSQL database ``--database`` and the shared directory ``--data-dir``."""
    if not args.database:
        raise SessionError("--ray keeps every session in PostgreSQL: give --database postgresql://user@host:5432/db "
                           "(or set APA_DATABASE); see docs/cluster.md")
    if args.replicas < 1 or args.engines < 1:
        raise ValueError(f"--replicas and --engines must be at least 1, got {args.replicas} and {args.engines}")
    if not 0 <= args.engine_gpus <= 64:
        raise ValueError(f"--engine-gpus must be from 0 to 64, got {args.engine_gpus}")
    try:
        from apa.web import cluster
    except ImportError as e:
        raise SessionError(f"apa serve --ray needs Ray Serve ({e}); install it with pip install 'apa[cluster]'") from e
    cluster.check_ray_address(args.ray)
    from apa.store.postgres import connect  # psycopg missing: one line saying to install apa[cluster]

    cfg = serve_config(args)
    validate_new(cfg)
    components.build(cfg)  # a missing prior fails here, before the cluster is asked for anything
    connect(args.database).close()  # so does an unreachable database
    bind(args.host, args.port).close()  # and a port in use on this machine
    fixed_seed = getattr(args, "seed", None) is not None  # absent unless given
    app = cluster.application(cfg, Path(args.data_dir), args.database, replicas=args.replicas, engines=args.engines,
                              fixed_seed=fixed_seed, max_sessions=args.max_sessions,
                              allowed_hosts=loopback_hosts(args.host), engine_gpus=args.engine_gpus,
                              prior_window=args.batch_window or cluster.PRIOR_WINDOW_S)
    cluster.run(app, args.ray, args.host, args.port)


def register_cli(subparsers: Any) -> None:
    """Add `apa serve` (heavy imports happen inside the command)."""
    p = subparsers.add_parser("serve", help="a web page where people rate images; one aligned session each")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default="runs/web-sessions",
                   help="where sessions live, one directory per session (default: runs/web-sessions)")
    p.add_argument("--workers", type=int, default=8,
                   help="rounds refitted and sampled at the same time, across all sessions (default: 8)")
    p.add_argument("--batch-window", type=float, default=0.0,
                   help="seconds a network call waits for other sessions' calls to join it in one batched call "
                        "(0, the default: every session calls the network on its own, which measured faster on "
                        "a 2-core CPU; see benchmarks/serve_load.py). With --ray the engines always batch, with this "
                        "window or 0.01 s")
    p.add_argument("--max-sessions", type=int, default=1000, help="refuse new sessions past this many (default: 1000)")
    p.add_argument("--database", default=os.environ.get("APA_DATABASE") or None, metavar="URL",
                   help="keep the sessions' records in this PostgreSQL database (default: $APA_DATABASE, else SQLite "
                        "in each session's directory); --data-dir then holds their tensors and outputs and must be "
                        "shared by every replica. Needs pip install 'apa[cluster]'; see docs/cluster.md")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="serve as a Ray Serve application on the Ray cluster at ADDRESS (HOST:PORT, ray://HOST:PORT, "
                        "auto), or 'local' to start Ray on this machine; needs --database and a --data-dir every "
                        "machine reaches at the same path. Needs pip install 'apa[cluster]'; see docs/cluster.md")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: replicas serving the page and API (default: 2)")
    p.add_argument("--engines", type=int, default=2,
                   help="with --ray: replicas holding the prior, where rounds are refitted and sampled (default: 2)")
    p.add_argument("--engine-gpus", type=float, default=0.0,
                   help="with --ray: GPUs Ray reserves for each engine replica (e.g. 1, or 0.5 to pack two on one GPU; "
                        "with --device cuda); default 0")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--preset", choices=["default", "seed"], default="default",
                   help="default: this project's measured defaults; seed: every value of the seed design")
    add_align_flags(p)
    p.set_defaults(func=cmd_serve)

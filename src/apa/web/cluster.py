"""`apa serve --ray ADDRESS --database URL`: the same page and API as a Ray Serve application, its
sessions in PostgreSQL and a directory every machine shares (``--data-dir``).

Two deployments:

- ``Web``, the ingress (``--replicas`` of them): the FastAPI app ``apa.web.server.create_app``
  builds, over :class:`ClusterSessions` instead of the single process's ``SessionManager``. Every
  request reads its session from the database and the shared directory; a write (ratings, a
  change of taste) opens the session for writing, which takes its advisory lock for that request
  only. What a replica keeps in memory (which sessions it has asked the engine to advance,
  rendered PNGs, the last failure to show) only saves work: a request that reaches another
  replica, or a replica started after one died, answers the same.
- ``Engine`` (``--engines`` of them): holds the prior, and takes a session's background steps
  (refit the surrogate, sample the next round, the final batch, the report) with
  ``apa.session.lifecycle.drive``, holding the session's lock while it does. It also decodes a
  round's particles into the images the page shows.

Where batching happens, and why this way: ``Engine.advance`` is a ``@serve.batch`` method taking
the tokens of sessions that asked within ``BATCH_WAIT_S`` of each other; they run together on
threads of the replica, every session on the replica's one ``BatchingPrior``, whose leader thread
makes one network call for all of them (``apa.priors.batching``). Batching the round instead of
each ε call keeps the sampler's loop, its weights and its randomness in the session's own thread
(a network call batched across processes would cross a process boundary at every step), and it
reuses the batching the single-process server has, whose bits are tested to be the session's own
(a session's images are the same whether it ran alone or beside others).

Who writes: a session is written by one process at a time, enforced by the store's advisory lock
(``apa.store.postgres``). A request that would write a session another process is writing (an
engine taking its steps, another ingress replica storing ratings) gets 503, one line and
Retry-After; nothing is written. An engine that finds the session locked leaves it to whoever
holds it. A killed process's lock goes with its connection, and the next poll of the page asks
an engine again, which continues from what the store holds.

PostgreSQL lost: a request that cannot reach the database answers 503 with Retry-After (the
page retries, and keeps unsent ratings in the browser); a store that loses its connection
mid-call reconnects and confirms an in-flight commit (``apa.store.postgres``), so nothing
acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from ray import serve
from ray.serve.config import RequestRouterConfig

from apa.config import AlignConfig
from apa.session import components, with_overrides
from apa.session.core import changed_on_resume, stored_config
from apa.session.lifecycle import DONE, FINAL, FIT, RATE, SAMPLE, Action, drive, next_action
from apa.session.state import SessionState
from apa.store import (FITTED, DatabaseUnavailable, RatingRefused, SessionBusy, StoreError, create, open_store,
                       read_store)
from apa.web import render
from apa.web.routing import REPLICA_HEADER
from apa.web.server import create_app
from apa.web.sessions import (DAMAGED, FINAL_PREVIEW, PHASES, TOKEN_RE, WebError, busy, count, counting, final_zip,
                              parse_ratings, public, report_file, state_view, write_report)

log = logging.getLogger("apa.web")
BATCH_SIZE = 8  # sessions an engine replica advances together, on as many threads
BATCH_WAIT_S = 0.05  # how long a batch waits for more sessions to join it
PRIOR_WINDOW_S = 0.01  # the engine's BatchingPrior window (apa.priors.batching)
ADVANCE_TIMEOUT_S = 3600.0  # an engine call unanswered this long is given up (the next poll asks again)
PNG_CACHE = 4096  # rendered PNGs an ingress replica keeps (a round's images never change)
OK, BUSY, UNAVAILABLE = "ok", "busy", "unavailable"  # what Engine.advance answers per session, or a ``failure``


# ---------------------------------------------------------------- the engine: where the steps run


def failure(message: str, session: Any = None) -> tuple[str, tuple[str, int | None] | None]:
    """A failed step as Engine.advance answers it: (message fit for the page, the step it failed at, as
    (kind, round), or None when the session could not be opened)."""
    if session is None:
        return message, None
    try:
        at = next_action(session.store, session.cfg.session.budget)
    except StoreError:
        return message, None
    return message, (at.kind, at.round)


class Steps:
    """What an engine replica does to sessions: their background steps, and their images decoded."""

    def __init__(self, settings: dict[str, Any]):
        self.cfg = AlignConfig.from_dict(settings["config"])
        self.data_dir, self.database = Path(settings["data_dir"]), settings["database"]
        self.window = settings["prior_window"]
        # held: every session on this replica shares this prior (weakly cached in apa.session.components)
        self.parts = components.build(self.cfg, self.window)
        self.report_lock = threading.Lock()  # plotting is not thread-safe

    def advance(self, token: str) -> str:
        """Take ``token``'s steps until it waits for ratings or is done (report included): OK; BUSY if
        another process holds it; UNAVAILABLE if the database is down; else a ``failure``."""
        from apa.session import Session

        try:
            session = Session.resume(self.data_dir / token, progress=False, batch_window=self.window,
                                     database=self.database)
        except SessionBusy:
            return BUSY
        except DatabaseUnavailable:
            return UNAVAILABLE
        except StoreError as e:
            log.error("session %s…: %s", token[:6], e)
            return failure(DAMAGED.format("continued"))
        try:
            if drive(session, answers=False).kind == DONE and not report_ready(session.store):
                message = write_report(session, self.report_lock)
                return OK if report_ready(session.store) else failure(message, session)  # done, but no report
            return OK
        except DatabaseUnavailable:
            return UNAVAILABLE
        except StoreError:
            log.exception("session %s…: background step failed", token[:6])
            return failure(DAMAGED.format("continued"), session)
        except Exception as e:  # the store holds everything up to the failure
            log.exception("session %s…: background step failed", token[:6])
            return failure(f"{type(e).__name__}: {public(str(e))}. Everything rated so far is saved; press Retry, "
                           "or ask the server's operator if it fails again.", session)
        finally:
            session.store.close()

    def render(self, token: str, r: int, p: int | None) -> dict[str, Any]:
        """Round r's p-th shown image as PNG (p None: all of them in a grid): {"png": bytes}, or
        {"status": int, "error": str}."""
        import torch

        try:
            store = read_store(self.data_dir / token, self.database)
        except DatabaseUnavailable as e:
            return {"status": 503, "error": busy(e).message}
        except StoreError:
            return {"status": 404, "error": "no session has this token; check the link, or start a new session"}
        try:
            rounds = store.rounds()
            k = len(rounds[r]["shown"]) if 0 <= r < len(rounds) else 0
            if p is None and not k or p is not None and not 0 <= p < k:
                return {"status": 404, "error": f"this session has no image {p} in round {r}" if p is not None
                        else f"this session has no round {r}"}
            prior, source = self.parts
            with torch.no_grad():
                images = prior.decode(SessionState(store, self.cfg, source.scale, prior.event_shape).shown_particles(r))
            return {"png": render.png(images, nrow=k) if p is None else render.single_png(images[p])}
        except DatabaseUnavailable as e:
            return {"status": 503, "error": busy(e).message}
        except StoreError as e:
            log.error("session %s…: %s", token[:6], e)
            return {"status": 500, "error": DAMAGED.format("shown")}
        finally:
            store.close()


def report_ready(store: Any) -> bool:
    return store.report_path.with_suffix(".html").is_file()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * BATCH_SIZE)
class Engine:
    """The prior's replicas (module docstring): ``advance`` batched across sessions, ``render`` alone."""

    def __init__(self, settings: dict[str, Any]):
        self.steps = Steps(settings)
        self.pool = ThreadPoolExecutor(BATCH_SIZE, thread_name_prefix="apa-engine")
        self.render_pool = ThreadPoolExecutor(2, thread_name_prefix="apa-render")

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def advance(self, tokens: list[str]) -> list[Any]:
        """Each session's steps (``Steps.advance``), the batch's sessions on threads sharing one prior; a
        token asked twice in a batch is advanced once."""
        loop = asyncio.get_running_loop()
        unique = list(dict.fromkeys(tokens))
        outcomes = await asyncio.gather(*(loop.run_in_executor(self.pool, self.steps.advance, t) for t in unique))
        answer = dict(zip(unique, outcomes))
        return [answer[t] for t in tokens]

    async def render(self, token: str, r: int, p: int | None) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(self.render_pool, self.steps.render, token, r, p)


# ---------------------------------------------------------------- the ingress: every request from the store


class Advancer:
    """Asks the engine to take sessions' background steps: one call in flight per session from this
    replica (another replica may ask too; the session's lock makes the second a no-op). A call that
    fails (an engine replica died) is forgotten, so the session's next poll asks again. A step that
    failed is shown, and not asked for again, until Retry or until the session has moved past it."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.lock = threading.Lock()
        self.running: dict[str, float] = {}  # token -> when this replica asked
        self.failed: dict[str, tuple] = {}  # token -> the engine's failure (message, step)

    def request(self, token: str) -> None:
        with self.lock:
            if token in self.running or token in self.failed:
                return
            self.running[token] = time.time()
        threading.Thread(target=self._wait, args=(token,), name="apa-advance", daemon=True).start()

    def _wait(self, token: str) -> None:
        try:
            outcome = self.engine.advance.remote(token).result(timeout_s=ADVANCE_TIMEOUT_S)
        except Exception as e:  # the engine replica died or is restarting: asked again on the next poll
            log.warning("session %s…: the engine did not answer (%s); asking again on the next poll", token[:6],
                        type(e).__name__)
            outcome = None
        with self.lock:
            self.running.pop(token, None)
            if isinstance(outcome, (tuple, list)):
                self.failed[token] = (outcome[0], tuple(outcome[1]) if outcome[1] is not None else None)

    def since(self, token: str) -> float | None:
        with self.lock:
            return self.running.get(token)

    def failure(self, token: str, action: Action) -> str | None:
        """The message of the step that failed, if the session still stands at it (else it is forgotten)."""
        with self.lock:
            message, at = self.failed.get(token, (None, None))
            if message is not None and at is not None and at != (action.kind, action.round):
                del self.failed[token]  # the session moved on (through another replica, say)
                return None
            return message

    def forget(self, token: str) -> None:
        with self.lock:
            self.failed.pop(token, None)


@contextlib.contextmanager
def answered(store: Any) -> Iterator[None]:
    """Use ``store`` for one request: a database lost meanwhile answers 503 with Retry-After; closed after."""
    try:
        yield
    except DatabaseUnavailable as e:
        raise busy(e) from e
    finally:
        store.close()


class ClusterSessions:
    """The operations of ``SessionManager`` for the ingress, each read from (and written to) the store."""

    def __init__(self, settings: dict[str, Any], engine: Any):
        self.cfg = AlignConfig.from_dict(settings["config"])
        self.data_dir, self.database = Path(settings["data_dir"]), settings["database"]
        self.fixed_seed, self.max_sessions = settings["fixed_seed"], settings["max_sessions"]
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.engine, self.advancer = engine, Advancer(engine)
        self.pngs: dict[tuple, bytes] = {}

    # ------------------------------------------------------------ the store, per request

    def path(self, token: str) -> Path:
        path = self.data_dir / token if isinstance(token, str) and TOKEN_RE.fullmatch(token) else None
        if path is None or not path.is_dir():
            raise WebError(404, "no session has this token; check the link, or start a new session")
        return path

    @contextlib.contextmanager
    def reading(self, token: str) -> Iterator[Any]:
        """The session's store, read-only (no lock); 404 if there is none, 503 if the database is down."""
        path = self.path(token)
        try:
            store = read_store(path, self.database)
        except DatabaseUnavailable as e:
            raise busy(e) from e
        except StoreError as e:
            raise WebError(404, "no session has this token; check the link, or start a new session") from e
        with answered(store):
            yield store

    @contextlib.contextmanager
    def writing(self, token: str) -> Iterator[Any]:
        """The session's store for writing, checked whole and locked for this request: 503 with Retry-After
        if another process writes it or the database is down, 500 if it is damaged (nothing written)."""
        path = self.path(token)
        try:
            store = open_store(path, self.database)
        except (SessionBusy, DatabaseUnavailable) as e:
            raise busy(e) from e
        except StoreError as e:
            log.error("session %s…: %s", token[:6], e)
            raise WebError(500, DAMAGED.format("changed")) from e
        with answered(store):
            yield store

    # ------------------------------------------------------------ the operations the API offers

    def create(self, given: list[bytes] | None = None) -> str:
        """A new session with a fresh token (its rows committed before returning); an engine samples its
        first round. Images the person gives need the prior, which only the engines hold: refused here."""
        if given:
            raise WebError(422, "this server keeps the prior on its engines only, so it cannot start a session "
                                "from your images; start without them, or use a single-process `apa serve`")
        token = secrets.token_urlsafe(32)
        seed = self.cfg.session.seed if self.fixed_seed else secrets.randbelow(2**31)
        cfg = with_overrides(self.cfg, session={"seed": seed})
        with counting(self.data_dir):
            if count(self.data_dir) >= self.max_sessions:
                raise WebError(503, f"this server already holds {self.max_sessions} sessions; "
                                    "ask its operator to raise --max-sessions or use another --data-dir")
            try:
                create(self.data_dir / token, cfg.to_dict(), database=self.database).close()
            except DatabaseUnavailable as e:
                raise busy(e) from e
        self.advancer.request(token)
        return token

    def submit(self, token: str, r: int, body: Any) -> dict[str, Any]:
        """Store the ratings of round ``r`` (committed, all together, before returning); an engine refits and
        samples on."""
        with self.writing(token) as store:
            cfg = stored_config(store, store.root)
            check_round(store, next_action(store, cfg.session.budget), r)
            k = len(store.rounds()[r]["shown"])
            scores = parse_ratings(body, k)
            done = {x["position"] for x in store.ratings(r)}
            todo = [(p, scores[p]) for p in range(k) if p not in done]
            if store.spent() == 0 and all(v is None for _, v in todo):
                raise WebError(422, "rate at least one image: the sampler needs one rating to learn from "
                                    "before it can skip a whole round")
            try:
                store.add_ratings(r, todo, "human")  # one transaction: all of them or none
            except RatingRefused as e:
                raise WebError(409, f"{e}; reload the page to see where the session stands") from e
        self.advancer.request(token)
        return self.state(token)

    def taste_changed(self, token: str) -> dict[str, Any]:
        """Forget the rounds before the one waiting for ratings (stored before returning)."""
        with self.writing(token) as store:
            cfg = stored_config(store, store.root)
            action = next_action(store, cfg.session.budget)
            if action.kind != RATE:
                raise WebError(409, f"say it while a round is waiting for your ratings (the session is "
                                    f"{phase_of(action)})")
            changed_on_resume(store, cfg, None, action.round + 1)
        return self.state(token)

    def retry(self, token: str) -> dict[str, Any]:
        """Ask an engine again for a session with a step to take (whichever replica saw it fail)."""
        self.path(token)
        self.advancer.forget(token)
        state = self.state(token)  # which asks an engine if a step is pending
        if state["phase"] in ("ready", "done"):
            raise WebError(409, f"nothing to retry: the session is {state['phase']}")
        return state

    # ------------------------------------------------------------ what the page shows

    def state(self, token: str) -> dict[str, Any]:
        """Where the session stands, from its store; a session with a background step to take is handed
        to an engine (again, if the one that had it died)."""
        with self.reading(token) as store:
            cfg = stored_config(store, store.root)
            action = next_action(store, cfg.session.budget)
            rounds, ratings = store.rounds(), store.ratings()
            failed, since = self.advancer.failure(token, action), self.advancer.since(token)
            report = report_ready(store)
            pending = action.kind != RATE and (action.kind != DONE or not report)
            if action.kind == DONE and (report or failed):  # failure: complete, but its report failed
                phase, message = "done", "The report is ready." if report else failed
            elif failed and pending:
                phase, message = "error", failed
            else:  # done but for its report: still at the final step, as on one process
                phase, message = PHASES[FINAL] if action.kind == DONE else phase_of(action), ""
            now = {"phase": phase, "round": action.round if action.kind in (RATE, FIT, SAMPLE) else None,
                   "message": message, "progress": {"elapsed": round(time.time() - since, 1) if since else 0.0,
                                                    "estimate": None}}
            view = state_view(store, cfg, rounds, ratings, now)
        if pending and not failed:
            self.advancer.request(token)
        return view

    def image_png(self, token: str, r: int, p: int) -> bytes:
        return self.rendered(token, r, p)

    def grid_png(self, token: str, r: int) -> bytes:
        return self.rendered(token, r, None)

    def rendered(self, token: str, r: int, p: int | None) -> bytes:
        """Round r's image p (None: the grid), decoded by an engine; kept, since a round never changes."""
        key = (token, r, p)
        if key not in self.pngs:
            self.path(token)
            try:
                answer = self.engine.render.remote(token, r, p).result(timeout_s=120)
            except Exception as e:  # the engine replica died or is restarting
                raise WebError(503, "the image could not be drawn just now; try again in a moment",
                               retry_after=2) from e
            if "png" not in answer:
                raise WebError(answer["status"], answer["error"], retry_after=2 if answer["status"] == 503 else None)
            if len(self.pngs) >= PNG_CACHE:
                self.pngs.clear()
            self.pngs[key] = answer["png"]
        return self.pngs[key]

    def final_images(self, token: str) -> Any:
        """The final batch [n, C, H, W], once the session is done (404 before)."""
        with self.reading(token) as store:
            cfg = stored_config(store, store.root)
            done = next_action(store, cfg.session.budget).kind == DONE
            images = store.final_images() if done else None
        if images is None:
            raise WebError(404, "the final samples appear once the whole budget is rated")
        return images

    def final_png(self, token: str) -> bytes:
        return render.png(self.final_images(token)[:FINAL_PREVIEW], nrow=8)

    def final_zip(self, token: str) -> bytes:
        return final_zip(self.final_images(token))

    def report_file(self, token: str, name: str) -> tuple[bytes, str]:
        return report_file(self.path(token), name)


def phase_of(action: Action) -> str:
    """The page's phase for what a session does next."""
    return {RATE: "ready", DONE: "done"}.get(action.kind) or PHASES[action.kind]


def check_round(store: Any, action: Action, r: int) -> None:
    """Refuse (409) ratings for any round but the one waiting for them."""
    if action.kind == RATE and action.round == r:
        return
    rounds = store.rounds()
    if 0 <= r < len(rounds) and (store.stage(r) == FITTED or action.kind in (FIT, SAMPLE, FINAL, DONE)):
        raise WebError(409, f"round {r} has already been rated; its ratings cannot change")
    if action.kind == RATE:
        raise WebError(409, f"round {r} is not the current round; the session is waiting for round {action.round}")
    raise WebError(409, f"round {r} is not waiting for ratings (the session is {phase_of(action)}); "
                        "wait for the next round to appear")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64,
                  request_router_config=RequestRouterConfig(request_router_class="apa.web.routing.PinnedRouter"))
@serve.ingress()
class Web:
    """The page and the API (``apa.web.server.create_app``) over :class:`ClusterSessions`."""

    def __init__(self, engine: Any, settings: dict[str, Any]):
        self.sessions = ClusterSessions(settings, engine)
        self.allowed_hosts = settings.get("allowed_hosts")

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.sessions, self.allowed_hosts)
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def name_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app


def application(cfg: AlignConfig, data_dir: Path, database: str, replicas: int = 2, engines: int = 2,
                fixed_seed: bool = False, max_sessions: int = 1000, allowed_hosts: list[str] | None = None,
                engine_gpus: float = 0.0, prior_window: float = PRIOR_WINDOW_S) -> Any:
    """The Serve application: ``replicas`` ingress replicas over ``engines`` engine replicas, each engine
    given ``engine_gpus`` GPUs by Ray (run the prior with ``--device cuda`` then) and batching its
    sessions' network calls with a window of ``prior_window`` seconds."""
    settings = {"config": cfg.to_dict(), "data_dir": str(Path(data_dir).resolve()), "database": database,
                "fixed_seed": fixed_seed, "max_sessions": max_sessions, "allowed_hosts": allowed_hosts,
                "prior_window": prior_window}
    engine = Engine.options(num_replicas=engines, ray_actor_options={"num_cpus": 0, "num_gpus": engine_gpus}
                            ).bind(settings)
    return Web.options(num_replicas=replicas).bind(engine, settings)


# ---------------------------------------------------------------- the command


APP = "apa"  # the Serve application's name


def check_ray_address(address: str) -> None:
    """Refuse an address nothing listens on, in one line (``ray.init`` would wait a minute first)."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        raise ValueError(f"--ray {address!r}: give a Ray cluster's address as HOST:PORT (its GCS, port 6379 by "
                         "default, or ray://HOST:10001), 'auto' on one of its machines, or 'local' to start one here")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except OSError as e:
        raise ValueError(f"--ray {address}: nothing answers there ({e.strerror or e}); start the cluster with "
                         "`ray start --head` and give its address, or use --ray local") from e


# Ray Serve restarts an HTTP proxy that is not ready within 5 s three times running; on a busy machine
# (two cores, the engines loading torch) starting one takes longer, so a local cluster waits a minute.
PATIENT_PROXY = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def start_local(num_cpus: int, **options: Any) -> None:
    """Start Ray on this machine (127.0.0.1), its Serve proxy given time to start on busy cores."""
    import ray

    for name, value in PATIENT_PROXY.items():
        os.environ.setdefault(name, value)  # read by the Serve controller, a process this starts
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **options)


def connect(address: str) -> None:
    """Join the Ray cluster at ``address``, or start one on this machine (``local``)."""
    import ray

    if address == "local":
        start_local(num_cpus=os.cpu_count())
        return
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--ray {address}: cannot join a Ray cluster there ({first})") from e


def run(app: Any, address: str, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` of every node of the cluster at ``address`` until interrupted; then
    remove it (and stop a ``local`` cluster)."""
    import ray

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops it as Ctrl-C does: the application removed, a local Ray stopped

    connect(address)
    signal.signal(signal.SIGTERM, interrupted)  # after ray.init, which sets a handler of its own
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP, route_prefix="/")
        shown = f"[{host}]" if ":" in host else host
        print(f"apa serve: on Ray ({address}); open http://{shown}:{port}/", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.shutdown() if address == "local" else serve.delete(APP)
        finally:
            ray.shutdown()

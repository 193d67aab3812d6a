"""The sessions `apa serve` holds: one directory per token under the data directory, opened on demand.

Each person's session is an ordinary apa session (see ``apa.session``) in ``DATA_DIR/<token>``,
where the token is ``secrets.token_urlsafe(32)``: 43 URL-safe characters, unguessable, and the only
thing a request names. Requests never carry a path; a token that is not of that exact form, or
has no session directory, is unknown.

Per session, one lock serialises everything that changes it. Refitting the surrogate and sampling
the next round run on a small pool of background threads; the page polls ``state`` meanwhile.
Nothing is kept only in memory: after a restart each session is reopened from its directory and
continues where its store says it stood (a round waiting for ratings, or a round rated but not yet
refitted, which is then refitted).
"""

from __future__ import annotations

import fcntl
import io
import logging
import math
import os
import queue
import re
import secrets
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

from apa.config import AlignConfig
from apa.evaluation.report import report_view
from apa.evaluation.report import write_report as report
from apa.feedback.human import RATINGS, SCALE
from apa.session import Session, components, with_overrides
from apa.session.examples import ExamplesError, read_given
from apa.session.lifecycle import DONE, FINAL, FIT, RATE, SAMPLE, drive, next_action
from apa.store import FITTED, DatabaseUnavailable, RatingRefused, SessionBusy, StoreError, exists
from apa.web import render

log = logging.getLogger("apa.web")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")
BUSY = ("queued", "fitting", "sampling", "final")  # phases in which a background job owns the session
FINAL_PREVIEW = 64  # final samples shown on the page
MAX_OPEN, IDLE_S = 200, 600.0  # past this many open sessions, those idle this long are closed
# The report's files a page may fetch: names the report writes, never a path a request makes up.
REPORT_FILE_RE = re.compile(r"(report\.(html|md|json|css)|[a-z_]{1,40}\.png|grids/[a-z0-9_]{1,40}\.png)")
REPORT_TYPES = {".html": "text/html; charset=utf-8", ".md": "text/markdown; charset=utf-8",
                ".json": "application/json", ".css": "text/css; charset=utf-8", ".png": "image/png"}


COUNT_LOCK = ".sessions.lock"  # flock'ed while sessions are counted and one is created: every server on the data dir


def public(message: str) -> str:
    """A message fit for a client: no path (absolute or relative: the data directory, a session's
    files) and no process id; the server's log keeps the whole message."""
    message = re.sub(r"`[^`]*/[^`]*`", "(a command for the operator)", message)
    message = re.sub(r"[\w.~-]*(?:/[^\s'\"`(),;]+)+", "(a file on the server)", message)
    return re.sub(r"\s*\(pid [^)]*\)", "", message)


DAMAGED = ("this session's stored files are damaged or incomplete, so it cannot be {}; nothing was changed and its "
           "ratings are kept on the server: ask the server's operator to check its log and restore or repair it")


RETRY_AFTER_S = 2  # what a busy or unreachable-database answer asks the client to wait before trying again
BUSY_MESSAGE = "this session is open in another process, which is writing it; try again in a moment"
UNREACHABLE = "the sessions' database cannot be reached right now; nothing you sent was lost, try again in a moment"


class WebError(Exception):
    """A request that cannot be served; ``status`` is its HTTP status, the message says what to do;
    ``retry_after`` (seconds): the same request may succeed then (sent as the Retry-After header)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def busy(e: BaseException) -> WebError:
    """503 with Retry-After for a session another process writes now, or a database that is down."""
    message = UNREACHABLE if isinstance(e, DatabaseUnavailable) else BUSY_MESSAGE
    return WebError(503, message, retry_after=RETRY_AFTER_S)


class Workers:
    """A few daemon threads running background jobs in order (a killed server loses none: the store is durable)."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"--workers must be at least 1, got {n}")
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.threads = [threading.Thread(target=self._loop, name=f"apa-web-worker-{i}", daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def submit(self, job: Callable[[], None]) -> None:
        self.jobs.put(job)

    def stop(self, timeout: float = 120.0) -> None:
        """Drop the jobs not started yet; wait (up to ``timeout`` s) for the threads to end their current job."""
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # a job reports its own errors; this keeps the worker alive regardless
                log.exception("background job failed")


class SessionHandle:
    """One open session: the Session, its lock, what it is doing now, and rendered images."""

    def __init__(self, token: str, session: Session):
        self.token, self.session = token, session
        self.lock = threading.Lock()
        self.phase, self.round, self.message = "idle", None, ""
        self.since = time.time()
        self.durations: dict[str, float] = {}  # how long each phase took last time (progress estimates)
        self.pngs: dict[tuple, bytes] = {}  # rendered images; rounds never change once sampled
        self.last_used = time.time()

    def enter(self, phase: str, round_: int | None = None, message: str = "") -> None:
        """Move to ``phase`` (under the lock), remembering how long the previous phase took."""
        with self.lock:
            now = time.time()
            if self.phase in BUSY:
                self.durations[self.phase] = now - self.since
            self.phase, self.round, self.message, self.since = phase, round_, message, now

    def progress(self) -> dict[str, Any]:
        """Seconds in the current phase, and how long it took last time (None: no estimate yet)."""
        elapsed = time.time() - self.since
        estimate = self.durations.get(self.phase) if self.phase != "queued" else None
        return {"elapsed": round(elapsed, 1), "estimate": round(estimate, 1) if estimate else None}

    def idle_for(self) -> float:
        return time.time() - self.last_used if self.phase not in BUSY else 0.0

    def close(self) -> None:
        with self.lock:
            self.session.store.close()


# ---------------------------------------------------------------- what a session needs next


def waiting_round(session: Session) -> int | None:
    """The round shown to the person and not yet fully rated, if any."""
    action = next_action(session.store, session.cfg.session.budget)
    return action.round if action.kind == RATE else None


def finished(session: Session) -> bool:
    return next_action(session.store, session.cfg.session.budget).kind == DONE


PHASES = {FIT: "fitting", SAMPLE: "sampling", FINAL: "final"}  # the page's name for each background step


def advance(handle: SessionHandle, report_lock: threading.Lock) -> None:
    """Background job: the steps ``next_action`` names (refit a rated round, sample the next one,
    draw the final batch) until the session waits for the person, or is done."""
    s = handle.session
    try:
        action = drive(s, answers=False, on_step=lambda a: handle.enter(PHASES[a.kind], a.round))
        if action.kind == RATE:
            handle.enter("ready", action.round)
        else:
            handle.enter("done", message=write_report(s, report_lock))
    except StoreError:  # its files damaged under it: the page says so, the log says which
        log.exception("session %s…: background step failed", handle.token[:6])
        handle.enter("error", message=DAMAGED.format("continued"))
    except Exception as e:  # shown on the page; the store still holds everything up to the failure
        log.exception("session %s…: background step failed", handle.token[:6])
        handle.enter("error", message=f"{type(e).__name__}: {public(str(e))}. Everything rated so far is saved; "
                                      "press Retry, or restart the server if it fails again.")


def write_report(session: Session, report_lock: threading.Lock) -> str:
    """The same report `apa align` writes, beside the session (one at a time: plotting is not thread-safe)."""
    try:
        with report_lock:
            report(report_view(session))
        return "The report is ready."
    except Exception as e:  # the session itself is complete; a failed report is only mentioned
        log.exception("report failed")
        return f"The session is complete, but its report could not be written ({public(str(e))})."


# ---------------------------------------------------------------- the ratings a page submits


def parse_ratings(body: Any, k: int) -> list[float | None]:
    """``{"ratings": [1..5 or null, ... one per shown image]}`` -> scores; WebError 422 otherwise."""
    if not isinstance(body, dict) or set(body) != {"ratings"}:
        raise WebError(422, 'send a JSON object with exactly one key, "ratings": a list with one entry per image')
    values = body["ratings"]
    if not isinstance(values, list) or len(values) != k:
        raise WebError(422, f"this round shows {k} images: send a list of {k} ratings (1 to 5, or null to skip)")
    scores = []
    for i, v in enumerate(values):
        if v is None:
            scores.append(None)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v not in RATINGS:
            raise WebError(422, f"image {i}: the rating {str(v)[:20]!r} is not allowed; "
                                f"use a whole number from {RATINGS[0]} to {RATINGS[-1]}, or null to skip")
        else:
            scores.append(float(v))
    return scores


# ---------------------------------------------------------------- what every server answers alike


def state_view(store: Any, cfg: AlignConfig, rounds: list[dict[str, Any]], ratings: list[dict[str, Any]],
               now: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of a session: ``now`` (its phase, round, message and progress) beside its
    stored rounds and ratings and the budget of ``cfg``."""
    phase, current = now["phase"], now["round"]
    by_round: dict[int, dict[int, float | None]] = {}
    for x in ratings:
        by_round.setdefault(x["round"], {})[x["position"]] = x["score"]
    history = [{"round": row["round"], "status": row["status"], "images": len(row["shown"]),
                "ratings": [by_round.get(row["round"], {}).get(p, "pending") for p in range(len(row["shown"]))],
                "fit_loss": None if row["fit_loss"] is None or not math.isfinite(row["fit_loss"]) else row["fit_loss"]}
               for row in rounds]
    return {"phase": phase, "round": current, "message": now["message"],
            "images": len(rounds[current]["shown"]) if phase == "ready" else 0,
            "rated": {str(p): v for p, v in by_round.get(current, {}).items()} if phase == "ready" else {},
            "spent": store.spent(),
            "budget": cfg.session.budget, "per_round": cfg.session.per_round,
            "scale": list(SCALE), "choices": list(RATINGS), "progress": now["progress"],
            "taste_changed_at": cfg.session.forget_before,
            "history": history, "final": phase == "done" and store.final_path.exists(),
            "report": phase == "done" and store.report_path.with_suffix(".html").is_file()}


def given_images(blobs: list[bytes], prior: Any, budget: int) -> Any:
    """The images a person starts a session from, as the prior's images [n, C, H, W] (None: none given);
    422 with one line when they cannot be read or leave no rating for the rounds."""
    if not blobs:
        return None
    if len(blobs) >= budget:
        raise WebError(422, f"give at most {budget - 1} images: each counts as one of the session's {budget} "
                            "ratings, and the rounds need at least one")
    try:
        return read_given(blobs, prior)
    except ExamplesError as e:
        raise WebError(422, str(e)) from e


def report_file(root: Path, name: str) -> tuple[bytes, str]:
    """One file of the report of the session at ``root`` and its media type (names from a fixed pattern)."""
    root = root.resolve()
    if not (isinstance(name, str) and REPORT_FILE_RE.fullmatch(name)):
        raise WebError(404, "no such file in this session's report")
    path = (root / name).resolve()
    if not (path.is_relative_to(root) and path.is_file()):
        raise WebError(404, "no such file in this session's report (it is written when the session ends)")
    return path.read_bytes(), REPORT_TYPES[path.suffix]


def final_zip(images: Any) -> bytes:
    """Every final sample [n, C, H, W] as its own PNG, in one zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for i, image in enumerate(images):
            out.writestr(f"final_{i:04d}.png", render.single_png(image))
    return buf.getvalue()


def counting(data_dir: Path):
    """COUNT_LOCK held (an exclusive flock; each call opens its own, so threads exclude each other too)."""
    fd = os.open(data_dir / COUNT_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return os.fdopen(fd, "rb")  # closing it releases the lock


def count(data_dir: Path) -> int:
    """The sessions under ``data_dir`` (directories named like a token)."""
    return sum(1 for p in data_dir.iterdir() if TOKEN_RE.fullmatch(p.name))


# ---------------------------------------------------------------- the manager


class SessionManager:
    """Creates, reopens and serves every session under ``data_dir`` (all with the server's settings)."""

    def __init__(self, data_dir: Path, cfg: AlignConfig, workers: int = 1, fixed_seed: bool = False,
                 max_sessions: int = 1000, batch_window: float | None = None, database: str | None = None):
        if cfg.feedback.name != "human":
            raise ValueError(f"apa serve collects a person's ratings; feedback must be 'human', not {cfg.feedback.name!r}")
        if workers < 1 or max_sessions < 1:  # before the data directory is made
            raise ValueError(f"--workers and --max-sessions must be at least 1, got {workers} and {max_sessions}")
        self.data_dir = Path(data_dir)
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ValueError(f"--data-dir {self.data_dir} is a file; choose a directory for the sessions")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # the directory names are the tokens: no other local user may list them
        self.cfg, self.fixed_seed, self.max_sessions = cfg, fixed_seed, max_sessions
        self.batch_window = batch_window  # seconds; None: every session calls the network alone
        self.database = database  # a PostgreSQL URL holding the sessions' records (None: SQLite in each directory)
        self.workers = Workers(workers)
        self.handles: dict[str, SessionHandle] = {}
        self.lock = threading.Lock()  # guards ``handles`` and the creation of sessions
        self.report_lock = threading.Lock()

    # ------------------------------------------------------------ finding sessions

    def session_dir(self, token: str) -> Path | None:
        """The directory of ``token``'s session, or None: only well-formed tokens name a directory."""
        if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
            return None
        path = self.data_dir / token
        return path if path.is_dir() and exists(path, self.database) else None

    def get(self, token: str) -> SessionHandle:
        """The open session of ``token``, reopened from disk if the server has not seen it since starting."""
        with self.lock:
            handle = self.handles.get(token) if isinstance(token, str) else None
            if handle is not None:
                handle.last_used = time.time()
                return handle
            self.close_idle()
            path = self.session_dir(token)
            if path is None:
                raise WebError(404, "no session has this token; check the link, or start a new session")
            try:
                handle = SessionHandle(token, Session.resume(path, progress=False, batch_window=self.batch_window,
                                                                database=self.database))
            except (SessionBusy, DatabaseUnavailable) as e:
                raise busy(e) from e
            except StoreError as e:  # damaged, or its ledger lost: refused before it could take a rating
                log.error("session %s…: %s", token[:6], e)
                raise WebError(500, DAMAGED.format("opened")) from e
            self.handles[token] = handle
            self.settle(handle)  # under the lock, so nobody sees the session before its phase is known
            return handle

    def settle(self, handle: SessionHandle) -> None:
        """Put a freshly opened session in the phase its store says, scheduling whatever work is pending."""
        s = handle.session
        r = waiting_round(s)
        if r is not None:
            handle.enter("ready", r)
        elif finished(s):
            handle.enter("done")
        else:
            self.schedule(handle)

    def schedule(self, handle: SessionHandle) -> None:
        handle.enter("queued")
        self.workers.submit(lambda: advance(handle, self.report_lock))

    def close_idle(self) -> None:
        """Past MAX_OPEN open sessions, close those idle for IDLE_S seconds (they reopen on their next request)."""
        if len(self.handles) < MAX_OPEN:
            return
        for token, handle in list(self.handles.items()):
            if handle.idle_for() > IDLE_S:
                del self.handles[token]
                handle.close()

    def close(self) -> None:
        """Stop the background threads and close every session, releasing their locks (pending work resumes
        when a server next opens these sessions)."""
        self.workers.stop()
        with self.lock:
            for handle in self.handles.values():
                handle.close()
            self.handles.clear()

    def count(self) -> int:
        return count(self.data_dir)

    # ------------------------------------------------------------ the operations the API offers

    def create(self, given: list[bytes] | None = None) -> str:
        """A new session with a fresh token; its first round is sampled in the background. ``given``: images
        the person already likes (image files' bytes), stored as round 0, each rated at the top of the scale
        and counted in the budget; they are read and checked before anything is written.

        The sessions are counted on disk and the new one made in place while COUNT_LOCK is held, so
        creates in this server and in any other on the same data directory cannot pass the limit."""
        with self.lock:
            self.close_idle()
        token = secrets.token_urlsafe(32)
        seed = self.cfg.session.seed if self.fixed_seed else secrets.randbelow(2**31)
        cfg = with_overrides(self.cfg, session={"seed": seed})
        parts = components.build(cfg, self.batch_window)
        images = given_images(given or [], parts[0], cfg.session.budget)
        with self.counting():
            if self.count() >= self.max_sessions:
                raise WebError(503, f"this server already holds {self.max_sessions} sessions; "
                                    "ask its operator to raise --max-sessions or use another --data-dir")
            handle = SessionHandle(token, Session.start(self.data_dir / token, cfg, progress=False, parts=parts,
                                                        database=self.database))
            if images is not None:
                handle.session.give(images)
        with self.lock:
            self.handles[token] = handle
            self.schedule(handle)
        return token

    def counting(self):
        return counting(self.data_dir)

    def submit(self, token: str, r: int, body: Any) -> dict[str, Any]:
        """Store the ratings of round ``r`` (durably and all together, before returning), then refit and sample on."""
        handle = self.get(token)
        with handle.lock:
            self.check_round(handle, r)
            s = handle.session
            k = len(s.store.rounds()[r]["shown"])
            scores = parse_ratings(body, k)
            done = {x["position"] for x in s.store.ratings(r)}
            todo = [(p, scores[p]) for p in range(k) if p not in done]
            if s.store.spent() == 0 and all(v is None for _, v in todo):
                raise WebError(422, "rate at least one image: the sampler needs one rating to learn from "
                                    "before it can skip a whole round")
            try:
                s.record_all(r, todo, "human")  # one transaction: a crash stores all of them or none
            except RatingRefused as e:
                raise WebError(409, f"{e}; reload the page to see where the session stands") from e
            handle.phase = "queued"  # still under the lock: a concurrent submission now sees the round taken
        self.schedule(handle)
        return self.state(token)

    @staticmethod
    def check_round(handle: SessionHandle, r: int) -> None:
        """Refuse (409) ratings for any round but the one waiting for them."""
        if handle.phase == "ready" and r == handle.round:
            return
        rounds = handle.session.store.rounds()
        if 0 <= r < len(rounds) and (handle.session.store.stage(r) == FITTED or r == handle.round):
            raise WebError(409, f"round {r} has already been rated; its ratings cannot change")
        if handle.phase == "ready":
            raise WebError(409, f"round {r} is not the current round; the session is waiting for round {handle.round}")
        raise WebError(409, f"round {r} is not waiting for ratings (the session is {handle.phase}); "
                            "wait for the next round to appear")

    def taste_changed(self, token: str) -> dict[str, Any]:
        """The person says their taste changed: the round waiting for their ratings and every later one
        are what the surrogate learns from; the earlier rounds are forgotten (stored before returning)."""
        handle = self.get(token)
        with handle.lock:
            if handle.phase != "ready":
                raise WebError(409, f"say it while a round is waiting for your ratings (the session is {handle.phase})")
            s = handle.session
            s.change_taste(handle.round + 1)
        return self.state(token)

    def retry(self, token: str) -> dict[str, Any]:
        """Run the failed background step again."""
        handle = self.get(token)
        with handle.lock:
            if handle.phase != "error":
                raise WebError(409, f"nothing to retry: the session is {handle.phase}")
            handle.phase = "queued"
        self.schedule(handle)
        return self.state(token)

    # ------------------------------------------------------------ what the page shows

    def state(self, token: str) -> dict[str, Any]:
        handle = self.get(token)
        s = handle.session
        with handle.lock:
            phase, current, message, progress = handle.phase, handle.round, handle.message, handle.progress()
            rounds, ratings = s.store.rounds(), s.store.ratings()
        return state_view(s.store, s.cfg, rounds, ratings, {"phase": phase, "round": current, "message": message,
                                                            "progress": progress})

    def image_png(self, token: str, r: int, p: int) -> bytes:
        """Round r's p-th shown image, rendered from the session's stored particles."""
        handle = self.get(token)
        rounds = handle.session.store.rounds()
        if not (0 <= r < len(rounds) and 0 <= p < len(rounds[r]["shown"])):
            raise WebError(404, f"this session has no image {p} in round {r}")
        key = ("image", r, p)
        if key not in handle.pngs:
            handle.pngs[key] = render.single_png(handle.session.shown_images(r)[p])
        return handle.pngs[key]

    def grid_png(self, token: str, r: int) -> bytes:
        """All images round r showed, as one grid."""
        handle = self.get(token)
        rounds = handle.session.store.rounds()
        if not 0 <= r < len(rounds):
            raise WebError(404, f"this session has no round {r}")
        key = ("grid", r)
        if key not in handle.pngs:
            handle.pngs[key] = render.png(handle.session.shown_images(r), nrow=len(rounds[r]["shown"]))
        return handle.pngs[key]

    def final_images(self, token: str) -> tuple["SessionHandle", Any]:
        """The session and its final batch [n, C, H, W], once the session is done (404 before)."""
        handle = self.get(token)
        images = handle.session.store.final_images() if handle.phase == "done" else None
        if images is None:
            raise WebError(404, "the final samples appear once the whole budget is rated")
        return handle, images

    def final_png(self, token: str) -> bytes:
        """The aligned sampler's final samples (the first 64), once the session is done."""
        handle, images = self.final_images(token)
        if "final" not in handle.pngs:
            handle.pngs["final"] = render.png(images[:FINAL_PREVIEW], nrow=8)
        return handle.pngs["final"]

    def report_file(self, token: str, name: str) -> tuple[bytes, str]:
        """One file of the session's report (report.html, its stylesheet, its images) and its media type."""
        return report_file(self.get(token).session.store.root, name)

    def final_zip(self, token: str) -> bytes:
        """Every final sample as its own PNG, in one zip, once the session is done."""
        handle, images = self.final_images(token)
        if "final.zip" not in handle.pngs:
            handle.pngs["final.zip"] = final_zip(images)
        return handle.pngs["final.zip"]

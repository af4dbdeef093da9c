"""`clickstream serve`: the HTTP API and the dashboard over one store.

JSON under /api (OpenAPI at /docs), the dashboard at / (static files in serving/static,
its chart library vendored there, so it works with no internet). Every read goes to the
store when asked (no cache): a DuckDB file is opened read-only per request, because the
job's writer needs the file's lock between requests.

Bad parameters are answered 4xx with what to send; an unexpected error is a 500 with the
error's type and a pointer to the server log, never a stack trace.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from importlib import resources
from time import monotonic
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

import orjson
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

import schemas
from pipeline import query
from serving import health, uniques
from serving.cache import ResponseCache
from serving.stores import NotHeld, Store
from transforms.metrics import DEFAULT_FUNNEL

log = logging.getLogger("clickstream.serve")

Metric = Literal["events", "active_users", "funnel_step", "feature_users"]
DistinctMetric = Literal["active_users", "feature_users"]
Granularity = Literal["hour", "day"]
Mode = Literal["hll", "exact"]
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
FAR = datetime(2200, 1, 1, tzinfo=UTC)
MAX_RANGE_DAYS = 366


@dataclass(frozen=True)
class ServeConfig:
    distinct: str = "hll"  # the default mode of range uniques
    archive_path: str = ""  # the raw archive, for mode=exact
    metrics_url: str = ""  # the job's Prometheus text endpoint, for health
    refresh_s: int = 30  # the dashboard's auto-refresh period
    # A store that cannot tell cheaply whether its data changed (Bigtable, BigQuery):
    # reuse an answer for up to this many seconds (0: read per request).
    max_staleness_s: float = 0.0


class BadRequest(Exception):
    """A parameter the API cannot use; the message says what to send."""


def _answers(fn: Callable) -> Callable:
    """Renders the answer as JSON, and turns the project's own refusals into 4xx:
    QueryError (a SystemExit, raised by pipeline.query's parsers) and BadRequest into
    400, NotHeld into 404."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            # Rendered here: the answers are plain JSON types already, and FastAPI's
            # generic encoder walked every point again (a third of a series request).
            return Response(orjson.dumps(fn(*args, **kwargs)),
                            media_type="application/json")
        except (query.QueryError, BadRequest) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        except NotHeld as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None

    return wrapper


def _time(text: str | None, name: str) -> datetime | None:
    try:
        return query.parse_time(text)
    except query.QueryError:
        raise BadRequest(f"{name} must be an ISO-8601 time or date, e.g. 2026-11-01 or "
                         f"2026-11-01T06:00Z (got {text!r})") from None


def _dims(text: str) -> str:
    try:
        return query.parse_dims(text)
    except query.QueryError as exc:  # its message names the CLI flag
        raise BadRequest(str(exc).replace("--dims", "dims")) from None


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    """UTC with a Z, as `clickstream query` prints times."""
    return None if value is None else value.astimezone(UTC).isoformat().replace(
        "+00:00", "Z")


def point_state(row: dict[str, Any]) -> str:
    """How far a value may still move: final (never by the stream), late (revised after
    its window closed) or open (the window may still change it)."""
    if row["is_final"]:
        return "final"
    return "late" if row["timing"] in ("LATE", schemas.BATCH_TIMING) else "open"


def data_version(store: Store, max_staleness_s: float) -> Callable[[], Hashable | None]:
    """The version answers are kept under: the store's own where it has one; otherwise,
    with a staleness allowed, the current period of that length (an answer is reused
    until the period ends, so it is at most that old plus the time to compute it)."""
    if max_staleness_s <= 0:
        return store.data_version

    def version() -> Hashable | None:
        own = store.data_version()
        return own if own is not None else ("period", int(monotonic() // max_staleness_s))

    return version


def create_app(store: Store, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    app = FastAPI(
        title="clickstream-beam serving API",
        description="Metric series, any-range unique users (HLL sketch unions or exact "
        "from the raw archive), funnel, feature adoption, changelog, dead letters and "
        f"pipeline health, read from the {store.name} store.")

    def reads_archive(path: str, query_string: bytes) -> bool:
        """Exact uniques read the raw archive, which the store's version does not cover."""
        if path not in ("/api/uniques", "/api/adoption"):
            return False
        mode = parse_qs(query_string.decode("latin-1")).get("mode", [config.distinct])[-1]
        return mode == "exact"

    app.add_middleware(ResponseCache, version=data_version(store, config.max_staleness_s),
                       reads_elsewhere=reads_archive)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("serving %s failed", request.url.path)
        return JSONResponse(status_code=500, content={
            "detail": f"internal error ({type(exc).__name__}) reading the {store.name} "
                      "store; the server log has the details"})

    def newest_day() -> date:
        rows = store.latest("active_users", "day", EPOCH, FAR)
        if not rows:
            raise NotHeld(f"the {store.name} store has no active_users day windows yet")
        return max(r["window_start"] for r in rows).date()

    def day_span(start: str | None, end: str | None, days: int | None) -> list[date]:
        last = uniques.parse_day(end, "end") if end else newest_day()
        if start:
            first = uniques.parse_day(start, "start")
        else:
            first = uniques.day_range(last, days or 1)[0]
        if first > last:
            raise BadRequest(f"start ({first}) is after end ({last})")
        span = uniques.days_of(first, last + timedelta(days=1))
        if len(span) > MAX_RANGE_DAYS:
            raise BadRequest(f"a range is at most {MAX_RANGE_DAYS} days (got {len(span)})")
        return span

    def count_distinct(metric: str, dims: str, span: list[date], mode: str
                       ) -> dict[str, Any]:
        if mode == "exact":
            return uniques.from_archive(config.archive_path, metric, json.loads(dims), span)
        rows = store.sketches(metric, "day", dims, _midnight(span[0]),
                              _midnight(span[-1] + timedelta(days=1)))
        return uniques.from_sketches(rows, span)

    @app.get("/api/series", summary="One metric's series: value, revision, timing, "
             "is_final per window")
    @_answers
    def series(metric: Metric, granularity: Granularity, dims: str = "{}",
               start: str | None = None, end: str | None = None) -> dict[str, Any]:
        canonical = _dims(dims)
        rows = query.query(store.series, metric, granularity, canonical,
                           _time(start, "start"), _time(end, "end"))
        return {"metric": metric, "granularity": granularity, "dims": canonical,
                "store": store.name,
                "points": [dict(r, state=point_state(r)) for r in rows]}

    @app.get("/api/uniques", summary="Distinct users over any range of days (DAU, WAU, "
             "MAU, rolling N): a union of daily sketches, or exact from the archive")
    @_answers
    def unique_users(
            metric: DistinctMetric = "active_users", dims: str = "{}",
            end: Annotated[str | None, Query(description="last day, YYYY-MM-DD; default "
                                             "the newest day in the store")] = None,
            days: Annotated[int, Query(ge=1, le=MAX_RANGE_DAYS, description="days "
                                       "ending with `end`: 1 DAU, 7 WAU, 30 MAU")] = 30,
            start: Annotated[str | None, Query(description="first day instead of "
                                               "`days`")] = None,
            mode: Mode | None = None) -> dict[str, Any]:
        span = day_span(start, end, days)
        canonical = _dims(dims)
        answer = count_distinct(metric, canonical, span, mode or config.distinct)
        return {"metric": metric, "dims": canonical, "start": span[0].isoformat(),
                "end": span[-1].isoformat(), "days": len(span), "store": store.name,
                **answer}

    @app.get("/api/funnel", summary="The funnel of a day or a range of days, with "
             "step-to-step conversion")
    @_answers
    def funnel(start: str | None = None, end: str | None = None) -> dict[str, Any]:
        span = day_span(start, end, 1)
        rows = store.latest("funnel_step", "day", _midnight(span[0]),
                            _midnight(span[-1] + timedelta(days=1)))
        reached: dict[tuple[int, str], int] = {}
        for row in rows:
            step = json.loads(row["dims"])
            key = (int(step["step"]), step["name"])
            reached[key] = reached.get(key, 0) + int(row["value"])
        steps = sorted(reached.items()) or [((i + 1, n), 0) for i, n in
                                            enumerate(DEFAULT_FUNNEL)]
        out, first, previous = [], None, None
        for (number, name), users in steps:
            first = users if first is None else first
            out.append({"step": number, "name": name, "users": users,
                        "conversion_from_previous": None if previous is None else
                        (round(users / previous, 4) if previous else 0.0),
                        "conversion_from_first": round(users / first, 4) if first else 0.0})
            previous = users
        return {"start": span[0].isoformat(), "end": span[-1].isoformat(),
                "store": store.name, "steps": out,
                "note": "per-day funnels summed over the range: an identity that "
                        "completes the funnel on two days counts twice"}

    @app.get("/api/adoption", summary="Feature adoption: distinct feature users / "
             "distinct active users over a day or a range")
    @_answers
    def adoption(start: str | None = None, end: str | None = None,
                 mode: Mode | None = None) -> dict[str, Any]:
        span = day_span(start, end, 1)
        chosen = mode or config.distinct
        first, after = _midnight(span[0]), _midnight(span[-1] + timedelta(days=1))
        features = sorted({r["dims"] for r in store.latest("feature_users", "day",
                                                           first, after)})
        active = count_distinct("active_users", schemas.canonical_dims({}), span, chosen)
        out = []
        for dims in features:
            users = count_distinct("feature_users", dims, span, chosen)
            out.append({"feature": json.loads(dims).get("feature"),
                        "feature_users": users["value"], "active_users": active["value"],
                        "adoption": round(users["value"] / active["value"], 4)
                        if active["value"] else 0.0,
                        "relative_standard_error": users["relative_standard_error"],
                        "complete": users["complete"] and active["complete"]})
        return {"start": span[0].isoformat(), "end": span[-1].isoformat(), "mode": chosen,
                "store": store.name, "features": out}

    @app.get("/api/changelog", summary="Every revision of one window (retractions "
             "included), oldest first")
    @_answers
    def changelog(metric: Metric, granularity: Granularity, window_start: str,
                  dims: str = "{}") -> dict[str, Any]:
        at = _time(window_start, "window_start")
        canonical = _dims(dims)
        rows = store.changelog(metric, granularity, canonical, at)  # type: ignore[arg-type]
        if not rows:
            raise NotHeld(f"no changelog rows for {metric} {granularity} {canonical} at "
                          f"{window_start} in the {store.name} store (window_start must "
                          "be a window's start, e.g. 2026-11-01T06:00Z for an hour)")
        return {"metric": metric, "granularity": granularity, "dims": canonical,
                "window_start": _iso(at), "store": store.name,
                "rows": [dict(r, emitted_at=_iso(r["emitted_at"])) for r in rows]}

    @app.get("/api/dead_letters", summary="Dead letters by reason (by ingest time)")
    @_answers
    def dead_letters(start: str | None = None, end: str | None = None) -> dict[str, Any]:
        rows = store.dead_letters(_time(start, "start"), _time(end, "end"))
        return {"store": store.name, "total": sum(n for _, n in rows),
                "reasons": [{"reason": r, "count": n} for r, n in rows]}

    @app.get("/api/health", summary="Freshness: newest windows, last pane, watermark "
             "lag and backlog from the job's metrics")
    @_answers
    def pipeline_health() -> dict[str, Any]:
        now = datetime.now(UTC)
        hours = store.latest("active_users", "hour", EPOCH, FAR)
        days = store.latest("active_users", "day", EPOCH, FAR)
        last_pane = max((r["emitted_at"] for r in hours + days), default=None)
        newest_hour = max((r["window_start"] for r in hours), default=None)
        newest_day = max((r["window_start"] for r in days), default=None)
        return {
            "store": store.name, "now": _iso(now), "last_pane_emitted_at": _iso(last_pane),
            "last_pane_age_s": round((now - last_pane).total_seconds(), 1) if last_pane
            else None,
            "newest_hour": _iso(newest_hour),
            "newest_day": newest_day.date().isoformat() if newest_day else None,
            "distinct_mode": config.distinct, "refresh_s": config.refresh_s,
            **health.job_metrics(config.metrics_url)}

    static = resources.files("serving").joinpath("static")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(str(static.joinpath("index.html")))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app

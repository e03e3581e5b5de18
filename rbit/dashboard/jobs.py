"""The recent jobs the dashboard shows, merged, bounded, filtered and paginated.

Outcomes come from the workers' history and live statuses from the status exchange.

One row per job (per queue and job id): its latest outcome. A job's statuses in order
are those seen live since the dashboard started (at most :data:`STATUSES_PER_JOB` of
each of the last :data:`JOBS_FOLLOWED` jobs).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any

#: Statuses that end a job (as :class:`rbit.outcome.Status` says).
FINAL = frozenset({"Done", "Failed", "Cancelled", "Uploaded"})
JOBS_FOLLOWED = 5_000
STATUSES_PER_JOB = 100
MAX_PER_PAGE = 200
#: The longest text kept from a status message (they come from runners).
MESSAGE_CHARS = 2_000


def _text(value: Any, limit: int = 300) -> str:
    return ("" if value is None else str(value))[:limit]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _unix(iso: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def _usage(value: Any) -> dict[str, float | None] | None:
    if not isinstance(value, dict):
        return None
    return {key: _number(value.get(key)) for key in ("wall_s", "cpu_s", "max_rss_kib")}


def history_row(item: dict[str, Any], worker: str) -> dict[str, Any]:
    """A worker's history item (``rbit ctl history``) as a dashboard row."""
    return {"job_id": _text(item.get("job_id"), 200), "queue": _text(item.get("queue"), 255),
            "status": _text(item.get("status"), 20), "attempt": _number(item.get("attempt")),
            "ended": _number(item.get("ended")), "duration": _number(item.get("duration")),
            "usage": _usage(item.get("usage")), "worker": _text(worker, 100),
            "message": _text(item.get("message"), MESSAGE_CHARS)}


def event_fields(event: dict[str, Any]) -> dict[str, Any]:
    """The fields of a status event the page shows, typed and bounded."""
    return {"job_id": _text(event.get("job_id"), 200), "queue": _text(event.get("queue"), 255),
            "status": _text(event.get("status"), 20), "worker": _text(event.get("worker"), 100),
            "time": _text(event.get("time"), 40), "usage": _usage(event.get("usage")),
            "message": _text(event.get("message"), MESSAGE_CHARS)}


class JobLog:
    """Recent outcomes and live statuses; safe to use from any thread.

    Args:
        rows_per_queue: Outcomes kept per queue, newest first.
    """

    def __init__(self, rows_per_queue: int) -> None:
        self._limit = rows_per_queue
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, dict[str, Any]]] = {}  # queue -> job id -> row
        self._statuses: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def add_history(self, rows: list[dict[str, Any]]) -> None:
        """Merge outcomes read from the workers' history."""
        with self._lock:
            touched = set()
            for row in rows:
                self._keep(row)
                touched.add(row["queue"])
            for queue in touched:
                self._trim(queue)

    def add_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """Record a live status event; returns its shown fields."""
        shown = event_fields(event)
        with self._lock:
            statuses = self._statuses.pop(shown["job_id"], [])
            statuses.append(shown)
            self._statuses[shown["job_id"]] = statuses[-STATUSES_PER_JOB:]
            while len(self._statuses) > JOBS_FOLLOWED:
                self._statuses.popitem(last=False)
            if shown["status"] in FINAL:
                usage = shown["usage"] or {}
                self._keep({**shown, "attempt": None, "ended": _unix(shown["time"]),
                            "duration": usage.get("wall_s")})
                self._trim(shown["queue"])
        return shown

    def _keep(self, row: dict[str, Any]) -> None:
        rows = self._rows.setdefault(row["queue"], {})
        old = rows.get(row["job_id"])
        if old is None or (row["ended"] or 0) >= (old["ended"] or 0):
            rows[row["job_id"]] = {k: v for k, v in row.items() if k != "time"}

    def _trim(self, queue: str) -> None:
        rows = self._rows.get(queue, {})
        if len(rows) > self._limit:
            newest = sorted(rows.values(), key=lambda r: r["ended"] or 0, reverse=True)
            self._rows[queue] = {r["job_id"]: r for r in newest[:self._limit]}

    def page(self, queue: str = "", status: str = "", page: int = 1,
             per_page: int = 50) -> dict[str, Any]:
        """One page of rows, newest first, filtered by queue and status ("" = any).

        Returns:
            ``{"rows", "page", "pages", "total"}``; ``page`` is clamped into range.
        """
        per_page = max(1, min(per_page, MAX_PER_PAGE))
        with self._lock:
            queues = [queue] if queue else list(self._rows)
            rows = [r for q in queues for r in self._rows.get(q, {}).values()
                    if not status or r["status"] == status]
        rows.sort(key=lambda r: r["ended"] or 0, reverse=True)
        pages = max(1, -(-len(rows) // per_page))
        page = max(1, min(page, pages))
        start = (page - 1) * per_page
        return {"rows": rows[start:start + per_page], "page": page, "pages": pages,
                "total": len(rows)}

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's statuses in order (as seen live) and its latest outcome per queue."""
        with self._lock:
            statuses = list(self._statuses.get(job_id, []))
            outcomes = [rows[job_id] for rows in self._rows.values() if job_id in rows]
        return {"job_id": job_id, "statuses": statuses, "outcomes": outcomes}

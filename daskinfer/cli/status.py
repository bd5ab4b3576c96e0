"""``daskinfer status``: the pipelines of a scheduler in the terminal, and the line of figures
that ``daskinfer run`` prints while it runs.

Both read the controller's time series (``daskinfer_pipeline_history`` on the scheduler): the
last sample's rates (requests and rows per second, errors per second), lag, mean batch size
and p50/p99 latency from read to written, per pipeline and per partition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Client

COLUMNS = ("PIPELINE", "PARTITION", "WORKER", "STATE", "REQ/S", "ROWS/S", "LAG", "BATCH", "P50", "P99", "ERRORS")


class NoController(RuntimeError):
    """The scheduler has no daskinfer controller (no pipeline was ever deployed there)."""


async def history_async(client: Client, name: str | None = None, last: int = 1) -> dict[str, dict[str, Any]]:
    """The latest ``last`` points of every pipeline (or of ``name``) on ``client``'s scheduler."""
    out = await client.scheduler.daskinfer_pipeline_history(name=name, last=last)
    if out is None:  # distributed answers None to an operation it has no handler for
        raise NoController(
            f"no daskinfer pipelines on {client.scheduler.address}: its scheduler has no daskinfer "
            "controller (no pipeline was deployed there)"
        )
    return out


def history(client: Client, name: str | None = None, last: int = 1) -> dict[str, dict[str, Any]]:
    return client.sync(history_async, client, name, last)


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 10 else f"{v:.2g}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g}ms"


def _last(points: Any) -> dict[str, Any] | None:
    points = list(points or [])
    return points[-1] if points else None


def figures_line(name: str, h: dict[str, Any]) -> str:
    """One line of a pipeline's latest figures (what ``daskinfer run`` prints)."""
    last = _last(h["points"])
    totals = h["totals"]
    head = f"{name}: {len(h['owners'])}/{h['partitions']} partitions"
    errors = f"errors {totals['errors']:,.0f}"
    if last is None:
        return f"{head}, {totals['answered']:,.0f} answered, {errors} (no rates yet)"
    return (
        f"{head}, {_rate(last['requests_s'])} req/s, {_rate(last['rows_s'])} rows/s, lag {last['lag']:,}, "
        f"batch {_rate(last['batch_rows'])}, p50 {_ms(last['p50'])}, p99 {_ms(last['p99'])}, {errors}"
    )


def status_table(pipelines: dict[str, dict[str, Any]]) -> str:
    """A table of every pipeline and its partitions (what ``daskinfer status`` prints)."""
    rows: list[tuple[str, ...]] = [COLUMNS]
    for name, h in sorted(pipelines.items()):
        last = _last(h["points"])

        def figures(p: dict[str, Any] | None, errors: Any) -> tuple[str, ...]:
            if p is None:
                return ("-",) * 6 + (f"{errors:,.0f}" if isinstance(errors, (int, float)) else "-",)
            return (
                _rate(p["requests_s"]),
                _rate(p["rows_s"]),
                f"{p['lag']:,}",
                _rate(p["batch_rows"]),
                _ms(p["p50"]),
                _ms(p["p99"]),
                f"{errors:,.0f}" if isinstance(errors, (int, float)) else "-",
            )

        rows.append((name, "all", "-", f"{len(h['owners'])}/{h['partitions']}", *figures(last, h["totals"]["errors"])))
        points = {int(p): pts for p, pts in (h.get("partition_points") or {}).items()}
        for p, owner in sorted((int(p), o) for p, o in h["owners"].items()):
            rows.append(
                (
                    name,
                    str(p),
                    str(owner.get("worker")),
                    str(owner.get("state")),
                    *figures(_last(points.get(p)), owner.get("errors")),
                )
            )
        for p, why in sorted((int(p), w) for p, w in (h.get("failures") or {}).items()):
            rows.append((name, str(p), "-", f"failed: {why}"[:60], *("-",) * 7))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    right = {i for i, c in enumerate(COLUMNS) if c not in ("PIPELINE", "WORKER", "STATE")}
    return "\n".join(
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )

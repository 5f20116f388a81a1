"""What ``processor dlq`` prints: the inspection and replay summaries (text for people, one JSON document
for machines), sample records and vendor payloads with secrets and PII masked, and progress (a bar on
a terminal, periodic log lines otherwise)."""

from __future__ import annotations

import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, quote_plus

import orjson
from pydantic import BaseModel, SecretStr

from processor.codec import Decoder
from processor.errors import DecodeError
from processor.redrive import RelayRecord
from processor.vendors.base import Adapter, VendorRequest

logger = logging.getLogger(__name__)

MASK = "***"
CONTACT_FIELDS = ("email", "phone", "first_name", "last_name")  # schemas/shop.events.Customer.avsc
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")  # not "event-relay@0.1.0"
BODY_MAX = 2000


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- masking -------------------------------------------------------------------------------------------
def mask_record(value: Any, key: str = "") -> Any:
    """A decoded event with the customer's contact fields masked and any e-mail address in a string."""
    if isinstance(value, dict):
        if key == "customer":
            return {k: (MASK if v is not None and k in CONTACT_FIELDS else mask_record(v, k)) for k, v in value.items()}
        return {k: mask_record(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_record(v, key) for v in value]
    if isinstance(value, str):
        return _EMAIL.sub("<email>", value)
    return value


def secrets_of(model: Any) -> set[str]:
    """Every secret value in a settings model (the sites' credentials)."""
    found: set[str] = set()
    if isinstance(model, SecretStr):
        value = model.get_secret_value()
        if value:
            found.add(value)
    elif isinstance(model, BaseModel):
        for name in type(model).model_fields:
            found |= secrets_of(getattr(model, name))
    elif isinstance(model, dict):
        for v in model.values():
            found |= secrets_of(v)
    elif isinstance(model, list | tuple | set | frozenset):
        for v in model:
            found |= secrets_of(v)
    return found


def _forms(value: str) -> set[str]:
    """How a value can appear in a URL, a form or a JSON body."""
    return {value, quote(value, safe=""), quote_plus(value), orjson.dumps(value).decode()[1:-1]}


def mask_text(text: str, hidden: set[str]) -> str:
    for value in sorted((f for v in hidden for f in _forms(v) if f), key=len, reverse=True):
        text = text.replace(value, MASK)
    return _EMAIL.sub("<email>", text)


def masked_request(adapter: Adapter[Any, Any], req: VendorRequest) -> dict[str, Any]:
    """A planned request as an operator may see it: the vendor's secrets and the events' contact data masked."""
    hidden = secrets_of(adapter.settings)
    for ev in req.events:
        customer = ev.record.get("customer") or {}
        hidden |= {str(customer[k]) for k in CONTACT_FIELDS if customer.get(k)}
    body = req.content.decode(errors="replace")
    return {"method": req.method, "url": mask_text(req.url, hidden),
            "headers": {k: mask_text(str(v), hidden) for k, v in req.headers.items()},
            "events": len(req.events),
            "body": mask_text(body[:BODY_MAX], hidden) + ("..." if len(body) > BODY_MAX else "")}


def sample(record: RelayRecord, decoder: Decoder) -> dict[str, Any]:
    """One dead-letter record for ``--show``: where it is, its headers decoded, its payload decoded and masked."""
    src = record.source
    out: dict[str, Any] = {
        "at": src.where(), "original": record.original_where(),
        "key": mask_text(src.key.decode(errors="replace"), set()) if src.key is not None else None,
        "headers": {k: mask_text(v.decode(errors="replace"), set()) if v is not None else None
                    for k, v in src.headers or ()},
    }
    try:
        kind, value = decoder.decode(src.value)
    except DecodeError as exc:
        out["payload_error"] = str(exc)
        return out
    out["kind"] = kind.value if kind is not None else None
    out["payload"] = mask_record(value)
    return out


# -- inspection --------------------------------------------------------------------------------------
def inspection_doc(found: Any, decoder: Decoder | None = None, group_of: Any = None) -> dict[str, Any]:
    vendors = {}
    for vendor, positions in sorted(found.positions.items()):
        vendors[vendor] = {"group": group_of(vendor) if group_of else None,
                           "position": {str(p): o for p, o in sorted(positions.items())},
                           "records": found.pending[vendor] + found.replayed[vendor],
                           "pending": found.pending[vendor], "replayed": found.replayed[vendor],
                           "unassigned_pending": found.unassigned_pending[vendor]}
    return {
        "topic": found.topic, "filters": found.filters.as_dict(), "scanned": found.scanned, "matched": found.matched,
        "counts": [{"vendor": v, "error_class": c, "http_status": int(s) if s else None, "records": n}
                   for (v, c, s), n in sorted(found.counts.items())],
        "oldest_failure": iso(found.oldest_ms), "newest_failure": iso(found.newest_ms),
        "top_reasons": [{"reason": r, "records": n} for r, n in found.reasons.most_common(10)],
        "replay_counts": {str(k): n for k, n in sorted(found.replay_counts.items())},
        "vendors": vendors,
        "samples": [sample(r, decoder) for r in found.samples] if decoder is not None else [],
    }


def inspection_text(doc: dict[str, Any]) -> str:
    lines = [f"dead-letter topic {doc['topic']}: {doc['scanned']} records, {doc['matched']} match"
             + (f" ({_filters(doc['filters'])})" if doc["filters"] else "")]
    if doc["matched"]:
        lines.append(f"failures from {doc['oldest_failure']} to {doc['newest_failure']}")
        lines += ["", f"{'vendor':<14}{'error class':<14}{'status':>7}{'records':>9}"]
        for row in doc["counts"]:
            lines.append(f"{row['vendor']:<14}{row['error_class']:<14}{row['http_status'] or '-':>7}"
                         f"{row['records']:>9}")
        lines += ["", "top reasons:"] + [f"{r['records']:>8}  {r['reason']}" for r in doc["top_reasons"]]
        lines.append("replay counts: " + ", ".join(f"{k} replays: {n}" for k, n in doc["replay_counts"].items()))
    if doc["vendors"]:
        lines += ["", "per vendor (pending: after the vendor's replay position; replayed: before it):"]
        for vendor, v in doc["vendors"].items():
            extra = f", plus {v['unassigned_pending']} of no vendor" if v["unassigned_pending"] else ""
            lines.append(f"  {vendor:<12} pending {v['pending']:>6}{extra}   replayed {v['replayed']:>6}"
                         f"   (group {v['group']})")
    for s in doc["samples"]:
        lines += ["", f"record {s['at']} (from {s['original']}):",
                  orjson.dumps(s, option=orjson.OPT_INDENT_2).decode()]
    return "\n".join(lines)


def _filters(filters: dict[str, Any]) -> str:
    return ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in filters.items())


# -- replay -------------------------------------------------------------------------------------------
def replay_doc(result: Any) -> dict[str, Any]:
    doc = {"vendor": result.vendor, "group": result.group, "dry_run": result.dry_run, "total": result.total,
           **result.summary, "pending": result.pending, "complete": result.complete,
           "interrupted": result.interrupted, "commit_failed": result.commit_failed,
           "committed": {str(p): o for p, o in sorted(result.committed.items())},
           "reports": [{"decision": r.decision.value, "at": r.where, "original": r.original, "reason": r.reason}
                       for r in result.reports],
           "elapsed_s": result.elapsed_s}
    if result.dry_run:
        doc["plan"] = result.plan
    return doc


def replay_text(doc: dict[str, Any]) -> str:
    verb = "would replay" if doc["dry_run"] else "replayed"
    lines = [f"{'dry run: ' if doc['dry_run'] else ''}{doc['vendor']} (group {doc['group']}): "
             f"{doc['scanned']} of {doc['total']} records scanned, {doc['replayed']} {verb}"]
    if doc["dry_run"]:
        plan = doc["plan"]
        lines.append(f"  {plan['requests']} requests planned for {plan['events']} events; the adapter would "
                     f"reject {plan['would_reject']} and filter {plan['would_filter']}; "
                     "nothing sent, nothing committed")
        lines += [f"  would reject {r['count']}: {r['reason']}" for r in plan["reject_reasons"]]
    else:
        lines.append(f"  delivered {doc['delivered']}, filtered by the vendor's rules {doc['filtered_by_vendor']}, "
                     f"failed again {doc['failed_again']} (written back with replay_count + 1)")
    lines.append(f"  skipped {doc['skipped']}: other vendors {doc['skipped_other_vendor']}, not matching the filters "
                 f"{doc['skipped_by_filter']}, kind not taken {doc['skipped_kind_not_taken']}")
    lines.append(f"  at the maximum of replays (not sent) {doc['at_max_replays']}, "
                 f"still undecodable {doc['still_undecodable']}")
    for r in doc["reports"]:
        lines.append(f"  {r['decision']}: {r['at']} (from {r['original']}): {r['reason']}")
    if doc["dry_run"]:
        for s in doc["plan"]["samples"]:
            lines += ["", f"sample request ({s['events']} events):",
                      orjson.dumps(s, option=orjson.OPT_INDENT_2).decode()]
    elif doc.get("commit_failed"):
        lines.append("  every record settled, but the final position could not be committed (see the log); "
                     "the next run repeats what settled since the last commit")
    elif doc["complete"]:
        lines.append(f"  done in {doc['elapsed_s']:.1f}s; position {_positions(doc['committed'])}")
    else:
        lines.append(f"  stopped with {doc['pending']} records pending; position {_positions(doc['committed'])}; "
                     "run the same command again to resume")
    return "\n".join(lines)


def _positions(committed: dict[str, int]) -> str:
    return ", ".join(f"{p}@{o}" for p, o in committed.items()) or "unchanged"


class ProgressReporter:
    """A progress bar on a terminal (stderr); a log line every ``interval_s`` otherwise (a Kubernetes Job)."""

    def __init__(self, vendor: str, interval_s: float = 10.0, tty: bool | None = None) -> None:
        self.vendor = vendor
        self.interval_s = interval_s
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._next = time.monotonic() + interval_s
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, s: dict[str, Any]) -> None:
        if self.tty:
            self._draw(s)
        elif time.monotonic() >= self._next:
            self._next = time.monotonic() + self.interval_s
            eta = (s["total"] - s["scanned"]) / s["rate"] if s["rate"] else None
            logger.info("replay to %s: %d of %d scanned, %d replayed, %d delivered, %d skipped, %d failed again, "
                        "%.0f records/s, eta %s", self.vendor, s["scanned"], s["total"], s["replayed"],
                        s["delivered"], s["skipped"], s["failed_again"], s["rate"],
                        f"{eta:.0f}s" if eta is not None else "-")

    def _draw(self, s: dict[str, Any]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self._bar is None:
            self._bar = Progress(TextColumn(f"{self.vendor}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[detail]}"), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("replay", total=s["total"], detail="")
        detail = (f"replayed {s['replayed']} delivered {s['delivered']} skipped {s['skipped']} "
                  f"failed {s['failed_again']} {s['rate']:.0f}/s")
        self._bar.update(self._task, completed=s["scanned"], detail=detail)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

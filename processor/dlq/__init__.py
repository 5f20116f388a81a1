"""``processor dlq``: inspect the dead-letter topic and replay it to one vendor.

``topic`` reads the dead-letter topic from a position to its end as of the call (the vendor's replay
group ``<kafka.group_id>.replay.<vendor>`` holds the position); ``inspection`` sums it up; ``replay``
runs one bounded, resumable replay through ``processor.redrive``; ``view`` prints both for people
(text) and machines (JSON), with secrets and PII masked.
"""

from __future__ import annotations

from processor.dlq.inspection import Inspection, inspect
from processor.dlq.replay import RateCap, ReplayOptions, ReplayResult, run_replay
from processor.dlq.topic import DlqTopic, check_vendor, parse_offsets, parse_when, replay_group

__all__ = ["DlqTopic", "Inspection", "RateCap", "ReplayOptions", "ReplayResult", "check_vendor", "inspect",
           "parse_offsets", "parse_when", "replay_group", "run_replay"]

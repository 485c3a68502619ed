"""A run's tags, note and baseline mark: `annotations.json` in its folder (so they survive restarts and travel
with the folder), one schema, written atomically.

Values come from the page, so every one is checked here (and the page shows the message): a tag is 1-32
characters of letters, digits, `_ . + -`; at most 12 tags; a note is at most 1000 characters without control
characters other than newlines and tabs. Only one run is the baseline at a time (`RunStore.set_baseline`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from shared.fsutil import write_json_atomic

ANNOTATIONS_FILE = "annotations.json"
SCHEMA_VERSION = 1
MAX_TAGS = 12
MAX_TAG_LEN = 32
MAX_NOTE_LEN = 1000
_TAG = re.compile(r"^[A-Za-z0-9_.+\-]{1,%d}$" % MAX_TAG_LEN)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class AnnotationError(ValueError):
    """A tag or note that may not be stored; the message names the problem and the fix."""


@dataclass(frozen=True)
class Annotations:
    tags: tuple[str, ...] = ()
    note: str = ""
    baseline: bool = False  # pinned: included in every comparison
    schema_version: int = field(default=SCHEMA_VERSION)

    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "tags": list(self.tags), "note": self.note,
                "baseline": self.baseline}

    @classmethod
    def from_dict(cls, data: dict) -> "Annotations":
        """Checked as strictly as page input: a hand-edited file cannot smuggle what the page would refuse."""
        if data.get("schema_version") != SCHEMA_VERSION:
            raise AnnotationError(f"{ANNOTATIONS_FILE} has schema_version {data.get('schema_version')!r}; "
                                  f"expected {SCHEMA_VERSION}")
        return cls(tags=parse_tags(data.get("tags") or []), note=check_note(data.get("note") or ""),
                   baseline=data.get("baseline") is True)


def parse_tags(value) -> tuple[str, ...]:
    """Tags from a comma/space separated text or a list; duplicates dropped, order kept."""
    if isinstance(value, str):
        if len(value) > MAX_TAGS * (MAX_TAG_LEN + 2):
            raise AnnotationError(f"too many tags: at most {MAX_TAGS} of at most {MAX_TAG_LEN} characters")
        value = [t for t in re.split(r"[,\s]+", value) if t]
    if not isinstance(value, (list, tuple)) or len(value) > MAX_TAGS:
        raise AnnotationError(f"expected at most {MAX_TAGS} tags, separated by commas or spaces")
    tags: list[str] = []
    for tag in value:
        if not isinstance(tag, str) or not _TAG.match(tag):
            shown = repr(tag) if len(repr(tag)) <= 40 else repr(tag)[:37] + "..."
            raise AnnotationError(f"tag {shown} is not allowed: use 1-{MAX_TAG_LEN} letters, digits or _ . + -")
        if tag not in tags:
            tags.append(tag)
    return tuple(tags)


def check_note(value) -> str:
    if not isinstance(value, str):
        raise AnnotationError("a note must be text")
    if len(value) > MAX_NOTE_LEN:
        raise AnnotationError(f"the note has {len(value)} characters; shorten it to at most {MAX_NOTE_LEN}")
    if _CONTROL.search(value):
        raise AnnotationError("the note contains control characters; use plain text (newlines are fine)")
    return value.strip()


def read_annotations(run_dir: Path) -> Annotations:
    """The run's annotations; empty ones when the file is missing. A damaged file reads as empty (its run still
    lists) — the next save replaces it."""
    try:
        data = json.loads((Path(run_dir) / ANNOTATIONS_FILE).read_bytes())
        return Annotations.from_dict(data) if isinstance(data, dict) else Annotations()
    except FileNotFoundError:
        return Annotations()
    except (ValueError, OSError):  # not JSON, not UTF-8, not our schema, unreadable
        return Annotations()


def write_annotations(run_dir: Path, annotations: Annotations) -> Path:
    return write_json_atomic(Path(run_dir) / ANNOTATIONS_FILE, annotations.to_dict())

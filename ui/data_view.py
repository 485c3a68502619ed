"""Pure views for the Data tab: the summaries of a quick scan and of the full check, the class-count frame, the
image-size table and the check's findings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from .formatting import DASH, md_code, md_escape, plural


def no_dataset_text(roots: Iterable[Any]) -> str:
    """What to do when no dataset folder was found in the data roots."""
    listed = ", ".join(md_code(str(r)) for r in roots)
    return (f"No dataset found yet in the data folders ({listed}). Put a folder with one sub-folder of images "
            "per class there and press **Refresh list**, upload a .zip of class folders, or download the "
            "flowers sample set.")


def scan_summary(classes: int, files: int, root: Path) -> str:
    """The quick look's headline (file names only, nothing decoded yet)."""
    return (f"**{classes} classes, {files} image files** in {md_code(root)}. "
            "Press **Check all images** to decode every file and find broken ones, duplicates and label conflicts.")


def check_summary(report: Mapping[str, Any], root: Path) -> str:
    """The full check's headline: classes, usable images, imbalance."""
    return (f"**{len(report['classes'])} classes, {report['total']} usable images** in "
            f"{md_code(root)} (largest / smallest class: {report['imbalance_ratio']:.1f}).")


def counts_frame(counts: Mapping[str, int]):
    import pandas as pd

    return pd.DataFrame({"class": list(counts), "images": [int(v) for v in counts.values()]})


def size_stats_markdown(sizes: Mapping[str, Any] | None) -> str:
    if not sizes:
        return ""
    rows = ["| | min | median | max |", "|---|---:|---:|---:|"]
    def num(v):
        return f"{v:g}" if isinstance(v, (int, float)) else DASH

    for key, label, unit in (("width", "width", " px"), ("height", "height", " px"), ("aspect", "aspect (w/h)", "")):
        s = sizes.get(key) or {}
        rows.append(f"| {label} | {num(s.get('min'))}{unit} | {num(s.get('median'))}{unit} | {num(s.get('max'))}{unit} |")
    return "\n".join(rows)


def problems_markdown(report: Mapping[str, Any], limit: int = 8) -> str:
    """The dataset check's findings as a short list, with examples of unreadable files."""
    lines = []
    problems = report.get("problems") or []
    if not problems:
        lines.append("✔ **No problems found.**")
    else:
        lines.append(f"**{plural(len(problems), 'problem')} found:**")
        lines += [f"- {md_escape(p)}" for p in problems]
    unreadable = report.get("unreadable") or []
    if unreadable:
        lines.append("")
        lines.append(f"**Unreadable files (skipped):** {len(unreadable)}")
        lines += [f"- {md_code(u['path'])} — {md_escape(u['reason'])}" for u in unreadable[:limit]]
        if len(unreadable) > limit:
            lines.append(f"- … and {len(unreadable) - limit} more")
    ignored = report.get("ignored") or []
    if ignored:
        lines.append("")
        lines.append(f"Ignored {plural(len(ignored), 'file')} that are not images, e.g. "
                     + ", ".join(f"{md_code(i['path'])}" for i in ignored[:3]))
    return "\n".join(lines)

"""Helpers for the browser end-to-end test: `resnet-lab up` as a subprocess, Debian's Chromium through Playwright,
bounded waits with readable failures, screenshots, and small readers for Gradio's DOM (tables, Vega plots, images).

Everything binds 127.0.0.1. Selectors are the page's elem_ids (`#runs-table`) plus ARIA roles and Gradio's own
data-testid attributes — never positions in the layout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from shared.launch.services import find_free_port, popen_in_own_group
from tests.procs import clean_env, wait_for

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts" / "e2e"
CHROMIUM = "/usr/bin/chromium"
# no sandbox (CI runs as root in a container); nothing that would call out of the machine
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic"]
READY_LINE = "resnet-lab is up: open "
# Every process `up` starts inherits this variable; finding it in /proc/<pid>/environ finds what was left behind.
MARKER_VAR = "RESNET_LAB_E2E_MARKER"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.5,
               describe: Callable[[], str] | None = None, page=None):
    """tests.procs.wait_for with a slower default pace; with `page`, the poll sleeps through Playwright (so its
    events keep flowing)."""
    sleep = time.sleep if page is None else (lambda seconds: page.wait_for_timeout(seconds * 1000))
    return wait_for(predicate, timeout, what, interval, describe=describe, sleep=sleep)


# --- the app ------------------------------------------------------------------------------------------------

class UpApp:
    """`python -m shared.cli up --gpus cpu` with its own models folder, data roots and port, output in a log file."""

    def __init__(self, root: Path, data_root: Path, *, port: int | None = None, extra_env: dict | None = None):
        self.root = Path(root)
        self.models = self.root / "models"
        self.data_root = Path(data_root)
        self.port = port or find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "up.log"
        self.marker = uuid.uuid4().hex
        env = clean_env()
        env.update({
            "RESNET_LAB_MODELS_DIR": str(self.models), "RESNET_LAB_DATA_ROOTS": str(self.data_root),
            "RESNET_LAB_PORT": str(self.port), "RESNET_LAB_WORKER_THREADS": "1",
            "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "GRADIO_TEMP_DIR": str(self.root / "gradio-tmp"), MARKER_VAR: self.marker, **(extra_env or {}),
        })
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "UpApp":
        with open(self.log_path, "wb") as out:
            # own group so a crashed test can still kill everything; die_with_parent: pytest gone, `up` gone
            self.proc = popen_in_own_group([sys.executable, "-m", "shared.cli", "up", "--gpus", "cpu"], env=self.env,
                                           cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        return self

    def log(self, tail: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:] if tail else text

    def wait_ready(self, timeout: float = 120.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"`resnet-lab up` exited with {self.proc.returncode} before the page was up:\n"
                                     f"{self.log()}")
            return READY_LINE in self.log(0)

        wait_until(ready, timeout, "`resnet-lab up` to print that the page is up", interval=0.2,
                   describe=lambda: self.log(2000))

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM to `up` itself (as Ctrl-C or a service manager would); its return code, None if it hung."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def leftovers(self) -> list[str]:
        """'pid command' of every live process that `up` started (found by the marker in its environment)."""
        needle = f"{MARKER_VAR}={self.marker}".encode()
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "Z":  # a zombie has exited; its parent reaps it
                    continue
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:  # gone meanwhile, or not ours to read
                continue
            out.append(f"{entry.name} {cmd}")
        return out

    def kill_all(self) -> None:
        """Last resort after a failure: SIGKILL `up`'s group and anything else that carries the marker."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        for line in self.leftovers():
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- the browser --------------------------------------------------------------------------------------------

class Shots:
    """Numbered full-page screenshots in `folder` (emptied of old ones first)."""

    def __init__(self, page, folder: Path = ARTIFACTS):
        self.page, self.folder, self.n = page, Path(folder), 0
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.png"):
            old.unlink()

    def take(self, name: str) -> Path:
        self.n += 1
        path = self.folder / f"{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def failure(self, step: str) -> Path | None:
        path = self.folder / f"FAILED-{re.sub(r'[^a-z0-9]+', '-', step.lower()).strip('-')}.png"
        try:
            self.page.screenshot(path=str(path), full_page=True, timeout=15_000)
        except Exception:  # noqa: BLE001 - a dead browser must not hide the real failure
            return None
        return path


def open_tab(page, name: str) -> None:
    """Click a top-level tab by its elem_id (`tab-<name>`; Gradio names the button `tab-<name>-button`)."""
    page.click(f"#tab-{name}-button")
    page.wait_for_selector(f"#tab-{name}", state="visible", timeout=15_000)


def pick_option(page, dropdown: str, text: str, timeout: float = 15_000) -> None:
    """Open the Gradio dropdown `dropdown` (a CSS selector of the component) and click the option containing `text`."""
    page.click(f"{dropdown} input[role=combobox]")
    listbox = page.get_attribute(f"{dropdown} input[role=combobox]", "aria-controls")
    option = page.locator(f"#{listbox} [role=option]", has_text=text).first
    option.wait_for(state="visible", timeout=timeout)
    option.click()


def md_text(page, selector: str) -> str:
    """Visible text of a component ('' when absent)."""
    el = page.query_selector(selector)
    return el.inner_text().strip() if el else ""


def wait_text(page, selector: str, text: str, timeout: float = 20) -> str:
    """Wait until the visible text of `selector` contains `text`; returns that text."""
    return wait_until(lambda: text in md_text(page, selector) and md_text(page, selector), timeout,
                      f"{text!r} in {selector}", page=page, interval=0.25,
                      describe=lambda: repr(md_text(page, selector)[:500]))


def table_rows(page, selector: str) -> list[list[str]]:
    """Cell texts of a Gradio Dataframe's body rows (ARIA grid rows that have cells; the header has none)."""
    return page.evaluate(
        """sel => Array.from(document.querySelectorAll(sel + ' [role=row]'))
               .map(row => Array.from(row.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))
               .filter(cells => cells.length)""", selector)


def table_cell(page, selector: str, row_text: str):
    """Locator of the first cell of the Dataframe row containing `row_text`."""
    return page.locator(f"{selector} [role=row]", has_text=row_text).first.locator("[role=gridcell]").first


def vega_marks(page, selector: str, kind: str) -> int:
    """Drawn marks of one kind ('line', 'symbol', 'rect') in the Vega plot of a Gradio native plot."""
    return page.evaluate(
        """([sel, kind]) => Array.from(document.querySelectorAll(`${sel} .mark-${kind}.role-mark path`))
               .filter(p => (p.getAttribute('d') || '').length > 4).length""", [selector, kind])


def vega_series(page, selector: str, field: str = "run") -> list[dict]:
    """Every line of a Gradio LinePlot: its color-field value (from Vega's aria-label, e.g. 'run: <label>') and
    stroke (None when Vega gave it no colour, i.e. it is invisible)."""
    return page.evaluate(
        """([sel, field]) => Array.from(document.querySelectorAll(`${sel} .mark-line.role-mark path`))
               .filter(p => (p.getAttribute('d') || '').length > 4)
               .map(p => ({name: ((p.getAttribute('aria-label') || '').match(new RegExp(field + ': (.*)$'))
                                  || [null, ''])[1],
                           stroke: p.getAttribute('stroke')}))""", [selector, field])


def vega_legend(page, selector: str) -> list[str]:
    """Labels in a Vega plot's legend."""
    return page.evaluate(
        """sel => Array.from(document.querySelectorAll(`${sel} .role-legend-label text`)).map(t => t.textContent)""",
        selector)


def vega_axis_labels(page, selector: str, axis: str = "X") -> list[str]:
    """Tick labels of a Vega plot's x ("X") or y ("Y") axis (found by the axis' aria-label, 'X-axis titled …')."""
    return page.evaluate(
        """([sel, axis]) => Array.from(document.querySelectorAll(`${sel} g.role-axis`))
               .filter(g => (g.getAttribute('aria-label') || '').startsWith(axis + '-axis'))
               .flatMap(g => Array.from(g.querySelectorAll('.role-axis-label text')).map(t => t.textContent))""",
        [selector, axis])


def vega_legend_cut(page, selector: str) -> list[str]:
    """Legend labels of a Vega plot that are not shown whole: shortened with '…' or reaching past the plot's edge."""
    return page.evaluate(
        """sel => { const svg = document.querySelector(`${sel} svg`); if (!svg) return [];
               const box = svg.getBoundingClientRect();
               return Array.from(svg.querySelectorAll('.role-legend-label text'))
                   .filter(t => t.textContent.includes('…') || t.getBoundingClientRect().right > box.right + 1
                                || t.getBoundingClientRect().left < box.left - 1)
                   .map(t => t.textContent); }""", selector)


def vega_bar_heights(page, selector: str) -> list[float]:
    """Heights in pixels of the bars of a Gradio BarPlot (a bar of height 0 is drawn but invisible)."""
    return page.evaluate(
        """sel => Array.from(document.querySelectorAll(`${sel} .mark-rect.role-mark path`))
               .map(p => p.getBBox().height)""", selector)


def images(page, selector: str) -> list[dict]:
    """Every <img> under `selector`: src, complete, naturalWidth (a broken image is complete with width 0)."""
    return page.evaluate(
        """sel => Array.from(document.querySelectorAll(sel + ' img')).map(
               i => ({src: i.currentSrc || i.src, complete: i.complete, width: i.naturalWidth}))""", selector)


def loaded_images(page, selector: str) -> list[dict]:
    return [i for i in images(page, selector) if i["complete"] and i["width"] > 0]


def clipped_images(page, selector: str) -> list[dict]:
    """<img>s under `selector` that an ancestor with hidden/scrolling overflow cuts (src, and by how many px)."""
    return page.evaluate(
        """sel => Array.from(document.querySelectorAll(sel + ' img')).flatMap(img => {
               const r = img.getBoundingClientRect(), out = [];
               for (let el = img.parentElement; el && el !== document.body; el = el.parentElement) {
                   if (getComputedStyle(el).overflowY === 'visible') continue;
                   const c = el.getBoundingClientRect();
                   const top = c.top - r.top, bottom = r.bottom - c.bottom;
                   if (top > 1 || bottom > 1) { out.push({src: img.currentSrc, top, bottom}); break; }
               }
               return out; })""", selector)


def covered_images(page, selector: str) -> list[dict]:
    """<img>s under `selector` whose drawn picture (object-fit: contain, so maybe inset in its box) lies partly under
    the component's floating label (Gradio's block-label); src and the overlap in px."""
    return page.evaluate(
        """sel => { const label = document.querySelector(sel + ' [data-testid=block-label]'); if (!label) return [];
               const l = label.getBoundingClientRect();
               return Array.from(document.querySelectorAll(sel + ' img')).flatMap(img => {
                   const r = img.getBoundingClientRect();
                   if (!img.naturalWidth || !img.naturalHeight) return [];
                   const scale = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
                   const w = img.naturalWidth * scale, h = img.naturalHeight * scale;
                   const left = r.left + (r.width - w) / 2, top = r.top + (r.height - h) / 2;
                   const dx = Math.min(l.right, left + w) - Math.max(l.left, left);
                   const dy = Math.min(l.bottom, top + h) - Math.max(l.top, top);
                   return dx > 1 && dy > 1 ? [{src: img.currentSrc, overlap: [Math.round(dx), Math.round(dy)]}] : [];
               }); }""", selector)


def broken_images(page, selector: str) -> list[str]:
    return [i["src"] for i in images(page, selector) if i["complete"] and i["width"] == 0]


def record_event_calls(page) -> list[str]:
    """Bodies of the event calls the page sends from now on: each POST to the queue's `join` runs one handler once
    (count the ones that carry a file's name to see how often an upload was handled)."""
    bodies: list[str] = []
    page.on("request", lambda r: bodies.append(r.post_data or "")
            if r.method == "POST" and "/queue/join" in r.url else None)
    return bodies


def toasts(page, kind: str = "error") -> list[str]:
    """Texts of Gradio's toast messages of `kind` (error, warning, info) now on the page."""
    return [t.strip() for t in page.locator(f"[data-testid=toast-body].{kind} [data-testid=toast-text]")
            .all_inner_texts()]


# --- the Runs tab's own SVG charts (ui/charts.py) -------------------------------------------------------------

def chart_series(page, selector: str) -> list[dict]:
    """Every drawn series of an SVG chart of ui/charts.py: its full name, its line's colour and dash, and how many
    point markers it shows."""
    return page.evaluate(
        """sel => Array.from(document.querySelectorAll(`${sel} svg.chart-svg g.series`)).map(g => {
               const line = g.querySelector('polyline');
               return {name: g.getAttribute('data-series'), stroke: line && getComputedStyle(line).stroke,
                       dashed: !!(line && line.getAttribute('stroke-dasharray')),
                       points: g.querySelectorAll('.point').length}; })""", selector)


def chart_legend(page, selector: str) -> list[dict]:
    """The chart's legend entries as shown: text, and whether any is cut (wider than its box, or hidden)."""
    return page.evaluate(
        """sel => Array.from(document.querySelectorAll(`${sel} .chart-legend li .legend-name`)).map(el => ({
               text: el.innerText.trim(), cut: el.scrollWidth > el.clientWidth + 1 || el.offsetParent === null}))""",
        selector)


def chart_axis_labels(page, selector: str, axis: str = "x") -> list[str]:
    """Tick labels of an SVG chart's x or y axis."""
    return page.evaluate(
        """([sel, axis]) => Array.from(document.querySelectorAll(`${sel} svg.chart-svg g.axis-${axis} text.tick`))
               .map(t => t.textContent)""", [selector, axis])

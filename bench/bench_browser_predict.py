"""Issue 17 — a photo dropped in the browser: how long after its upload completes does the page show the label?

Starts a private Redis and the page with one finished run (ResNet18, 224 px, random weights: latency does not
depend on them), opens the Predict tab in headless Chromium and sets a photo on its image input, `--photos` times
(different photos, each dropped over the last, after `--warmup` ones). Both instants are taken inside the page, on one clock
(`performance.now()`): the upload's `responseEnd` from the browser's Resource Timing entries, and the first
mutation of the Top-5 label after it (a MutationObserver). p50/p95 of the difference; target p95 <= 300 ms.

Run:    .venv/bin/python bench/bench_browser_predict.py --json bench/results/browser_predict.json
quick:  .venv/bin/python bench/bench_browser_predict.py --quick
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_MS = 300.0

# Resets the marks, then records every change of the Top-5 label (while it shows a label).
WATCH = """() => {
  window.__labelAt = [];
  const label = document.querySelector('#predict-label');
  if (window.__observer) window.__observer.disconnect();
  window.__observer = new MutationObserver(() => {
    if (label.innerText.trim().length > 0) window.__labelAt.push(performance.now());
  });
  window.__observer.observe(label, {subtree: true, childList: true, characterData: true});
  performance.clearResourceTimings();
}"""
# The upload's end and the label's first change after it, or null while either is missing.
READ = """() => {
  const ups = performance.getEntriesByType('resource').filter(e => e.name.includes('/gradio_api/upload'));
  if (!ups.length) return null;
  const end = ups[ups.length - 1].responseEnd;
  const after = window.__labelAt.filter(t => t > end);
  return after.length ? {upload_end: end, label_at: after[0]} : null;
}"""


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=20, help="photos dropped (measured)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    args = common.parse(parser, argv, __file__)
    model_name, env = "resnet18", {}
    if args.quick:  # the tiny ResNet: the same page and browser, each answer a fraction of ResNet18's CPU time
        args.photos, args.warmup, args.image_size = 3, 1, 64
        model_name, env = common.use_tiny_model(), common.quick_env()

    from playwright.sync_api import sync_playwright

    common.ensure_repo_on_path()
    from tests.browser import CHROMIUM_ARGS

    from bench_predict_latency import sample_images

    print(f"load before: {common.loadavg()}")
    classes, photos = sample_images(args.data_dir, args.photos + args.warmup)
    gaps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_browser_predict_") as tmp:
        work = Path(tmp)
        models = work / "models"
        common.make_run(models, str(args.data_dir), classes, args.image_size, model_name=model_name)
        with common.Stack(work, models, [args.data_dir], env=env) as stack, sync_playwright() as pw:
            stack.start_redis()
            stack.start_page()
            browser = pw.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                                         args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(stack.url, wait_until="load")
            page.get_by_role("tab", name="Predict").click()
            file_input = page.locator("#predict-image input[type=file]")
            # the tab renders its components after the click: WATCH needs the label in the document (a fast click
            # on a loaded machine once found none: "parameter 1 is not of type 'Node'")
            page.locator("#predict-label").wait_for(state="attached")
            for i, photo in enumerate(photos):
                page.evaluate(WATCH)
                file_input.set_input_files(str(photo))
                marks = None
                deadline = time.monotonic() + 60
                while marks is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                    marks = page.evaluate(READ)
                if marks is None:
                    raise SystemExit(f"no label after dropping {photo.name} (60 s)")
                if i >= args.warmup:
                    gaps.append(marks["label_at"] - marks["upload_end"])
                # the next photo is dropped over this one: let its heat-map arrive first, so answers do not overlap
                # (the tiny model's comes at once; a drop during an answer waits for it: trigger_mode="always_last")
                if i < len(photos) - 1:
                    page.wait_for_timeout(300 if args.quick else 1500)
            browser.close()

    ordered = sorted(gaps)
    p50, p95 = common.percentile(ordered, 50), common.percentile(ordered, 95)
    print(f"\nphoto dropped in Chromium → label shown, after the upload completes ({len(gaps)} photos, ResNet18 "
          f"{args.image_size} px): p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {ordered[-1]:.0f} ms "
          f"(target p95 <= {TARGET_MS:.0f} ms: {common.verdict(p95 <= TARGET_MS, args.quick)})")
    result = {"photos": len(gaps), "model": model_name, "image_size": args.image_size,
              "gaps_ms": [round(g, 1) for g in gaps],
              "p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "target_ms": TARGET_MS}
    return common.finish(args, "browser_predict", result)


if __name__ == "__main__":
    main()

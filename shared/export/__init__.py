"""Export a run's model for use outside resnet-lab: `export_run(run_dir, fmt, out_dir)` writes the bundle
(model, classes, preprocessing, calibration, model card, standalone predict.py), `zip_bundle` packs it."""

from shared.export.bundle import FORMATS, ExportError, default_bundle_dir, export_run, zip_bundle

__all__ = ["FORMATS", "ExportError", "default_bundle_dir", "export_run", "zip_bundle"]

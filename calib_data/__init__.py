"""Calibration data: which images (``sources``), how they are read (``images``), how they become graph
inputs (``batches``, through the runtime's ``prepare_batch``), provenance hashes (``provenance``) and a
Polygraphy data-loader writer (``polygraphy_loader``)."""

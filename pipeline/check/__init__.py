"""`circularity-check`: per-image pupil/iris geometry, pass/fail rules, quality figures, folder runs,
summaries, plots and image-set metrics (KID). Pure NumPy/OpenCV; imports only `pipeline.common`."""

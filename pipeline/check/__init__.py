"""`circularity-check`: per-image pupil/iris geometry, pass/fail rules, quality figures, folder runs,
summaries, plots and image-set metrics (KID). Pure NumPy/OpenCV; imports only `pipeline.common`."""

# What the worker processes of `pipeline.check.folder.analyze_folder` import: here, where a caller can
# name it to start their server early (`pipeline.common.pool.start_pool_server`) without importing it.
POOL_PRELOAD = ("pipeline.check.folder", "numpy.random")  # NumPy imports its random module on first use

"""The benchmark harness (``specdec bench``) and the scripts whose results live in RESULTS.md."""

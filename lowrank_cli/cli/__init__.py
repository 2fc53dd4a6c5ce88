"""The `lrc` command: one module per command, a thin layer over the Python API, one error boundary (app.py)."""

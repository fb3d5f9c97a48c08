class EffjaxError(Exception):
    """A user mistake: main.py prints it as one line and exits non-zero."""

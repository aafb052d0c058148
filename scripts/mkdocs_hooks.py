"""MkDocs hooks for the documentation build (``hooks:`` in mkdocs.yml).

``--strict`` turns every griffe docstring warning into a build failure, which is what keeps the API
reference honest. Two source files are exempt for now, because their docstrings list several
parameters on one line (``min_width, min_height, min_derivative:``) or leave a parameter untyped
(``kernel``), and they are being rewritten for speed elsewhere:
``src/pushforward/transforms/coupling.py`` and ``src/pushforward/transforms/splines.py``.
Delete the entries of ``EXEMPT`` once those docstrings are fixed.
"""

from __future__ import annotations

import logging

EXEMPT = ("src/pushforward/transforms/coupling.py:", "src/pushforward/transforms/splines.py:")


class _DropExempt(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        message = record.getMessage()
        return not any(path in message for path in EXEMPT)


def on_startup(command: str, dirty: bool) -> None:
    logging.getLogger("mkdocs.plugins.griffe").addFilter(_DropExempt())

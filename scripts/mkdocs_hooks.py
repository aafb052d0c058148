"""MkDocs hooks for the documentation build (``hooks:`` in mkdocs.yml).

``--strict`` turns every griffe docstring warning into a build failure, which is what keeps the API
reference honest. ``EXEMPT`` lists source files (``"path:"`` prefixes of griffe's messages) whose
warnings are hidden instead; it is empty, and should stay so: fix a docstring rather than exempt it.
"""

from __future__ import annotations

import logging

EXEMPT: tuple[str, ...] = ()


class _DropExempt(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        message = record.getMessage()
        return not any(path in message for path in EXEMPT)


def on_startup(command: str, dirty: bool) -> None:
    logging.getLogger("mkdocs.plugins.griffe").addFilter(_DropExempt())

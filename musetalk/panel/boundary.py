"""The operator-error boundary: what an action raises becomes a readable `gr.Error`, never a traceback."""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from typing import Any

import gradio as gr
from loguru import logger

from musetalk.errors import MuseTalkError

PROGRESS = gr.Progress()  # a default-argument marker: Gradio gives each call its own tracker in its place


def message(text: str) -> str:
    """Operator text for a gr.Error (rendered as HTML in the browser: escape it, keep line breaks)."""
    return html.escape(text.strip(), quote=False)


def duration_for(text: str) -> float | None:
    """Short messages fade after a while; long ones (lists of missing files, how-tos) stay until closed."""
    return None if len(text) > 160 or "\n" in text.strip() else 12


def operator_errors(fn: Callable) -> Callable:
    """Turn `MuseTalkError` into `gr.Error` with its message; anything else into a short readable error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except MuseTalkError as exc:
            logger.warning("{}: {}", fn.__name__, exc)
            text = str(exc)
            raise gr.Error(message(text), duration=duration_for(text), print_exception=False) from None
        except Exception as exc:  # a bug: log the traceback here, show one line there
            logger.opt(exception=exc).error("Unexpected error in {}", fn.__name__)
            raise gr.Error(
                message(f"Unexpected error ({type(exc).__name__}: {exc}). The panel's console has the details."),
                duration=None,
                print_exception=False,
            ) from None

    return wrapper


def scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text

"""`localsgl chat`: a Textual terminal chat over an in-process engine.

Textual is imported only when the chat starts, so `localsgl run` never pays for it."""
from __future__ import annotations


def run_chat(engine_kwargs: dict, *, system: str | None = None, resume: bool = False, inline: bool = False,
             model_given: bool = True, sampling: dict | None = None) -> int:
    """Open the chat; returns the exit code. The model loads inside the app (with a
    progress display), so the window opens at once."""
    from ..config import tui_settings
    from .app import ChatApp
    from .engine_link import EngineLink
    from .keys import keymap_from_config

    tui = tui_settings()
    keymap = keymap_from_config(tui.get("keys"))
    app = ChatApp(EngineLink(engine_kwargs, sampling=sampling), system=system, resume=resume, model_given=model_given,
                  keymap=keymap, theme=tui.get("theme"))
    app.run(inline=inline, inline_no_clear=inline)
    return int(app.return_code or 0)

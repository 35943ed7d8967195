"""The chat's key bindings: every binding has an id, a default key and a description, and
the config file's [tui.keys] table maps ids to other keys (Textual's keymap)::

    [tui.keys]
    send = "ctrl+s"
    newline = "enter"
    models = "ctrl+o,f2"
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class KeyAction:
    id: str
    key: str  # Textual key names, comma-separated alternatives
    description: str
    short: str = ""  # the footer's label, for the few keys it shows


KEY_ACTIONS: dict[str, KeyAction] = {
    a.id: a
    for a in [
        KeyAction("send", "enter", "Send the message", "send"),
        KeyAction("newline", "shift+enter,ctrl+j", "New line in the message"),
        KeyAction("history_previous", "up", "Previous message you sent (on the first line)"),
        KeyAction("history_next", "down", "Next message you sent (on the last line)"),
        KeyAction("stop", "escape", "Stop the answer being written", "stop"),
        KeyAction("palette", "ctrl+p", "Command palette", "commands"),
        KeyAction("help", "f1", "Commands and keys", "help"),
        KeyAction("models", "f2", "Models: switch, pull, delete", "models"),
        KeyAction("sessions", "f3", "Saved conversations", "chats"),
        KeyAction("select_text", "f4", "Select text with the keyboard"),
        KeyAction("new_chat", "ctrl+n", "New conversation"),
        KeyAction("copy_answer", "ctrl+r", "Copy the last answer"),
        KeyAction("copy_code", "ctrl+b", "Copy the last code block"),
        KeyAction("quit", "ctrl+q", "Quit", "quit"),
    ]
}


def keymap_from_config(table: dict | None) -> dict[str, str]:
    """[tui.keys] -> {binding id: keys}; unknown ids and non-text keys are usage errors."""
    out: dict[str, str] = {}
    for name, keys in (table or {}).items():
        bid = name.replace("-", "_").lower()
        if bid not in KEY_ACTIONS:
            raise ConfigError(f"[tui.keys]: unknown binding {name!r}; known: {', '.join(KEY_ACTIONS)}")
        if isinstance(keys, (list, tuple)):
            keys = ",".join(str(k) for k in keys)
        if not isinstance(keys, str) or not keys.strip():
            raise ConfigError(f"[tui.keys]: {name} needs a key such as \"ctrl+s\" (or several, comma-separated)")
        out[bid] = ",".join(k.strip() for k in keys.split(",") if k.strip())
    return out


def effective_keys(keymap: dict[str, str]) -> dict[str, str]:
    """Every binding id -> the keys it answers to, after the keymap."""
    return {bid: keymap.get(bid, a.key) for bid, a in KEY_ACTIONS.items()}


def first_key(keymap: dict[str, str], bid: str) -> str:
    return effective_keys(keymap)[bid].split(",")[0]

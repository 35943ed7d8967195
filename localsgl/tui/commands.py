"""The chat's slash commands: their names, arguments and help, and the parser that turns
a line of input into a command. The app runs them (ChatApp.run_command)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    args: str  # how the arguments look, "" for none
    help: str
    needs_args: bool = False  # the palette asks for the arguments instead of running it bare


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command("system", "TEXT", "Set the system message (alone: show it; '/system -' clears it)", needs_args=True),
        Command("clear", "", "Start a new conversation (the old one stays in the sessions list)"),
        Command("model", "NAME", "Switch model, keeping the conversation (alone: the model screen)"),
        Command("temp", "T", "Sampling temperature for the next answers (0 = greedy; alone: show it)", needs_args=True),
        Command("max-tokens", "N", "Longest answer, in tokens (alone: show it)", needs_args=True),
        Command("regenerate", "", "Answer the last message again"),
        Command("edit", "[TEXT]", "Edit the last message you sent and send it again"),
        Command("save", "FILE", "Save the conversation: FILE.json as JSON, anything else as Markdown", needs_args=True),
        Command("copy", "[code]", "Copy the last answer (or its last code block) to the clipboard"),
        Command("sessions", "", "Saved conversations: reopen or delete"),
        Command("help", "", "Commands and keys"),
        Command("quit", "", "Leave the chat"),
    ]
}
ALIASES = {"temperature": "temp", "max_tokens": "max-tokens", "maxtokens": "max-tokens", "new": "clear",
           "models": "model", "exit": "quit", "retry": "regenerate", "?": "help"}


class CommandError(ValueError):
    """A slash command that cannot run as typed; the message says why."""


@dataclass(frozen=True)
class ParsedCommand:
    name: str
    arg: str


def parse(line: str) -> ParsedCommand | None:
    """'/temp 0.7' -> ParsedCommand('temp', '0.7'); None for a line that is not a command
    (text, or '//' which sends a literal slash)."""
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    head, _, arg = text[1:].partition(" ")
    name = ALIASES.get(head.lower(), head.lower())
    if name not in COMMANDS:
        raise CommandError(f"unknown command /{head}; /help lists them")
    return ParsedCommand(name, arg.strip())


def unescape(line: str) -> str:
    """A message that starts with '//' is sent with one slash."""
    return line[1:] if line.lstrip().startswith("//") else line


def parse_float(arg: str, what: str, low: float, high: float) -> float:
    try:
        v = float(arg)
    except ValueError:
        raise CommandError(f"{what}: expected a number, got {arg!r}") from None
    if not (low <= v <= high):
        raise CommandError(f"{what}: must be in [{low:g}, {high:g}], got {v:g}")
    return v


def parse_int(arg: str, what: str, low: int) -> int:
    try:
        v = int(arg)
    except ValueError:
        raise CommandError(f"{what}: expected a whole number, got {arg!r}") from None
    if v < low:
        raise CommandError(f"{what}: must be at least {low}, got {v}")
    return v


def help_markdown(keys: dict[str, str], descriptions: dict[str, str]) -> str:
    """The /help text: every command, then every key binding as it is now."""
    lines = ["## Commands", ""]
    for c in COMMANDS.values():
        lines.append(f"- `/{c.name}{' ' + c.args if c.args else ''}`: {c.help}")
    lines += ["", "A message that starts with `//` is sent with one `/`.", "", "## Keys", ""]
    for bid, key in keys.items():
        lines.append(f"- `{key}`: {descriptions[bid]}")
    lines += ["", "Change keys in the config file's `[tui.keys]` table (docs/tui.md).",
              "Select text with the mouse and press ctrl+c to copy it; click a code block to copy it."]
    return "\n".join(lines)

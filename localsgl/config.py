"""Paths, settings and their precedence: CLI > LOCALSGL_<FLAG> env var > config file > default.

Paths
  models        the Hugging Face cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE respected); never a copy
  data          $XDG_DATA_HOME/localsgl          (manifests/, quantized models/, chats.sqlite3)
  cache         $XDG_CACHE_HOME/localsgl         (GGUF files converted for loading; safe to delete)
  config file   $XDG_CONFIG_HOME/localsgl/config.toml   (or $LOCALSGL_CONFIG)

The config file holds flags by their long name, snake_case or kebab-case, at the top level
or in an [engine] / [server] table::

    model = "smollm2-135m"
    kv-memory = "2GiB"
    [server]
    port = 8080

The chat's own settings (key bindings, theme) are in a [tui] table, read by tui_settings().
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

DEFAULT_MODEL = "smollm2-135m"


class ConfigError(ValueError):
    """A bad setting (from the CLI, an env var or the config file): a usage error."""


# ----------------------------------------------------------------------------- paths


def _env_path(name: str) -> Path | None:
    v = os.environ.get(name)
    return Path(v).expanduser() if v else None


def home() -> Path:
    return Path(os.path.expanduser("~"))


def hf_home() -> Path:
    """$HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface (as huggingface_hub)."""
    p = _env_path("HF_HOME")
    if p:
        return p
    cache = _env_path("XDG_CACHE_HOME") or home() / ".cache"
    return cache / "huggingface"


def hf_hub_cache() -> Path:
    """Where hub downloads live: $HF_HUB_CACHE (or the legacy $HUGGINGFACE_HUB_CACHE), else HF_HOME/hub."""
    return _env_path("HF_HUB_CACHE") or _env_path("HUGGINGFACE_HUB_CACHE") or hf_home() / "hub"


def hf_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE", "")) is True


def data_dir() -> Path:
    """$XDG_DATA_HOME/localsgl (default ~/.local/share/localsgl): manifests and quantized outputs."""
    return (_env_path("XDG_DATA_HOME") or home() / ".local" / "share") / "localsgl"


def manifests_dir() -> Path:
    return data_dir() / "manifests"


def quantized_dir() -> Path:
    return data_dir() / "models"


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/localsgl (default ~/.cache/localsgl): derived files that can be rebuilt
    at any time (e.g. GGUF files converted to the run dtype)."""
    return (_env_path("XDG_CACHE_HOME") or home() / ".cache") / "localsgl"


def config_dir() -> Path:
    return (_env_path("XDG_CONFIG_HOME") or home() / ".config") / "localsgl"


def config_file() -> Path:
    return _env_path("LOCALSGL_CONFIG") or config_dir() / "config.toml"


def debug_enabled() -> bool:
    return _truthy(os.environ.get("LOCALSGL_DEBUG", "")) is True


# ----------------------------------------------------------------------------- sizes

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """'8GiB' -> 8589934592, '1.5GB' -> 1500000000, '512' -> 512 (bytes).

    Units: B, KB/KiB, MB/MiB, GB/GiB, TB/TiB (case-insensitive; K/M/G/T alone are decimal)."""
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or value != value:
            raise ConfigError(f"size must be non-negative, got {value!r}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(
            f"cannot parse size {value!r}: use a number of bytes or a number with a unit "
            "(KB, KiB, MB, MiB, GB, GiB, TB, TiB), e.g. 8GiB"
        )
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int | float | None) -> str:
    """Bytes -> '1.50 GiB' (binary units)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


# ----------------------------------------------------------------------------- settings


def _truthy(s: str) -> bool | None:
    s = s.strip().lower()
    if s in ("1", "true", "yes", "on", "y"):
        return True
    if s in ("0", "false", "no", "off", "n", ""):
        return False
    return None


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    b = _truthy(str(v))
    if b is None:
        raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {v!r}")
    return b


def _to_int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if isinstance(v, bool):
            raise ValueError(f"expected an integer, got {v!r}")
        try:
            n = int(str(v).strip()) if not isinstance(v, int) else v
        except ValueError:
            raise ValueError(f"expected an integer, got {v!r}") from None
        if n < minimum:
            raise ValueError(f"must be at least {minimum}, got {n}")
        if maximum is not None and n > maximum:
            raise ValueError(f"must be at most {maximum}, got {n}")
        return n

    return conv


def _to_size(v: Any) -> int:
    try:
        n = parse_size(v)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if n <= 0:
        raise ValueError(f"size must be positive, got {v!r}")
    return n


def _choice(*choices: str, aliases: dict[str, str | None] | None = None) -> Callable[[Any], str | None]:
    aliases = aliases or {}
    # the error names the spellings of "unset" too ("auto", "none"), which a user may type
    named = [a for a, to in aliases.items() if to is None] + list(choices)

    def conv(v: Any) -> str | None:
        s = str(v).strip().lower()
        if s in aliases:
            return aliases[s]
        if s in choices:
            return s
        raise ValueError(f"expected one of {', '.join(named)}, got {v!r}")

    return conv


def _device(v: Any) -> str | None:
    s = str(v).strip().lower()
    if s in ("auto", ""):
        return None
    if s == "cpu" or s == "cuda" or re.fullmatch(r"cuda:\d+", s):
        return s
    raise ValueError(f"expected cuda, cuda:N, cpu or auto, got {v!r}")


def _str(v: Any) -> str:
    s = str(v)
    if not s.strip():
        raise ValueError("must not be empty")
    return s


_DTYPE_ALIASES: dict[str, str | None] = {
    "auto": None,
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}


@dataclass(frozen=True)
class Setting:
    name: str  # snake_case, the Engine kwarg / config key
    convert: Callable[[Any], Any]
    engine: bool = True  # passed to Engine(...)

    @property
    def env(self) -> str:
        return "LOCALSGL_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("model", _str),
        Setting("device", _device),
        Setting("dtype", _choice("float32", "bfloat16", "float16", aliases=_DTYPE_ALIASES)),
        Setting("max_model_len", _to_int(2)),
        Setting("kv_memory", _to_size),
        Setting("gpu_memory", _to_size),
        Setting("max_running", _to_int(1)),
        Setting("chunk_size", _to_int(1)),
        Setting("attention_backend", _choice("auto", "triton", "torch")),
        Setting("disable_cuda_graph", _to_bool),
        Setting("disable_overlap", _to_bool),
        Setting("disable_radix_cache", _to_bool),
        Setting("load_format", _choice("auto", "dummy")),
        Setting("weights", _choice("keep", "dequantize", aliases={"auto": None})),
        Setting("quantization", _choice("int4", "int8", "fp8", aliases={"none": None, "auto": None})),
        Setting("kv_cache_dtype", _choice("fp8", aliases={"auto": None, "none": None, "fp8_e4m3": "fp8", "e4m3": "fp8"})),
        Setting("schedule_policy", _choice("fcfs", "lpm")),
        Setting("seed", _to_int(0)),
        Setting("max_queue", _to_int(1)),
        Setting("tp", _to_int(1)),
        # front-end settings (not Engine kwargs)
        Setting("host", _str, engine=False),
        Setting("port", _to_int(1, 65535), engine=False),
        Setting("api_key", _str, engine=False),
    ]
}
ENGINE_SETTINGS = [n for n, s in SETTINGS.items() if s.engine]


def not_utf8(e: UnicodeDecodeError) -> str:
    """Where a file's bytes stop being UTF-8, for an error message."""
    return f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"


def _load_toml(path: Path) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"{path}: reading TOML needs Python 3.11+ or the 'tomli' package") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 text
        raise ConfigError(f"{path}: invalid TOML: {not_utf8(e)}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None


def load_config_file(path: Path | None = None) -> dict[str, Any]:
    """The config file's settings as {snake_name: raw value}; {} when there is no file.

    Top-level keys and the [engine] / [server] tables are merged; unknown keys are
    reported on stderr and ignored."""
    path = path or config_file()
    if not path.is_file():
        if os.environ.get("LOCALSGL_CONFIG"):
            raise ConfigError(f"LOCALSGL_CONFIG: no such file: {path}")
        return {}
    data = _load_toml(path)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key in ("tui", "sampling"):  # read by tui_settings() / sampling_settings()
                continue
            if key not in ("engine", "server"):
                print(f"warning: {path}: ignoring unknown table [{key}]", file=sys.stderr)
                continue
            items = value.items()
        else:
            items = [(key, value)]
        for k, v in items:
            name = k.replace("-", "_").lower()
            if name not in SETTINGS:
                print(f"warning: {path}: ignoring unknown setting {k!r}", file=sys.stderr)
                continue
            flat[name] = v
    flat["__path__"] = str(path)
    return flat


def tui_settings(path: Path | None = None) -> dict[str, Any]:
    """The config file's [tui] table (the chat app's settings, e.g. its [tui.keys]
    bindings), {} when the file or the table is absent."""
    path = path or config_file()
    if not path.is_file():
        return {}
    table = _load_toml(path).get("tui", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: tui must be a table ([tui])")
    return table


# ----------------------------------------------------------------------------- sampling

def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got {v!r}")
    try:
        x = float(str(v).strip()) if not isinstance(v, (int, float)) else float(v)
    except ValueError:
        raise ValueError(f"expected a number, got {v!r}") from None
    if x != x:
        raise ValueError("expected a number, got NaN")
    return x


# A person's own defaults for the sampling fields a request leaves unset: LOCALSGL_<FIELD>
# or the config file's [sampling] table.  They rank above the model's defaults
# (engine/sampling_defaults.py) and below a value given with the request itself.
SAMPLING_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "max_tokens": _to_int(1),
    "temperature": _to_float,
    "top_p": _to_float,
    "top_k": _to_int(-1),
    "min_p": _to_float,
    "repetition_penalty": _to_float,
}


def sampling_settings(path: Path | None = None) -> dict[str, tuple[Any, str]]:
    """{field: (value, source)} for each sampling field set by LOCALSGL_<FIELD> (which wins)
    or the config file's [sampling] table; {} when neither sets any."""
    out: dict[str, tuple[Any, str]] = {}
    path = path or config_file()
    table: dict = {}
    if path.is_file():
        table = _load_toml(path).get("sampling", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: sampling must be a table ([sampling])")
        for key in table:
            if key.replace("-", "_").lower() not in SAMPLING_SETTINGS:
                print(f"warning: {path}: ignoring unknown sampling setting {key!r}", file=sys.stderr)
    for name, conv in SAMPLING_SETTINGS.items():
        env = "LOCALSGL_" + name.upper()
        raw, source = os.environ.get(env), env
        if raw is None or not raw.strip():
            raw = next((v for k, v in table.items() if k.replace("-", "_").lower() == name), None)
            source = f"{path} [sampling]"
        if raw is None:
            continue
        try:
            out[name] = (conv(raw), source)
        except ValueError as e:
            raise ConfigError(f"{source}: {name}: {e}") from None
    return out


def _convert(name: str, value: Any, source: str) -> Any:
    try:
        return SETTINGS[name].convert(value)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def resolve_settings(cli_values: dict[str, Any], names: list[str] | None = None, *, file_values: dict | None = None) -> dict[str, Any]:
    """Resolve each setting in ``names`` (default: all) by precedence CLI > env > file.

    ``cli_values`` maps snake_case names to the CLI's value, None meaning 'not given'.
    The result maps every name that some source set to its converted value (None for
    a setting that normalises to 'auto', e.g. --dtype auto); names no source set are absent."""
    names = list(names or SETTINGS)
    unknown = [k for k in cli_values if k not in SETTINGS]
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    file_values = load_config_file() if file_values is None else file_values
    path = file_values.get("__path__", "config file")
    out: dict[str, Any] = {}
    for name in names:
        s = SETTINGS[name]
        if cli_values.get(name) is not None:
            out[name] = _convert(name, cli_values[name], s.flag)
        elif os.environ.get(s.env, "") != "":
            out[name] = _convert(name, os.environ[s.env], s.env)
        elif name in file_values:
            out[name] = _convert(name, file_values[name], f"{path}: {name}")
    return out


def resolve_engine_kwargs(cli_values: dict[str, Any]) -> dict[str, Any]:
    """The snake_case kwargs for ``Engine(...)``: CLI > LOCALSGL_<FLAG> > config file.

    Settings no source gave are left out (the Engine's defaults apply), except ``model``,
    which defaults to the embedded smollm2-135m. Sizes come back as ints (bytes)."""
    engine_cli = {k: v for k, v in cli_values.items() if k in ENGINE_SETTINGS}
    extra = [k for k in cli_values if k not in SETTINGS]
    if extra:
        raise ConfigError(f"unknown engine setting(s): {', '.join(sorted(extra))}")
    out = resolve_settings(engine_cli, ENGINE_SETTINGS)
    out = {k: v for k, v in out.items() if v is not None}
    out.setdefault("model", DEFAULT_MODEL)
    user_sampling = sampling_settings()
    if user_sampling:
        out["default_sampling"] = user_sampling
    return out

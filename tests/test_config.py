"""Settings precedence (CLI > LOCALSGL_* env > config file > default), sizes and paths."""
from pathlib import Path

import pytest

from localsgl import config as C


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(C.SETTINGS):
        monkeypatch.delenv(C.SETTINGS[name].env, raising=False)
    for var in ("LOCALSGL_CONFIG", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def write_config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg" / "localsgl" / "config.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8GiB", 8 * 2**30),
        ("8 GiB", 8 * 2**30),
        ("8gib", 8 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("512MiB", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("4KiB", 4096),
        ("2KB", 2000),
        ("1TiB", 2**40),
        ("1TB", 10**12),
        ("12345", 12345),
        ("0", 0),
        ("100B", 100),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert C.parse_size(text) == expected


@pytest.mark.parametrize("junk", ["", "lots", "GiB", "8 GiBs", "-1GiB", "8 XB", "1e3", "8..0GB", True])
def test_parse_size_rejects_junk(junk):
    with pytest.raises(C.ConfigError, match="size"):
        C.parse_size(junk)


def test_format_size():
    assert C.format_size(8 * 2**30) == "8.00 GiB"
    assert C.format_size(100) == "100 B"
    assert C.format_size(None) == "-"


def test_defaults_only_model():
    assert C.resolve_engine_kwargs({}) == {"model": C.DEFAULT_MODEL}
    assert C.resolve_engine_kwargs({"dtype": None, "tp": None}) == {"model": C.DEFAULT_MODEL}


def test_precedence_cli_env_file(clean_env, monkeypatch):
    write_config(clean_env, 'model = "file-model"\nkv-memory = "1GiB"\nmax_running = 8\nchunk-size = 128\n')
    monkeypatch.setenv("LOCALSGL_KV_MEMORY", "2GiB")
    monkeypatch.setenv("LOCALSGL_MAX_RUNNING", "16")
    kw = C.resolve_engine_kwargs({"max_running": 32, "model": None, "chunk_size": None})
    assert kw["max_running"] == 32  # CLI beats env and file
    assert kw["kv_memory"] == 2 * 2**30  # env beats file
    assert kw["chunk_size"] == 128  # file beats default
    assert kw["model"] == "file-model"


def test_env_vars_for_every_engine_flag(monkeypatch):
    values = {
        "model": ("llama-3.2-1b", "llama-3.2-1b"),
        "device": ("cpu", "cpu"),
        "dtype": ("bf16", "bfloat16"),
        "max_model_len": ("4096", 4096),
        "kv_memory": ("512MiB", 512 * 2**20),
        "gpu_memory": ("8GiB", 8 * 2**30),
        "max_running": ("4", 4),
        "chunk_size": ("256", 256),
        "attention_backend": ("torch", "torch"),
        "disable_cuda_graph": ("1", True),
        "disable_overlap": ("true", True),
        "disable_radix_cache": ("off", False),
        "load_format": ("dummy", "dummy"),
        "weights": ("keep", "keep"),
        "quantization": ("INT4", "int4"),
        "kv_cache_dtype": ("FP8", "fp8"),
        "schedule_policy": ("lpm", "lpm"),
        "seed": ("7", 7),
        "max_queue": ("100", 100),
        "tp": ("1", 1),
    }
    assert set(values) == set(C.ENGINE_SETTINGS)
    for name, (raw, _) in values.items():
        monkeypatch.setenv("LOCALSGL_" + name.upper(), raw)
    kw = C.resolve_engine_kwargs({})
    assert kw == {name: want for name, (_, want) in values.items()}


def test_cli_bool_flag_and_auto_values(monkeypatch):
    monkeypatch.setenv("LOCALSGL_DISABLE_CUDA_GRAPH", "0")
    kw = C.resolve_engine_kwargs({"disable_cuda_graph": True, "dtype": "auto", "device": "auto"})
    assert kw["disable_cuda_graph"] is True
    assert "dtype" not in kw and "device" not in kw  # auto = let the engine choose


@pytest.mark.parametrize(
    "name, raw, where",
    [
        ("dtype", "int3", "--dtype"),
        ("device", "tpu", "--device"),
        ("max_running", "0", "--max-running"),
        ("max_model_len", "many", "--max-model-len"),
        ("kv_memory", "lots", "--kv-memory"),
        ("attention_backend", "flash", "--attention-backend"),
        ("disable_overlap", "maybe", "--disable-overlap"),
    ],
)
def test_bad_cli_values_name_their_flag(name, raw, where):
    with pytest.raises(C.ConfigError, match=where):
        C.resolve_engine_kwargs({name: raw})


def test_a_bad_choice_lists_every_accepted_spelling():
    """`auto` is accepted for --kv-cache-dtype, --weights and --quantization (the default), so the
    error lists it beside the values."""
    with pytest.raises(C.ConfigError, match=r"--kv-cache-dtype: expected one of auto, none, fp8, got 'bfloat16'"):
        C.resolve_engine_kwargs({"kv_cache_dtype": "bfloat16"})
    with pytest.raises(C.ConfigError, match=r"expected one of auto, keep, dequantize, got 'foo'"):
        C.resolve_engine_kwargs({"weights": "foo"})
    assert C.resolve_engine_kwargs({"kv_cache_dtype": "auto"}).get("kv_cache_dtype") is None


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("LOCALSGL_GPU_MEMORY", "a lot")
    with pytest.raises(C.ConfigError, match="LOCALSGL_GPU_MEMORY"):
        C.resolve_engine_kwargs({})


def test_bad_file_value_names_the_file(clean_env):
    p = write_config(clean_env, "max_running = -3\n")
    with pytest.raises(C.ConfigError, match="config.toml"):
        C.resolve_engine_kwargs({})
    p.write_text("this is = not [toml\n")
    with pytest.raises(C.ConfigError, match="invalid TOML"):
        C.resolve_engine_kwargs({})
    p.write_bytes(b'dtype = "float16"\n# caf\xe9\n')  # a Latin-1 byte: TOML is UTF-8
    with pytest.raises(C.ConfigError, match=r"invalid TOML: not UTF-8 text \(byte 0xe9 at offset 23\)"):
        C.resolve_engine_kwargs({})


def test_config_tables_and_unknown_keys(clean_env, capsys):
    write_config(clean_env, '[engine]\ndtype = "float16"\nflux = 3\n[server]\nport = 9000\nhost = "0.0.0.0"\n[weird]\nx = 1\n')
    assert C.resolve_engine_kwargs({})["dtype"] == "float16"
    s = C.resolve_settings({"port": None}, ["host", "port", "api_key"])
    assert s == {"host": "0.0.0.0", "port": 9000}
    with pytest.raises(C.ConfigError, match="must be at most 65535, got 99999"):  # not wrapped to 34463
        C.resolve_settings({"port": 99999}, ["port"])
    err = capsys.readouterr().err
    assert "flux" in err and "weird" in err


def test_unknown_cli_setting_is_an_error():
    with pytest.raises(C.ConfigError, match="bogus"):
        C.resolve_engine_kwargs({"bogus": 1})


def test_localsgl_config_env_points_at_file(clean_env, monkeypatch):
    p = clean_env / "other.toml"
    p.write_text("tp = 1\nmax_queue = 5\n")
    monkeypatch.setenv("LOCALSGL_CONFIG", str(p))
    assert C.resolve_engine_kwargs({})["max_queue"] == 5
    monkeypatch.setenv("LOCALSGL_CONFIG", str(clean_env / "missing.toml"))
    with pytest.raises(C.ConfigError, match="no such file"):
        C.resolve_engine_kwargs({})


def test_paths(clean_env, monkeypatch):
    home = clean_env / "home"
    assert C.config_file() == clean_env / "cfg" / "localsgl" / "config.toml"
    assert C.data_dir() == clean_env / "data" / "localsgl"
    assert C.manifests_dir().parent == C.data_dir()
    assert C.hf_home() == home / ".cache" / "huggingface"
    assert C.hf_hub_cache() == home / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xc"))
    assert C.hf_home() == clean_env / "xc" / "huggingface"
    monkeypatch.setenv("HF_HOME", str(clean_env / "hf"))
    assert C.hf_hub_cache() == clean_env / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(clean_env / "hub2"))
    assert C.hf_hub_cache() == clean_env / "hub2"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert C.data_dir() == home / ".local" / "share" / "localsgl"
    assert C.config_dir() == home / ".config" / "localsgl"
    assert not C.hf_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert C.hf_offline()

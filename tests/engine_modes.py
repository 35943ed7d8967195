"""Which test files build engines whose mode LOCALSGL_IN_PROCESS picks (tests/conftest.py marks
their tests ``engine``; scripts/test.sh runs those in both modes)."""
from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent

# test files that build an engine whose mode they leave to LOCALSGL_IN_PROCESS
ENGINE_TEST_FILES = frozenset({
    "quant/test_fp8_kv_cache.py",
    "quant/test_quantize_command.py",
    "server/test_bad_input.py",
    "server/test_disconnect_load.py",
    "server/test_openai_client.py",
    "server/test_schemathesis.py",
    "server/test_security.py",
    "store/test_model_commands.py",
    "structured/test_embedded_model.py",
    "structured/test_json_schemas.py",
    "structured/test_reasoning.py",
    "structured/test_tool_calls.py",
    "test_bench_serving.py",
    "test_cli.py",
    "test_debug_switches.py",
    "test_long_context.py",
    "test_sampling_defaults.py",
    "test_start.py",
    "tui/test_chat_cli.py",
    "tui/test_chat_embedded.py",
    "tui/test_tmux.py",
})

# files the check flags that build no engine of a mode to choose, and why (GPU tests, tests/gpu/
# and *_gpu.py, are not checked: the CPU suite skips them)
NO_ENGINE_FILES = {
    "quant/test_quant_plan.py": "`info` plans without building an engine",
    "store/test_pull.py": "downloads only",
    "structured/test_engine_grammar.py": "drives EngineCore directly, with the shared engine's tokenizer",
    "structured/test_grammar_parts.py": "grammar backend parts on the shared engine's tokenizer",
    "test_bench_latency.py": "`bench latency` runs its engine core in-process in either mode",
    "test_core_process.py": "names the mode of every engine it builds",
    "test_engine_modes.py": "checks these lists and how the mode is picked",
    "test_generation_parity.py": "its engine fixture runs both modes itself",
}

"""Every kernel launch in kernels/ passes options.FMA (``enable_fp_fusion``), so that a Triton
whose default no longer contracts a·b + c (3.10 on) compiles the kernels as they were measured."""
import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _launches(tree: ast.AST):
    """``kernel[grid](...)`` calls: a subscripted name called (the modules here use no other)."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
            and isinstance(n.func.value, ast.Name)]


def _asks_for_fma(call: ast.Call) -> bool:
    return any((k.arg is None and isinstance(k.value, ast.Name) and k.value.id == "FMA")
               or (k.arg == "enable_fp_fusion" and isinstance(k.value, ast.Constant) and k.value.value is True)
               for k in call.keywords)


def test_every_launch_asks_for_fused_multiply_add():
    seen, missing = 0, []
    for path in sorted(KERNELS.glob("*.py")):
        for call in _launches(ast.parse(path.read_text())):
            seen += 1
            if not _asks_for_fma(call):
                missing.append(f"{path.name}:{call.lineno} {call.func.value.id}")
    assert seen >= 30  # the walk finds the launches
    assert not missing, missing


def test_fma_is_the_fusion_option():
    from localsgl_kernels.options import FMA

    assert FMA == {"enable_fp_fusion": True}

"""edgellm's imports run one way: a static walk of every module under edgellm/ (function-level imports
included) finds no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "edgellm"


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package)"""
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _lazy_facade(tree: ast.Module) -> set[int]:
    """Line numbers inside a package's module-level ``__getattr__`` (PEP 562): ``edgellm.build`` reaching
    edgellm.api on first use. A re-export at the top, not a dependency of the package's modules."""
    return {n.lineno for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f) if hasattr(n, "lineno")}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _lazy_facade(tree) if is_pkg else set()
        here = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = here
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                for alias in node.names:  # `from a import b`: the submodule a.b, else the module a
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                    if target in mods:
                        graph[name].add(target)
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "edgellm.backends.tvm_cpu" in graph["edgellm.backends.tvm_int8"]  # inside a function
    assert "edgellm.backends.tvm_int8.x86" in graph["edgellm.backends.tvm_int8"]  # `from .x86 import ...`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_inside_edgellm():
    found = cycles(import_graph())
    assert not found, "import cycles (each a set of modules that import each other): " + "; ".join(" <-> ".join(c) for c in found)


def test_serve_imports_without_the_compiler_side():
    """edgellm.serve is device-side: it imports with torch, onnx, click, rich and TVM's compiler unimportable."""
    import subprocess
    import sys

    from tests.conftest import ROOT, import_blocker

    script = import_blocker("torch", "onnx", "onnxruntime", "click", "rich", "transformers", "tvm.relax", "tvm.s_tir", "tvm.script.parser",
                            "edgellm.api", "edgellm.backends", "edgellm.llm", "edgellm.cli") + (
        "import edgellm.serve, edgellm.serve.kserve, edgellm.serve.openai_api, edgellm.serve.__main__\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'onnx', 'click', 'rich', 'transformers'}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_runtime_imports_only_the_runtime():
    """edgellm/runtime/ is what `bundle-runtime` copies to a device: it may import edgellm (the stdlib-only top
    module), edgellm.errors and itself, nothing of the compiler side (edgellm.package, edgellm.signing, ...)."""
    allowed = {"edgellm", "edgellm.errors"}
    leaks = {m: sorted(d for d in deps if not d.startswith("edgellm.runtime") and d not in allowed)
             for m, deps in import_graph().items() if m.startswith("edgellm.runtime")}
    leaks = {m: d for m, d in leaks.items() if d}
    assert not leaks, f"runtime modules importing the compiler side: {leaks}"


def test_reading_a_package_needs_no_cryptography_until_keys_are_given(tmp_path):
    """The runtime reads (signed or unsigned) packages where cryptography cannot be imported; only verifying asks for it,
    with one line saying how to get it."""
    import json
    import platform
    import subprocess
    import sys

    from edgellm.package import write_package
    from edgellm.signing import keygen, sign_package
    from tests.conftest import ROOT, import_blocker

    path = tmp_path / "m.edgepkg"
    write_package(path, {"target": {"name": "t", "arch": platform.machine()}, "backend": {"name": "tvm"}, "inputs": [], "outputs": []},
                  {"model.so": b"\x7fELF"})
    key = keygen(tmp_path / "k")
    sign_package(path, key["private"])
    script = import_blocker("cryptography", "torch", "onnx", "click", "rich", "tvm", "edgellm.package", "edgellm.signing") + r"""
import json
from edgellm.runtime.package import read_package, read_signature
from edgellm.errors import EdgeError
manifest, members = read_package(sys.argv[1])
try:
    read_package(sys.argv[1], [sys.argv[2]])
    error = None
except EdgeError as e:
    error = str(e)
print(json.dumps({"members": sorted(members), "signer": read_signature(sys.argv[1])["key_fingerprint"], "error": error,
                  "crypto": "cryptography" in sys.modules}))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(path), key["public"]], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {"members": ["model.so"], "signer": key["fingerprint"], "crypto": False,
                      "error": "signed packages need the cryptography library (pip install 'cryptography>=42')"}

"""The house rules that keep the package readable, checked on the source itself: no module over
500 lines, no import cycle between the package's parts (function-local imports count), no
function or class that nothing uses, and no comment that points at a file outside the repository."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ltm_convert"
MAX_LINES = 500
KNOWN_CYCLES: list[set[str]] = []  # none left: every import points down the package's layers
# used by name from outside Python: typer's root callback, and documented public API (docs/usage.md)
USED_ELSEWHERE = {"_root", "register_method"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _part(module: str) -> str:
    """The unit a cycle is counted between: a top-level module or a subpackage of ltm_convert."""
    return module.split(".")[1] if "." in module else ""


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("ltm_convert.")}


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules along a real seam: {long}"


def test_no_import_cycle_between_the_parts():
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in _modules().items():
        for target in _imports(module, path):
            if _part(target) != _part(module):
                edges[_part(module)].add(_part(target))
    for cycle in _cycles(edges):
        assert any(cycle <= known for known in KNOWN_CYCLES), f"import cycle between {sorted(cycle)}"
    assert "config" not in edges.get("merge", set()), "merge imports config, and config merge's method names"


REGISTRARS = {"builtin_family", "merge_method"}  # a decorated family or method is used by its registry


def test_every_function_and_class_is_used():
    sources = [p for d in ("ltm_convert", "tests", "benchmarks", "examples", "scripts") for p in (ROOT / d).rglob("*.py")]
    words = Counter(w for p in sources for w in re.findall(r"\w+", p.read_text()))
    unused = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = node.name
                registered = any(ast.unparse(d).split("(")[0] in REGISTRARS for d in node.decorator_list)
                if not name.startswith("__") and name not in USED_ELSEWHERE and words[name] <= 1 and not registered:
                    unused.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")  # its definition alone
    assert not unused, f"dead code: {unused}"


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of a file's comments and docstrings (all of a Markdown file)."""
    text = path.read_text()
    if path.suffix == ".md":
        return list(enumerate(text.splitlines(), 1))
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    return out


def test_no_comment_names_a_file_outside_the_repository():
    skip = {".git", ".venv", "__pycache__"}
    tracked = {p.name for d in ("ltm_convert", "tests", "benchmarks", "docs", "examples", "scripts")
               for p in (ROOT / d).rglob("*") if not skip & set(p.parts)} | {p.name for p in ROOT.iterdir()}
    outside = re.compile(r"\.\./shared|/work/|design/")
    bad = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"),
                 *(ROOT / "docs").rglob("*.md"), ROOT / "README.md", ROOT / "benchmarks" / "README.md"]:
        for lineno, text in _prose(path):
            named = [m.group() for m in re.finditer(r"[\w./-]+\.md\b", text)  # an output after --flag is not a reference
                     if Path(m.group()).name not in tracked and not re.search(r"--[\w-]+\s+$", text[:m.start()])]
            if named or outside.search(text):
                bad.append(f"{path.relative_to(ROOT)}:{lineno}: {(named or [text.strip()])[0][:90]}")
    assert not bad, "these point outside the repository; say what they mean instead:\n" + "\n".join(bad)

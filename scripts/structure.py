"""Structure figures of src/duomodal: the largest files, the longest functions, the imports inside
functions, and the import cycles (strongly connected groups of modules, imports inside functions
counted, `if TYPE_CHECKING:` imports not, "from pkg import mod" counting as importing pkg too).

    python scripts/structure.py [SRC_DIR]      # SRC_DIR defaults to src
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def main(src: Path) -> None:
    root = src / "duomodal"
    modules = {}
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    edges: dict[str, set[str]] = {}
    functions: list[tuple[int, str]] = []
    sizes: list[tuple[int, str]] = []
    inside = 0
    for name, path in modules.items():
        text = path.read_text(encoding="utf-8")
        sizes.append((len(text.splitlines()), str(path)))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
            if isinstance(node, ast.Import):
                return [alias.name for alias in node.names]
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            return [base] + [f"{base}.{alias.name}" for alias in node.names]

        def visit(node: ast.AST, depth: int) -> None:
            nonlocal inside
            if isinstance(node, ast.If) and _is_type_checking(node):
                for child in node.orelse:
                    visit(child, depth)
                return
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}"))
                depth += 1
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                inside += depth > 0
                for target in targets(node):
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                    if target and target != name:
                        edges.setdefault(name, set()).add(target)
            for child in ast.iter_child_nodes(node):
                visit(child, depth)

        visit(ast.parse(text), 0)
    print("largest files:", ", ".join(f"{p} {n}" for n, p in sorted(sizes, reverse=True)[:3]))
    print("longest functions:", ", ".join(f"{p} {n}" for n, p in sorted(functions, reverse=True)[:3]))
    print(f"files over 450 lines: {sum(n > 450 for n, _ in sizes)}; functions over 80 lines: "
          f"{sum(n > 80 for n, _ in functions)}; imports inside functions: {inside}")
    cycles = _cycles(modules, edges)
    print(f"import cycles: {len(cycles)}")
    for group in cycles:
        print("  " + " <-> ".join(group))


def _cycles(modules: dict[str, Path], edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in modules:
        if node not in index:
            connect(node)
    return groups


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("src"))

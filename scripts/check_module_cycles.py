#!/usr/bin/env python3
"""Fail when the library's modules import each other in a circle.

A module is one `.rs` file under src/ (a folder's module is its `mod.rs`,
the crate root is `lib.rs`). Every path that names something in the crate
is an edge from the file it is written in to the file that defines what it
names:

- `use crate::…`, `use super::…`, `use self::…` declarations, grouped ones
  (`use crate::a::{b, c::{d, e}}`) included;
- paths written in code: `crate::a::b::f(…)`, `super::x`, `self::x`;
- paths that start with a name the file imported (`use crate::db;` then
  `db::jobs::get_job(…)`) or with one of the file's own submodules.

A path is resolved through the module tree to the longest module that
exists; where it goes on through a name that module imports or re-exports
(`pub use x::Thing`), it is followed to the import's target, so an edge
points at the file that defines the item, not at a facade that re-exports
it. A `use` that only names a module (`use crate::db;`) adds no edge by
itself: the paths written through it do.

Not edges:
- a module's paths into its own direct submodules (the ones it declares
  with `mod x;`): a parent owns its children. A child's `use super::X` into
  its parent does count;
- anything inside a `#[cfg(test)] mod tests { … }` block: unit tests may
  reach wherever they need;
- comments (doc links included) and string literals;
- src/main.rs, the binary's crate root, which reaches the library as
  `pretext::…` and so cannot close a circle inside it.

Usage: scripts/check_module_cycles.py [--edges] [REPO_ROOT]
(`--edges` also prints every edge, with the first line that makes it).

Exit status 0 when the graph has no cycle; 1 with, for each strongly
connected component (Tarjan) of more than one file, its members and one
shortest cycle through them, each step with the line that makes it; 2 for
source it cannot read faithfully (an inline module outside
`#[cfg(test)]`, a `#[path]` attribute), rather than a guess.
"""

from __future__ import annotations

import re
import sys
from collections import deque
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
KEYWORD_ROOTS = {"crate", "super", "self"}


def strip_comments_and_strings(text: str) -> str:
    """Blank out comments, string and char literals, keeping every newline."""
    out = []
    i, n = 0, len(text)

    def blank(chunk: str) -> str:
        return "".join("\n" if c == "\n" else " " for c in chunk)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end == -1 else end
            out.append(blank(text[i:end]))
            i = end
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif (m := re.compile(r'b?r(#*)"').match(text, i)) and (
            i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")
        ):
            closing = '"' + m.group(1)
            end = text.find(closing, m.end())
            end = n if end == -1 else end + len(closing)
            out.append(blank(text[i:end]))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(blank(text[i : j + 1]))
            i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}'), or else a lifetime.
            m = re.compile(r"'(\\.[^']*|[^\\'\n])'").match(text, i)
            if m:
                out.append(blank(m.group(0)))
                i = m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching_brace(text: str, open_at: int) -> int:
    """Index just past the `}` that closes the `{` at `open_at`."""
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


ATTRIBUTES = r"((?:#\[[^\]]*\]\s*)*)"
VISIBILITY = r"(?:pub(?:\s*\([^)]*\))?\s+)?"
MODULE_BLOCK = re.compile(ATTRIBUTES + VISIBILITY + r"\bmod\s+(" + IDENT + r")\s*\{")
MODULE_FILE = re.compile(ATTRIBUTES + VISIBILITY + r"\bmod\s+(" + IDENT + r")\s*;")


def is_test_only(attributes: str) -> bool:
    return re.search(r"#\[cfg\(test\)\]", attributes) is not None


class Unsupported(Exception):
    """Source the checker cannot read faithfully; it refuses rather than guess."""


def strip_test_modules(text: str, file: Path) -> str:
    """Blank out every `#[cfg(test)] mod name { … }` block, keeping newlines.

    Any other inline module is refused: its `super::` would be read as the
    file's, so its edges would point one level too high.
    """
    position = 0
    while m := MODULE_BLOCK.search(text, position):
        if not is_test_only(m.group(1)):
            line = text.count("\n", 0, m.start()) + 1
            raise Unsupported(
                f"{file}:{line}: inline `mod {m.group(2)} {{ … }}` outside #[cfg(test)]; "
                "give it its own file, or teach scripts/check_module_cycles.py inline modules"
            )
        open_at = m.end() - 1
        end = matching_brace(text, open_at)
        chunk = text[m.start() : end]
        text = text[: m.start()] + "".join("\n" if c == "\n" else " " for c in chunk) + text[end:]
        position = m.start()
    return text


USE_TOKEN = re.compile(r"\s*(::|[{},*]|" + IDENT + r")")


def expand_use_tree(tree: str) -> list[tuple[list[str], str | None]]:
    """`a::{b, c::{d as e, self}, f::*}` → [(path segments, name it binds), …].

    A glob binds no name; its segments end in `*`.
    """
    tokens = []
    position = 0
    while position < len(tree):
        m = USE_TOKEN.match(tree, position)
        if not m:
            break
        tokens.append(m.group(1))
        position = m.end()
    tokens = [t for t in tokens if t]
    results: list[tuple[list[str], str | None]] = []

    def walk(prefix: list[str], at: int) -> int:
        """Parse one use tree from tokens[at:]; returns the index after it."""
        segments = list(prefix)
        while at < len(tokens):
            token = tokens[at]
            if token == "::":
                at += 1
            elif token == "{":
                at += 1
                while at < len(tokens) and tokens[at] != "}":
                    at = walk(segments, at)
                    if at < len(tokens) and tokens[at] == ",":
                        at += 1
                return at + 1
            elif token == "*":
                results.append((segments + ["*"], None))
                return at + 1
            elif token in (",", "}"):
                break
            elif token == "as" and len(segments) > len(prefix):
                alias = tokens[at + 1] if at + 1 < len(tokens) else None
                bind(segments, alias)
                return at + 2
            else:
                segments.append(token)
                at += 1
        bind(segments, None)
        return at

    def bind(segments: list[str], alias: str | None) -> None:
        if segments and segments[-1] == "self":
            segments = segments[:-1]
        if segments:
            results.append((segments, alias or segments[-1]))

    walk([], 0)
    return results


class Crate:
    """The library's module tree: module path (a tuple) → its source file."""

    def __init__(self, src: Path) -> None:
        self.files: dict[tuple[str, ...], Path] = {}
        self.children: dict[tuple[str, ...], set[str]] = {}
        self._load((), src / "lib.rs")

    def _load(self, module: tuple[str, ...], file: Path) -> None:
        self.files[module] = file
        self.children[module] = set()
        code = strip_test_modules(strip_comments_and_strings(file.read_text()), file)
        folder = file.parent if file.name in ("lib.rs", "mod.rs") else file.with_suffix("")
        for m in MODULE_FILE.finditer(code):
            attributes, name = m.group(1), m.group(2)
            if is_test_only(attributes):
                continue
            line = code.count("\n", 0, m.start()) + 1
            if re.search(r"#\[\s*path\b", attributes):
                raise Unsupported(f"{file}:{line}: `#[path]` on `mod {name};`")
            candidates = [c for c in (folder / f"{name}.rs", folder / name / "mod.rs") if c.exists()]
            if not candidates:
                raise Unsupported(f"{file}:{line}: no file for `mod {name};`")
            self.children[module].add(name)
            self._load(module + (name,), candidates[0])


class ModuleSource:
    """One file's code (comments, strings and test modules blanked out) and the names its `use`s bind."""

    def __init__(self, crate: Crate, module: tuple[str, ...]) -> None:
        self.module = module
        self.file = crate.files[module]
        self.code = strip_test_modules(strip_comments_and_strings(self.file.read_text()), self.file)
        self.uses: list[tuple[list[str], int]] = []  # absolute-or-relative segments, line
        self.bindings: dict[str, list[str]] = {}
        for m in re.finditer(r"\buse\s+([^;]+);", self.code):
            tree = m.group(1).strip().lstrip(":")
            line = self.code.count("\n", 0, m.start()) + 1
            for segments, bound in expand_use_tree(tree):
                self.uses.append((segments, line))
                if bound and bound != "_":
                    self.bindings.setdefault(bound, segments)


class Graph:
    """File-level import edges of the whole crate."""

    def __init__(self, crate: Crate) -> None:
        self.crate = crate
        self.sources = {m: ModuleSource(crate, m) for m in crate.files}
        # (from file, to file) → first (line, path text) that makes the edge
        self.edges: dict[tuple[Path, Path], tuple[int, str]] = {}
        for source in self.sources.values():
            self._collect(source)

    def absolute(self, module: tuple[str, ...], segments: list[str], depth: int = 0) -> list[str] | None:
        """Segments written in `module` as a path from the crate root; None when they leave the crate."""
        here = list(module)
        if segments[0] == "crate":
            return segments[1:]
        if segments[0] in ("self", "super"):
            rest = list(segments)
            while rest and rest[0] in ("self", "super"):
                if rest.pop(0) == "super":
                    if not here:
                        return None
                    here.pop()
            return here + rest
        if segments[0] in self.crate.children[module]:
            return here + segments
        binding = self.sources[module].bindings.get(segments[0])
        if binding is not None and binding != segments[:1] and depth < 8:
            target = self.absolute(module, binding, depth + 1)
            return None if target is None else target + segments[1:]
        return None

    def resolve(self, segments: list[str], seen: frozenset = frozenset()) -> tuple[tuple[str, ...], bool]:
        """The module that defines what an absolute path names, and whether the path names only a module."""
        module: tuple[str, ...] = ()
        for i, segment in enumerate(segments):
            if segment in self.crate.children[module]:
                module = module + (segment,)
                continue
            binding = self.sources[module].bindings.get(segment)
            if binding is not None and (module, segment) not in seen:
                target = self.absolute(module, binding)
                if target is not None:
                    return self.resolve(target + segments[i + 1 :], seen | {(module, segment)})
            return module, False
        return module, True

    def _collect(self, source: ModuleSource) -> None:
        paths: list[tuple[list[str], int]] = list(source.uses)
        # Paths written in code: blank out the `use` declarations, already counted.
        code = re.sub(r"\buse\s+[^;]+;", lambda m: re.sub(r"[^\n]", " ", m.group(0)), source.code)
        for m in re.finditer(r"(?<![A-Za-z0-9_:])(" + IDENT + r"(?:\s*::\s*" + IDENT + r")+)", code):
            segments = re.split(r"\s*::\s*", m.group(1))
            root = segments[0]
            if root in KEYWORD_ROOTS or root in self.crate.children[source.module] or root in source.bindings:
                paths.append((segments, code.count("\n", 0, m.start()) + 1))
        for segments, line in paths:
            glob = segments[-1] == "*"
            if glob:
                segments = segments[:-1]
            absolute = self.absolute(source.module, segments) if segments else None
            if absolute is None:
                continue
            target, names_module = self.resolve(absolute)
            if names_module and not glob:
                continue  # binds a module's name; the paths written through it are the edges
            if target == source.module:
                continue
            if target[:-1] == source.module:
                continue  # into one of its own submodules
            key = (self.crate.files[source.module], self.crate.files[target])
            self.edges.setdefault(key, (line, "::".join(segments + (["*"] if glob else []))))


def strongly_connected_components(nodes, successors):
    """Tarjan's algorithm, iterative."""
    index: dict = {}
    low: dict = {}
    on_stack: set = set()
    stack: list = []
    components: list = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(successors(root)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(successors(child))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    return components


def shortest_cycle(start, members: set, successors) -> list:
    """A shortest path start → … → start that stays inside `members`."""
    previous = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in successors(node):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return [start]


def main() -> int:
    arguments = sys.argv[1:]
    show_edges = "--edges" in arguments
    arguments = [a for a in arguments if a != "--edges"]
    root = Path(arguments[0]) if arguments else Path(__file__).resolve().parent.parent
    try:
        graph = Graph(Crate(root / "src"))
    except Unsupported as error:
        print(f"check_module_cycles: {error}", file=sys.stderr)
        return 2

    def name(file: Path) -> str:
        return str(file.relative_to(root))

    successors_of: dict[Path, list[Path]] = {}
    for (a, b) in sorted(graph.edges):
        successors_of.setdefault(a, []).append(b)
        if show_edges:
            line, text = graph.edges[(a, b)]
            print(f"{name(a)}:{line} → {name(b)}  ({text})")

    def successors(node: Path) -> list[Path]:
        return successors_of.get(node, [])

    nodes = sorted(graph.crate.files.values())
    cycles = sorted(sorted(c) for c in strongly_connected_components(nodes, successors) if len(c) > 1)
    if not cycles:
        print(f"check_module_cycles: no import cycle among {len(nodes)} modules ({len(graph.edges)} edges)")
        return 0
    print(f"check_module_cycles: {len(cycles)} import cycle(s) among src/ modules", file=sys.stderr)
    for number, members in enumerate(cycles, 1):
        print(f"\ncycle {number}: {len(members)} modules", file=sys.stderr)
        for member in members:
            print(f"  {name(member)}", file=sys.stderr)
        path = shortest_cycle(members[0], set(members), successors)
        print("  for example:", file=sys.stderr)
        for a, b in zip(path, path[1:]):
            line, text = graph.edges[(a, b)]
            print(f"    {name(a)}:{line} → {name(b)}  ({text})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

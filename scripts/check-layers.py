#!/usr/bin/env python3
"""Check that dependencies point down.

    scripts/check-layers.py      # exit 0 when sound; 1, naming each violation

docs/layers.toml lists the crate's modules by layer, top first
(`modules`), and the files of each module directory, top first (`files`;
a subdirectory counts as one file under its name). A file may use only
modules of its own layer or below, and, inside a module, only files listed
after its own: neither modules nor the files of one can import each other
in a circle, and a module's mod.rs, at the top, is only its face.

An import is a `use` path, or a path in code that starts with `crate::`,
`super::`, `self::` or (in a mod.rs) a child module's name. Test code
(`tests.rs`, `*_tests.rs`, inline `#[cfg(test)] mod ... { }`) and the
test-only directories listed in `exempt` are not part of the structure.
"""
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
LAYERS = ROOT / "docs" / "layers.toml"


def strip(text):
    """Source without comments, literals and inline test modules."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        m = re.match(r'r(#*)"', text[i:]) if text[i] == "r" and (i == 0 or not text[i - 1].isalnum()) else None
        if m:
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            i = n if j < 0 else j + len(end)
            out.append('""')
            continue
        if text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            out.append('""')
            continue
        m = re.match(r"'(\\.|[^\\'\n])'", text[i:])
        if m:
            i += len(m.group(0))
            out.append("' '")
            continue
        out.append(text[i])
        i += 1
    s = "".join(out)
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([\w:]+\))?\s+)?mod\s+\w+\s*\{", s)
        if not m:
            return s
        depth, j = 1, m.end()
        while j < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            j += 1
        s = s[: m.start()] + s[j:]


def expand(tree, prefix=()):
    """`a::{b, c::{d, e as f}}` -> [a,b], [a,c,d], [a,c,e]."""
    out, depth, start, parts = [], 0, 0, []
    for i, ch in enumerate(tree):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(tree[start:i])
            start = i + 1
    parts.append(tree[start:])
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if "{" in part:
            head, rest = part.split("{", 1)
            segs = [s for s in head.split("::") if s]
            out += expand(rest[: rest.rfind("}")], prefix + tuple(segs))
        else:
            part = re.sub(r"\s+as\s+\w+$", "", part)
            out.append(list(prefix) + [s for s in part.split("::") if s])
    return out


def exists(mod):
    """Is `mod` (a list of names) a module of the crate?"""
    p = SRC.joinpath(*mod) if mod else SRC
    return bool(mod) and ((p.with_suffix(".rs")).is_file() or (p / "mod.rs").is_file())


def resolve(base, rest):
    """The deepest module `base` + a prefix of `rest` names."""
    mod = list(base)
    for seg in rest:
        if exists(mod + [seg]):
            mod.append(seg)
        else:
            break
    return mod


def imports(path, text):
    """The modules a file at module path `path` imports."""
    is_mod = path_is_mod[tuple(path)]
    here = path  # the module the file is
    parent = here[:-1]
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        paths += expand(re.sub(r"\s+", " ", m.group(1)).replace(" ::", "::").replace(":: ", "::"))
    for kw in ("crate", "super", "self"):
        for m in re.finditer(r"(?<![\w:])" + kw + r"((?:::\w+)+)", text):
            paths.append([kw] + m.group(1).split("::")[1:])
    if is_mod:
        for m in re.finditer(r"(?<![\w:])(\w+)::", text):
            if exists(here + [m.group(1)]):
                paths.append(["self", m.group(1)])
    out = []
    for p in paths:
        if not p:
            continue
        if p[0] == "crate":
            out.append(resolve([], p[1:]))
        elif p[0] == "self":
            out.append(resolve(here, p[1:]))
        elif p[0] == "super":
            base, rest = parent, p[1:]
            while rest and rest[0] == "super":
                base, rest = base[:-1], rest[1:]
            out.append(resolve(base, rest) if base or rest else base)
        elif is_mod and exists(here + [p[0]]):
            out.append(resolve(here, p))
    return [t for t in out if t]


path_is_mod = {}


def main():
    cfg = tomllib.loads(LAYERS.read_text())
    layer = {m: i for i, row in enumerate(cfg["modules"]) for m in row}
    orders = cfg["files"]
    exempt = cfg.get("exempt", [])
    files = []
    for p in sorted(SRC.rglob("*.rs")):
        rel = p.relative_to(SRC).as_posix()
        if rel in ("lib.rs", "main.rs") or p.name == "tests.rs" or p.name.endswith("_tests.rs"):
            continue
        if any(rel.startswith(e.rstrip("/") + "/") or rel == e for e in exempt):
            continue
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        is_mod = parts[-1] == "mod"
        mod = parts[:-1] if is_mod else parts
        path_is_mod[tuple(mod)] = is_mod
        files.append((rel, mod, is_mod, strip(p.read_text())))
    errors, edges = [], set()
    for rel, mod, is_mod, text in files:
        if mod[0] not in layer:
            errors.append(f"{rel}: module `{mod[0]}` is in no layer of docs/layers.toml")
            continue
        for t in imports(mod, text):
            if t[0] != mod[0]:
                if t[0] not in layer:
                    errors.append(f"{rel}: uses `{t[0]}`, which is in no layer")
                    continue
                edges.add((mod[0], t[0]))
                if layer[t[0]] < layer[mod[0]]:
                    errors.append(f"{rel}: uses `{t[0]}`, a layer above `{mod[0]}`")
                continue
            # Inside one module: the entries of the deepest directory both
            # sides pass through.
            k = 0
            while k < min(len(mod), len(t)) and mod[k] == t[k]:
                k += 1
            a = mod[k] if k < len(mod) else "mod"
            b = t[k] if k < len(t) else "mod"
            if a == b:
                continue
            key = "/".join(mod[:k])
            order = orders.get(key)
            if order is None:
                errors.append(f"{rel}: directory `{key}` has no file order in docs/layers.toml")
                continue
            missing = [n for n in (a, b) if n not in order]
            for n in missing:
                errors.append(f"{rel}: `{n}` is missing from the file order of `{key}`")
            if not missing and order.index(b) <= order.index(a):
                errors.append(f"{rel}: uses `{key}/{b}`, listed above `{a}`")
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                errors.append("modules import each other in a circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    errors = sorted(set(errors))
    for e in errors:
        print(e)
    if errors:
        print(f"check-layers: {len(errors)} violation(s) of docs/layers.toml", file=sys.stderr)
        return 1
    print(f"check-layers: {len(files)} files; every dependency points down")
    return 0


if __name__ == "__main__":
    sys.exit(main())

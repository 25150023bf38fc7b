"""The house rules of docs/architecture.md, read from the code: every `neuclip`/`baselines` import (at the top of a
module or inside a function) runs down a floor or stays on its own floor, and the rooms import one another in
no circle. The floors are read from docs/architecture.md's table itself, so the doc is the one statement of them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"


def floors_from_doc() -> dict[str, int]:
    """room (dotted) -> floor, from the table rows `| N... | rooms | ...`: a backticked folder (`neuclip/grid/`,
    `baselines/`) is a room, and so is a backticked `.py` that is a module of neuclip/ itself (`nets.py`,
    `neuclip/neuclip.py`); files named inside a folder's description (`workflow.py`) belong to that folder."""
    floors = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        number = re.match(r"^(\d+)\b", cells[1]) if len(cells) >= 4 else None
        if number is None:
            continue
        floor = int(number.group(1))
        for token in re.findall(r"`([^`]+)`", cells[2]):
            if token.endswith("/") and (REPO / token).is_dir():
                floors[token.rstrip("/").replace("/", ".")] = floor
            elif token.endswith(".py"):
                path = REPO / token if "/" in token else REPO / "neuclip" / token
                if path.is_file() and path.parent == REPO / "neuclip":
                    floors["neuclip." + path.stem] = floor
    return floors


FLOORS = floors_from_doc()


def room_of(module: str) -> str | None:
    for room in sorted(FLOORS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import of the project's own code."""
    out = []
    for path in sorted([*REPO.glob("neuclip/**/*.py"), *REPO.glob("baselines/*.py")]):
        me = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if room_of(name):
                    out.append((me, name, node.lineno))
    return out


def test_the_doc_table_gives_every_floor():
    assert sorted(set(FLOORS.values())) == list(range(1, 8)), FLOORS
    assert FLOORS["neuclip.estimators"] == 1 and FLOORS["neuclip.grid"] == 4 and FLOORS["neuclip.commands"] == 7
    assert FLOORS["neuclip.nets"] == 1 and FLOORS["baselines"] == 2 and "neuclip.workflow" not in FLOORS


def test_every_module_has_a_room():
    modules = [module_name(p) for p in [*REPO.glob("neuclip/**/*.py"), *REPO.glob("baselines/*.py")]]
    homeless = sorted(m for m in modules if room_of(m) is None and m != "neuclip")
    assert not homeless, f"give these a floor in docs/architecture.md's table: {homeless}"


def upward(found: list[tuple[str, str, int]]) -> list[str]:
    return sorted({f"{a} (floor {FLOORS[room_of(a)]}) imports {b} (floor {FLOORS[room_of(b)]}), line {line}"
                   for a, b, line in found if room_of(a) and FLOORS[room_of(b)] > FLOORS[room_of(a)]})


def circle(found: list[tuple[str, str, int]]) -> list[str] | None:
    """One circle of rooms (depth-first search over the room graph), or None."""
    edges: dict[str, set[str]] = {room: set() for room in FLOORS}
    for a, b, _ in found:
        ra, rb = room_of(a), room_of(b)
        if ra and ra != rb:
            edges[ra].add(rb)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(room: str, path: list[str]) -> list[str] | None:
        state[room] = 1
        for nxt in sorted(edges[room]):
            if state.get(nxt) == 1:
                here = [*path, room]
                return [*here[here.index(nxt):], nxt]
            if nxt not in state:
                hit = visit(nxt, [*path, room])
                if hit:
                    return hit
        state[room] = 2
        return None

    for room in sorted(edges):
        if room not in state:
            hit = visit(room, [])
            if hit:
                return hit
    return None


def test_no_import_runs_up_a_floor():
    up = upward(imports())
    assert not up, "\n".join(up)


def test_the_rooms_import_one_another_in_no_circle():
    hit = circle(imports())
    assert hit is None, " -> ".join(hit)


def test_the_checks_see_a_violation():
    made_up = [("neuclip.grid.workflow", "neuclip.jobs.launch", 1),  # floor 4 -> 6: up
               ("neuclip.jobs.launch", "neuclip.error_study.fit", 2), ("neuclip.error_study.fit", "neuclip.grid", 3)]
    assert upward(made_up) == ["neuclip.grid.workflow (floor 4) imports neuclip.jobs.launch (floor 6), line 1"]
    assert circle(made_up) == ["neuclip.error_study", "neuclip.grid", "neuclip.jobs", "neuclip.error_study"]
    assert circle(made_up[1:]) is None

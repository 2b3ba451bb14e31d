"""The course's path: which notebooks and which sections are the core, and which are deep dives.

A learner with a day takes the core path; everything else is a deep dive (proofs bit for bit, kernel forensics,
library differences, the longer experiments) to take in any order after it. The marks live in the notebooks
themselves, where a learner sees them and a tool can read them:

- a section whose heading ends with "(deep dive)" is a deep dive, and so is everything under it;
- every other section is core;
- the opening cell says which, in one line that starts with "**Core:**", written from the headings by
  `core_line(nb)` (tests/test_notebook_conventions.py fails when the line and the headings disagree).

`make student CORE=1` hands out core copies: every cell kept (the notebook still runs top to bottom), the deep
dives' cells collapsed in JupyterLab, and the site shows each page's place on the path.
"""

import re
from dataclasses import dataclass

# The core path, in the order to take it: the tour, then fine-tuning itself (SFT), LoRA, preference tuning and
# what a fine-tune forgets (README, "How long it takes"). The numbers are the notebooks' names, not the order.
CORE_NOTEBOOKS = ("00", "11", "02", "08", "09")
# A learner's minutes per notebook: reading, running and every exercise, from working each notebook through as a
# learner would (docs/instructors.md, "Learner time per notebook", says how they were obtained).
STUDY_MINUTES = {"00": 95, "01": 205, "02": 155, "03": 200, "04": 200, "05": 305, "06": 215, "07": 170, "08": 205,
                 "09": 175, "10": 255, "11": 240, "12": 255, "13": 245, "14": 265, "15": 165, "16": 175}
# What each notebook builds on (its first cells say so too); the site draws the path from it.
PREREQUISITES = {"00": (), "01": ("00",), "02": ("00",), "03": ("01", "02"), "04": ("02",), "05": ("02",),
                 "06": ("02",), "07": ("06",), "08": ("02",), "09": ("02",), "10": ("01",), "11": ("00",),
                 "12": ("08",), "13": ("08", "12"), "14": ("02",),
                 "15": ("11", "09"), "16": ("12", "09")}
DEEP_DIVE = "(deep dive)"
HEADING = re.compile(r"^(#{2,4})\s+(.*\S)\s*$")
NUMBER = re.compile(r"^(\d+(?:\.\d+)*)\.?\s*(?:·\s*)?(.*)$")
PATH_BLOCK = re.compile(r"\n*^\*\*On the path:\*\*.*\n\n^\*\*Core:\*\*.*$", flags=re.M)


@dataclass
class Section:
    name: str        # "2.3", or the title of an unnumbered section ("Exercises")
    title: str
    level: int       # 2 for ##, 3 for ###, 4 for ####
    first_cell: int  # the index of the cell that holds the heading
    deep: bool       # marked "(deep dive)", itself or through a parent
    listed: bool = True  # an unnumbered subsection is part of its parent, not listed on its own


def sections(nb) -> list[Section]:
    """Every section of a notebook below its title, in order, with its deep-dive mark resolved."""
    found: list[Section] = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            match = HEADING.match(line)
            if not match:
                continue
            level, text = len(match.group(1)), match.group(2)
            deep = text.endswith(DEEP_DIVE)
            text = text.removesuffix(DEEP_DIVE).strip()
            number = NUMBER.match(text)
            name, title = (number.group(1), number.group(2)) if number else (text, text)
            parent = next((s for s in reversed(found) if s.level < level), None)
            listed = bool(number) or parent is None
            deep = deep or bool(parent and parent.deep and (not listed or _is_under(name, parent.name)))
            found.append(Section(name, title, level, index, deep, listed))
    return found


def _is_under(name: str, parent: str) -> bool:
    return name.startswith(parent + ".")


def cell_is_deep(nb) -> list[bool]:
    """Per cell: does it sit in a deep-dive section?"""
    marks, current = [], False
    starts = {s.first_cell: s.deep for s in sections(nb)}
    for index, _ in enumerate(nb.cells):
        current = starts.get(index, current)
        marks.append(current)
    return marks


def _split(name: str) -> tuple[str, int] | None:
    """"2.3" -> ("2.", 3); "3" -> ("", 3); a title -> None."""
    head, _, last = name.rpartition(".")
    return (head + "." if head else "", int(last)) if last.isdigit() else None


def _ranges(names: list[str]) -> str:
    """["1", "2.1", "2.2", "2.3", "3", "Exercises"] -> "1, 2.1-2.3, 3 and Exercises" (consecutive siblings joined)."""
    numbered = [n for n in names if _split(n)]
    groups: list[list[str]] = []
    for name in numbered:
        if groups and _split(groups[-1][-1])[0] == _split(name)[0] and _split(groups[-1][-1])[1] + 1 == _split(name)[1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    parts = [g[0] if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups] + [n for n in names if not _split(n)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _compact(found: list[Section], deep: bool) -> list[str]:
    """The shortest list of section names that covers exactly the sections with this mark."""
    listed = [s for s in found if s.listed and s.title.lower() != "recap"]
    names: list[str] = []
    for s in listed:
        below = [t for t in listed if _is_under(t.name, s.name)]
        if s.deep != deep or s.name in names:
            continue
        if any(t.deep != deep for t in below) and any(t.deep == deep for t in below):
            continue  # both marks inside: its parts are listed one by one
        if not any(_is_under(s.name, n) for n in names):
            names.append(s.name)  # (a core section whose only subsections are deep dives is listed whole)
    return names


def core_line(nb) -> str:
    """The opening cell's path line, written from the headings."""
    found = sections(nb)
    core, deep = _compact(found, deep=False), _compact(found, deep=True)
    line = f"**Core:** sections {_ranges(core)}" if core else "**Core:** none"
    if deep:
        line += f"; **deep dives** (marked *{DEEP_DIVE}* in their headings): {_ranges(deep)}"
    return line.replace("Exercises", "the exercises") + "."


def path_block(nb, stem: str) -> str:
    """The two lines that end every notebook's opening cell: where it sits on the path, and its core sections."""
    number = stem[:2]
    order = " → ".join(CORE_NOTEBOOKS)
    where = (f"a core notebook ({order})" if number in CORE_NOTEBOOKS
             else f"a deep dive, for after the core path ({order})")
    minutes = STUDY_MINUTES.get(number)
    study = f", about {minutes} minutes of study with the exercises" if minutes else ""
    return f"**On the path:** {where}{study}.\n\n{core_line(nb)}"


def with_path_block(nb, stem: str) -> bool:
    """Write (or rewrite) the path block at the end of the opening cell; True when the cell changed."""
    cell = nb.cells[0]
    text = PATH_BLOCK.sub("", cell.source).rstrip("\n") + "\n\n" + path_block(nb, stem)
    changed, cell.source = text != cell.source, text
    return changed


def notebook_on_path(stem: str) -> str:
    """"core" or "deep dive", for a notebook file stem such as "08_preference_tuning"."""
    return "core" if stem[:2] in CORE_NOTEBOOKS else "deep dive"


def main(argv=None) -> int:
    import argparse

    import nbformat

    from course_utils.tools.notebooks import course_notebooks

    parser = argparse.ArgumentParser(description="Write each notebook's path block (core sections) from its headings.")
    parser.add_argument("--check", action="store_true", help="only list the notebooks whose block is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path in course_notebooks():
        nb = nbformat.read(path, as_version=4)
        if with_path_block(nb, path.stem):
            stale.append(path.name)
            if not args.check:
                nbformat.write(nb, path)
    verb = "out of date" if args.check else "rewrote"
    for name in stale:
        print(f"{verb}: {name}")
    return 1 if args.check and stale else 0


def where_it_sits(stem: str) -> str:
    """One line for a notebook's page: its place on the path and what to read first (plain text)."""
    number = stem[:2]
    order = " → ".join(f"[{n}]" if n == number else n for n in CORE_NOTEBOOKS)
    kind = "core" if number in CORE_NOTEBOOKS else "deep dive"
    before = ", ".join(PREREQUISITES.get(number, ())) or "nothing"
    minutes = STUDY_MINUTES.get(number)
    study = f", about {minutes} min of study" if minutes else ""
    return f"Core path: {order} · this notebook: {kind}{study} · read first: {before}"


def core_copy(nb):
    """A copy of `nb` whose deep-dive cells are collapsed in JupyterLab (kept: the notebook still runs)."""
    import nbformat

    copy = nbformat.from_dict(nb)
    for cell, deep in zip(copy.cells, cell_is_deep(copy)):
        if deep:
            cell.metadata.setdefault("jupyter", {}).update(source_hidden=True, outputs_hidden=True)
    return copy


if __name__ == "__main__":
    raise SystemExit(main())

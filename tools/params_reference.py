"""The parameter reference in docs/params.md, generated from params.yaml and its comments.

params.yaml is the one place a parameter is documented (its trailing comment, or the comment
lines just above it). This prints that as a Markdown table, or with ``--write docs/params.md``
replaces the table between the ``<!-- params:begin -->`` / ``<!-- params:end -->`` markers; the
test suite checks that copy is current.

    python tools/params_reference.py --write docs/params.md
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

BEGIN, END = "<!-- params:begin -->", "<!-- params:end -->"
LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def reference(params_yaml: str) -> str:
    rows, path, above = [], [], []
    for raw in params_yaml.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            if raw.startswith(" "):  # comment lines inside a section describe the key below them
                above.append(stripped.lstrip("# ").strip())
            continue
        match = LINE.match(raw)
        if not match:
            continue
        depth = len(match["indent"]) // 2
        path = path[:depth] + [match["key"]]
        meaning = " ".join([*above, (match["comment"] or "").strip()]).strip()
        above = []
        value = match["value"].strip()
        if depth == 0 and value:  # a top-level key with a value of its own (preset), not a section
            rows.append(f"| `{match['key']}` | `{value}` | {meaning.replace('|', '/')} |")
        elif depth == 0:
            rows.append(f"| **`{match['key']}`** | | {meaning.replace('|', '/')} |")
        else:
            shown = f"`{value}`" if value else ""
            rows.append(f"| `{'.'.join(path)}` | {shown.replace('|', '/')} | {meaning.replace('|', '/')} |")
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--write", metavar="FILE", help="replace the table between the markers in this file")
    args = parser.parse_args()
    table = reference(Path(args.params).read_text())
    if not args.write:
        print(table)
        return
    doc = Path(args.write).read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    Path(args.write).write_text(doc[:start] + "\n" + table + "\n" + doc[end:])


if __name__ == "__main__":
    main()

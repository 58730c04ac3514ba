"""Check that nothing the README dropped is lost: every paragraph, list item, table row and code block of an old
README must appear in the docs pages (``docs/**/*.md``, pages they include, or the new README).

    python scripts/check_readme_moved.py OLD_README.md        # e.g. git show <commit>:README.md > /tmp/old.md

Headings are reported but do not fail the check (a section may be renamed or split across pages). Text is
compared after normalising what moving a paragraph may change: link targets (``[text](url)`` -> ``text``),
heading levels and cross-references (``see *Data* below`` -> ``see Data``) are ignored, whitespace is
collapsed. Prints every unit not found and exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_INCLUDE = re.compile(r'^--8<-- "([^"]+)"\s*$', re.M)


def normalise(text: str) -> str:
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    # a cross-reference "see *Data* below" becomes a link "see [Data](operator/data.md)" on another page
    text = re.sub(r"\bsee \*([^*]+)\*(?: below)?", r"see \1", text)
    return " ".join(text.split())


def units(markdown: str) -> list[str]:
    """Paragraphs, list items, table rows and fenced code blocks of ``markdown``."""
    found: list[str] = []
    lines = markdown.splitlines()
    i, block = 0, []

    def flush() -> None:
        if block:
            found.append("\n".join(block))
            block.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines) - 1)
            found.append("\n".join(lines[i:end + 1]))
            i = end + 1
            continue
        if not line.strip():
            flush()
        elif line.startswith("|") or line.startswith("#"):
            flush()
            if not re.fullmatch(r"\|[-| :]+\|", line.strip()):
                found.append(line)
        elif re.match(r"^(\d+\.|-) ", line):
            flush()
            block.append(line)
        else:
            block.append(line)
        i += 1
    flush()
    return found


def corpus(docs: Path, readme: Path, root: Path) -> str:
    texts = []
    for page in sorted(docs.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        texts.append(text)
        texts += [(root / target).read_text(encoding="utf-8") for target in _INCLUDE.findall(text)]
    texts.append(readme.read_text(encoding="utf-8"))
    return normalise("\n\n".join(texts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old_readme", type=Path)
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    haystack = corpus(args.docs, args.readme, args.root)
    old = units(args.old_readme.read_text(encoding="utf-8"))
    missing = [u for u in old if normalise(u) and normalise(u) not in haystack]
    headings = [u for u in missing if u.startswith("#")]  # a section may be renamed or split: reported, not failed
    missing = [u for u in missing if not u.startswith("#")]
    for unit in headings:
        print(f"heading not kept as is (its content is checked like the rest): {unit}")
    for unit in missing:
        print(f"NOT FOUND:\n{unit}\n", file=sys.stderr)
    print(f"{len(old) - len(missing)} of {len(old)} units of {args.old_readme} found in {args.docs}/ or {args.readme}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

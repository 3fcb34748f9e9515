"""The documentation holds together: README.md stays a short front door, and every relative link in it and in
docs/*.md leads to a file that exists (and, with #anchor, to a heading of that file), so a page that moves or a
heading that is renamed cannot leave a dead link behind."""
import glob
import html
import os
import re

import pytest

from conftest import ROOT

README_MAX_LINES = 220
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)      # http:, https:, mailto:, ...


def prose(path):
    """The page's lines outside code: fenced blocks, indented blocks and inline code spans removed (a link or a
    heading shown as code is not one)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().split("\n")
    kept, fenced = [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            continue
        kept.append(re.sub(r"`[^`]*`", "", line))
    return kept


def slug(heading):
    """The anchor GitHub gives a heading: its text without markup, lower case, punctuation dropped, spaces as
    hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = html.unescape(text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every heading anchor of a page, with GitHub's -1, -2, ... for a heading text seen before."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().split("\n")
    found, seen, fenced = set(), {}, False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not fenced:
            base = slug(m.group(1))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def links(path):
    return [target for line in prose(path) for target in LINK.findall(line)]


def test_the_pages_are_there():
    assert len(PAGES) > 1 and all(p.endswith(".md") for p in PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not os.path.exists(os.path.join(ROOT, path)):
            broken.append(f"{target}: no file {path}")
        elif anchor and (not path.endswith(".md") or anchor not in anchors(path)):
            broken.append(f"{target}: no heading #{anchor} in {path}")
    assert broken == [], f"{page} has dead links: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(t.partition("#")[0]) for t in links("README.md")}
    assert [p for p in PAGES[1:] if p not in linked] == []


def test_the_readme_stays_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        count = len(f.read().splitlines())
    assert count <= README_MAX_LINES, f"README.md is {count} lines; move details to a page in docs/"


def test_the_anchor_rule_is_githubs():
    assert slug("Nuclei as objects (`val.py --instances`)") == "nuclei-as-objects-valpy---instances"
    assert slug("A stopped run, and resuming it") == "a-stopped-run-and-resuming-it"
    assert slug("The DSB2018 nuclei set (preprocess_dsb2018.py)") == "the-dsb2018-nuclei-set-preprocess_dsb2018py"

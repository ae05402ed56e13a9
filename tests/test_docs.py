"""The documents stay true to the repository: every test, file and section they cite exists.

Code, tests, README and docs cite `docs/method.md#<section>` (or the paper), never the section numbers
of a document that is not in the repository.
"""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md", "benchmarks/RESULTS.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]
SOURCES = sorted(set(glob.glob("*.py", root_dir=ROOT) + glob.glob("tests/*.py", root_dir=ROOT)
                     + glob.glob("benchmarks/*.py", root_dir=ROOT)) - {"tests/test_docs.py"})  # not this file


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def anchors(path: str) -> set[str]:
    """GitHub's link targets of a markdown file's headings."""
    headings = re.findall(r"^#{1,6} (.+)$", read(path), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def defined_tests() -> dict[str, set[str]]:
    found = {}
    for path in glob.glob("tests/*.py", root_dir=ROOT):
        for name in re.findall(r"^def (test_\w+)", read(path), re.M):
            found.setdefault(name, set()).add(path)
    return found


@pytest.mark.parametrize("path", DOCUMENTS + SOURCES)
def test_links_to_documents_and_sections_resolve(path):
    text, folder = read(path), os.path.dirname(path)
    links = re.findall(r"((?:[\w./-]+/)?[\w-]+\.md)#([\w-]+)", text)  # docs/method.md#anchor, method.md#anchor
    links += [(os.path.basename(path), anchor) for anchor in re.findall(r"\]\(#([\w-]+)\)", text)]
    for target, anchor in links:
        candidates = [os.path.normpath(os.path.join(folder, target)), os.path.normpath(target)]
        existing = [c for c in candidates if os.path.isfile(os.path.join(ROOT, c))]
        assert existing, f"{path} links to {target}, which does not exist"
        assert anchor in anchors(existing[0]), f"{path} links to {target}#{anchor}: no such section"
    if not path.endswith(".md"):  # `x[i](y)` in code is not a link
        return
    for target in re.findall(r"\]\(([\w./-]+)\)", text):  # plain relative links of markdown files
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, folder, target)), f"{path} links to {target}"


@pytest.mark.parametrize("path", DOCUMENTS)
def test_cited_tests_exist(path):
    tests, current = defined_tests(), None
    for token in re.findall(r"`([^`]+)`", read(path)):
        cited = re.fullmatch(r"(tests/\w+\.py)::(test_\w+)", token)
        if cited:
            current, name = cited.groups()
        elif re.fullmatch(r"test_\w+", token):
            name = token  # a name listed after a file's first one belongs to that file
        else:
            continue
        assert name in tests, f"{path} cites {name}, which is not a test"
        assert current is None or current in tests[name], f"{path} cites {current}::{name}, not in that file"


@pytest.mark.parametrize("path", DOCUMENTS + SOURCES)
def test_no_references_to_an_outside_document(path):
    text = read(path)
    assert "§" not in text and "elasticdiffusion-method" not in text
    assert not re.search(r"\(D\d{1,2}\b|\bD\d{1,2}\)|, D\d{1,2}\b", text), "a defect number of an outside list"

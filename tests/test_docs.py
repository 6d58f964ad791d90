"""The documentation runs as written: every ```python block of README.md and docs/*.md is executed,
and every relative link of those pages points at a file of the repository.

How the blocks run: the blocks of one page run in order in one shared namespace, as a reader
goes down the page (a block may use the names an earlier block of the same page defined); each
page starts from a fresh namespace, in an empty temporary working directory (files a block writes,
such as a ``runs/`` folder, land there), with ``torch.manual_seed(0)`` and one intra-op thread.
A traceback names the page and the line of the block (``docs/attacks.md:42``).

A block that cannot run here (it needs a GPU, say) is opted out by an HTML comment on the line
just before its fence, with the reason: ``<!-- not-run: needs a GPU -->``. The opt-outs are
counted and listed by ``test_opt_outs_are_few_and_say_why``. A block that calls
``torch.distributed.init_process_group`` (the torchrun examples) runs as a one-process group:
the test sets the environment variables torchrun would set for rank 0 of 1.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
OPT_OUT = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>.*?)\s*-->\s*$")
# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    not_run: str | None  # the reason of an opt-out, or None


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, dedented by their fence's indentation (blocks
    inside list items are indented)."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m["indent"], m["lang"], i
        body = []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        if i == len(lines):
            raise ValueError(f"{path.name}:{start + 1}: a code block that is never closed")
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        opt = OPT_OUT.match(previous)
        found.append(Block(_name(path), start + 1, lang, "\n".join(body) + "\n", opt["reason"] if opt else None))
        i += 1
    return found


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def python_blocks(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang == "python"]


PAGES_WITH_PYTHON = [p for p in PAGES if python_blocks(p)]


def test_the_extractor_finds_indented_blocks_and_opt_outs(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n- item\n\n  ```python\n  if x:\n      y = 2\n  ```\n\n"
        "<!-- not-run: needs a GPU -->\n```python\nz = torch.ones(1, device='cuda')\n```\n\n```bash\nls\n```\n"
    )
    found = blocks(page)
    assert [(b.lang, b.line, b.not_run) for b in found] == [
        ("python", 3, None),
        ("python", 9, None),
        ("python", 15, "needs a GPU"),
        ("bash", 19, None),
    ]
    assert found[1].source == "if x:\n    y = 2\n"


def test_the_pages_have_python_examples():
    # the README's four examples at least: a silent extractor must not pass for a green test
    assert len(python_blocks(ROOT / "README.md")) >= 4
    assert ROOT / "README.md" in PAGES_WITH_PYTHON


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON, ids=_name)
def test_the_python_examples_run(page, tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    torch.manual_seed(0)
    ran = 0
    for block in python_blocks(page):
        if block.not_run is not None:
            continue
        if "init_process_group" in block.source:
            for key, value in dict(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
            ).items():
                monkeypatch.setenv(key, value)
        code = compile(block.source, f"{block.page}:{block.line}", "exec")
        exec(code, namespace)
        ran += 1
    assert ran > 0, f"{_name(page)}: every Python block is opted out"


def test_opt_outs_are_few_and_say_why():
    every = [b for page in PAGES for b in python_blocks(page)]
    opted = [b for b in every if b.not_run is not None]
    listing = ", ".join(f"{b.page}:{b.line} ({b.not_run})" for b in opted)
    assert all(b.not_run for b in opted), f"an opt-out without a reason: {listing}"
    # an opt-out is for what this machine cannot run (a GPU), not for a fragment: at most 1 in 5
    assert len(opted) * 5 <= len(every), f"{len(opted)} of {len(every)} Python blocks are not run: {listing}"


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of each link to a file of the repository or a heading, outside code blocks."""
    found, in_code = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line) or re.match(r"^\s*```\s*$", line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for m in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"^(https?|mailto):", m["target"]):
                found.append((number, m["target"]))
    return found


def anchors_of(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    found, in_code = set(), False
    for line in text.splitlines():
        if FENCE.match(line) or re.match(r"^\s*```\s*$", line):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6}\s+(.*?)\s*$", line)):
            found.add(re.sub(r"[^\w\- ]", "", m[1].lower()).replace(" ", "-"))
    return found


def test_relative_links_point_at_files_and_headings():
    broken = []
    for page in PAGES:
        for number, target in relative_links(page):
            file, _, anchor = target.partition("#")
            path = page.parent / file if file else page
            if not path.exists():
                broken.append(f"{_name(page)}:{number}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors_of(path.read_text()):
                broken.append(f"{_name(page)}:{number}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_sees_what_it_should(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md#top) [web](https://example.org) `[not](code.md)`\n![img](missing.png) [here](#x)\n")
    assert relative_links(page) == [(1, "page.md#top"), (2, "missing.png"), (2, "#x")]
    text = "# The `fastrob` command\n## Fused, twice-differentiable kernels\n```\n# not a heading\n```\n"
    assert anchors_of(text) == {"the-fastrob-command", "fused-twice-differentiable-kernels"}

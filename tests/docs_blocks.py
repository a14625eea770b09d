"""The shell commands the documentation shows, collected so that tests/test_docs.py can run them.

Sources (globbed, so a new README is picked up with no extra work): ``README.md``, every
``*/README.md`` one level down (the stage READMEs, ``app/``, ``experiments/``), ``docs/*.md``,
and the usage comment at the top of ``docker-compose.yml`` and ``docker-shell.sh``.

What counts as a command block:

* a fenced block tagged ``bash``, ``sh``, ``shell``, ``zsh`` or ``console``;
* an untagged fenced block whose first command line starts with a program (on PATH or in the
  project's venv, or ``./script``, or ``VAR=value program``); untagged blocks that start with
  anything else (a diagram, an error message, a folder layout) are text. A ``text``/``yaml``/
  ``ini``/``python`` tag is never run (Python snippets are not shell);
* ``$ `` prompts: when a block has any, only the prompted lines (and ``> `` continuations) are
  commands and the rest is the output shown, as in a ``console`` block;
* a *synopsis* (a line with ``[--option ...]``, the usual usage notation) is not run: the test
  checks instead that ``<program> <subcommand> --help`` lists every option it names;
* usage comments: lines ``#   COMMAND   description`` (3+ spaces after ``#``) whose first word is
  a program; the description is cut at 2+ spaces or `` # ``; a description ``e.g. COMMAND``
  is an example that runs too.

Ids are stable and readable: ``<file>#<heading slug>``, with ``-2``, ``-3`` for later blocks under
the same heading (``docker-shell.sh#usage`` for a usage comment). tests/docs_blocks.yaml refers to them.

Hand-written because no library collects shell from Markdown with these rules (pytest-markdown-docs,
phmdoctest and mktestdocs run Python blocks, or need the blocks annotated).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

SHELL_TAGS = {"bash", "sh", "shell", "zsh", "console"}
USAGE_COMMENT_FILES = ("docker-compose.yml", "docker-shell.sh")
CONTAINER_WORDS = re.compile(r"(^|[\s;&|(])(docker|docker-compose|\./docker-shell\.sh)(\s|$)|CVPIPE_RUNNER=docker")
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SYNOPSIS = re.compile(r"\[--?[\w-]")
_ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


@dataclass
class Block:
    """One runnable unit of the docs: its id, where it is, and its commands."""

    id: str
    path: str  # relative to the repository root
    line: int  # 1-based line of the block's first command
    text: str  # the commands, prompts and shown output removed
    synopsis: bool = False
    tags: set[str] = field(default_factory=set)

    @property
    def container(self) -> bool:
        return any(CONTAINER_WORDS.search(line) for line in command_lines(self.text))


def doc_files(repo: Path) -> list[Path]:
    """Every documentation file whose commands are tested, in a fixed order."""
    files = [repo / "README.md", *sorted(repo.glob("*/README.md")), *sorted(repo.glob("docs/*.md"))]
    files += [repo / name for name in USAGE_COMMENT_FILES]
    return [f for f in files if f.is_file()]


def collect(repo: Path, files: list[Path] | None = None, path_dirs: list[str] | None = None) -> list[Block]:
    """All command blocks of *files* (default: :func:`doc_files`), ids unique across them."""
    blocks: list[Block] = []
    for f in files if files is not None else doc_files(repo):
        rel = f.relative_to(repo).as_posix() if f.is_relative_to(repo) else f.name
        text = f.read_text(encoding="utf-8")
        if f.suffix == ".md":
            blocks += markdown_blocks(rel, text, path_dirs)
        else:
            blocks += usage_comment_blocks(rel, text, path_dirs)
    ids = [b.id for b in blocks]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, f"duplicate doc block ids: {sorted(dupes)}"
    return blocks


def slug(heading: str) -> str:
    """GitHub-style anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return re.sub(r"\s", "-", s) or "top"


def markdown_blocks(rel: str, text: str, path_dirs: list[str] | None = None) -> list[Block]:
    """The command blocks of one Markdown file."""
    out: list[Block] = []
    heading, seen = "top", {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            h = _HEADING.match(lines[i])
            if h:
                heading = slug(h.group(2))
            i += 1
            continue
        indent, fence, tag = len(m.group(1)), m.group(2), m.group(3).lower()
        start = i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[:3]):
            i += 1
        body = [line[indent:] if line[:indent].isspace() else line for line in lines[start:i]]
        i += 1
        block = _make_block(rel, heading, seen, start + 1, body, tag, path_dirs)
        if block is not None:
            out.append(block)
    return out


def _make_block(rel, heading, seen, line, body, tag, path_dirs) -> Block | None:
    if tag and tag not in SHELL_TAGS:
        return None
    commands = strip_prompts(body, force=tag == "console")
    first = next((c for c in commands if c.strip() and not c.lstrip().startswith("#")), None)
    if first is None or (not tag and not starts_with_program(first, path_dirs)):
        return None
    n = seen[heading] = seen.get(heading, 0) + 1
    bid = f"{rel}#{heading}" + (f"-{n}" if n > 1 else "")
    synopsis = any(_SYNOPSIS.search(c) for c in commands)
    return Block(bid, rel, line, "\n".join(commands).strip("\n") + "\n", synopsis=synopsis)


def strip_prompts(body: list[str], force: bool = False) -> list[str]:
    """Commands of a block: with ``$ `` prompts (or a console block), the prompted lines only."""
    if not force and not any(line.lstrip().startswith("$ ") for line in body):
        return list(body)
    out: list[str] = []
    in_command = False
    for line in body:
        s = line.lstrip()
        if s.startswith("$ "):
            out.append(s[2:])
            in_command = s.rstrip().endswith("\\")
        elif (in_command or s.startswith("> ")) and out:
            out.append(s[2:] if s.startswith("> ") else line)
            in_command = s.rstrip().endswith("\\")
    return out


def starts_with_program(line: str, path_dirs: list[str] | None = None) -> bool:
    """Whether a line's first word (after ``VAR=value`` prefixes) is a program one could run."""
    words = line.split()
    while words and _ENV_PREFIX.match(words[0]):
        words = words[1:]
    if not words:
        return False
    word = words[0]
    if word.startswith("./") or word in ("export", "cd", "source", "set"):
        return True
    path = None if path_dirs is None else ":".join(path_dirs)
    return re.fullmatch(r"[\w.+-]+", word) is not None and shutil.which(word, path=path) is not None


def usage_comment_blocks(rel: str, text: str, path_dirs: list[str] | None = None) -> list[Block]:
    """The usage comment at the top of a script or compose file: ``#   COMMAND   description``."""
    commands, first_line = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        m = re.match(r"#\s{3,}(\S.*)$", line)
        if not m:
            continue
        parts = re.split(r"\s+#\s|\s{2,}", m.group(1).rstrip(), maxsplit=1)
        command, rest = parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")
        for candidate in (command, rest[5:].strip() if rest.startswith("e.g. ") else ""):
            if candidate and (candidate.startswith("./") or starts_with_program(candidate, path_dirs)):
                commands.append(candidate)
                first_line = first_line or n
    if not commands:
        return []
    return [Block(f"{rel}#usage", rel, first_line, "\n".join(commands) + "\n")]


def command_lines(text: str) -> list[str]:
    """Non-blank, non-comment lines of a block."""
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def synopsis_options(text: str) -> list[tuple[list[str], list[str]]]:
    """For each synopsis command: the words before the first option, and every ``--option`` named
    (a line that starts with an option continues the command above it)."""
    out: list[tuple[list[str], list[str]]] = []
    for line in command_lines(text):
        words = []
        for w in line.split():
            if w.startswith(("[", "-", "<")):
                break
            words.append(w)
        options = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line))
        if not words and out:
            out[-1] = (out[-1][0], sorted(options | set(out[-1][1])))
        else:
            out.append((words, sorted(options)))
    return out

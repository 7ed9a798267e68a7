"""Runs the fenced code blocks of one Markdown page, as written, in order.

``python tests/docs_runner.py PAGE.md`` (what ``tests/test_docs.py`` does for
README.md and every page of docs/, from a fresh temporary working directory).

What a page's blocks mean here (docs/writing-docs.md says the same for
a writer):

- The fence's info string says what a block is. ``python`` and ``sh`` blocks
  run; ``text`` (output, a synopsis, a listing) and ``console`` (a shell
  session with its output) do not; ``json`` must parse; ``c`` blocks are
  only used by a ``file`` marker (below). Any other info string, or none, is
  an error: every block is one of these.
- The ``python`` blocks of a page run one after another in one namespace, as
  a reader pasting them in order would, so a block may use the names an
  earlier block defined. A ``sh`` block runs with ``bash -e -o pipefail`` in
  the page's working directory (the same one the Python blocks run in).
- An HTML comment on the line before the opening fence is a marker:

  ``<!-- docs-test: skip REASON -->``
      not run (a ``python`` block must still compile, a ``sh`` block must
      pass ``bash -n``); REASON, required, says why it cannot run in CI.
  ``<!-- docs-test: file NAME -->``
      the block is written to NAME in the working directory (a C source
      that a later ``sh`` block builds, say), not run.
  ``<!-- docs-test: context -->``
      a complete async program, visible to the reader, whose body has one
      line ``...  # the fragments below run here``. The later blocks of the
      page run at that line, one after another: ``python`` fragments with
      ``await`` allowed at their top level and the program's local names
      (``sup``, ``pool`` ...) in scope, on the program's event loop.
  ``<!-- docs-test: program -->``
      inside a context: a complete program of its own (it calls
      ``anyio.run``, ``asyncio.run`` or ``trio.run``), run on a thread with
      no event loop, with the fragments' names in scope.

Tracebacks name the page and its line (the blocks are compiled with the
page's line numbers), so a failure reads ``docs/supervisor.md, line 312``.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Info strings: blocks that run, blocks that are shown only, blocks that parse.
RUN = frozenset({"python", "sh"})
SHOWN = frozenset({"text", "console", "c"})
PARSED = frozenset({"json"})
MARKERS = frozenset({"skip", "file", "context", "program"})
#: The line of a context block where the page's later blocks run.
FRAGMENTS_LINE = re.compile(r"^(?P<indent>\s*)\.\.\.\s*# the fragments below run here\s*$")
#: Seconds one shell block may take.
SHELL_TIMEOUT = 300

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+)(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<kind>[\w-]+)\s*(?P<argument>.*?)\s*-->\s*$")


class DocsError(Exception):
    """A page that breaks the conventions above, or a block that failed."""


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: str  # as given on the command line: tracebacks name it
    line: int  # the line of its first line of code (1-based)
    info: str  # the fence's info string
    code: str
    marker: str | None = None
    argument: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line - 1}"  # the line of the opening fence

    def compile(self, *, top_level_await: bool = False) -> Any:
        """The block's code object, with the page's line numbers."""
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if top_level_await else 0
        source = "\n" * (self.line - 1) + self.code
        return compile(source, self.page, "exec", flags=flags, dont_inherit=True)


def parse(text: str, page: str) -> list[Block]:
    """The fenced blocks of a Markdown page, with their markers; a
    :class:`DocsError` for an unclosed fence, an unknown info string or
    marker, or a marker without its argument."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].strip().split(" ")[0] if opening["info"].strip() else ""
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        if end == len(lines):
            raise DocsError(f"{page}:{index + 1}: a fence that is never closed")
        if info not in RUN | SHOWN | PARSED:
            raise DocsError(
                f"{page}:{index + 1}: fenced block with info string {info!r}: use one of "
                f"{sorted(RUN | SHOWN | PARSED)} (text: output or not code)"
            )
        body = [
            line[len(indent) :] if line.startswith(indent) else line
            for line in lines[index + 1 : end]
        ]
        marker, argument = _marker_before(lines, index, page)
        blocks.append(Block(page, index + 2, info, "\n".join(body) + "\n", marker, argument))
        index = end + 1
    return blocks


def _marker_before(lines: list[str], fence: int, page: str) -> tuple[str | None, str]:
    previous = fence - 1
    while previous >= 0 and not lines[previous].strip():
        previous -= 1
    found = _MARKER.match(lines[previous]) if previous >= 0 else None
    if found is None:
        if previous >= 0 and "docs-test" in lines[previous]:
            raise DocsError(f"{page}:{previous + 1}: not a docs-test marker: {lines[previous]!r}")
        return None, ""
    kind, argument = found["kind"], found["argument"]
    if kind not in MARKERS:
        raise DocsError(f"{page}:{previous + 1}: unknown docs-test marker {kind!r}")
    if kind in ("skip", "file") and not argument:
        raise DocsError(
            f"{page}:{previous + 1}: docs-test: {kind} needs its argument (a reason, a name)"
        )
    return kind, argument


# ---- running a page ---------------------------------------------------------


def check_shown(block: Block) -> None:
    """What a block that does not run must still satisfy."""
    if block.info == "json" and block.marker != "skip":
        try:
            json.loads(block.code)
        except ValueError as exc:
            raise DocsError(f"{block.where}: the json block does not parse: {exc}") from None
    if block.marker == "skip":
        if block.info == "python":
            block.compile(top_level_await=True)
        elif block.info == "sh":
            checked = subprocess.run(["bash", "-n"], input=block.code, text=True, check=False)
            if checked.returncode != 0:
                raise DocsError(f"{block.where}: the skipped sh block is not valid bash")


def run_shell(block: Block) -> None:
    print(f"--- {block.where} (sh)", flush=True)
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code],
        timeout=SHELL_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise DocsError(f"{block.where}: the sh block exited {done.returncode}")


class Page:
    """One page's blocks, run in order."""

    def __init__(self, blocks: list[Block]) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__main__"}
        self._blocks: Iterator[Block] = iter(blocks)
        self._in_context = False

    def run(self) -> None:
        for block in self._blocks:
            if self._done_without_running(block):
                continue
            if block.marker == "program":
                raise DocsError(f"{block.where}: docs-test: program outside a context block")
            if block.info == "sh":
                run_shell(block)
            elif block.marker == "context":
                self._run_context(block)
            else:
                print(f"--- {block.where} (python)", flush=True)
                exec(block.compile(), self.namespace)  # the page's own code

    def _done_without_running(self, block: Block) -> bool:
        if block.info in RUN and block.marker not in ("skip", "file"):
            return False
        if block.marker == "file":
            Path(block.argument).write_text(block.code)
        check_shown(block)
        return True

    def _run_context(self, block: Block) -> None:
        lines = block.code.splitlines()
        places = [number for number, line in enumerate(lines) if FRAGMENTS_LINE.match(line)]
        if len(places) != 1:
            raise DocsError(
                f"{block.where}: a context block has exactly one line "
                "'...  # the fragments below run here'"
            )
        match = FRAGMENTS_LINE.match(lines[places[0]])
        assert match is not None
        lines[places[0]] = f"{match['indent']}await __docs_fragments__(locals())"
        self.namespace["__docs_fragments__"] = self._fragments
        print(f"--- {block.where} (python, context)", flush=True)
        context = Block(block.page, block.line, block.info, "\n".join(lines) + "\n")
        exec(context.compile(), self.namespace)  # the page's own code
        if not self._in_context:
            raise DocsError(f"{block.where}: the context block never reached its fragments line")

    async def _fragments(self, scope: dict[str, Any]) -> None:
        import anyio

        self._in_context = True
        names = {**self.namespace, **scope}
        for block in self._blocks:
            if self._done_without_running(block):
                continue
            if block.marker == "context":
                raise DocsError(f"{block.where}: a context block inside a context block")
            if block.info == "sh":
                await anyio.to_thread.run_sync(run_shell, block)
            elif block.marker == "program":
                print(f"--- {block.where} (python, program)", flush=True)
                code = block.compile()
                await anyio.to_thread.run_sync(exec, code, names)
            else:
                print(f"--- {block.where} (python, fragment)", flush=True)
                code = block.compile(top_level_await=True)
                result = eval(code, names)  # the page's own code
                if code.co_flags & inspect.CO_COROUTINE:
                    await result


#: The checkout: pages are named relative to it.
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tests/docs_runner.py PAGE.md", file=sys.stderr)
        return 2
    # The blocks import as a reader's interpreter would: from the working
    # directory, not from tests/ (whose tests/ray package would hide Ray).
    sys.path[0] = os.getcwd()
    path = Path(argv[1]).resolve()
    page = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    try:
        Page(parse(path.read_text(), page)).run()
    except DocsError as exc:
        print(f"docs-test: {exc}", file=sys.stderr)
        return 1
    print("docs-test: every block ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""README.md and every page of docs/ run as written: each fenced ``python`` and
``sh`` block, in order, through ``tests/docs_runner.py`` (its docstring, and
docs/writing-docs.md, say how a page marks a block that is output, that
cannot run in CI, or that needs a setup)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from hlasync import GuestCrashed, GuestTimeout, Sandbox, SandboxConfig, guests
from hlasync.js import default_config as js_default_config
from hlasync.kvm import Kvm

from .conftest import require_tool
from .docs_runner import DocsError, parse

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "docs_runner.py"
PAGES = ["README.md", *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))]
#: Seconds one page may take (the Ray pages start a Ray instance or two).
PAGE_TIMEOUT = 600


def run_page(page: Path, work: Path) -> subprocess.CompletedProcess[str]:
    """Run one page's blocks from ``work``; the completed runner."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HYPERLIGHT_CORE_DUMP_DIR"] = str(work / "dumps")
    (work / "dumps").mkdir(exist_ok=True)
    # Ray's files (ray_current_cluster, sockets under 108 bytes) in a short
    # directory of the page's own: a head a page starts is found by that page alone.
    ray_temp = Path(tempfile.mkdtemp(prefix="hldoc-", dir="/tmp"))
    env["RAY_TMPDIR"] = str(ray_temp)
    env.pop("RAY_ADDRESS", None)
    try:
        return subprocess.run(
            [sys.executable, str(RUNNER), str(page)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=PAGE_TIMEOUT,
            check=False,
        )
    finally:
        subprocess.run(["rm", "-rf", str(ray_temp)], check=False)


@pytest.mark.parametrize("page", PAGES)
def test_every_block_of_the_page_runs(page: str, kvm: Kvm, tmp_path: Path) -> None:
    done = run_page(ROOT / page, tmp_path)
    assert done.returncode == 0, (
        f"{page}: a block failed (exit {done.returncode})\n"
        f"stdout:\n{done.stdout[-6000:]}\nstderr:\n{done.stderr[-6000:]}"
    )
    assert "docs-test: every block ran" in done.stdout


def test_every_page_is_run() -> None:
    """A new page under docs/ joins the test by itself: nothing lists them by hand."""
    found = {f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md")}
    assert found | {"README.md"} == set(PAGES)


# ---- the runner itself: it fails where a reader would fail ------------------


def _page(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """Run a page of ``text`` (a new directory of ``tmp_path`` for each)."""
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    page = base / "page.md"
    page.write_text(text)
    work = base / "work"
    work.mkdir()
    return run_page(page, work)


def test_a_block_that_uses_an_undefined_name_fails_naming_its_line(tmp_path: Path) -> None:
    done = _page(
        tmp_path, "Intro.\n\n```python\nx = 1\n```\n\nMore.\n\n```python\nprint(sup)\n```\n"
    )
    assert done.returncode == 1
    assert 'page.md", line 10' in done.stderr and "NameError: name 'sup'" in done.stderr


def test_blocks_of_a_page_share_names_and_a_working_directory(tmp_path: Path) -> None:
    done = _page(
        tmp_path,
        "```python\nname = 'f.txt'\nopen(name, 'w').write('x')\n```\n"
        "```sh\ntest -f f.txt\n```\n"
        "```python\nassert open(name).read() == 'x'\n```\n",
    )
    assert done.returncode == 0, done.stderr


def test_a_failing_shell_block_fails_the_page(tmp_path: Path) -> None:
    done = _page(tmp_path, "```sh\ntrue\nfalse\necho never\n```\n")
    assert done.returncode == 1
    assert "page.md:1: the sh block exited 1" in done.stderr and "never" not in done.stdout


def test_fragments_run_inside_the_context_block(tmp_path: Path) -> None:
    done = _page(
        tmp_path,
        "<!-- docs-test: context -->\n```python\nimport anyio\n\n"
        "async def main() -> None:\n    base = 40\n    ...  # the fragments below run here\n\n"
        "anyio.run(main)\n```\n\n"
        "```python\nawait anyio.sleep(0)\ntotal = base + 1\n```\n\n"
        "<!-- docs-test: program -->\n```python\nanyio.run(anyio.sleep, 0)\n```\n\n"
        "```python\nassert total == 41\nprint('total', total)\n```\n",
    )
    assert done.returncode == 0, done.stderr
    assert "total 41" in done.stdout


def test_a_skip_needs_a_reason_and_a_skipped_block_still_compiles(tmp_path: Path) -> None:
    done = _page(tmp_path, "<!-- docs-test: skip -->\n```python\nx = 1\n```\n")
    assert done.returncode == 1 and "needs its argument" in done.stderr
    done = _page(tmp_path, "<!-- docs-test: skip needs a machine -->\n```python\nx = = 1\n```\n")
    assert done.returncode == 1 and "SyntaxError" in done.stderr


def test_every_fence_says_what_it_holds() -> None:
    with pytest.raises(DocsError, match="info string ''"):
        parse("```\nls\n```\n", "page.md")
    with pytest.raises(DocsError, match="never closed"):
        parse("```python\nx = 1\n", "page.md")
    with pytest.raises(DocsError, match="unknown docs-test marker"):
        parse("<!-- docs-test: later -->\n```python\nx = 1\n```\n", "page.md")
    for page in PAGES:
        parse((ROOT / page).read_text(), page)  # every page follows the conventions


# ---- what the code can say, checked against what the pages say --------------


def table(page: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header row starts with ``header``."""
    lines = (ROOT / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def code_names(text: str) -> list[str]:
    """The backticked identifiers of a cell, leaving out what parentheses explain."""
    while (stripped := re.sub(r"\([^()]*\)", "", text)) != text:
        text = stripped
    return re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", text)


def fenced_after(page: str, heading: str) -> str:
    """The first fenced block after the line ``heading`` of a page."""
    text = (ROOT / page).read_text()
    after = text[text.index(heading) :]
    return after.split("```", 2)[1].split("\n", 1)[1]


def test_the_simpleguest_table_lists_every_function_with_its_signature() -> None:
    listed = {row[0].strip("`") for row in table("docs/guest-sdk.md", "| function | behaviour")}
    done = subprocess.run(
        [sys.executable, "-m", "hlasync", "guest", "functions", "simpleguest"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed == set(done.stdout.split("\n")) - {""}


def test_the_config_table_gives_every_field_and_its_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HLASYNC_SPIN", raising=False)
    monkeypatch.delenv("HLASYNC_HOT_RESTORE", raising=False)
    defaults = SandboxConfig()
    documented: dict[str, str] = {}
    for row in table("docs/guest-sdk.md", "| field | default | allowed"):
        names = code_names(row[0])
        values = [value.strip() for value in row[1].split(", ")] if len(names) > 1 else [row[1]]
        documented.update(zip(names, values, strict=True))
    assert set(documented) == {field.name for field in dataclasses.fields(SandboxConfig)}
    for name, text in documented.items():
        assert _doc_value(text) == getattr(defaults, name), (name, text)


def _doc_value(text: str) -> object:
    """A default as the table writes it: ``8 MiB``, ``10``, ```None`: ...``, ``"auto"``."""
    literal = re.match(r"`([^`]+)`", text)
    if literal:
        return ast.literal_eval(literal.group(1))
    number, _, unit = text.partition(" ")
    return int(number) << {"": 0, "KiB": 10, "MiB": 20}[unit]


def _tree(text: str) -> dict[str, str | None]:
    """class -> parent, from an exception tree drawn with box characters."""
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for line in text.splitlines():
        found = re.match(r"^([│ ]*(?:[├└]── )?)(\w+)", line)
        if found is None:
            continue
        depth = len(found.group(1)) // 4
        del stack[depth:]
        parents[found.group(2)] = stack[-1] if stack else None
        stack.append(found.group(2))
    return parents


def test_the_error_tree_is_the_code_s_and_architecture_md_draws_it() -> None:
    import hlasync.errors

    drawn = hlasync.errors.__doc__ or ""
    start = drawn.index("    HlasyncError")
    tree = _tree(textwrap.dedent(drawn[start:].split("\n\n")[0]))
    actual: dict[str, str | None] = {"HlasyncError": None}
    pending = [hlasync.errors.HlasyncError]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if not sub.__name__.startswith("_"):
                actual[sub.__name__] = cls.__name__
                pending.append(sub)
    assert tree == actual
    assert _tree(fenced_after("docs/architecture.md", "## 10. Errors")) == actual


def test_the_event_table_gives_every_event_and_its_fields() -> None:
    from hlasync import events

    common = {field.name for field in dataclasses.fields(events.Event)}
    rows = table("docs/events.md", "| event | fields | emitted")
    documented = {row[0].strip("`"): set(code_names(row[1])) for row in rows}
    actual = {
        cls.__name__: {field.name for field in dataclasses.fields(cls)} - common
        for cls in vars(events).values()
        if isinstance(cls, type) and issubclass(cls, events.Event) and cls is not events.Event
    }
    assert documented == actual


def test_no_page_installs_a_release_that_does_not_exist() -> None:
    """hlasync is installed from its checkout (README's install command):
    ``pip install 'hlasync[...]'`` would ask a package index for a release
    that is not there."""
    wrong = re.compile(r"pip install\s+['\"]?hlasync\b")
    files = [ROOT / page for page in PAGES] + [
        path
        for folder in ("hlasync", "examples", "tests")
        for path in (ROOT / folder).rglob("*.py")
        if path != Path(__file__)
    ]
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if wrong.search(line)
    ]
    assert found == []


# ---- sample output on the pages, checked against the tools' real output ------


def sample(page: str, command: str) -> list[str]:
    """The output lines a page shows after ``$ COMMAND...`` in a console block
    (up to the next ``$`` line or the end of the block)."""
    for block in parse((ROOT / page).read_text(), page):
        lines = block.code.splitlines()
        for number, line in enumerate(lines):
            if block.info == "console" and line.startswith(f"$ {command}"):
                shown = []
                for out in lines[number + 1 :]:
                    if out.startswith("$ "):
                        break
                    shown.append(out)
                return shown
    raise AssertionError(f"{page} shows no '$ {command}'")


#: A backtrace's frame number, as gdb (``#3``), lldb (``frame #3:``) and
#: ``hlasync dump show`` (``#3``) print it.
_FRAME = re.compile(r"^(?:\* )?(?:frame )?#(\d+):?\s")


def assert_shown_lines_are_real(shown: list[str], output: str, *, sampled: bool = False) -> None:
    """Every line a page shows is a line of the real output, where ``...``
    stands for anything and hex numbers (addresses, offsets) may differ: the
    names, files and line numbers must be the real ones. ``sampled``: the
    dump is of a guest stopped wherever it was (a hang), so its innermost
    frame is a sample: only its function must be in the output, and frames
    may be numbered differently (one more when it stopped in a callee)."""
    real = [line.strip() for line in output.splitlines()]
    for line in shown:
        line = line.strip()
        if line in ("", "..."):
            continue
        frame = _FRAME.match(line)
        if sampled and frame and frame.group(1) == "0":
            function = re.search(r"(?:in |`| )([A-Za-z_]\w*)(?: \(|\+| at )", line)
            assert function is not None and function.group(1) in output, line
            continue
        pattern = re.escape(line).replace(re.escape("..."), ".*")
        pattern = re.sub(r"0x[0-9a-f]+", "0x[0-9a-f]+", pattern)
        if sampled and frame:
            pattern = pattern.replace(f"\\#{frame.group(1)}", r"\#\d+", 1)
        assert any(re.fullmatch(pattern, got) for got in real), (
            f"shown line not in the real output:\n  {line}\nreal output:\n" + "\n".join(real)
        )


def _tool(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    return done.stdout + done.stderr


def test_crashdumps_md_shows_what_gdb_says_of_a_fault(kvm: Kvm, dump_dir: Path) -> None:
    gdb = require_tool("gdb")
    with Sandbox(guests.path("simpleguest")) as sb, pytest.raises(GuestCrashed) as caught:
        sb.call("divide_by_zero")
    core = str(caught.value.core_path)
    shown = sample("docs/crashdumps.md", "gdb -nx -batch -ex bt")
    assert any(line.startswith("#0") for line in shown)
    output = _tool(gdb, "-nx", "-batch", "-ex", "bt", str(guests.path("simpleguest")), core)
    assert_shown_lines_are_real(shown, output)


def make_js_hang_dump(directory: Path) -> Path:
    """The dump of javascript.md's hung handler, with the default sizes."""
    from hlasync.js import JSSandbox

    loop = "function spin() {\n  while (true) {}\n}\nfunction handler(event) { return spin() }\n"
    config = dataclasses.replace(js_default_config(), crashdump_dir=directory)
    with JSSandbox(config=config) as js:
        js.add_handler("loop", loop)
        js.load()
        with pytest.raises(GuestTimeout) as caught:
            js.call_handler("loop", {}, timeout=0.2)
    assert caught.value.core_path is not None
    return Path(caught.value.core_path)


@pytest.fixture(scope="module")
def js_hang_dump(kvm: Kvm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_js_hang_dump(tmp_path_factory.mktemp("js-dumps"))


def test_javascript_md_shows_what_dump_show_gdb_and_lldb_say(kvm: Kvm, tmp_path: Path) -> None:
    """A hang is caught wherever the engine is: the innermost frame is a
    sample (and a rare dump may stop between the interpreter's frames, so a
    few are tried); the frames below it are the page's."""
    gdb, lldb, jsruntime = require_tool("gdb"), require_tool("lldb"), str(guests.path("jsruntime"))
    problem: AssertionError | None = None
    for _ in range(3):
        core = str(make_js_hang_dump(tmp_path))
        try:
            output = _tool(sys.executable, "-m", "hlasync", "dump", "show", core)
            shown = sample("docs/javascript.md", "hlasync dump show")
            assert_shown_lines_are_real(shown, output, sampled=True)
            output = _tool(gdb, "-nx", "-batch", "-ex", "bt", jsruntime, core)
            shown = sample("docs/javascript.md", "gdb -nx -batch")
            assert_shown_lines_are_real(shown, output, sampled=True)
            output = _tool(lldb, "--batch", "-c", core, jsruntime, "-o", "bt")
            shown = sample("docs/javascript.md", "lldb --batch")
            assert_shown_lines_are_real(shown, output, sampled=True)
            return
        except AssertionError as exc:
            problem = exc
    raise AssertionError(f"no hang dump matched the page's samples; the last:\n{problem}")


def test_javascript_md_gives_the_size_of_a_hang_dump(js_hang_dump: Path) -> None:
    text = (ROOT / "docs/javascript.md").read_text()
    claim = re.search(
        r"takes about ([\d.]+) MiB on disk \(sparse; ([\d.]+) MiB apparent\)",
        " ".join(text.split()),
    )
    assert claim is not None, "javascript.md no longer says how large a hang dump is"
    on_disk, apparent = float(claim.group(1)), float(claim.group(2))
    status = js_hang_dump.stat()
    assert abs(status.st_size / 2**20 - apparent) <= 0.1 * apparent
    # Blocks on disk depend on the file system: the same order of magnitude.
    assert on_disk / 2 <= status.st_blocks * 512 / 2**20 <= on_disk * 2


def test_javascript_md_says_where_dump_show_json_puts_the_js_stack(js_hang_dump: Path) -> None:
    text = " ".join((ROOT / "docs/javascript.md").read_text().split())
    assert '`hlasync dump show --json` (`"js_stack"` under `"metadata"`)' in text
    output = _tool(sys.executable, "-m", "hlasync", "dump", "show", "--json", str(js_hang_dump))
    shown = json.loads(output)
    assert "js_stack" not in shown and "at spin (loop.js:2:3)" in shown["metadata"]["js_stack"]

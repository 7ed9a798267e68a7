"""Behaviours hyperlight-js has and users coming from it expect (issue 19).

hyperlight-js (https://github.com/hyperlight-dev/hyperlight-js) is the spec:
each test's docstring names the upstream test or source it comes from.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pytest

from hlasync import FunctionNotFound, JSError, JSSyntaxError, SandboxBusy, Supervisor
from hlasync.js import JSSandbox, files
from hlasync.js.arguments import checked
from hlasync.kvm import Kvm
from tests.conftest import run_cli

# Modules with the names and exports of hyperlight-js's tests/fixtures/ (our
# own copies of their interface: tests/js/compat/fixtures/).
_FIXTURE_DIR = Path(__file__).parent / "compat" / "fixtures"
FIXTURES = {
    name: (_FIXTURE_DIR / name).read_text()
    for name in (
        "math.js",
        "strings.js",
        "hitchhiker.js",
        "galaxy/deepThought.js",
        "galaxy/index.js",
    )
}


@pytest.fixture
def js(kvm: Kvm) -> Iterator[JSSandbox]:
    with JSSandbox(heap_size=8 << 20) as sandbox:
        yield sandbox


def _call(js: JSSandbox, source: str, event: object = None) -> Any:
    js.add_handler("handler", source)
    js.load()
    return js.call_handler("handler", event)


# ------------------------------------------- 1. modules without an export


def test_an_importing_handler_need_not_export_handler(js: JSSandbox) -> None:
    """host_functions.rs ``can_call_host_functions``: a handler that imports
    and defines ``function handler`` without exporting it works (the runtime's
    ``register_handler`` appends ``export { handler };``)."""
    js.register_host_function("host", "print", lambda message: 42)
    js.register_host_function("utils", "add", lambda a, b: a + b)
    source = """
        import * as host from "host";
        import * as utils from "utils";
        function handler(event) {
            let a = host.print("Hello, World!!");
            let b = 24;
            let c = utils.add(a, b);
            return { c };
        }
        """
    assert _call(js, source, {}) == {"c": 66}


def test_a_syntax_error_keeps_its_line_when_export_is_added(js: JSSandbox) -> None:
    """The export goes after the last line: a syntax error of the handler is
    still reported at its own line and column (runtime ``register_handler``)."""
    js.add_module("math.js", FIXTURES["math.js"])
    source = "import { add } from './math.js';\n\nfunction handler(e) { return add(1, }\n"
    with pytest.raises(JSSyntaxError) as info:
        js.add_handler("broken", source)
    assert (info.value.file, info.value.line) == ("broken.js", 3)
    assert info.value.column == source.splitlines()[2].index("}") + 1
    unclosed = "import { add } from './math.js';\nfunction handler(e) {\n  return add(1, 2)\n"
    with pytest.raises(JSSyntaxError) as info:
        js.add_handler("unclosed", unclosed)
    assert info.value.line == 4  # the end of the source, not the added line 5


def test_an_importing_module_without_handler_still_says_what_is_missing(js: JSSandbox) -> None:
    """Without a ``handler`` to export, the error is hlasync's own "must
    define", not one about a line the user never wrote."""
    js.add_module("math.js", FIXTURES["math.js"])
    js.add_handler(
        "other", "import { add } from './math.js';\nfunction main(e) { return add(1, 2) }"
    )
    with pytest.raises(JSSyntaxError, match="must define"):
        js.load()


def test_an_inline_export_is_not_exported_twice(js: JSSandbox) -> None:
    """An export that does not start a line is still an export: the handler
    compiles as written."""
    js.add_module("math.js", FIXTURES["math.js"])
    source = "import { add } from './math.js'; export function handler(e) { return add(2, 3) }"
    assert _call(js, source) == 5


# ------------------------------------------ 2. host-function argument types


def test_host_function_arguments_are_checked_against_annotations(js: JSSandbox) -> None:
    """host_functions.rs ``host_fn_call_should_fail_if_wrong_arg_types``:
    ``add(a: i32, b: i32)`` called as ``add("10", "32")`` fails (upstream:
    serde cannot deserialise the arguments, a HostFunctionError)."""

    def add(a: int, b: int) -> int:
        return a + b

    js.register_host_function("host", "add", add)
    js.add_handler(
        "caught",
        'import * as host from "host";\nexport function handler(event) {\n'
        '  try { return host.add("10", "32") } catch (e) { return [e.name, e.message] }\n}\n',
    )
    js.add_handler(
        "uncaught",
        'import * as host from "host";\nexport function handler(e) { return host.add("10", "32") }',
    )
    js.add_handler(
        "fine",
        'import * as host from "host";\nexport function handler(e) { return host.add(40, 2) }',
    )
    js.load()
    assert js.call_handler("fine") == 42
    name, message = js.call_handler("caught")
    assert name == "TypeError"
    assert message == "host function host.add: argument 1 ('a') must be int, got str '10'"
    with pytest.raises(JSError) as info:
        js.call_handler("uncaught")
    assert info.value.name == "TypeError"
    assert "host.add" in info.value.js_message and "'a'" in info.value.js_message


def test_unannotated_and_any_parameters_are_not_checked(js: JSSandbox) -> None:
    """Only a declared type is checked: hyperlight-js's ``register_raw`` (JSON
    in, JSON out) has no types either (``register_raw_basic``)."""
    js.register_host_function("m", "loose", lambda a, b: [a, b])

    def anything(a: Any, b: object) -> list[Any]:
        return [a, b]

    js.register_host_function("m", "any", anything)
    source = (
        'import * as m from "m";\n'
        'export function handler(e) { return [m.loose("1", 2), m.any(true, null)] }'
    )
    assert _call(js, source) == [["1", 2], [True, None]]


def _typed(
    i: int,
    f: float,
    s: str,
    b: bool,
    items: list[int],
    table: dict[str, str],
    nothing: None,
    maybe: Optional[int],  # noqa: UP045 - the typing spelling is what is tested
    either: Union[int, str],  # noqa: UP007
    pipe: bool | None,
    mode: Literal["r", "w"],
) -> str:
    return "ok"


GOOD = [1, 1.5, "s", True, [1, 2], {"k": "v"}, None, None, "x", None, "r"]


@pytest.mark.parametrize(
    ("index", "value", "expected"),
    [
        (0, "1", "int"),
        (0, True, "int"),
        (0, 1.5, "int"),
        (1, "1.5", "float"),
        (2, 3, "str"),
        (3, 1, "bool"),
        (4, [1, "2"], "list[int]"),
        (4, {"a": 1}, "list[int]"),
        (5, {"k": 1}, "dict[str, str]"),
        (6, 0, "None"),
        (7, "1", "int | None"),
        (8, None, "int | str"),
        (9, 0, "bool | None"),
        (10, "x", "'r' or 'w'"),
    ],
)
def test_annotations_that_are_checked(index: int, value: object, expected: str) -> None:
    """int/float/str/bool/list/dict/None, their generics, Optional, unions and
    Literal, as serde checks Rust types (no KVM: the check runs on the host)."""
    function = checked("m", "typed", _typed)
    assert function(*GOOD) == "ok"
    assert function(*GOOD[:1], 2, *GOOD[2:]) == "ok"  # an int is a float
    args = list(GOOD)
    args[index] = value
    with pytest.raises(TypeError) as info:
        function(*args)
    assert f"m.typed: argument {index + 1} " in str(info.value)
    assert f" must be {expected}, got " in str(info.value)


def test_string_annotations_and_async_functions_are_checked() -> None:
    """``from __future__ import annotations`` (this module) and ``async def``."""
    import asyncio

    async def fetch(key: str) -> str:
        return key

    function = checked("db", "fetch", fetch)
    assert asyncio.run(function("k")) == "k"
    with pytest.raises(TypeError, match="must be str, got int 1"):
        asyncio.run(function(1))

    def unknown(value: NotDefinedAnywhere) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    assert checked("m", "unknown", unknown) is unknown  # nothing it can check


@pytest.mark.usefixtures("supervisor_mode")
@pytest.mark.anyio
async def test_pool_host_function_arguments_are_checked(kvm: Kvm) -> None:
    """The same rule in a supervisor's JS pool (thread and process modes)."""

    def add(a: int, b: int) -> int:
        return a + b

    source = (
        'import * as host from "host";\nexport function handler(e) { return host.add(e.a, e.b) }'
    )
    async with Supervisor() as sup:
        pool = await sup.create_js_pool(
            {"add": source}, size=1, heap_size=8 << 20, host_functions={"host": {"add": add}}
        )
        assert await pool.call_handler("add", {"a": 40, "b": 2}) == 42
        with pytest.raises(JSError) as info:
            await pool.call_handler("add", {"a": "10", "b": "32"})
        assert info.value.name == "TypeError" and "host.add" in info.value.js_message


# ----------------------------------------------------------- 3. zero limits


@pytest.mark.parametrize("limit", ["timeout", "cpu_timeout"])
def test_a_zero_timeout_is_refused(js: JSSandbox, limit: str) -> None:
    """timeout.test.js "should throw INVALID_ARG for zero wallClockTimeoutMs"
    and "... zero cpuTimeoutMs" (the monitors' ``new()`` refuses
    ``Duration::ZERO``): 0 is an error, not "no limit", as in the
    supervisor's pools."""
    _call(js, "function handler(e) { return 1 }")
    bad_values: tuple[Any, ...] = (0, 0.0, -1, True, "1")
    for bad in bad_values:
        with pytest.raises(ValueError, match=f"{limit} must be a positive number"):
            js.call_handler("handler", {}, **{limit: bad})
    no_limit: dict[str, Any] = {limit: None}
    long_limit: dict[str, Any] = {limit: 30}
    assert js.call_handler("handler", {}, **no_limit) == 1
    assert js.call_handler("handler", {}, **long_limit) == 1


@pytest.mark.usefixtures("supervisor_mode")
@pytest.mark.anyio
async def test_a_zero_timeout_is_refused_by_pools_too(kvm: Kvm) -> None:
    """The supervisor's JS pools, with the same message."""
    async with Supervisor() as sup:
        pool = await sup.create_js_pool({"one": "function handler(e) { return 1 }"}, size=1)
        for limit in ("timeout", "cpu_timeout"):
            with pytest.raises(ValueError, match=f"{limit} must be a positive number"):
                await pool.call_handler("one", {}, **{limit: 0})


# ------------------------------------------------------------------ 4. names


def test_an_empty_handler_name_is_an_invalid_argument(js: JSSandbox) -> None:
    """sandbox.test.js "should reject empty handler name on remove" and "... on
    callHandler" (ERR_INVALID_ARG; js_sandbox.rs and loaded_js_sandbox.rs
    "Handler name must not be empty"): ValueError, as ``add_handler("")``."""
    _call(js, "function handler(e) { return 1 }")
    with pytest.raises(ValueError, match="handler name"):
        js.add_handler("", "function handler(e) { return 1 }")
    with pytest.raises(ValueError, match="handler name"):
        js.remove_handler("")
    with pytest.raises(ValueError, match="handler name"):
        js.call_handler("", {})
    with pytest.raises(KeyError):
        js.remove_handler("absent")  # a valid name that is not there
    with pytest.raises(FunctionNotFound):
        js.call_handler("absent", {})


@pytest.mark.usefixtures("supervisor_mode")
@pytest.mark.anyio
async def test_an_empty_handler_name_is_invalid_in_pools_too(kvm: Kvm) -> None:
    """The same for a pool's ``call_handler``."""
    async with Supervisor() as sup:
        pool = await sup.create_js_pool({"one": "function handler(e) { return 1 }"}, size=1)
        with pytest.raises(ValueError, match="handler name"):
            await pool.call_handler("", {})


def test_host_functions_with_unusual_names(js: JSSandbox) -> None:
    """host_functions.rs ``host_fn_with_unusual_names`` and
    ``host_modules_should_contain_all_host_functions``: any non-empty name,
    reached as a property of the module object."""
    js.register_host_function("host", "scoped/add/😊", lambda a, b: a + b)
    js.register_host_function("host", "life", lambda: 42)
    js.register_host_function("host", "no-op", lambda: "Hello, World!")
    js.add_handler(
        "call",
        'import * as host from "host";\nexport function handler(event) {;\n'
        '  return [host["scoped/add/😊"](10, 32), host["no-op"](), Object.keys(host).sort()]\n}\n',
    )
    js.add_handler(
        "named",
        'import { "no-op" as noop } from "host";\nexport function handler(e) { return noop() }',
    )
    js.load()
    assert js.call_handler("call") == [42, "Hello, World!", ["life", "no-op", "scoped/add/😊"]]
    assert js.call_handler("named") == "Hello, World!"
    for bad in ("", "a\0b", "\ud800", "x" * 101, 5):
        with pytest.raises(ValueError, match="host function name"):
            js.register_host_function("host", bad, lambda: 0)  # type: ignore[arg-type]


@pytest.mark.usefixtures("supervisor_mode")
@pytest.mark.anyio
async def test_pool_host_functions_with_unusual_names(kvm: Kvm) -> None:
    """``host_functions={"host": {"no-op": ...}}`` in a pool."""
    source = 'import * as host from "host";\nexport function handler(e) { return host["no-op"]() }'
    async with Supervisor() as sup:
        pool = await sup.create_js_pool(
            {"h": source}, size=1, host_functions={"host": {"no-op": lambda: "done"}}
        )
        assert await pool.call_handler("h", {}) == "done"


# ------------------------------------------------ 5. unload, clear_handlers


def test_unload_then_load_other_handlers(js: JSSandbox) -> None:
    """js-host-api examples/unload.js (and loaded_js_sandbox.rs ``unload``):
    unloading returns to the sandbox without handlers; new ones load after."""
    js.register_host_function("host", "greeting", lambda: "Hello")
    js.add_module("names.js", "export const shout = (s) => s + '!';")
    hello = (
        'import { greeting } from "host";\nimport { shout } from "./names.js";\n'
        "export function handler(event) {\n"
        "  return { message: shout(greeting() + ', ' + event.name) }\n}"
    )
    assert _call(js, hello, {"name": "Alice"}) == {"message": "Hello, Alice!"}
    js.unload()
    assert dict(js.handlers) == {} and not js.loaded
    with pytest.raises(SandboxBusy, match="load"):
        js.call_handler("handler", {"name": "Bob"})
    goodbye = (
        'import { shout } from "./names.js";\n'
        "export function handler(event) { return { message: shout('Goodbye, ' + event.name) } }"
    )
    assert _call(js, goodbye, {"name": "Bob"}) == {"message": "Goodbye, Bob!"}  # modules stayed


def test_clear_handlers(js: JSSandbox) -> None:
    """js_sandbox.rs ``test_clear_handlers`` and sandbox.test.js "should clear
    handlers without throwing": every handler goes, at the next load()."""
    js.add_handler("handler1", "function handler(e) { return 1 }")
    js.add_handler("handler2", "function handler(e) { return 2 }")
    js.load()
    js.clear_handlers()
    assert dict(js.handlers) == {} and not js.loaded
    js.load()
    with pytest.raises(FunctionNotFound):
        js.call_handler("handler1", {})


# ------------------------------------------------------- 6. module resolution


def _add_fixtures(js: JSSandbox, *names: str) -> None:
    for name in names:
        js.add_module(name, FIXTURES[name])


MULTIPLE_IMPORTS = """
    import { add, multiply } from './math{ext}';
    import { toUpperCase, concat } from './strings{ext}';

    function handler(event) {
        event.sum = add(event.a, event.b);
        event.product = multiply(event.a, event.b);
        event.message = toUpperCase(concat('Result: ', event.sum));
        return event;
    }
    """


@pytest.mark.parametrize("ext", [".js", ""])
def test_handler_with_multiple_imports(js: JSSandbox, ext: str) -> None:
    """module_loader.rs ``test_handler_with_multiple_imports``, and the same
    without the extension (its resolver's ``extensions: [".js", ".mjs"]``)."""
    _add_fixtures(js, "math.js", "strings.js")
    result = _call(js, MULTIPLE_IMPORTS.replace("{ext}", ext), {"a": 5, "b": 3})
    assert result == {"a": 5, "b": 3, "sum": 8, "product": 15, "message": "RESULT: 8"}


def test_handler_import_restrictions(js: JSSandbox) -> None:
    """module_loader.rs ``test_handler_import_restrictions``: a module that is
    not registered fails the load, naming it."""
    _add_fixtures(js, "math.js")
    js.add_handler("calculator", MULTIPLE_IMPORTS.replace("{ext}", ""))
    with pytest.raises(JSError, match="could not load module 'strings'"):
        js.load()


@pytest.mark.parametrize(
    "specifier", ["./galaxy/index.js", "./galaxy", "./galaxy/index", "/galaxy"]
)
def test_handler_import_from_a_subfolder(js: JSSandbox, specifier: str) -> None:
    """module_loader.rs ``test_handler_import_from_a_subfolder`` (a module
    importing a module beside it), and a directory's ``index.js``."""
    _add_fixtures(js, "hitchhiker.js", "galaxy/deepThought.js", "galaxy/index.js")
    source = (
        f"import {{ ultimateQuestionOfEverything }} from '{specifier}';\n"
        "function handler(event) { return ultimateQuestionOfEverything; }"
    )
    assert _call(js, source, {}) == 42


def test_parent_directories_mjs_and_names(js: JSSandbox) -> None:
    """``../`` from a handler in a folder (its name) and ``.mjs`` (its
    resolver's extensions); a bare specifier is a registered name exactly, as
    in hlasync before (upstream looks in node_modules: resolver.rs
    ``test_prefix_collision``, "foo" is not "foo.js")."""
    _add_fixtures(js, "math.js", "galaxy/deepThought.js")
    js.add_module("lib/index.mjs", "export const lib = 'lib';")
    js.add_handler(
        "api/v1",
        "import { ultimateQuestionOfEverything as u } from '../galaxy/deepThought';\n"
        "import { lib } from '../lib';\nimport { add } from 'math.js';\n"
        "export function handler(e) { return [u, lib, add(1, 2)] }",
    )
    js.load()
    assert js.call_handler("api/v1") == [42, "lib", 3]
    js.add_handler("bare", "import { add } from 'math';\nexport function handler(e) { return 1 }")
    with pytest.raises(JSError, match="could not load module 'math'"):
        js.load()


def test_js_run_loads_modules_next_to_the_handler(kvm: Kvm, tmp_path: Path) -> None:
    """``hlasync js run handler.js`` as hyperlight-js's ``Script::from_file``
    (its base path is the file's directory): the fixtures next to the handler."""
    for name, source in FIXTURES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(source)
    script = tmp_path / "calculator.js"
    script.write_text(
        MULTIPLE_IMPORTS.replace("{ext}", "")
        + "\nimport { ultimateQuestionOfEverything as u } from './hitchhiker';"
        "\nexport { handler };"
    )
    done = run_cli("js", "run", str(script), "--event", '{"a": 5, "b": 3}')
    assert done.returncode == 0, done.stderr
    assert '"message": "RESULT: 8"' in done.stdout
    zero = run_cli("js", "run", str(script), "--timeout", "0")
    assert zero.returncode == 2 and "--timeout must be a positive number" in zero.stderr


def test_module_files_are_read_within_bounds(tmp_path: Path) -> None:
    """What ``js run`` reads: regular .js/.mjs files under the handler's
    directory, no symbolic link, nothing hidden or in node_modules, capped."""
    (tmp_path / "a.js").write_text("export const a = 1;")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.mjs").write_text("export const b = 2;")
    (tmp_path / "handler.js").write_text("function handler(e) { return 1 }")
    (tmp_path / "notes.txt").write_text("not a module")
    (tmp_path / ".hidden.js").write_text("export const h = 1;")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "dep.js").write_text("export const d = 1;")
    (tmp_path / "bad name.js").write_text("export const x = 1;")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "secret.js").write_text("export const secret = 1;")
    os.symlink(outside / "secret.js", tmp_path / "link.js")
    os.symlink(outside, tmp_path / "linked")
    if sys.platform.startswith("linux"):
        os.mkfifo(tmp_path / "fifo.js")
    assert files.read_modules(tmp_path, exclude="handler.js") == {
        "a.js": "export const a = 1;",
        "sub/b.mjs": "export const b = 2;",
    }
    (tmp_path / "big.js").write_bytes(b"x" * (files.MAX_FILE_SIZE + 1))
    with pytest.raises(ValueError, match="at most"):
        files.read_modules(tmp_path)
    (tmp_path / "big.js").write_bytes(b"\xff")
    with pytest.raises(ValueError, match="not UTF-8"):
        files.read_modules(tmp_path)


def test_js_run_reads_modules_only_for_a_handler_that_loads_some(kvm: Kvm, tmp_path: Path) -> None:
    """A handler that imports nothing runs whatever lies beside it (a word like
    "important" is no import); one reached through a symbolic link to its
    directory reads its modules; require() of a sibling works from the CLI."""
    (tmp_path / "bundle.js").write_bytes(b"\xff not a module")  # would fail a module read
    plain = tmp_path / "plain.js"
    plain.write_text('function handler(e) { return "important" }')
    done = run_cli("js", "run", str(plain))
    assert done.returncode == 0, done.stderr
    assert "important" in done.stdout
    real = tmp_path / "real"
    real.mkdir()
    (real / "math.js").write_text("export function add(a, b) { return a + b }")
    (real / "h.js").write_text(
        "import { add } from './math.js';\nfunction handler(e) { return add(2, 3) }"
    )
    (real / "r.js").write_text('function handler(e) { return require("./math.js").add(4, 5) }')
    os.symlink(real, tmp_path / "linkdir")
    linked = run_cli("js", "run", str(tmp_path / "linkdir" / "h.js"))
    assert linked.returncode == 0, linked.stderr
    assert "5" in linked.stdout
    required = run_cli("js", "run", str(real / "r.js"))
    assert required.returncode == 0, required.stderr
    assert "9" in required.stdout


def test_a_huge_directory_is_refused_before_it_is_read_whole(tmp_path: Path) -> None:
    for index in range(files.MAX_ENTRIES + 50):
        (tmp_path / f"f{index}.txt").touch()
    with pytest.raises(ValueError, match=f"more than {files.MAX_ENTRIES}"):
        files.read_modules(tmp_path)


def test_the_handler_file_is_read_within_bounds(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.js"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        files.read_handler(fifo)  # never blocks
    big = tmp_path / "big.js"
    big.write_bytes(b"x" * (files.MAX_FILE_SIZE + 1))
    with pytest.raises(ValueError, match="at most"):
        files.read_handler(big)
    assert files.imports_modules("import { a } from './a.js'")
    assert files.imports_modules("  import * as m from 'm'")
    assert files.imports_modules("const m = require('./m.js')")
    assert not files.imports_modules('function handler() { return "important" }')
    assert not files.imports_modules("// imports nothing\nfunction handler() {}")


def test_js_run_prints_nothing_a_terminal_would_act_on(kvm: Kvm, tmp_path: Path) -> None:
    """What ``hlasync js run`` prints of a handler (its result, its console
    lines) cannot drive the operator's terminal: a lone surrogate does not
    crash the command, and C1 controls (U+009B is a one-character CSI), bidi
    overrides and ESC come out escaped; the result is still JSON."""
    script = tmp_path / "h.js"
    script.write_text(
        "function handler(e) {\n"
        '  console.log("log \\u001b[2J \\u009b31m \\u202eX");\n'
        '  return {s: "\\uD800", c1: "\\u009b31m\\u202eX", esc: "\\u001b[2J", ok: "é"};\n'
        "}"
    )
    done = run_cli("js", "run", str(script))
    assert done.returncode == 0, done.stderr
    for raw in ("\x1b", "\x9b", "\u202e"):
        assert raw not in done.stdout
    lines = done.stdout.splitlines()
    assert lines[0].startswith("log ") and "\\x1b[2J" in lines[0]
    result = json.loads("\n".join(lines[1:]))
    assert result == {"s": "\ud800", "c1": "\x9b31m\u202eX", "esc": "\x1b[2J", "ok": "é"}

"""The built-ins of the JavaScript guest (guest/js/builtins.c), from JavaScript in
a real JSSandbox: print, require, String.bytesFrom, the console, io, crypto and
require modules; HMAC-SHA-256/384/512 checked against Python's hmac and hashlib,
and what hostile arguments get (a clear exception, never a crashed guest)."""

from __future__ import annotations

import base64
import hmac
import json
import random
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from hlasync import JSError, Supervisor
from hlasync import events as ev
from hlasync.js import JSSandbox
from hlasync.js.host import default_output
from hlasync.kvm import Kvm

ALGORITHMS = ("sha256", "sha384", "sha512")


@pytest.fixture(scope="module")
def js(kvm: Kvm) -> Iterator[JSSandbox]:
    """One sandbox for the module; each test loads its own handlers. What the
    guest prints is in ``js.printed``."""
    printed: list[tuple[str, str]] = []

    with JSSandbox(
        heap_size=64 << 20, output=lambda level, text: printed.append((level, text))
    ) as sb:
        sb.printed = printed  # type: ignore[attr-defined]
        yield sb


def _load(js: JSSandbox, **handlers: str) -> JSSandbox:
    js.clear_handlers()
    for name, source in handlers.items():
        js.add_handler(name, source)
    js.load()
    getattr(js, "printed", []).clear()
    return js


def _run(js: JSSandbox, body: str, event: Any = None) -> Any:
    """``body`` as the body of a script handler ``function handler(event)``."""
    _load(js, run=f"function handler(event) {{\n{body}\n}}")
    return js.call_handler("run", event)


def _printed(js: JSSandbox) -> list[tuple[str, str]]:
    return list(js.printed)  # type: ignore[attr-defined]


#: Calls ``f()`` and gives ``[name, message]`` of what it throws, or ``["ok", value]``.
CATCH = (
    "function caught(f) {\n"
    "  try { return ['ok', f()] } catch (e) { return [e.name, e.message] }\n"
    "}\n"
)


# ---------------------------------------------------------------- globals
@pytest.mark.parametrize("kind", ["script", "module"])
def test_the_globals_exist_in_scripts_and_modules(js: JSSandbox, kind: str) -> None:
    body = (
        "return [typeof console.log, typeof print, typeof require, typeof String.bytesFrom,"
        " Object.keys(globalThis).includes('print')]"
    )
    source = f"function handler(event) {{ {body} }}"
    if kind == "module":
        source = "import * as io from 'io';\n" + source
    _load(js, h=source)
    # the new globals are the engine's kind: writable, configurable, not enumerable
    assert js.call_handler("h", {}) == ["function", "function", "function", "function", False]


def test_the_builtin_modules_export_exactly_these_names(js: JSSandbox) -> None:
    _load(
        js,
        h="""
        import * as crypto from "crypto";
        import * as console from "console";
        import * as io from "io";
        import * as req from "require";
        import require, { require as named } from "require";
        export function handler(event) {
          return [Object.keys(crypto), Object.keys(console), Object.keys(io), Object.keys(req),
                  typeof require, require === named, require("io") === io];
        }
        """,
    )
    assert js.call_handler("h", {}) == [
        ["Hmac", "createHmac"],
        ["log"],
        ["flush", "print"],
        ["default", "require"],
        "function",
        True,
        True,
    ]


# ------------------------------------------------------------------ crypto
def test_hmac_sha256_the_upstream_example(js: JSSandbox) -> None:
    key = "TULWi2fOzLr9GcJeArpS4o135bEGmFhdUjpBSxUeJxXtIlx6qh"
    data = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJUZXN0In0"
    result = _run(
        js,
        "var h = require('crypto').createHmac('sha256', event.key).update(event.data);"
        "return [h.digest('hex'), h.digest('base64'), h.digest('base64url')]",
        {"key": key, "data": data},
    )
    mac = hmac.new(key.encode(), data.encode(), "sha256").digest()
    assert result == [
        mac.hex(),
        base64.b64encode(mac).decode(),
        base64.urlsafe_b64encode(mac).decode().rstrip("="),
    ]


#: RFC 4231 section 4, test cases 1-4, 6 and 7 (key, data); case 5 truncates.
RFC4231 = [
    (b"\x0b" * 20, b"Hi There"),
    (b"Jefe", b"what do ya want for nothing?"),
    (b"\xaa" * 20, b"\xdd" * 50),
    (bytes(range(1, 26)), b"\xcd" * 50),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First"),
    (
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size data."
        b" The key needs to be hashed before being used by the HMAC algorithm.",
    ),
]


def test_hmac_rfc4231_test_vectors(js: JSSandbox) -> None:
    result = _run(
        js,
        "var crypto = require('crypto');\n"
        "var bytes = (hex) => new Uint8Array(hex.match(/../g).map((b) => parseInt(b, 16)));\n"
        "return event.cases.map(([key, data]) => event.algorithms.map((a) =>\n"
        "  crypto.createHmac(a, bytes(key)).update(bytes(data)).digest('hex')))",
        {"cases": [[k.hex(), d.hex()] for k, d in RFC4231], "algorithms": ALGORITHMS},
    )
    assert result == [[hmac.new(k, d, a).hexdigest() for a in ALGORITHMS] for k, d in RFC4231]
    # the RFC's own values for test case 2, to tie the oracle to the spec
    assert result[1][0] == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    assert result[1][2] == (
        "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
        "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
    )


def test_hmac_every_length_around_the_block_sizes(js: JSSandbox) -> None:
    """Data of 0-300 bytes and keys of 0-300 bytes (both block sizes, 64 and
    128, and their neighbours), and the data fed in pieces of every size."""
    result = _run(
        js,
        "var crypto = require('crypto');\n"
        "var bytes = (n, seed) => Uint8Array.from({length: n}, (_, i) => (i * 31 + seed) & 255);\n"
        "var out = [];\n"
        "for (const a of ['sha256', 'sha384', 'sha512'])\n"
        "  for (let n = 0; n <= 300; n++) {\n"
        "    const data = bytes(n, 7), h = crypto.createHmac(a, bytes(n, 3));\n"
        "    const step = 1 + (n % 67);\n"
        "    for (let i = 0; i < n; i += step) h.update(data.subarray(i, i + step));\n"
        "    out.push(h.digest('hex'));\n"
        "  }\n"
        "return out",
    )

    def pattern(n: int, seed: int) -> bytes:
        return bytes((i * 31 + seed) & 255 for i in range(n))

    expected = [
        hmac.new(pattern(n, 3), pattern(n, 7), a).hexdigest()
        for a in ALGORITHMS
        for n in range(301)
    ]
    assert result == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hmac_of_a_long_event_string(js: JSSandbox, algorithm: str) -> None:
    """1.5 MB of text from the event (the event buffer holds 2 MiB), non-ASCII
    included, against Python's hmac over its UTF-8."""
    rng = random.Random(algorithm)
    text = "".join(rng.choice("abcdefgh é€😀\n") for _ in range(400_000))
    key = "k€y" * 100
    result = _run(
        js,
        "var crypto = require('crypto');\n"
        "return crypto.createHmac(event.algorithm, event.key).update(event.text).digest('hex')",
        {"algorithm": algorithm, "key": key, "text": text},
    )
    assert result == hmac.new(key.encode(), text.encode(), algorithm).hexdigest()


def test_hmac_of_data_built_in_the_guest(js: JSSandbox) -> None:
    """Megabytes made in the guest, never sent: 8 MiB in 1 MiB updates."""
    result = _run(
        js,
        "var h = require('crypto').createHmac('sha512', 'key');\n"
        "var block = new Uint8Array(1 << 20).fill(0x61);\n"
        "for (let i = 0; i < 8; i++) h.update(block);\n"
        "return h.digest('base64')",
    )
    mac = hmac.new(b"key", b"a" * (8 << 20), "sha512").digest()
    assert result == base64.b64encode(mac).decode()


def test_hmac_keys_and_data_of_every_accepted_kind(js: JSSandbox) -> None:
    """A string is its UTF-8; an ArrayBuffer and a typed array (of any element
    type, a subarray included) are the bytes they hold or view."""
    result = _run(
        js,
        "var crypto = require('crypto');\n"
        "var mac = (key, data) => crypto.createHmac('sha256', key).update(data).digest('hex');\n"
        "var all = Uint8Array.from({length: 16}, (_, i) => i);\n"
        "return [mac('ké😀', 'dätä😀'), mac(all.buffer, all.subarray(4, 12)),\n"
        "        mac(new Uint16Array([0x0102, 0x0304]), new Uint8ClampedArray([1, 2])),\n"
        "        mac(new Float64Array([1.5]), new ArrayBuffer(0)), mac('', '')]",
    )
    all_bytes = bytes(range(16))
    assert result == [
        hmac.new("ké😀".encode(), "dätä😀".encode(), "sha256").hexdigest(),
        hmac.new(all_bytes, all_bytes[4:12], "sha256").hexdigest(),
        hmac.new(b"\x02\x01\x04\x03", b"\x01\x02", "sha256").hexdigest(),
        hmac.new(bytes.fromhex("000000000000f83f"), b"", "sha256").hexdigest(),
        hmac.new(b"", b"", "sha256").hexdigest(),
    ]


def test_hmac_is_computed_once_and_update_after_a_digest_starts_anew(js: JSSandbox) -> None:
    """As hyperlight-js: digest computes the MAC once (digest three times, same
    MAC); an update after it starts a new MAC with the same key; update and
    finalize return the Hmac itself; algorithm and format in any case."""
    result = _run(
        js,
        "var { Hmac, createHmac } = require('crypto');\n"
        "var h = new Hmac('SHA384', 'key');\n"
        "var same = h.update('a') === h && h.update('b') === h;\n"
        "var first = [h.digest('hex'), h.digest('HEX'), h.digest('Hex')];\n"
        "var again = h.update('c').digest('hex');\n"
        "var fresh = createHmac('sha384', 'key').digest('hex');\n"
        "var finalized = createHmac('Sha384', 'key').update('ab').finalize().digest('hex');\n"
        "return [same, first, again, fresh, finalized, h instanceof Hmac,\n"
        "        Object.prototype.toString.call(h)]",
    )
    ab, c, empty = (hmac.new(b"key", m, "sha384").hexdigest() for m in (b"ab", b"c", b""))
    assert result == [True, [ab, ab, ab], c, empty, ab, True, "[object Hmac]"]


def test_hmac_subclasses(js: JSSandbox) -> None:
    result = _run(
        js,
        "var { Hmac } = require('crypto');\n"
        "class Signer extends Hmac { sign(x) { return this.update(x).digest('hex') } }\n"
        "var s = new Signer('sha256', 'k');\n"
        "return [s instanceof Signer, s instanceof Hmac, s.sign('m')]",
    )
    assert result == [True, True, hmac.new(b"k", b"m", "sha256").hexdigest()]


@pytest.mark.parametrize(
    ("expression", "name", "message"),
    [
        ("createHmac('md5', 'k')", "TypeError", 'Invalid algorithm: "md5"'),
        ("createHmac('sha-256', 'k')", "TypeError", 'Invalid algorithm: "sha-256"'),
        ("createHmac('x'.repeat(1000), 'k')", "TypeError", '"xxxxxxxxxx'),
        ("createHmac(256, 'k')", "TypeError", "algorithm must be a string"),
        ("createHmac()", "TypeError", "algorithm must be a string"),
        ("createHmac('sha256')", "TypeError", "got undefined"),
        ("createHmac('sha256', 42)", "TypeError", "got number"),
        ("createHmac('sha256', null)", "TypeError", "got null"),
        ("createHmac('sha256', [1, 2])", "TypeError", "got object"),
        ("createHmac('sha256', {length: 3})", "TypeError", "got object"),
        ("createHmac('sha256', new DataView(new ArrayBuffer(4)))", "TypeError", "got object"),
        ("createHmac('sha256', 'a\\ud800b')", "TypeError", "lone surrogate"),
        ("createHmac('sha256', 'k').update('\\udfff')", "TypeError", "lone surrogate"),
        ("createHmac('sha256', 'k').update(12n)", "TypeError", "got bigint"),
        ("createHmac('sha256', 'k').update(Symbol('s'))", "TypeError", "got symbol"),
        ("createHmac('sha256', 'k').update(() => 1)", "TypeError", "got function"),
        ("createHmac('sha256', 'k').digest('latin1')", "TypeError", 'Unsupported format: "latin1"'),
        ("createHmac('sha256', 'k').digest()", "TypeError", "format must be"),
        ("createHmac('sha256', 'k').digest(1)", "TypeError", "got number"),
        ("Hmac('sha256', 'k')", "TypeError", "must be called with new"),
        ("Hmac.prototype.update.call({}, 'x')", "TypeError", "Hmac"),
        ("createHmac('sha256', 'k').digest.call(Hmac.prototype, 'hex')", "TypeError", "Hmac"),
    ],
)
def test_hmac_refuses_bad_arguments_with_a_type_error(
    js: JSSandbox, expression: str, name: str, message: str
) -> None:
    result = _run(
        js,
        CATCH
        + f"var {{ Hmac, createHmac }} = require('crypto');\nreturn caught(() => {expression})",
    )
    assert result[0] == name and message in result[1], result


def test_hmac_over_a_detached_or_shrunk_buffer_is_a_type_error(js: JSSandbox) -> None:
    result = _run(
        js,
        CATCH + "var { createHmac } = require('crypto');\n"
        "var detached = new ArrayBuffer(8); var view = new Uint8Array(detached);\n"
        "detached.transfer();\n"
        "var resizable = new ArrayBuffer(16, {maxByteLength: 32});\n"
        "var tail = new Uint8Array(resizable, 8, 8); resizable.resize(4);\n"
        "return [caught(() => createHmac('sha256', view)),\n"
        "        caught(() => createHmac('sha256', 'k').update(tail)),\n"
        "        caught(() => createHmac('sha256', detached))]",
    )
    assert [name for name, _ in result] == ["TypeError", "TypeError", "TypeError"], result


# --------------------------------------------------------- String.bytesFrom
def test_bytes_from_decodes_base64url_to_the_utf8_text(js: JSSandbox) -> None:
    rng = random.Random(19)
    texts = ["", "a", "ab", "abc", "Hello World!!\n", '{"alg":"HS256","typ":"JWT"}', "é€😀"]
    texts += [
        "".join(rng.choice("xyz~?>é€😀\0") for _ in range(rng.randrange(1, 60))) for _ in range(50)
    ]
    encoded = [base64.urlsafe_b64encode(t.encode()).decode() for t in texts]
    result = _run(
        js,
        "return event.map((e) => [String.bytesFrom(e, 'base64url'),\n"
        "                         String.bytesFrom(e.replace(/=+$/, ''), 'base64url')])",
        encoded,
    )
    assert result == [[t, t] for t in texts]


def test_bytes_from_reads_both_alphabets_and_drops_any_trailing_padding(js: JSSandbox) -> None:
    """hyperlight-js decodes with the standard alphabet (``+/``) only; base64url's
    ``-_`` are read too, so a JWT's segments decode."""
    payload = '{"sub":"1234567890","name":"Jøhn Døe","admin":true}>>>???'
    standard = base64.b64encode(payload.encode()).decode()
    url = base64.urlsafe_b64encode(payload.encode()).decode()
    assert "+" in standard or "/" in standard
    result = _run(
        js,
        "var decode = (data) => String.bytesFrom(data, 'base64url');\n"
        "return [decode(event[0]), decode(event[1]), decode('YQ====='), decode('===='),\n"
        "        decode(new Uint8Array([0x59, 0x57, 0x4a, 0x6a]))]",
        [standard, url.rstrip("=")],
    )
    assert result == [payload, payload, "a", "", "abc"]


def test_bytes_from_makes_bytes_that_are_no_utf8_replacement_characters(js: JSSandbox) -> None:
    """The bytes become a string as UTF-8, as in hyperlight-js: a byte that is
    no UTF-8 becomes U+FFFD (the engine's JS_NewStringLen)."""
    data = base64.urlsafe_b64encode(b"a\xffb\xc3").decode().rstrip("=")
    assert _run(js, "return String.bytesFrom(event, 'base64url')", data) == "a\ufffdb\ufffd"


def test_bytes_from_a_long_input(js: JSSandbox) -> None:
    text = "JSON payload ✓ " * 70_000  # 1.2 MB of UTF-8, 1.6 MB encoded
    encoded = base64.urlsafe_b64encode(text.encode()).decode()
    result = _run(
        js,
        "var s = String.bytesFrom(event, 'base64url'); return [s.length, s.slice(0, 30)]",
        encoded,
    )
    assert result == [len(text), text[:30]]


@pytest.mark.parametrize(
    ("call", "name", "message"),
    [
        ("'abc', 'base64'", "TypeError", "only 'base64url' is supported"),
        ("'abc', 'BASE64URL'", "TypeError", "only 'base64url' is supported"),
        ("'abc'", "TypeError", "got undefined"),
        ("'abc', 1", "TypeError", "got number"),
        ("", "TypeError", "got undefined"),
        ("42, 'base64url'", "TypeError", "got number"),
        ("null, 'base64url'", "TypeError", "got null"),
        ("'a\\ud800', 'base64url'", "TypeError", "lone surrogate"),
        ("'a', 'base64url'", "SyntaxError", "no whole number of bytes"),
        ("'abcde', 'base64url'", "SyntaxError", "no whole number of bytes"),
        ("'ab!c', 'base64url'", "SyntaxError", "'!' at offset 2"),
        ("'ab=c', 'base64url'", "SyntaxError", "'=' at offset 2"),
        ("'ab c', 'base64url'", "SyntaxError", "' ' at offset 2"),
        ("'abc\\n', 'base64url'", "SyntaxError", "byte 0x0a at offset 3"),
        ("'abcé', 'base64url'", "SyntaxError", "byte 0xc3 at offset 3"),
        ("'abd', 'base64url'", "SyntaxError", "not canonical"),
        ("'YR', 'base64url'", "SyntaxError", "not canonical"),
    ],
)
def test_bytes_from_refuses_what_it_cannot_decode(
    js: JSSandbox, call: str, name: str, message: str
) -> None:
    result = _run(js, CATCH + f"return caught(() => String.bytesFrom({call}))")
    assert result[0] == name and message in result[1], result


# ------------------------------------------------------------ print and io
def test_print_writes_text_with_no_newline(js: JSSandbox) -> None:
    _load(
        js,
        h="import { print as ioPrint, flush } from 'io';\n"
        "function handler(e) { print('Hello'); print(''); print(', World'); ioPrint('!');"
        " flush(); console.log('line'); return 0 }",
    )
    assert js.call_handler("h", {}) == 0
    assert _printed(js) == [
        ("print", "Hello"),
        ("print", ", World"),
        ("print", "!"),
        ("log", "line"),
    ]


def test_print_refuses_what_is_not_a_string(js: JSSandbox) -> None:
    result = _run(
        js,
        CATCH + "return [caught(() => print(42)), caught(() => print()), caught(() => print({}))]",
    )
    assert result == [
        ["TypeError", "print: the text must be a string, got number"],
        ["TypeError", "print: the text must be a string, got undefined"],
        ["TypeError", "print: the text must be a string, got object"],
    ]
    assert _printed(js) == []


def test_text_that_is_no_utf8_reaches_the_host_with_replacement_characters(js: JSSandbox) -> None:
    """A lone surrogate (no UTF-8 form) and a NUL (which ends a C string) arrive
    as U+FFFD, from print and from the console alike: before issue 19, a
    console.log of a lone surrogate crashed the guest."""
    _run(js, "print('a\\ud800b\\u0000c'); console.error('\\udc00', 'x\\u0000'); return 0")
    assert _printed(js) == [("print", "a\ufffdb\ufffdc"), ("error", "\ufffd x\ufffd")]


def test_print_longer_than_the_output_buffer_arrives_whole(js: JSSandbox) -> None:
    """4.5 MiB printed at once (the output buffer holds 2 MiB) comes in pieces
    that are never cut inside a character."""
    _run(js, "print('ab€😀'.repeat(1 << 19)); return 0")  # 4.5 MiB of UTF-8
    printed = _printed(js)
    assert len(printed) > 1 and {level for level, _ in printed} == {"print"}
    assert "".join(text for _, text in printed) == "ab€😀" * (1 << 19)


def test_console_line_longer_than_the_output_buffer_is_cut_with_a_note(js: JSSandbox) -> None:
    """Before issue 19 this aborted the guest."""
    _run(js, "console.log('x'.repeat(3 << 20)); return 0")
    [(level, text)] = _printed(js)
    assert level == "log" and text.startswith("x" * 1000)
    assert text.endswith("more bytes: the output buffer holds no more]")
    assert len(text.encode()) < 2 << 20


def test_console_module_log_is_console_log(js: JSSandbox) -> None:
    _load(
        js,
        h="import { log } from 'console';\n"
        "export function handler(e) {\n"
        "  log('a', 1, {b: [2]}); console.log('a', 1, {b: [2]}); return 0\n"
        "}",
    )
    js.call_handler("h", {})
    assert _printed(js) == [("log", 'a 1 {"b":[2]}'), ("log", 'a 1 {"b":[2]}')]


def test_default_output_prints_print_text_without_a_newline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    default_output("print", "a")
    default_output("print", "b")
    default_output("log", "c")
    default_output("warn", "w")
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("abc\n", "w\n")


@pytest.mark.anyio
async def test_print_in_a_pool_is_a_guest_output_event_of_level_print(kvm: Kvm) -> None:
    async with Supervisor() as sup, sup.subscribe(ev.GuestOutput) as events:
        pool = await sup.create_js_pool(
            {"p": "function handler(e) { print('no newline'); return 1 }"},
            size=1,
            heap_size=8 << 20,
        )
        assert await pool.call_handler("p", {}) == 1
        with anyio.fail_after(10):
            event = await events.receive()
        assert isinstance(event, ev.GuestOutput)
        assert (event.level, event.text) == ("print", "no newline")


# ----------------------------------------------------------------- require
def test_require_finds_builtin_registered_and_host_modules(kvm: Kvm) -> None:
    with JSSandbox(heap_size=16 << 20) as js:
        js.add_module("lib/math.js", "export const add = (a, b) => a + b;")
        js.add_module("money", "export const round2 = (x) => Math.round(x * 100) / 100;")
        js.register_host_function("shop", "price", lambda name: {"pear": 0.75}[name])
        script = """function handler(event) {
          const { add } = require('./lib/math');
          const { round2 } = require('money');
          const { price } = require('shop');
          const crypto = require('crypto');
          return [add(1, 2), round2(price('pear') * 3.333), typeof crypto.createHmac,
                  require('money') === require('money')];
        }"""
        js.add_handler("script", script)  # a script: its own context
        js.add_handler("api/v1", "import 'money';\n" + script.replace("./lib", "../lib"))
        js.load()
        assert js.call_handler("script", {}) == [3, 2.5, "function", True]
        assert js.call_handler("api/v1", {}) == [3, 2.5, "function", True]


def test_a_registered_module_comes_before_a_builtin_of_the_same_name(kvm: Kvm) -> None:
    with JSSandbox(heap_size=16 << 20) as js:
        js.add_module("crypto", "export const mine = true;")
        js.add_handler("h", "function handler(e) { return Object.keys(require('crypto')) }")
        js.load()
        assert js.call_handler("h", {}) == ["mine"]


def test_require_errors(kvm: Kvm) -> None:
    with JSSandbox(heap_size=16 << 20) as js:
        js.add_module("throws", "throw new RangeError('top level');")
        js.add_module("waits", "await new Promise(() => {}); export const never = 1;")
        js.add_module("a", "import { b } from 'b'; export const a = 1;")
        js.add_module("b", "export const b = Object.keys(require('a'));")
        result = _run(
            js,
            CATCH + "return [caught(() => require('nope')), caught(() => require(1)),\n"
            "        caught(() => require()), caught(() => require('throws')),\n"
            "        caught(() => typeof require('waits').then),\n"
            "        caught(() => Object.keys(require('a')))]",
        )
        assert _run(js, "return Object.keys(require('crypto'))") == ["Hmac", "createHmac"]
    assert result[0][0] == "ReferenceError" and "could not load module 'nope'" in result[0][1]
    assert result[1] == ["TypeError", "require: the module name must be a string, got number"]
    assert result[2] == ["TypeError", "require: the module name must be a string, got undefined"]
    assert result[3] == ["RangeError", "top level"]
    assert result[4] == ["ok", "function"]  # a module still waiting: its promise
    assert result[5][0] in ("ok", "ReferenceError", "TypeError")  # a cycle: no crash


def test_a_hostile_call_is_a_js_error_not_a_crash(js: JSSandbox) -> None:
    _load(js, h="function handler(e) { return require('crypto').createHmac('md4', 'k') }")
    with pytest.raises(JSError) as info:
        js.call_handler("h", {})
    assert info.value.name == "TypeError" and "Invalid algorithm" in info.value.js_message
    assert json.dumps(_run(js, "return 1")) == "1"

"""Errors carrying text a guest wrote print safely: their ``str()`` escapes
control characters (a guest cannot clear a terminal, retitle its window or
forge log lines through an error), while the attributes keep the raw text."""

from __future__ import annotations

import pickle
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlasync import errors
from hlasync.errors import printable
from tests.conftest import fuzz_examples

HOSTILE = "\x1b]0;owned\x07\x1b[2J\rfake\x00\x7f\x85\x9b31m\u202egnp.exe\u2028x"


#: Invisible characters that reorder text (bidirectional marks, embeddings, isolates).
BIDI = {"\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}


def _unsafe(text: str, *, newlines: bool = True) -> list[str]:
    """The characters of ``text`` that a terminal or log would act on."""
    allowed = {"\n", "\t"} if newlines else {"\t"}
    return [
        c
        for c in text
        if c not in allowed and (unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI)
    ]


def test_printable_escapes_controls_and_keeps_the_rest() -> None:
    assert printable("plain text, üñí 漢字 \\x41") == "plain text, üñí 漢字 \\x41"
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("\r\x00\x7f\x85\x9f") == "\\x0d\\x00\\x7f\\x85\\x9f"
    assert printable("\u202eevil\u2066") == "\\u202eevil\\u2066"
    assert printable("line 1\n\tline 2") == "line 1\n\tline 2"
    assert printable("line 1\n\tline 2", keep_newlines=False) == "line 1\\x0a\tline 2"


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(text=st.text(), keep=st.booleans())
def test_printable_leaves_nothing_a_terminal_acts_on(text: str, keep: bool) -> None:
    shown = printable(text, keep_newlines=keep)
    assert _unsafe(shown, newlines=keep) == []
    assert printable(shown, keep_newlines=keep) == shown  # printing twice changes nothing


def _guest_text_errors(text: str) -> list[errors.HlasyncError]:
    return [
        errors.JSError(sandbox_id="p", function="h", name=text, js_message=text, stack=text),
        errors.JSSyntaxError(
            sandbox_id="p",
            function="h",
            name="SyntaxError",
            js_message=text,
            stack=text,
            file=None,
            line=None,
            column=None,
        ),
        errors.JSResultError(sandbox_id="p", function="h", name="", js_message=text, stack=text),
        errors.GuestAborted(sandbox_id="sb-1", function="f", code=1, guest_message=text),
        errors.GuestResultError(
            f"the guest could not return: {text}", sandbox_id="sb-1", function="f"
        ),
        errors.GuestProtocolError(f"bad frame: {text}", sandbox_id="sb-1", function="f"),
        errors.HostFunctionError(
            f"host function 'h' raised KeyError: {text}",
            sandbox_id="sb-1",
            function="f",
            host_function="h",
        ),
        errors.InvalidCoreDump(f"not a core dump: {text}"),
    ]


@pytest.mark.parametrize("index", range(len(_guest_text_errors(""))))
def test_errors_show_guest_text_escaped_and_keep_it_raw(index: int) -> None:
    error = _guest_text_errors(HOSTILE)[index]
    shown = str(error)
    assert _unsafe(shown) == [], shown
    assert "\\x1b" in shown
    for kept in ("js_message", "stack", "guest_message"):
        if hasattr(error, kept):
            assert getattr(error, kept) == HOSTILE
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == shown
    for kept in ("js_message", "stack", "guest_message"):
        if hasattr(error, kept):
            assert getattr(again, kept) == HOSTILE


def test_one_line_fields_do_not_forge_lines() -> None:
    aborted = errors.GuestAborted(
        sandbox_id="sb-1", function="f", code=2, guest_message="bye\nERROR root: forged"
    )
    assert "\n" not in str(aborted)
    named = errors.JSError(sandbox_id="p", function="h", name="E\nforged", js_message="m", stack="")
    assert "\n" not in str(named)
    stacked = errors.JSError(
        sandbox_id="p", function="h", name="E", js_message="m", stack="    at a\n    at b"
    )
    assert "    at a\n    at b" in str(stacked)  # a stack keeps its lines


def test_host_messages_read_as_before() -> None:
    error = errors.GuestError("it broke", sandbox_id="sb-1", function="f")
    assert str(error) == "it broke (sandbox sb-1, function 'f')"
    assert str(errors.ConfigError("bad size")) == "bad size"

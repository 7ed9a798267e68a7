"""The guest SDK runtime, exercised from real guests built in the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from hlasync import GuestProtocolError, Sandbox, SandboxState
from hlasync._build import build_guest
from hlasync.kvm import Kvm

FORMATS = r"""
#include <hlasync_guest.h>
const char *fmt_test(int64_t x, double f, const char *s) {
    static char buf[256];
    hl_snprintf(buf, sizeof buf, "[%5d|%-5d|%05d|%x|%X|%.3f|%f|%-6s|%.2s|%c|%ld|%%|%q %s]",
                (int)x, (int)x, (int)-x, 255u, 255u, f, f, s, s, 'z', (long)x, s);
    return buf;
}
HL_EXPORT(fmt_test, HL_STR, HL_INT, HL_FLOAT, HL_STR);
"""


@pytest.fixture(scope="module")
def formats_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("formats")
    source = directory / "formats.c"
    source.write_text(FORMATS)
    return build_guest([source], directory / "formats.elf")


def test_snprintf_conversions(kvm: Kvm, formats_guest: Path) -> None:
    with Sandbox(formats_guest) as sb:
        text = sb.call("fmt_test", 42, 3.14159, "abc")
        # An unsupported conversion (%q) stops formatting instead of misreading arguments.
        assert text == "[   42|42   |-0042|ff|FF|3.142|3.141590|abc   |ab|z|42|%|%q %s]"
        assert sb.call("fmt_test", -7, -0.5, "") == (
            "[   -7|-7   |00007|ff|FF|-0.500|-0.500000|      ||z|-7|%|%q %s]"
        )


def test_restore_after_an_in_instruction(kvm: Kvm, hostile_guest: Path) -> None:
    # KVM completes an interrupted `in` on the next KVM_RUN: restore must not let
    # that completion land on top of the restored registers.
    with Sandbox(hostile_guest) as sb:
        for _ in range(3):
            with pytest.raises(GuestProtocolError, match="IoIn") as info:
                sb.call("in_port")
            assert info.value.vcpu_exit is not None
            sb.restore()
            with pytest.raises(GuestProtocolError, match="bad result frame"):
                sb.call("bad_result_frame")  # runs from its own entry, not from `in_port`
            assert sb.state is SandboxState.POISONED
            sb.restore()


def test_rebuilt_guest_at_the_same_path_runs_the_new_code(kvm: Kvm, tmp_path: Path) -> None:
    source = tmp_path / "version.c"
    target = tmp_path / "version.elf"
    for version in (1, 2):
        source.write_text(
            "#include <hlasync_guest.h>\n"
            f"int64_t version(void) {{ return {version}; }}\n"
            "HL_EXPORT(version, HL_INT);\n"
        )
        build_guest([source], target)
        with Sandbox(target) as sb:
            assert sb.call("version") == version


def test_calls_do_not_inherit_vector_state(kvm: Kvm, hostile_guest: Path) -> None:
    with Sandbox(hostile_guest) as sb:
        clean = sb.call("observe_vector_state")
        assert clean == 0x1F80 << 32
        sb.call("leave_vector_state")
        assert sb.call("observe_vector_state") == clean  # same sandbox, next call
        sb.call("leave_vector_state")
        sb.restore()
        assert sb.call("observe_vector_state") == clean  # after a restore

"""Our ctypes mirrors of the KVM structures against the kernel's own headers:
a C compiler prints ``sizeof``/``offsetof`` from ``<linux/kvm.h>`` and the
ioctl numbers, and they must equal what ``hlasync.kvm._abi`` computes."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest

from hlasync.kvm import _abi
from tests.conftest import require_tool

HEADER = Path("/usr/include/linux/kvm.h")
EVENT_FIELDS = [
    "exception.injected",
    "exception.nr",
    "exception.has_error_code",
    "exception.pending",
    "exception.error_code",
    "interrupt.injected",
    "interrupt.nr",
    "interrupt.soft",
    "interrupt.shadow",
    "nmi.injected",
    "nmi.pending",
    "nmi.masked",
    "sipi_vector",
    "flags",
    "smi.smm",
    "smi.pending",
    "smi.smm_inside_nmi",
    "smi.latched_init",
    "triple_fault.pending",
    "reserved",
    "exception_has_payload",
    "exception_payload",
]
IOCTLS = ["KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "KVM_GET_REGS", "KVM_SET_SREGS"]
FLAGS = [name for name in dir(_abi) if name.startswith(("KVM_VCPUEVENT_", "KVM_SYNC_X86_"))]


def _offset(struct: type[ctypes.Structure], dotted: str) -> int:
    """offsetof(struct, a.b): nested structures of an instance share its buffer."""
    whole = inner = struct()
    *outer, name = dotted.split(".")
    for part in outer:
        inner = getattr(inner, part)
    return (
        ctypes.addressof(inner) - ctypes.addressof(whole) + int(getattr(type(inner), name).offset)
    )


def _kernel_values(tmp_path: Path) -> dict[str, int]:
    cc = require_tool("cc")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} is not installed (linux-libc-dev)")
    lines = ['printf("size %zu\\n", sizeof(struct kvm_vcpu_events));']
    lines += [
        f'printf("{name} %zu\\n", offsetof(struct kvm_vcpu_events, {name}));'
        for name in EVENT_FIELDS
    ]
    lines += [
        f'printf("run.{name} %zu\\n", offsetof(struct kvm_run, {name}));'
        for name in ("kvm_dirty_regs", "s.regs.regs", "s.regs.sregs", "s.regs.events")
    ]
    lines += [f'printf("{name} %lu\\n", (unsigned long){name});' for name in IOCTLS + FLAGS]
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/kvm.h>\n"
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n"
    )
    program = tmp_path / "layout"
    subprocess.run([cc, "-o", str(program), str(source)], check=True, timeout=60)
    output = subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in output.splitlines())}


def test_vcpu_events_and_the_sync_area_match_the_kernel_headers(tmp_path: Path) -> None:
    kernel = _kernel_values(tmp_path)
    ours = {"size": ctypes.sizeof(_abi.kvm_vcpu_events)}
    ours |= {name: _offset(_abi.kvm_vcpu_events, name) for name in EVENT_FIELDS}
    ours |= {
        "run.kvm_dirty_regs": _abi.RUN_DIRTY_REGS,
        "run.s.regs.regs": _abi.RUN_SYNC_REGS,
        "run.s.regs.sregs": _abi.RUN_SYNC_SREGS,
        "run.s.regs.events": _abi.RUN_SYNC_EVENTS,
    }
    ours |= {name: getattr(_abi, name) for name in IOCTLS + FLAGS}
    assert ours == kernel

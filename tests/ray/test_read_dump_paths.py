"""What a node's actor hands out through ``read_dump`` (issue 18): only
hlasync dumps that really lie in one of the node's dump directories. The
rule is a plain function (:func:`hlasync.ray.actor.read_node_dump`), tested
here without starting Ray."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hlasync.crashdump.placement import dump_directories, write_atomically
from hlasync.ray.actor import NodeWorker, read_node_dump
from tests.crashdump import hostile

NAME = "hl_core_20260101_T000000.000_1-1-abcd.elf"
OUTSIDE = "not one of this node's core dump directories"


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """``node_dumps`` with one dump, and beside it ``private`` holding a file
    named like a dump (a real dump, so only its place gives it away)."""
    dumps = tmp_path / "node_dumps"
    private = tmp_path / "private"
    dumps.mkdir()
    private.mkdir()
    hostile.minimal(dumps / NAME)
    hostile.minimal(private / "hl_core_secret.elf", {"reason": "secret"})
    return dumps


def test_a_dump_in_the_directory_is_handed_out(node: Path) -> None:
    assert read_node_dump(str(node / NAME), [node]) == (node / NAME).read_bytes()


def test_dot_dot_out_of_the_directory_is_refused(node: Path) -> None:
    with pytest.raises(PermissionError, match=OUTSIDE):
        read_node_dump(f"{node}/../private/hl_core_secret.elf", [node])


def test_a_symlinked_directory_inside_is_refused(node: Path) -> None:
    (node / "elsewhere").symlink_to(node.parent / "private")
    with pytest.raises(PermissionError, match=OUTSIDE):
        read_node_dump(str(node / "elsewhere" / "hl_core_secret.elf"), [node])


def test_a_symlinked_dump_pointing_out_is_refused(node: Path) -> None:
    (node / "hl_core_link.elf").symlink_to(node.parent / "private" / "hl_core_secret.elf")
    with pytest.raises(PermissionError, match=OUTSIDE):
        read_node_dump(str(node / "hl_core_link.elf"), [node])


def test_the_directory_may_be_named_through_a_symlink(node: Path) -> None:
    """HYPERLIGHT_CORE_DUMP_DIR spelled through a symlink (/tmp -> /private/tmp):
    directories are compared as files, not as strings."""
    link = node.parent / "dumps-link"
    link.symlink_to(node)
    expected = (node / NAME).read_bytes()
    assert read_node_dump(str(link / NAME), [link]) == expected
    assert read_node_dump(str(node / NAME), [link]) == expected


def test_files_that_are_not_dumps_are_refused(node: Path) -> None:
    (node / "hl_core_text.elf").write_text("not a core dump\n")
    with pytest.raises(PermissionError, match="no hlasync note"):
        read_node_dump(str(node / "hl_core_text.elf"), [node])
    os.mkfifo(node / "hl_core_fifo.elf")
    outcome: list[BaseException] = []

    def read_fifo() -> None:
        try:
            read_node_dump(str(node / "hl_core_fifo.elf"), [node])
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():
        os.close(os.open(node / "hl_core_fifo.elf", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_node_dump blocked on a FIFO")
    assert isinstance(outcome[0], PermissionError) and "not a regular file" in str(outcome[0])
    (node / "hl_core_dir.elf").mkdir()
    with pytest.raises(PermissionError, match="not a regular file"):
        read_node_dump(str(node / "hl_core_dir.elf"), [node])


def test_names_and_sizes_are_checked(node: Path) -> None:
    for path in ("/etc/passwd", NAME, f"{node}/core.elf", f"{node}/hl_core_x.elf.bak"):
        with pytest.raises(PermissionError, match="not a core dump of this worker"):
            read_node_dump(path, [node])
    with pytest.raises(FileNotFoundError, match="no core dump at"):
        read_node_dump(str(node / "hl_core_gone.elf"), [node])
    with pytest.raises(ValueError, match="over 100"):
        read_node_dump(str(node / NAME), [node], limit=100)
    with pytest.raises(PermissionError, match=OUTSIDE):
        read_node_dump(str(node / NAME), [])


def test_the_actor_serves_the_directories_this_process_wrote_to(node: Path, dump_dir: Path) -> None:
    """The default directory ($HYPERLIGHT_CORE_DUMP_DIR here) and every one a
    dump was written to: a SandboxConfig.crashdump_dir of the node's sandboxes."""
    data = (node / NAME).read_bytes()
    written, _ = write_atomically(node, lambda fd: os.write(fd, data))
    assert dump_directories()[0] == dump_dir and dump_directories()[-1] == node
    actor = object.__new__(NodeWorker)  # read_dump needs no worker
    assert actor.read_dump(str(written)) == data
    with pytest.raises(PermissionError, match=OUTSIDE):
        actor.read_dump(f"{node}/../private/hl_core_secret.elf")

"""Port of the unit tests of hyperlight-js ``src/hyperlight-js/src/resolver.rs``.

Upstream tests its embedded file system (``embed_modules!``); the ports test
what a handler sees of it: a module added under a path is importable by that
path, and nothing else is.
"""

from __future__ import annotations

import pytest

from hlasync import JSError
from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

from ._helpers import Printed
from ._missing import SKIP_RUST_EMBEDDED_FS


def test_file_read(kvm: Kvm) -> None:
    """resolver.rs ``test_file_read``: "test.js" holds the source it was given."""
    printed = Printed()
    with JSSandbox(output=printed) as js:
        js.add_module("test.js", "console.log('hello');")
        js.add_handler("reader", "import './test.js';\nexport function handler(e) { return 0 }")
        js.load()  # runs test.js
        assert printed.take() == "hello\n"


@pytest.mark.skip(reason=SKIP_RUST_EMBEDDED_FS)
def test_directory_detection() -> None:
    """resolver.rs ``test_directory_detection``: "foo" is a directory of "foo/bar.js"."""


@pytest.mark.skip(reason=SKIP_RUST_EMBEDDED_FS)
def test_file_metadata() -> None:
    """resolver.rs ``test_file_metadata``: "test.js" is a file, not a directory."""


def test_prefix_collision(kvm: Kvm) -> None:
    """resolver.rs ``test_prefix_collision``: with "foo.js" and "foobar.js", "foo"
    is not found and "foo.js" is."""
    with JSSandbox() as js:
        js.add_module("foo.js", "export default 'content1';")
        js.add_module("foobar.js", "export default 'content2';")
        js.add_handler(
            "prefix", "import foo from 'foo';\nexport function handler(e) { return foo }"
        )
        with pytest.raises(JSError, match="foo"):
            js.load()
        js.add_handler(
            "prefix", "import foo from 'foo.js';\nexport function handler(e) { return foo }"
        )
        js.load()
        assert js.call_handler("prefix", {}) == "content1"


def test_not_found(kvm: Kvm) -> None:
    """resolver.rs ``test_not_found``: "missing.js" is not there."""
    with JSSandbox() as js:
        js.add_module("exists.js", "export default 'content';")
        js.add_handler(
            "reader", "import m from 'missing.js';\nexport function handler(e) { return m }"
        )
        with pytest.raises(JSError, match=r"missing\.js"):
            js.load()

"""Port of hyperlight-js ``src/hyperlight-js-runtime/tests/native_cli.rs``.

Upstream builds its native ``hyperlight-js-runtime`` binary and runs it as
``hyperlight-js-runtime FILE EVENT``; here the command a user runs is
``python -m hlasync js run FILE --event EVENT``. Upstream prints the result
as ``Handler result: <JSON>``, hlasync's CLI prints the result as JSON alone:
the output line is the same JSON value, without the label.
"""

from __future__ import annotations

import os
from pathlib import Path

from hlasync.kvm import Kvm
from tests.conftest import run_cli

INDEX_JS = """
            import * as math from './math.js';
            function handler(event) {
                console.log(JSON.stringify(event));
                return math.add(event.a, 41);
            }
        """

MATH_JS = """
            const add = (a, b) => a + b;
            const subtract = (a, b) => a - b;
            export { add, subtract };
        """


def test_smoke_test(kvm: Kvm, tmp_path: Path) -> None:
    """native_cli.rs ``smoke_test``: a handler file that imports a sibling
    ``./math.js`` (and exports nothing) runs from the command line; its
    ``console.log`` line and then its result (42) are the whole of stdout."""
    (tmp_path / "index.js").write_text(INDEX_JS)
    (tmp_path / "math.js").write_text(MATH_JS)

    done = run_cli(
        "js", "run", os.path.join(tmp_path, "./index.js"), "--event", '{"a":1,"b":[1,2,3]}'
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    # Upstream: [r#"{"a":1,"b":[1,2,3]}"#, "Handler result: 42"].
    assert lines == ['{"a":1,"b":[1,2,3]}', "42"]

"""Port of hyperlight-js ``src/hyperlight-js/tests/builtin_crypto.rs``."""

from __future__ import annotations

import json

from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

HANDLER = r"""
        function handler(event) {
            var crypto = require('crypto');
            var key = "TULWi2fOzLr9GcJeArpS4o135bEGmFhdUjpBSxUeJxXtIlx6qh";
            var data = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJUZXN0U3ViamVjdCIsIm5hbWUiOiJUZXN0IFVzZXIiLCJpYXQiOjE3MTg4OTE5MTksIm5iZiI6MTcxODg5MTkxOSwiZXhwIjoxODc2NjU4MzQ2fQ";
            var hmac = crypto.createHmac('sha256', key).update(data);
            event.signature_b64_url = hmac.digest('base64url');
            event.signature_b64 = hmac.digest('base64');
            event.signature_hex = hmac.digest('hex');
            String.bytesFrom("SGVsbG8gV29ybGQhIQo=", "base64url");
            String.bytesFrom("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", "base64url");
            String.bytesFrom("eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyLCJuYmYiOjE1MTYyMzkwMjIsImV4cCI6MTcxNjIzOTAyMn0=","base64url");
            String.bytesFrom("eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyLCJuYmYiOjE1MTYyMzkwMjIsImV4cCI6MTcxNjIzOTAyMn0","base64url");
            return event;
        }
"""  # noqa: E501 - upstream's script, verbatim


def test_crypto_create_hmac(kvm: Kvm) -> None:
    """builtin_crypto.rs ``crypto_create_hmac``: ``require('crypto').createHmac('sha256',
    key).update(data)`` digests the same HMAC as base64url, base64 and hex."""
    event = {"signature_b64_url": "", "signature_b64": "", "signature_hex": ""}
    with JSSandbox() as js:
        js.add_handler("handler", HANDLER)
        js.load()
        result = js.call_handler("handler", event)
    assert result == json.loads(
        '{"signature_b64_url":"uRMcKIrmGTb0LDN0IxDF0kyS8zy2E5RZwV_L66XGHg8",'
        '"signature_b64":"uRMcKIrmGTb0LDN0IxDF0kyS8zy2E5RZwV/L66XGHg8=",'
        '"signature_hex":"b9131c288ae61936f42c33742310c5d24c92f33cb6139459c15fcbeba5c61e0f"}'
    )

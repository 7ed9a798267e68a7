"""Fuzz tests of the parsers that read untrusted bytes (JS replies, guest
frames, worker-channel frames, core dumps), with budgets per input; run
longer with ``HLASYNC_FUZZ_SCALE`` (see ``tests.conftest.fuzz_examples``)."""

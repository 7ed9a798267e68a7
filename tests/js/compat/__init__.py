"""hyperlight-js's test suite, ported to hlasync.js (issue 19): the behaviour its users expect."""

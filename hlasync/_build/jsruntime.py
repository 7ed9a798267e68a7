"""Build the JavaScript runtime guest: QuickJS with a small libc.

What goes into ``jsruntime.elf``, each group compiled with its own flags:

- the SDK runtime (``runtime.c``), like every guest;
- the glue, ``guest/js/*.c`` (``jsruntime.c``, the built-ins ``builtins.c`` and
  ``sha2.c``), and our libc, ``guest/js/libc/*.c``
  (stdout/stderr, clocks, pthreads for one thread, errno, abort);
- the QuickJS engine from the pinned ``quickjs-ng`` sdist, compiled as hosted
  C (builtins on: memcpy of a constant size becomes a move);
- musl sources from the pinned ``ziglang`` wheel (:data:`MUSL_SOURCES`: libm,
  printf's number formatting, strtod, qsort, a few string functions), compiled
  as musl compiles itself.

Everything is compiled against musl's headers (``-nostdinc``, the compiler's
own headers last), so the C ABI is the same with gcc and with zig cc. The
engine's and musl's objects depend only on the pins, the compiler and the
flags: they are cached under ``<cache>/objects/`` and reused, so rebuilding
after a change to the glue or our libc compiles only those.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import fetch
from .errors import GuestBuildError
from .toolchain import Toolchain

__all__ = ["ENGINE_SOURCES", "build", "inputs"]

#: QuickJS's C files in the sdist's upstream-quickjs/, the longest to compile first.
ENGINE_SOURCES = ("quickjs.c", "libregexp.c", "libunicode.c", "dtoa.c")

#: The interpreter polls its interrupt handler at these branch opcodes (loop
#: back-edges) without saving the running frame's pc first (the engine's own
#: FIXME in build_backtrace), so a stack taken there names the looping function
#: "(missing)" instead of its line. The build saves pc at the start of each of
#: them, in a copy of the pinned quickjs.c next to it: one store per branch, and
#: a hung handler's JavaScript stack points at its loop.
POLLING_BRANCHES = (
    "OP_goto",
    "OP_goto16",
    "OP_goto8",
    "OP_if_true",
    "OP_if_false",
    "OP_if_true8",
    "OP_if_false8",
)
#: The parser gives an empty loop (``while (true) {}``) no source position of
#: its own, so a stack taken at its back-edge names the enclosing function's
#: first line. The build records the loop keyword's position just before each
#: back-edge of ``while``, ``do ... while`` and ``for (;;)`` (compile time only:
#: it lands in the line table, not in the bytecode). Each entry: (what is
#: replaced, its replacement); each must occur exactly once.
_LOOP_POSITIONS = (
    (
        "    case TOK_WHILE:\n        {\n            int label_cont, label_break;\n"
        "            BlockEnv break_entry;\n",
        "    case TOK_WHILE:\n        {\n            int label_cont, label_break;\n"
        "            BlockEnv break_entry;\n"
        "            int loop_line = s->token.line_num, loop_col = s->token.col_num;\n",
    ),
    (
        "            emit_goto(s, OP_goto, label_cont);\n\n            emit_label(s, label_break);"
        "\n\n            pop_break_entry(s->cur_func);\n        }\n        break;\n"
        "    case TOK_DO:\n        {\n            int label_cont, label_break, label1;\n"
        "            BlockEnv break_entry;\n",
        "            emit_source_loc_at(s, loop_line, loop_col);\n"
        "            emit_goto(s, OP_goto, label_cont);\n\n            emit_label(s, label_break);"
        "\n\n            pop_break_entry(s->cur_func);\n        }\n        break;\n"
        "    case TOK_DO:\n        {\n            int label_cont, label_break, label1;\n"
        "            BlockEnv break_entry;\n"
        "            int loop_line = s->token.line_num, loop_col = s->token.col_num;\n",
    ),
    (
        "            emit_goto(s, OP_if_true, label1);\n",
        "            emit_source_loc_at(s, loop_line, loop_col);\n"
        "            emit_goto(s, OP_if_true, label1);\n",
    ),
    (
        "            } else {\n                emit_goto(s, OP_goto, label_cont);\n            }\n",
        "            } else {\n"
        "                emit_source_loc_at(s, source_line_num, source_col_num);\n"
        "                emit_goto(s, OP_goto, label_cont);\n            }\n",
    ),
)
#: JSON.parse (and so every event) makes every number a float64, where the
#: JavaScript parser keeps integral literals as int32: a handler computing on
#: an event's integers took the interpreter's slower float paths (fib(25) 8.2
#: ms from an event, 5.9 ms from a literal). Integral values that fit go in
#: as int32, as ``js_number`` does everywhere else (-0 and non-integers stay
#: float64: nothing a script can observe changes).
_JSON_INTEGERS = (
    "    s->token.u.num.val = js_float64(strtod((const char *)p_start, NULL));\n",
    "    s->token.u.num.val = js_number(strtod((const char *)p_start, NULL));\n",
)
PATCHED_ENGINE = "quickjs-hlasync.c"


def _pinned_changed(quickjs: Path, what: str) -> GuestBuildError:
    return GuestBuildError(
        f"{quickjs / 'quickjs.c'}: {what}: the pinned QuickJS changed; update "
        "hlasync/_build/jsruntime.py"
    )


def engine_source(quickjs: Path) -> Path:
    """``quickjs.c`` with the pc saved at the polling branches, loop positions
    in the line table and integral JSON numbers as int32 (see above)."""
    original = (quickjs / "quickjs.c").read_text(encoding="utf-8")
    branches = "|".join(POLLING_BRANCHES)
    patched, count = re.subn(rf"(CASE\(({branches})\):)", r"\1 sf->cur_pc = pc;", original)
    if count != len(POLLING_BRANCHES):
        raise _pinned_changed(
            quickjs, f"expected {len(POLLING_BRANCHES)} polling branches, found {count}"
        )
    for index, (old, new) in enumerate((*_LOOP_POSITIONS, _JSON_INTEGERS)):
        found = patched.count(old)
        if found != 1:
            raise _pinned_changed(quickjs, f"adjustment {index} found {found} times, not once")
        patched = patched.replace(old, new)
    target = quickjs / PATCHED_ENGINE
    if not target.is_file() or target.read_text(encoding="utf-8") != patched:
        fd, temp = tempfile.mkstemp(prefix=f".{PATCHED_ENGINE}.", dir=quickjs)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(patched)
        os.replace(temp, target)
    return target


#: musl's libm: what QuickJS calls and what those call. An x86_64 version
#: (src/math/x86_64/NAME.c: sqrt, fabs, lrint... in one instruction) wins.
_MATH = (  # noqa: SIM905 - sixty names read better as words than as a list
    "__cos __expo2 __fpclassifyl __math_divzero __math_invalid __math_oflow __math_uflow "
    "__math_xflow __rem_pio2 __rem_pio2_large __signbitl __sin __tan acos acosh asin asinh "
    "atan atan2 atanh cbrt ceil copysign copysignl cos cosh exp exp2 exp_data exp2f_data "
    "expm1 fabs fabsl floor fmax fmin fmod fmodl frexp frexpl hypot log log10 log1p log2 "
    "log2_data log_data lrint modf pow pow_data rint round scalbn scalbnl sin sincos sinh "
    "sqrt tan tanh trunc"
).split()

#: The rest of musl we compile, relative to its src/. Left out on purpose (our
#: libc has its own): stdout.c and stderr.c (system calls), wcrtomb.c, strerror.c
#: and __errno_location.c (thread-local storage), abort.c, the clocks, the locks.
_OTHER = (  # noqa: SIM905
    "stdio/vfprintf.c stdio/vsnprintf.c stdio/snprintf.c stdio/sprintf.c stdio/vsprintf.c "
    "stdio/printf.c stdio/vprintf.c stdio/fprintf.c stdio/fwrite.c "
    "stdio/fputs.c stdio/__towrite.c stdio/__toread.c stdio/__uflow.c "
    "stdlib/strtod.c stdlib/strtol.c stdlib/atoi.c stdlib/abs.c stdlib/qsort.c "
    "stdlib/qsort_nr.c internal/floatscan.c internal/intscan.c internal/shgetc.c "
    "string/memchr.c string/memrchr.c string/strrchr.c string/strstr.c string/strchrnul.c "
    "string/strspn.c string/strcspn.c string/strpbrk.c string/strcat.c string/strncat.c "
    "string/strdup.c string/strndup.c multibyte/wctomb.c time/__secs_to_tm.c"
).split()


def _musl_sources(musl: Path) -> list[Path]:
    sources = []
    for name in _MATH:
        arch = musl / "src" / "math" / "x86_64" / f"{name}.c"
        sources.append(arch if arch.is_file() else musl / "src" / "math" / f"{name}.c")
    sources += [musl / "src" / relative for relative in _OTHER]
    return sources


def inputs(js_dir: Path) -> list[Path]:
    """Our own files the guest is built from (the glue and the libc)."""
    return sorted(p for p in js_dir.rglob("*") if p.suffix in (".c", ".h") and p.is_file())


#: Our libc, in a source checkout (installed packages ship built guests only).
LIBC_DIR = Path(__file__).resolve().parents[2] / "guest" / "js" / "libc"


class _Flags:
    """Compiler flags of each group of sources."""

    def __init__(self, tools: Toolchain, sdk: Path, quickjs: Path, zig: Path) -> None:
        musl = zig / "lib" / "libc" / "musl"
        headers = zig / "lib" / "libc" / "include"
        # -I, not -isystem: zig cc puts clang's own headers first among the
        # -isystem folders even with -nostdinc, and clang's limits.h of a
        # freestanding build hides musl's. The compiler's headers come last, for
        # what musl lacks (stdatomic.h).
        public = [
            "-nostdinc",
            f"-I{headers / 'x86_64-linux-musl'}",
            f"-I{headers / 'generic-musl'}",
            f"-isystem{tools.builtin_include()}",
        ]
        # musl's own order: arch, its internal headers, then the public ones.
        internal = [
            f"-I{musl / 'arch' / 'x86_64'}",
            f"-I{musl / 'arch' / 'generic'}",
            f"-I{musl / 'src' / 'include'}",
            f"-I{musl / 'src' / 'internal'}",
            *public,
        ]
        code = list(tools.code_cflags)
        freestanding = ["-ffreestanding", "-fno-builtin"]
        if tools.kind == "gcc":
            freestanding.append("-fno-tree-loop-distribute-patterns")
        sections = ["-ffunction-sections", "-fdata-sections"]  # unused code is collected
        #: QuickJS, hosted. -fwrapv as upstream's Makefile: it relies on signed wrap-around.
        self.engine = [
            *code,
            "-std=gnu11",
            *sections,
            "-fwrapv",
            "-w",
            "-DNDEBUG",
            "-D_GNU_SOURCE",
            *public,
        ]
        #: musl, as its Makefile compiles it.
        self.musl = [
            *code,
            "-std=c99",
            *freestanding,
            *sections,
            "-ffp-contract=off",
            "-frounding-math",
            "-fno-strict-aliasing",
            "-D_XOPEN_SOURCE=700",
            "-w",
            *internal,
        ]
        #: Our libc: beside musl's internals (as system headers: their warnings are
        #: not ours), with our warnings.
        self.libc = [
            *code,
            "-std=gnu11",
            *freestanding,
            *sections,
            "-Wall",
            "-Wextra",
            "-D_GNU_SOURCE",
            f"-I{sdk / 'include'}",
            *(f"-isystem{flag[2:]}" if flag.startswith("-I") else flag for flag in internal),
        ]
        #: The glue: hosted, with QuickJS's and the SDK's headers.
        self.glue = [
            *code,
            "-std=gnu11",
            *sections,
            "-fwrapv",
            "-Wall",
            "-Wextra",
            "-DNDEBUG",
            "-D_GNU_SOURCE",
            f"-I{sdk / 'include'}",
            f"-I{quickjs}",
            *public,
        ]
        self.runtime = [*tools.cflags, f"-I{sdk / 'include'}"]


def build(
    output: Path, tools: Toolchain, glue: Sequence[Path], sdk: Path, libc: Path = LIBC_DIR
) -> None:
    """Link the engine, our libc (``libc/*.c``) and the ``glue`` sources into a
    guest at ``output`` (atomically)."""
    from . import atomic_output  # the package imports this module first

    quickjs = fetch.fetch(fetch.QUICKJS) / "upstream-quickjs"
    zig = fetch.fetch(fetch.ZIGLANG) / "ziglang"
    flags = _Flags(tools, sdk, quickjs, zig)
    engine = [engine_source(quickjs), *(quickjs / name for name in ENGINE_SOURCES[1:])]
    third_party = [(path, flags.engine) for path in engine]
    third_party += [(path, flags.musl) for path in _musl_sources(zig / "lib" / "libc" / "musl")]
    ours = [(sdk / "runtime.c", flags.runtime)]
    ours += [(path, flags.libc) for path in sorted(libc.glob("*.c"))]
    ours += [(path, flags.glue) for path in glue]

    cache = _object_cache(tools, third_party)
    cached = _cached_objects(cache, len(third_party))
    cache.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="hlasync-jsruntime-") as work:
            scratch = Path(work)
            jobs = [
                (source, flags, scratch / f"{i}-{source.parent.name}-{source.stem}.o")
                for i, (source, flags) in enumerate(ours)
            ]
            if cached is None:  # quickjs.c first: it takes longest
                jobs = [
                    (source, flags, fresh / f"{source.parent.name}-{source.stem}.o")
                    for source, flags in third_party
                ] + jobs
            _compile(tools, jobs)
            if cached is None:
                (fresh / "complete").write_text(tools.identity + "\n")
                _drop_superseded(cache, tools.identity)
                fresh.rename(cache)
                cached = _cached_objects(cache, len(third_party))
                assert cached is not None
            own = [target for _, _, target in jobs[-len(ours) :]]
            with atomic_output(output) as temp:
                tools.run(
                    [
                        *tools.cflags,
                        f"-T{sdk / 'guest.ld'}",
                        *tools.ldflags,
                        *map(str, [*own, *cached]),
                        *tools.libs,
                        "-o",
                        str(temp),
                    ],
                    what=f"linking {output.name} with {tools.identity}",
                )
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def _compile(tools: Toolchain, jobs: Sequence[tuple[Path, list[str], Path]]) -> None:
    """Compile each (source, flags, object) in parallel; raise the first error in order."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = [
            pool.submit(
                tools.run,
                [*flags, "-c", str(source), "-o", str(target)],
                what=f"compiling {source.name} with {tools.identity}",
            )
            for source, flags, target in jobs
        ]
        for future in futures:
            future.result()


def _object_cache(tools: Toolchain, jobs: Sequence[tuple[Path, list[str]]]) -> Path:
    """Where the engine's and musl's objects for this compiler and these flags live."""
    key = hashlib.sha256(tools.identity.encode())
    for source, flags in jobs:
        key.update(f"\0{source}\0{' '.join(flags)}".encode())
    key.update(Path(__file__).read_bytes())
    return fetch.cache_root() / "objects" / f"jsengine-{key.hexdigest()[:24]}"


def _drop_superseded(cache: Path, identity: str) -> None:
    """Remove this compiler's objects built with other flags or sources: they
    would never be used again (another compiler's stay)."""
    for other in cache.parent.glob("jsengine-*"):
        try:
            superseded = other == cache or (other / "complete").read_text().strip() == identity
        except OSError:
            continue  # still being built by another process, or not ours
        if superseded:
            shutil.rmtree(other, ignore_errors=True)


def _cached_objects(cache: Path, count: int) -> list[Path] | None:
    if not (cache / "complete").is_file():
        return None
    objects = sorted(cache.glob("*.o"))
    return objects if len(objects) == count else None

"""The SDK's heap (malloc, calloc, realloc, free, malloc_usable_size) in a
real guest: random use keeps every block's contents, blocks are 16-byte
aligned and never overlap, freed memory coalesces back into one block, and
misuse aborts the guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from hlasync import GuestAborted, Sandbox, SandboxConfig
from hlasync._build import build_guest
from hlasync.kvm import Kvm

HEAP = r"""
#include <hlasync_guest.h>

#define SLOTS 600
static uint8_t *blocks[SLOTS];
static size_t sizes[SLOTS];
static uint8_t marks[SLOTS];
static uint64_t state;

static uint64_t next(void) { /* xorshift64 */
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static void fill(int i, size_t from) {
    for (size_t k = from; k < sizes[i]; k++) blocks[i][k] = (uint8_t)(marks[i] + k * 7);
}

static bool intact(int i, size_t length) {
    for (size_t k = 0; k < length; k++)
        if (blocks[i][k] != (uint8_t)(marks[i] + k * 7)) return false;
    return true;
}

static size_t random_size(int64_t max_size) {
    uint64_t r = next();
    if (r % 8) return r % 200; /* mostly small, as an interpreter allocates */
    return r % (uint64_t)max_size;
}

/* Random malloc/calloc/realloc/free over SLOTS blocks; every block keeps its
 * contents, is 16-byte aligned and usable for at least the bytes asked.
 * Returns 0, or the step (1-based) where a check failed, negated. */
int64_t heap_stress(int64_t seed, int64_t steps, int64_t max_size) {
    state = (uint64_t)seed * 0x9e3779b97f4a7c15ULL + 1;
    for (int64_t step = 1; step <= steps; step++) {
        int i = (int)(next() % SLOTS);
        size_t size = random_size(max_size);
        if (blocks[i] && !intact(i, sizes[i])) return -step;
        uint8_t *p;
        switch (next() % 4) {
        case 0: /* free */
            free(blocks[i]);
            blocks[i] = 0;
            continue;
        case 1: /* realloc (malloc when empty) */
            if (!blocks[i]) sizes[i] = 0, marks[i] = (uint8_t)next();
            p = realloc(blocks[i], size);
            if (!p) continue; /* the old block stays */
            blocks[i] = p;
            if (size > sizes[i]) {
                size_t old = sizes[i];
                sizes[i] = size;
                fill(i, old);
            } else {
                sizes[i] = size;
            }
            break;
        case 2: /* calloc: zeroed */
            free(blocks[i]);
            blocks[i] = p = calloc(1, size);
            if (!p) continue;
            for (size_t k = 0; k < size; k++)
                if (p[k]) return -step;
            sizes[i] = size, marks[i] = (uint8_t)next();
            fill(i, 0);
            break;
        default:
            free(blocks[i]);
            blocks[i] = p = malloc(size);
            if (!p) continue;
            sizes[i] = size, marks[i] = (uint8_t)next();
            fill(i, 0);
        }
        if (((uintptr_t)p & 15) || malloc_usable_size(p) < size) return -step;
    }
    for (int i = 0; i < SLOTS; i++) {
        if (blocks[i] && !intact(i, sizes[i])) return -steps - 1;
        free(blocks[i]);
        blocks[i] = 0;
    }
    return 0;
}
HL_EXPORT(heap_stress, HL_INT, HL_INT, HL_INT, HL_INT);

/* How many blocks of `size` bytes fit before malloc returns NULL; then frees
 * them in an interleaved order. */
int64_t heap_fill(int64_t size) {
    void **list = 0;
    int64_t count = 0;
    for (void *p; (p = malloc((size_t)size));) {
        *(void **)p = list;
        list = p;
        count++;
    }
    void **odd = 0;
    for (int64_t n = 0; list; n++) { /* free every other one, then the rest */
        void **p = list;
        list = *p;
        if (n & 1) *p = odd, odd = p;
        else free(p);
    }
    while (odd) {
        void **p = odd;
        odd = *p;
        free(p);
    }
    return count;
}
HL_EXPORT(heap_fill, HL_INT, HL_INT);

/* The largest block malloc gives, to the nearest 16 bytes. */
int64_t heap_largest(void) {
    size_t low = 0, high = hl_peb_get()->heap_size;
    while (high - low > 16) {
        size_t middle = (low + high) / 2;
        void *p = malloc(middle);
        if (p) free(p), low = middle;
        else high = middle;
    }
    return (int64_t)low;
}
HL_EXPORT(heap_largest, HL_INT);

void heap_misuse(int64_t how) {
    char *p = malloc(100);
    (void)malloc(100); /* the block after p */
    switch (how) {
    case 0: free(p); free(p); break;               /* double free */
    case 1: free(p + 16); break;                    /* not a block's start */
    case 2: free((void *)hl_peb_get()); break;      /* not heap memory */
    case 3: memset(p, 0x41, 140); free(p); break;   /* overflow into the next header */
    case 4: free(p); (void)realloc(p, 10); break;   /* realloc of a freed block */
    case 5: free(p); (void)malloc_usable_size(p); break;
    }
}
HL_EXPORT(heap_misuse, HL_VOID, HL_INT);
"""

CONFIG = SandboxConfig(memory_size=8 << 20, heap_size=2 << 20)


@pytest.fixture(scope="module")
def heap_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("heap")
    (directory / "heap.c").write_text(HEAP)
    return build_guest([directory / "heap.c"], directory / "heap.elf")


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_use_keeps_every_block(kvm: Kvm, heap_guest: Path, seed: int) -> None:
    with Sandbox(heap_guest, config=CONFIG) as sb:
        assert sb.call("heap_stress", seed, 20000, 16 << 10) == 0
        assert sb.call("heap_stress", seed + 100, 3000, 512 << 10) == 0  # some do not fit


def test_freed_memory_coalesces(kvm: Kvm, heap_guest: Path) -> None:
    with Sandbox(heap_guest, config=CONFIG) as sb:
        whole = sb.call("heap_largest")
        assert (
            isinstance(whole, int) and whole > (2 << 20) - 256
        )  # one block: the heap less its header
        for size in (1, 24, 100, 1000, 5000):
            count = sb.call("heap_fill", size)
            assert count == sb.call("heap_fill", size)  # everything came back
            assert sb.call("heap_largest") == whole  # ...as one block again
        assert sb.call("heap_stress", 9, 20000, 64 << 10) == 0
        assert sb.call("heap_largest") == whole


def test_small_blocks_cost_sixteen_bytes(kvm: Kvm, heap_guest: Path) -> None:
    with Sandbox(heap_guest, config=CONFIG) as sb:
        heap = 2 << 20
        assert sb.call("heap_fill", 16) == pytest.approx(heap // 32, rel=0.01)
        assert sb.call("heap_fill", 48) == pytest.approx(heap // 64, rel=0.01)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        (0, "free(): double free"),
        (1, "free(): invalid pointer"),
        (2, "free(): invalid pointer"),
        (3, "free(): heap corruption"),
        (4, "realloc(): double free"),
        (5, "malloc_usable_size(): double free"),
    ],
)
def test_misuse_aborts_the_guest(kvm: Kvm, heap_guest: Path, how: int, message: str) -> None:
    with Sandbox(heap_guest, config=CONFIG) as sb:
        with pytest.raises(GuestAborted) as info:
            sb.call("heap_misuse", how)
        assert info.value.code == -2
        assert info.value.guest_message.startswith(message)

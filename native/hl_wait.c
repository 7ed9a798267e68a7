/*
 * hlasync's host-side waiting helper, loaded with ctypes (which releases the
 * GIL for the whole call): a thread waits for a guest's doorbell word without
 * holding the GIL, spinning while an answer is expected soon and sleeping on
 * a futex after that.
 *
 * Built at install beside the bundled guests (hlasync/_bin/libhlwait.so).
 */
#include <stdint.h>

/* Freestanding: no libc headers or libraries (the pinned zig ships musl's
 * headers only, and the object must load into any CPython). Raw system calls. */
#define SYS_FUTEX 202
#define SYS_CLOCK_GETTIME 228
#define FUTEX_WAIT_PRIVATE 128
#define FUTEX_WAKE_PRIVATE 129
#define CLOCK_MONOTONIC 1
#define WAKE_ALL 0x7fffffff

struct hl_timespec {
    int64_t sec, nsec;
};

static long hl_syscall4(long number, long a, long b, long c, long d) {
    register long r10 __asm__("r10") = d;
    long result;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(number), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return result;
}

#define HL_WAIT_WORD 1    /* *word reached the expected value */
#define HL_WAIT_FLAG 2    /* *flag was raised (hl_wake) */
#define HL_WAIT_ASK 3     /* *ask differs from *answer (the guest asked something) */
#define HL_WAIT_TIMEOUT 0 /* none of these, within timeout_ns */

/* How long one futex sleep lasts before the word is looked at again: the guest
 * cannot wake a futex, so a sleeping waiter polls at this period. */
#define NAP_NS 50000ull

static uint64_t now_ns(void) {
    struct hl_timespec t = {0, 0};
    hl_syscall4(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC, (long)&t, 0, 0);
    return (uint64_t)t.sec * 1000000000ull + (uint64_t)t.nsec;
}

struct hl_watch {
    const volatile uint64_t *word;
    uint64_t expected;
    const volatile uint64_t *ask, *answer;
    const volatile uint32_t *flag;
};

static inline int ready(const struct hl_watch *w) {
    if (__atomic_load_n(w->word, __ATOMIC_ACQUIRE) == w->expected) return HL_WAIT_WORD;
    if (__atomic_load_n(w->ask, __ATOMIC_ACQUIRE) != __atomic_load_n(w->answer, __ATOMIC_ACQUIRE))
        return HL_WAIT_ASK;
    if (__atomic_load_n(w->flag, __ATOMIC_ACQUIRE)) return HL_WAIT_FLAG;
    return -1;
}

/* Wait until *word == expected, *ask != *answer or *flag != 0: spin for
 * spin_ns, then sleep on the flag's futex in NAP_NS slices, for at most
 * timeout_ns in all. The word is checked first, so a result that is there wins
 * over a raised flag. Pass ask == answer when nothing can be asked. */
int hl_wait(const volatile uint64_t *word, uint64_t expected, const volatile uint64_t *ask,
            const volatile uint64_t *answer, volatile uint32_t *flag, uint64_t spin_ns,
            uint64_t timeout_ns) {
    const struct hl_watch w = {word, expected, ask, answer, flag};
    const struct hl_watch *watch = &w;
    int outcome = ready(watch);
    if (outcome >= 0) return outcome;
    uint64_t start = now_ns();
    uint64_t spin_end = start + (spin_ns < timeout_ns ? spin_ns : timeout_ns);
    unsigned polls = 0;
    for (;;) {
        __builtin_ia32_pause();
        outcome = ready(watch);
        if (outcome >= 0) return outcome;
        if ((++polls & 63) == 0 && now_ns() >= spin_end) break;
    }
    for (;;) {
        uint64_t now = now_ns();
        if (now - start >= timeout_ns) return HL_WAIT_TIMEOUT;
        uint64_t left = timeout_ns - (now - start);
        uint64_t nap = left < NAP_NS ? left : NAP_NS;
        struct hl_timespec slice = {(int64_t)(nap / 1000000000ull), (int64_t)(nap % 1000000000ull)};
        hl_syscall4(SYS_FUTEX, (long)flag, FUTEX_WAIT_PRIVATE, 0, (long)&slice);
        outcome = ready(watch);
        if (outcome >= 0) return outcome;
    }
}

/* Raise *flag and wake every thread sleeping on it in hl_wait. */
void hl_wake(volatile uint32_t *flag) {
    __atomic_store_n(flag, 1, __ATOMIC_RELEASE);
    hl_syscall4(SYS_FUTEX, (long)flag, FUTEX_WAKE_PRIVATE, WAKE_ALL, 0);
}

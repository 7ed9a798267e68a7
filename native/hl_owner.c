/*
 * A vCPU's owner thread (hlasync/kvm/owner.py): the one thread that runs a
 * sandbox's vCPU for the sandbox's whole life. It serves one request at a time
 * from a small shared record, without the GIL: KVM_RUN, every vCPU ioctl, the
 * mapping and unmapping of guest memory and the closing of the VM's files.
 * Any thread posts a request (hl_owner_call, serialized by the poster) and
 * waits for it, spinning and then sleeping; any thread kicks (hl_owner_kick)
 * the owner's KVM_RUN out of the guest, or the next one if none runs.
 *
 * Freestanding like hl_wait.c: raw system calls, no libc.
 */
#include <stdint.h>

#define SYS_MMAP 9
#define SYS_MUNMAP 11
#define SYS_MADVISE 28
#define SYS_IOCTL 16
#define SYS_CLOSE 3
#define SYS_RT_SIGTIMEDWAIT 128
#define SYS_FUTEX 202
#define SYS_CLOCK_GETTIME 228
#define SYS_TGKILL 234
#define FUTEX_WAIT_PRIVATE 128
#define FUTEX_WAKE_PRIVATE 129
#define CLOCK_MONOTONIC 1
#define EINTR 4
#define EAGAIN 11
#define KVM_RUN 0xae80
#define SYS_SCHED_YIELD 24
/* Spinning waits yield the CPU after this many polls (a few microseconds):
 * on a busy machine the thread they wait for may need this very CPU. */
#define YIELD_AFTER 256

enum {
    OP_NONE = 0,
    OP_IOCTL = 1,  /* ioctl(fd, a1, a2) */
    OP_RUN = 2,    /* KVM_RUN on fd; -EINTR at once when a kick is pending */
    OP_MUNMAP = 3, /* munmap(a1, a2) */
    OP_CLOSE = 4,  /* close(fd) */
    OP_EXIT = 5,   /* the loop ends (after answering) */
    OP_DRAIN = 6,  /* forget a pending kick */
    OP_MMAP = 7,   /* mmap(a1, a2, a3 >> 32, a3 & 0xffffffff, fd, a4): the result is the address */
    OP_MADVISE = 8, /* madvise(a1, a2, a3) */
};

/* Shared with Python (hlasync/kvm/owner.py: _Record): keep the layouts equal. */
struct hl_owner {
    uint32_t req;             /* sequence of the latest request (the owner's futex) */
    uint32_t done;            /* sequence of the latest answered request (the waiter's futex) */
    uint32_t owner_sleeping;  /* the owner sleeps on req */
    uint32_t waiter_sleeping; /* a waiter sleeps on done */
    uint32_t kicked;          /* a kick waits for the next KVM_RUN */
    uint32_t in_run;          /* the owner is in (or entering) KVM_RUN */
    int32_t tid, pid, signal; /* the owner thread, its process, the kick signal */
    int32_t op;
    int64_t fd, a1, a2, a3, a4;
    int64_t result; /* >= 0, or -errno */
    uint64_t spin_ns; /* how long the owner spins for the next request before it sleeps */
    uint64_t runs, kicks, served;
    uint64_t last_run_ns; /* how long the last KVM_RUN took */
    uint64_t gap_ns;      /* from the last answer to the request after it was posted */
    uint64_t posted_ns;   /* when the latest request was posted */
    uint32_t has_slot;    /* this owner and its waiter hold a spin slot */
    uint32_t warm;        /* a request comes soon: a sleeping owner spins once more */
};

struct hl_timespec {
    int64_t sec, nsec;
};

static long sys6(long n, long a, long b, long c, long d, long e, long f) {
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long result;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return result;
}

static uint64_t clock_ns(void) {
    struct hl_timespec t = {0, 0};
    sys6(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC, (long)&t, 0, 0, 0, 0);
    return (uint64_t)t.sec * 1000000000ull + (uint64_t)t.nsec;
}

/* At most this many threads spin at once (owners waiting for a request,
 * waiters for an answer): more spinners than free CPUs take the CPUs the
 * guests and the callers need. Others sleep on their futex at once.
 *
 * The threads of one process count in one cell. The worker processes of one
 * supervisor share their slots through a board (hl_owner_share_spin): each
 * counts in its own cell of memory all of them map, 64 bytes apart, and a
 * thread may spin while the cells add up to no more than the slots. Taking
 * a slot adds to the own cell first and then reads the sum (both sequentially
 * consistent): of two threads that take the last slot at once, the later
 * sees the other's and gives its own back, so the slots are never exceeded.
 * The supervisor clears a cell only once the process that counted in it is
 * gone (reaped), and a process attaches before it takes any slot: a cell is
 * never below zero then. Should one be (a give-back without its take), it
 * counts as zero in the sum and its own process takes no slot. */
#define CELL_BYTES 64
static uint32_t spin_slots = 1;
static int32_t local_cell = 0;
static int32_t *my_cell = &local_cell;
static const uint8_t *board = 0; /* 0: this process counts alone */
static uint32_t board_cells = 0;

void hl_owner_set_spin_slots(uint32_t slots) { spin_slots = slots ? slots : 1; }

/* Count in cell `mine` of `cells` at `base` (a shared mapping that stays for the
 * process's life), with `slots` for all of them; base 0: count alone again. */
void hl_owner_share_spin(void *base, uint32_t cells, uint32_t mine, uint32_t slots) {
    if (!base || mine >= cells) {
        __atomic_store_n(&board, 0, __ATOMIC_SEQ_CST);
        my_cell = &local_cell;
        return;
    }
    my_cell = (int32_t *)((uint8_t *)base + (uint64_t)mine * CELL_BYTES);
    board_cells = cells;
    spin_slots = slots ? slots : 1;
    __atomic_store_n(&board, (const uint8_t *)base, __ATOMIC_SEQ_CST);
}

/* In a forked child: the parent's spinners are not here, and it counts alone. */
void hl_owner_forked(void) {
    __atomic_store_n(&board, 0, __ATOMIC_SEQ_CST);
    my_cell = &local_cell;
    __atomic_store_n(&local_cell, 0, __ATOMIC_SEQ_CST);
}

/* How many spin slots are taken now (by every process of the board). */
uint32_t hl_owner_spinners(void) {
    const uint8_t *shared = __atomic_load_n(&board, __ATOMIC_SEQ_CST);
    if (!shared) {
        int32_t mine = __atomic_load_n(my_cell, __ATOMIC_SEQ_CST);
        return mine > 0 ? (uint32_t)mine : 0;
    }
    uint64_t sum = 0;
    for (uint32_t i = 0; i < board_cells; i++) {
        int32_t v = __atomic_load_n((const int32_t *)(shared + (uint64_t)i * CELL_BYTES), __ATOMIC_SEQ_CST);
        if (v > 0) sum += (uint64_t)v;
    }
    return sum > 0xffffffffull ? 0xffffffffu : (uint32_t)sum;
}

/* Take a slot for this process (1), or none is free (0). */
int hl_owner_take_spin(void) {
    /* Below one here, the cell was below zero: its takes would not show in the
     * sum (a give-back without its take; never in the shipped flow). This
     * process then spins no more rather than past the slots. */
    if (__atomic_add_fetch(my_cell, 1, __ATOMIC_SEQ_CST) >= 1 && hl_owner_spinners() <= spin_slots)
        return 1;
    __atomic_sub_fetch(my_cell, 1, __ATOMIC_SEQ_CST);
    return 0;
}

/* Give back a slot this process took. */
void hl_owner_give_spin(void) { __atomic_sub_fetch(my_cell, 1, __ATOMIC_SEQ_CST); }

/* Hot sandboxes (guests spinning between calls, hlasync/sandbox/hot.py) of
 * the processes of a board, counted 4 bytes into each cell in the same way:
 * the Python budget of a worker process asks here for one of the board's
 * slots (the same number) before a sandbox of its goes hot. Without a board
 * the process's own budget alone decides: these always agree then. */
static uint32_t hot_total(const uint8_t *shared) {
    uint64_t sum = 0;
    for (uint32_t i = 0; i < board_cells; i++) {
        int32_t v = __atomic_load_n((const int32_t *)(shared + (uint64_t)i * CELL_BYTES + 4), __ATOMIC_SEQ_CST);
        if (v > 0) sum += (uint64_t)v;
    }
    return sum > 0xffffffffull ? 0xffffffffu : (uint32_t)sum;
}

/* How many sandboxes of the board's processes are hot now (0 without a board). */
uint32_t hl_owner_hot(void) {
    const uint8_t *shared = __atomic_load_n(&board, __ATOMIC_SEQ_CST);
    return shared ? hot_total(shared) : 0;
}

/* Take a hot slot (1) if the board's hot sandboxes and `extra` more (this
 * process's calls in flight) leave one, else 0; always 1 without a board. */
int hl_owner_take_hot(uint32_t extra) {
    const uint8_t *shared = __atomic_load_n(&board, __ATOMIC_SEQ_CST);
    if (!shared) return 1;
    int32_t *mine = (int32_t *)((uint8_t *)my_cell + 4);
    if (__atomic_add_fetch(mine, 1, __ATOMIC_SEQ_CST) >= 1 && (uint64_t)hot_total(shared) + extra <= spin_slots)
        return 1; /* below one: see hl_owner_take_spin */
    __atomic_sub_fetch(mine, 1, __ATOMIC_SEQ_CST);
    return 0;
}

/* Give back a hot slot taken with hl_owner_take_hot. */
void hl_owner_give_hot(void) {
    const uint8_t *shared = __atomic_load_n(&board, __ATOMIC_SEQ_CST);
    if (shared) __atomic_sub_fetch((int32_t *)((uint8_t *)my_cell + 4), 1, __ATOMIC_SEQ_CST);
}

/* A slot belongs to an owner and its waiter together: they take turns (the
 * waiter spins while the owner runs the guest, the owner while the caller
 * works), so the pair keeps it while requests come back to back and gives
 * it up when either side goes to sleep. */
static int pair_take(struct hl_owner *o) {
    if (__atomic_load_n(&o->has_slot, __ATOMIC_SEQ_CST)) return 1;
    if (!hl_owner_take_spin()) return 0;
    if (__atomic_exchange_n(&o->has_slot, 1, __ATOMIC_SEQ_CST)) hl_owner_give_spin(); /* the other side took one */
    return 1;
}

static void pair_give(struct hl_owner *o) {
    if (__atomic_exchange_n(&o->has_slot, 0, __ATOMIC_SEQ_CST)) hl_owner_give_spin();
}

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)

/* Consume every pending kick signal of this (the owner) thread. */
static void drain_signals(struct hl_owner *o) {
    uint64_t set = 1ull << (o->signal - 1);
    struct hl_timespec zero = {0, 0};
    while (sys6(SYS_RT_SIGTIMEDWAIT, (long)&set, 0, (long)&zero, 8, 0, 0) > 0) {
    }
}

static int64_t run(struct hl_owner *o) {
    int64_t result;
    uint64_t start = clock_ns();
    STORE(&o->in_run, 1);
    if (LOAD(&o->kicked))
        result = -EINTR;
    else
        result = sys6(SYS_IOCTL, o->fd, KVM_RUN, 0, 0, 0, 0);
    STORE(&o->in_run, 0);
    o->last_run_ns = clock_ns() - start;
    o->runs++;
    if (result == -EINTR) {
        /* A kick ended it (or was pending): it is spent. One sent after this
         * drain stays pending and makes the next KVM_RUN return at once. */
        STORE(&o->kicked, 0);
        drain_signals(o);
    }
    return result;
}

static int64_t serve(struct hl_owner *o) {
    switch (o->op) {
    case OP_IOCTL:
        return sys6(SYS_IOCTL, o->fd, o->a1, o->a2, 0, 0, 0);
    case OP_RUN:
        return run(o);
    case OP_MUNMAP:
        return sys6(SYS_MUNMAP, o->a1, o->a2, 0, 0, 0, 0);
    case OP_MMAP:
        return sys6(SYS_MMAP, o->a1, o->a2, (long)((uint64_t)o->a3 >> 32),
                    (long)(o->a3 & 0xffffffff), o->fd, o->a4);
    case OP_MADVISE:
        return sys6(SYS_MADVISE, o->a1, o->a2, o->a3, 0, 0, 0);
    case OP_CLOSE:
        return sys6(SYS_CLOSE, o->fd, 0, 0, 0, 0, 0);
    case OP_DRAIN:
        STORE(&o->kicked, 0);
        drain_signals(o);
        return 0;
    case OP_EXIT:
        return 0;
    default:
        return -22; /* EINVAL */
    }
}

/* The owner thread's loop: serve requests until OP_EXIT. The calling thread
 * must keep the kick signal blocked (KVM unblocks it inside KVM_RUN). */
void hl_owner_loop(struct hl_owner *o) {
    /* From the last answered request: one posted before the loop began is served. */
    uint32_t seen = LOAD(&o->done);
    for (;;) {
        /* Spin for the next request only while requests come back within the
         * spin (a caller's next call, a run of ioctls): an idle owner, or one
         * whose callers are slow (a busy machine), sleeps at once. */
        uint64_t answered = clock_ns();
        int eager = o->gap_ns < o->spin_ns;
        while (LOAD(&o->req) == seen) {
            uint64_t spin = eager && pair_take(o) ? o->spin_ns : 0;
            uint64_t end = clock_ns() + spin;
            unsigned polls = 0;
            while (LOAD(&o->req) == seen && spin) {
                if (++polls > YIELD_AFTER)
                    sys6(SYS_SCHED_YIELD, 0, 0, 0, 0, 0, 0);
                else
                    __builtin_ia32_pause();
                if ((polls & 63) == 0 && clock_ns() >= end) break;
            }
            if (LOAD(&o->req) != seen) break;
            STORE(&o->owner_sleeping, 1); /* before the slot goes: see answered() */
            pair_give(o);
            while (LOAD(&o->req) == seen && !LOAD(&o->warm))
                sys6(SYS_FUTEX, (long)&o->req, FUTEX_WAIT_PRIVATE, seen, 0, 0, 0);
            STORE(&o->owner_sleeping, 0);
            /* Woken by hl_owner_warm: a request is on its way, spin for it. */
            eager = __atomic_exchange_n(&o->warm, 0, __ATOMIC_SEQ_CST);
        }
        /* The caller's own pause, not the owner's wake-up: a sleeping owner
         * goes back to spinning as soon as requests come back quickly again. */
        uint64_t posted = o->posted_ns;
        o->gap_ns = posted > answered ? posted - answered : 0;
        seen = LOAD(&o->req);
        int op = o->op;
        o->result = serve(o);
        o->served++;
        if (op == OP_EXIT) pair_give(o); /* before the answer: the record is the waiter's then */
        STORE(&o->done, seen);
        if (LOAD(&o->waiter_sleeping))
            sys6(SYS_FUTEX, (long)&o->done, FUTEX_WAKE_PRIVATE, 0x7fffffff, 0, 0, 0);
        if (op == OP_EXIT) return;
    }
}

/* Wait (any thread) until the request with sequence ``seq`` is answered:
 * 1 when it is, 0 after timeout_ns. Spins for spin_ns first. */
/* The request ``seq`` is answered: after the last one (OP_EXIT) the owner has
 * ended, so a spin slot the waiter took meanwhile goes back here. */
static int answered(struct hl_owner *o) {
    /* A slot taken while the owner went to sleep (or ended) would stay taken
     * with nobody spinning: give it back. */
    if (o->op == OP_EXIT || LOAD(&o->owner_sleeping)) pair_give(o);
    return 1;
}

int hl_owner_wait(struct hl_owner *o, uint32_t seq, uint64_t spin_ns, uint64_t timeout_ns) {
    if (LOAD(&o->done) == seq) return answered(o);
    if (!spin_ns) pair_give(o); /* a long wait (a hot guest's run): nobody of the pair spins */
    uint64_t start = clock_ns();
    uint64_t spin_end = start + (spin_ns < timeout_ns ? spin_ns : timeout_ns);
    if (spin_ns && pair_take(o)) {
        unsigned polls = 0;
        for (;;) {
            if (++polls > YIELD_AFTER)
                sys6(SYS_SCHED_YIELD, 0, 0, 0, 0, 0, 0);
            else
                __builtin_ia32_pause();
            if (LOAD(&o->done) == seq) return answered(o);
            if ((polls & 63) == 0 && clock_ns() >= spin_end) break;
        }
        pair_give(o);
    }
    for (;;) {
        uint64_t now = clock_ns();
        if (now - start >= timeout_ns) return 0;
        uint64_t left = timeout_ns - (now - start);
        struct hl_timespec slice = {(int64_t)(left / 1000000000ull), (int64_t)(left % 1000000000ull)};
        uint32_t seen = LOAD(&o->done);
        if (seen == seq) return answered(o);
        STORE(&o->waiter_sleeping, 1);
        if (LOAD(&o->done) == seen)
            sys6(SYS_FUTEX, (long)&o->done, FUTEX_WAIT_PRIVATE, seen, (long)&slice, 0, 0);
        STORE(&o->waiter_sleeping, 0);
        if (LOAD(&o->done) == seq) return answered(o);
    }
}

/* Post a request (the caller makes sure no other is in flight) and wait for
 * it as hl_owner_wait does. The request's sequence is o->req afterwards. */
int hl_owner_call(struct hl_owner *o, int32_t op, int64_t fd, int64_t a1, int64_t a2, int64_t a3,
                  int64_t a4, uint64_t spin_ns, uint64_t timeout_ns) {
    uint32_t seq = LOAD(&o->req) + 1;
    o->op = op;
    o->fd = fd;
    o->a1 = a1;
    o->a2 = a2;
    o->a3 = a3;
    o->a4 = a4;
    o->posted_ns = clock_ns();
    STORE(&o->req, seq);
    if (LOAD(&o->owner_sleeping))
        sys6(SYS_FUTEX, (long)&o->req, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0);
    return hl_owner_wait(o, seq, spin_ns, timeout_ns);
}

/* Wake a sleeping owner ahead of a request that follows soon (any thread,
 * never blocks): its wake-up overlaps the caller's work instead of adding to
 * the request's latency. */
void hl_owner_warm(struct hl_owner *o) {
    if (!LOAD(&o->owner_sleeping)) return;
    STORE(&o->warm, 1);
    sys6(SYS_FUTEX, (long)&o->req, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0);
}

/* Kick the owner (any thread): its KVM_RUN returns -EINTR now, or its next
 * one at once. Only the kick that raises the flag signals, and only a thread
 * in KVM_RUN: a pending kick is one flag and at most one signal. (The owner
 * sets in_run before it looks at kicked, the kicker the other way round: one
 * of the two sees the other's store.) */
void hl_owner_kick(struct hl_owner *o) {
    if (__atomic_exchange_n(&o->kicked, 1, __ATOMIC_SEQ_CST)) return;
    __atomic_add_fetch(&o->kicks, 1, __ATOMIC_RELAXED);
    if (LOAD(&o->in_run))
        sys6(SYS_TGKILL, o->pid, o->tid, o->signal, 0, 0, 0);
}

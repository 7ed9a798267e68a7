/* Test guest that breaks the host/guest protocol on purpose. */
#include <hlasync_guest.h>

/* Returns to the host with a garbage result frame. */
void bad_result_frame(void) {
    uint8_t *out = (uint8_t *)hl_peb_get()->output_addr;
    for (int i = 0; i < 64; i++) out[i] = (uint8_t)(0xA5 ^ i);
    __asm__ volatile("outb %%al, %0" : : "i"(HL_PORT_RETURN), "a"(0) : "memory");
    for (;;) __asm__ volatile("pause");
}
HL_EXPORT(bad_result_frame, HL_INT);

/* A host call whose frame claims an argument far outside the buffer. */
void bad_host_call(void) {
    uint32_t *out = (uint32_t *)hl_peb_get()->output_addr;
    out[0] = HL_MAGIC_HOSTCALL;
    out[1] = 1;          /* name length */
    out[2] = 1;          /* argc */
    out[3] = 64;         /* frame size */
    out[4] = HL_BYTES;   /* slot: type */
    out[5] = 0x7fffffff; /* slot: length */
    out[6] = 0x40;       /* slot: offset (low) */
    out[7] = 0;
    ((char *)out)[32] = 'x';
    __asm__ volatile("outb %%al, %0" : : "i"(HL_PORT_HOSTCALL), "a"(0) : "memory");
}
HL_EXPORT(bad_host_call, HL_VOID);

/* Reads a port the I/O bitmap allows: a KVM_EXIT_IO (in) no guest should make. */
int64_t in_port(void) {
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "i"(HL_PORT_RETURN));
    return value;
}
HL_EXPORT(in_port, HL_INT);

/* Leaves x87/SSE state behind: a rounding mode and a value in xmm15. */
void leave_vector_state(void) {
    uint32_t mxcsr = 0x1f80 | (1u << 13); /* round down */
    __asm__ volatile("ldmxcsr %0" : : "m"(mxcsr));
    __asm__ volatile("movq %0, %%xmm15" : : "r"(0x5ec2e75ec2e7ULL) : "xmm15");
}
HL_EXPORT(leave_vector_state, HL_VOID);

/* What the next call finds: MXCSR in the high half, xmm15's low 32 bits in the low half. */
int64_t observe_vector_state(void) {
    uint32_t mxcsr;
    uint64_t xmm15;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("movq %%xmm15, %0" : "=r"(xmm15));
    return ((int64_t)mxcsr << 32) | (int64_t)(xmm15 & 0xffffffff);
}
HL_EXPORT(observe_vector_state, HL_INT);

/* Executes one privileged, unusual or forbidden operation at CPL3 (see test_hostile.py). */
int64_t instruction(int64_t which) {
    switch (which) {
    case 0: __asm__ volatile("hlt"); break;
    case 1: __asm__ volatile("rdmsr" :: "c"(0x10) : "rax", "rdx"); break;
    case 2: __asm__ volatile("wrmsr" :: "c"(0x10), "a"(0), "d"(0)); break;
    case 3: { uint8_t d[10] = {0}; __asm__ volatile("lgdt %0" :: "m"(d)); break; }
    case 4: { uint8_t d[10] = {0}; __asm__ volatile("lidt %0" :: "m"(d)); break; }
    case 5: __asm__ volatile("mov %0, %%cr3" :: "r"(0x1000ULL)); break;
    case 6: __asm__ volatile("int $0x80"); break;
    case 7: __asm__ volatile("syscall" ::: "rcx", "r11", "memory"); break;
    case 8: __asm__ volatile("sysenter" ::: "memory"); break;
    case 9: __asm__ volatile("int3"); break;
    case 10: { uint8_t v; __asm__ volatile("inb $0x60, %0" : "=a"(v)); break; }
    case 11: __asm__ volatile("outb %%al, $0x80" :: "a"(0)); break;
    case 12: __asm__ volatile("cli"); break;
    case 13: __asm__ volatile("invlpg (%0)" :: "r"(0x200000ULL)); break;
    case 14: __asm__ volatile("wbinvd"); break;
    case 15: __asm__ volatile("cpuid" ::: "rax","rbx","rcx","rdx"); break;
    case 16: { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return lo; }
    case 17: __asm__ volatile("vmcall"); break;
    case 18: __asm__ volatile("ud2"); break;
    case 19: { uint64_t x; __asm__ volatile("mov %%cr0, %0" : "=r"(x)); break; }
    case 20: __asm__ volatile("swapgs"); break;
    case 21: __asm__ volatile("iretq"); break;
    case 22: { volatile uint64_t *p = (uint64_t *)0x1000; *p = 1; break; }   /* page tables */
    case 23: { volatile uint64_t *p = (uint64_t *)0x4000; return *p; }        /* GDT read */
    case 24: { volatile uint8_t *p = (uint8_t *)0x102000; *p = 0x90; break; } /* own code */
    case 25: { volatile uint64_t *p = (uint64_t *)(1ULL << 30); return *p; } /* outside memory */
    case 26: { volatile uint64_t *p = (uint64_t *)0xF0000; *p = 1; break; }  /* PEB write */
    case 27: __asm__ volatile("jmp *%0" :: "r"(0x7000ULL)); break;           /* jump into stubs */
    case 28: { volatile uint64_t *p = (uint64_t *)0xFFFFFFFFFFFFF000ULL; return *p; }
    case 29: { volatile uint64_t *p = (uint64_t *)0x0000800000000000ULL; return *p; } /* noncanonical */
    case 30: { uint8_t d[10]; __asm__ volatile("sidt %0" : "=m"(d)); return d[2]; }
    case 31: { uint8_t d[10]; __asm__ volatile("sgdt %0" : "=m"(d)); return d[2]; }
    case 32: { uint16_t v; __asm__ volatile("sldt %0" : "=r"(v)); return v; }
    case 33: { uint16_t v; __asm__ volatile("str %0" : "=r"(v)); return v; }
    }
    return which;
}
HL_EXPORT(instruction, HL_INT, HL_INT);

/* Prints `count` lines as fast as it can. */
int64_t flood_print(int64_t count) {
    for (int64_t i = 0; i < count; i++) hl_print("flood flood flood flood flood flood flood\n");
    return count;
}
HL_EXPORT(flood_print, HL_INT, HL_INT);

/* Recurses without bound, calling host function "again" at every level. */
#pragma GCC diagnostic ignored "-Winfinite-recursion"
__attribute__((noinline)) int64_t host_recursion(int64_t depth) {
    volatile char frame[256];
    frame[0] = (char)hl_call_host_int("again", "i", depth);
    return host_recursion(depth + 1) + frame[0];
}
HL_EXPORT(host_recursion, HL_INT, HL_INT);

/* A print frame whose length claims more than the output buffer. */
void bad_print_frame(void) {
    uint32_t *out = (uint32_t *)hl_peb_get()->output_addr;
    out[0] = HL_MAGIC_PRINT;
    out[1] = 0xfffffff0u;
    __asm__ volatile("outb %%al, %0" : : "i"(HL_PORT_PRINT), "a"(0) : "memory");
}
HL_EXPORT(bad_print_frame, HL_VOID);

/* An abort frame whose length claims more than the output buffer. */
void bad_abort_frame(void) {
    uint32_t *out = (uint32_t *)hl_peb_get()->output_addr;
    out[0] = HL_MAGIC_ABORT;
    out[1] = 0xfffffff0u;
    __asm__ volatile("outb %%al, %0" : : "i"(HL_PORT_ABORT), "a"(0) : "memory");
}
HL_EXPORT(bad_abort_frame, HL_VOID);

/* Writes `value` at guest address `address` (anything the guest can name). */
void poke(int64_t address, int64_t value) { *(volatile int64_t *)address = value; }
HL_EXPORT(poke, HL_VOID, HL_INT, HL_INT);

int64_t peek(int64_t address) { return *(volatile int64_t *)address; }
HL_EXPORT(peek, HL_INT, HL_INT);

/* ------------------------------------------------------------------------
 * Fresh state: a call plants a secret in every class of state it can reach,
 * a later call scans for it. The secret is key ^ SECRET_MASK, computed in a
 * register: the scanning call's own frame holds only the key.
 */
#define SECRET_MASK 0x5EC2E75EC2E7A11DULL
enum {
    CLS_X87 = 1,     /* x87 / MMX registers */
    CLS_SSE = 2,     /* xmm0-15, MXCSR */
    CLS_AVX = 4,     /* upper halves of ymm0-15 */
    CLS_AVX512 = 8,  /* zmm0-31 upper bits, k1-k7 */
    CLS_SEGBASE = 16, /* FS and GS base (wrfsbase/wrgsbase) */
    CLS_MEMORY = 32, /* every writable page: data, scratch, stack, buffers, heap, doorbell */
};

/* The doorbell words a call may write without breaking the call protocol:
 * all but req_seq, spin (the dispatcher would spin for ever), answer_seq,
 * done_seq, ask_seq and ask_port. */
static int free_doorbell_word(uint64_t i) {
    return i != 0 && i != 1 && i != 2 && i != 8 && i != 10 && i != 11;
}

static volatile uint64_t secret_data[512];

static uint64_t secret_of(int64_t key) { return (uint64_t)key ^ SECRET_MASK; }
/* A canonical user address made from the secret (a segment base must be canonical). */
static uint64_t base_of(uint64_t secret) { return (secret & 0x00007ffffffff000ULL) | 0x1000; }

static void fill(volatile uint64_t *p, uint64_t words, uint64_t value) {
    for (uint64_t i = 0; i < words; i++) p[i] = value;
}

static int64_t count(const volatile uint64_t *p, uint64_t words, uint64_t value) {
    int64_t found = 0;
    for (uint64_t i = 0; i < words; i++) found += p[i] == value;
    return found;
}

__attribute__((noinline)) static void plant_stack(uint64_t s) {
    volatile uint64_t deep[2048]; /* 16 KiB below the dispatcher's frames */
    fill(deep, 2048, s);
}

#define YMM_STORE(n) __asm__ volatile("vmovdqu %0, %%ymm" #n :: "m"(*(const uint64_t(*)[4])v))
#define ZMM_STORE(n) __asm__ volatile("vmovdqu64 %0, %%zmm" #n :: "m"(*(const uint64_t(*)[8])v))
#define YMM_LOAD(n) __asm__ volatile("vmovdqu %%ymm" #n ", %0" : "=m"(*(uint64_t(*)[4])r))
#define ZMM_LOAD(n) __asm__ volatile("vmovdqu64 %%zmm" #n ", %0" : "=m"(*(uint64_t(*)[8])r))

static void plant(uint64_t s, int64_t classes) {
    if (classes & CLS_X87) {
        __asm__ volatile("movq %0, %%mm0\n\tmovq %0, %%mm1\n\tmovq %0, %%mm2\n\tmovq %0, %%mm3\n\t"
                         "movq %0, %%mm4\n\tmovq %0, %%mm5\n\tmovq %0, %%mm6\n\tmovq %0, %%mm7\n\t"
                         "emms" :: "r"(s));
    }
    if (classes & CLS_SSE) {
        uint32_t mxcsr = 0x1f80 | (3u << 13); /* round toward zero */
        __asm__ volatile("ldmxcsr %0" :: "m"(mxcsr));
        __asm__ volatile("movq %0, %%xmm8\n\tmovq %0, %%xmm9\n\tmovq %0, %%xmm10\n\t"
                         "movq %0, %%xmm11\n\tmovq %0, %%xmm12\n\tmovq %0, %%xmm13\n\t"
                         "movq %0, %%xmm14\n\tmovq %0, %%xmm15" :: "r"(s)
                         : "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    }
    if (classes & CLS_AVX) {
        uint64_t v[4] = {s, s, s, s};
        YMM_STORE(0); YMM_STORE(1); YMM_STORE(2); YMM_STORE(3); YMM_STORE(4); YMM_STORE(5);
        YMM_STORE(6); YMM_STORE(7); YMM_STORE(8); YMM_STORE(9); YMM_STORE(10); YMM_STORE(11);
        YMM_STORE(12); YMM_STORE(13); YMM_STORE(14); YMM_STORE(15);
    }
    if (classes & CLS_AVX512) {
        uint64_t v[8] = {s, s, s, s, s, s, s, s};
        ZMM_STORE(16); ZMM_STORE(17); ZMM_STORE(18); ZMM_STORE(19); ZMM_STORE(20); ZMM_STORE(21);
        ZMM_STORE(22); ZMM_STORE(23); ZMM_STORE(24); ZMM_STORE(25); ZMM_STORE(26); ZMM_STORE(27);
        ZMM_STORE(28); ZMM_STORE(29); ZMM_STORE(30); ZMM_STORE(31);
        __asm__ volatile("kmovq %0, %%k1\n\tkmovq %0, %%k2\n\tkmovq %0, %%k3\n\tkmovq %0, %%k4\n\t"
                         "kmovq %0, %%k5\n\tkmovq %0, %%k6\n\tkmovq %0, %%k7" :: "r"(s));
    }
    if (classes & CLS_SEGBASE) {
        uint64_t base = base_of(s);
        __asm__ volatile("wrfsbase %0\n\twrgsbase %0" :: "r"(base));
    }
    if (classes & CLS_MEMORY) {
        const hl_peb *peb = hl_peb_get();
        fill((volatile uint64_t *)HL_SCRATCH_ADDR, HL_SCRATCH_SIZE / 8, s);
        fill(secret_data, 512, s);
        fill((volatile uint64_t *)peb->heap_addr, peb->heap_size / 8, s);
        fill((volatile uint64_t *)peb->input_addr, peb->input_size / 8, s);
        fill((volatile uint64_t *)peb->output_addr, peb->output_size / 8, s);
        plant_stack(s);
        volatile uint64_t *bell = (volatile uint64_t *)HL_DOORBELL_ADDR;
        for (uint64_t i = 0; i < 512; i++)
            if (free_doorbell_word(i)) bell[i] = s;
    }
}

static int64_t scan(uint64_t s, int64_t classes) {
    int64_t found = 0;
    if (classes & (CLS_X87 | CLS_SSE)) {
        /* fxsave holds st0-7/mm0-7 (bytes 32-159), MXCSR (24) and xmm0-15 (160-415). */
        uint8_t area[512] __attribute__((aligned(16)));
        __asm__ volatile("fxsave %0" : "=m"(area));
        if ((classes & CLS_X87) && count((const uint64_t *)(area + 32), 16, s)) found |= CLS_X87;
        uint32_t mxcsr;
        memcpy(&mxcsr, area + 24, 4);
        if ((classes & CLS_SSE) && (count((const uint64_t *)(area + 160), 32, s) ||
                                    (mxcsr & 0x6000) == 0x6000))
            found |= CLS_SSE;
    }
    if (classes & CLS_AVX) {
        uint64_t r[4];
        int64_t n = 0;
#define YMM_CHECK(i) YMM_LOAD(i); n += r[2] == s || r[3] == s
        YMM_CHECK(0); YMM_CHECK(1); YMM_CHECK(2); YMM_CHECK(3); YMM_CHECK(4); YMM_CHECK(5);
        YMM_CHECK(6); YMM_CHECK(7); YMM_CHECK(8); YMM_CHECK(9); YMM_CHECK(10); YMM_CHECK(11);
        YMM_CHECK(12); YMM_CHECK(13); YMM_CHECK(14); YMM_CHECK(15);
        if (n) found |= CLS_AVX;
    }
    if (classes & CLS_AVX512) {
        uint64_t r[8];
        int64_t n = 0;
#define ZMM_CHECK(i) ZMM_LOAD(i); n += count(r, 8, s)
        ZMM_CHECK(16); ZMM_CHECK(17); ZMM_CHECK(18); ZMM_CHECK(19); ZMM_CHECK(20); ZMM_CHECK(21);
        ZMM_CHECK(22); ZMM_CHECK(23); ZMM_CHECK(24); ZMM_CHECK(25); ZMM_CHECK(26); ZMM_CHECK(27);
        ZMM_CHECK(28); ZMM_CHECK(29); ZMM_CHECK(30); ZMM_CHECK(31);
        uint64_t k[7];
        __asm__ volatile("kmovq %%k1, %0\n\tkmovq %%k2, %1\n\tkmovq %%k3, %2\n\tkmovq %%k4, %3\n\t"
                         "kmovq %%k5, %4\n\tkmovq %%k6, %5\n\tkmovq %%k7, %6"
                         : "=r"(k[0]), "=r"(k[1]), "=r"(k[2]), "=r"(k[3]), "=r"(k[4]), "=r"(k[5]),
                           "=r"(k[6]));
        n += count(k, 7, s);
        if (n) found |= CLS_AVX512;
    }
    if (classes & CLS_SEGBASE) {
        uint64_t fs, gs;
        __asm__ volatile("rdfsbase %0\n\trdgsbase %1" : "=r"(fs), "=r"(gs));
        if (fs == base_of(s) || gs == base_of(s)) found |= CLS_SEGBASE;
    }
    if (classes & CLS_MEMORY) {
        const hl_peb *peb = hl_peb_get();
        uint64_t here = (uint64_t)__builtin_frame_address(0);
        uint64_t stack_base = peb->stack_top - peb->stack_size;
        int64_t n = count((const volatile uint64_t *)HL_SCRATCH_ADDR, HL_SCRATCH_SIZE / 8, s);
        n += count(secret_data, 512, s);
        n += count((const volatile uint64_t *)peb->heap_addr, peb->heap_size / 8, s);
        n += count((const volatile uint64_t *)peb->input_addr, peb->input_size / 8, s);
        n += count((const volatile uint64_t *)peb->output_addr, peb->output_size / 8, s);
        n += count((const volatile uint64_t *)stack_base, (here - 1024 - stack_base) / 8, s);
        n += count((const volatile uint64_t *)HL_DOORBELL_ADDR, 512, s);
        if (n) found |= CLS_MEMORY;
    }
    return found;
}

void plant_secrets(int64_t key, int64_t classes) { plant(secret_of(key), classes); }
HL_EXPORT(plant_secrets, HL_VOID, HL_INT, HL_INT);

/* The memory class on a few pages only (a restore copies them back one by
 * one): the first words of scratch, data, heap, buffers and the last heap
 * page, 16 KiB of stack and the doorbell's free words. */
void plant_some_memory(int64_t key) {
    uint64_t s = secret_of(key);
    const hl_peb *peb = hl_peb_get();
    *(volatile uint64_t *)HL_SCRATCH_ADDR = s;
    secret_data[0] = s;
    *(volatile uint64_t *)peb->heap_addr = s;
    *(volatile uint64_t *)(peb->heap_addr + peb->heap_size - 8) = s;
    *(volatile uint64_t *)peb->input_addr = s;
    *(volatile uint64_t *)(peb->output_addr + 64) = s;
    plant_stack(s);
    volatile uint64_t *bell = (volatile uint64_t *)HL_DOORBELL_ADDR;
    for (uint64_t i = 0; i < 512; i++)
        if (free_doorbell_word(i)) bell[i] = s;
}
HL_EXPORT(plant_some_memory, HL_VOID, HL_INT);

/* Bitmask of the classes in which the secret of `key` is found. */
int64_t scan_secrets(int64_t key, int64_t classes) { return scan(secret_of(key), classes); }
HL_EXPORT(scan_secrets, HL_INT, HL_INT, HL_INT);

/* Both in one call: shows the scanner sees what planting leaves. */
int64_t plant_and_scan(int64_t key, int64_t classes) {
    plant(secret_of(key), classes);
    return scan(secret_of(key), classes);
}
HL_EXPORT(plant_and_scan, HL_INT, HL_INT, HL_INT);

/* Takes two blobs (a call whose second argument does not fit writes nothing). */
int64_t two_blobs(const uint8_t *a, size_t a_length, const uint8_t *b, size_t b_length) {
    (void)a, (void)b;
    return (int64_t)(a_length + b_length);
}
HL_EXPORT(two_blobs, HL_INT, HL_BYTES, HL_BYTES);

/* How often `needle` XOR 0x55 occurs in the input buffer (the caller's frame holds
 * only the XORed needle, so a hit is a leftover of an earlier call). */
int64_t count_in_input(const uint8_t *needle, size_t length) {
    const hl_peb *peb = hl_peb_get();
    const uint8_t *buffer = (const uint8_t *)peb->input_addr;
    int64_t found = 0;
    if (!length || length > 64) return -1;
    for (size_t at = 0; at + length <= peb->input_size; at++) {
        size_t i = 0;
        while (i < length && buffer[at + i] == (uint8_t)(needle[i] ^ 0x55)) i++;
        found += i == length;
    }
    return found;
}
HL_EXPORT(count_in_input, HL_INT, HL_BYTES);

/* A string `in` of `count` bytes from an open port into the heap (no SDK guest does
 * this: the host reports a protocol error). */
int64_t insb_to_heap(int64_t count) {
    uint8_t *p = (uint8_t *)hl_peb_get()->heap_addr;
    uint64_t c = (uint64_t)count;
    __asm__ volatile("rep insb" : "+D"(p), "+c"(c) : "d"(HL_PORT_RETURN) : "memory");
    return (int64_t)c;
}
HL_EXPORT(insb_to_heap, HL_INT, HL_INT);

/* CPUID leaf `leaf`, subleaf 0: ebx | ecx << 32. */
int64_t cpuid_leaf(int64_t leaf) {
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"((uint32_t)leaf), "c"(0));
    (void)a, (void)d;
    return (int64_t)b | ((int64_t)c << 32);
}
HL_EXPORT(cpuid_leaf, HL_INT, HL_INT);

/* Fills the heap with non-zero data (large dumps). */
int64_t fill_heap(int64_t value) {
    const hl_peb *peb = hl_peb_get();
    fill((volatile uint64_t *)peb->heap_addr, peb->heap_size / 8, (uint64_t)value);
    return (int64_t)peb->heap_size;
}
HL_EXPORT(fill_heap, HL_INT, HL_INT);

/* Calls host function `name` with `x` and spins after it returns (a guest that
 * blocks in a host function, then never returns). */
void host_then_spin(const char *name, int64_t x) {
    hl_call_host_int(name, "i", x);
    for (;;) __asm__ volatile("pause");
}
HL_EXPORT(host_then_spin, HL_VOID, HL_STR, HL_INT);

/* An entry point that never reaches the dispatcher (link with --entry=hang_at_entry). */
__attribute__((noreturn)) void hang_at_entry(void) {
    for (;;) __asm__ volatile("pause");
}

/* Takes the doorbell over and never gives it back: every call posted from now
 * on is "answered" at once with a garbage result frame, and a request to stop
 * spinning is ignored. */
void forge_doorbell(void) {
    volatile hl_doorbell *bell = (volatile hl_doorbell *)HL_DOORBELL_ADDR;
    uint8_t *out = (uint8_t *)hl_peb_get()->output_addr;
    uint64_t seen = bell->req_seq - 1; /* the call that runs this is answered too */
    for (;;) {
        if (bell->req_seq != seen) {
            seen = bell->req_seq;
            for (int i = 0; i < 64; i++) out[i] = (uint8_t)(0x5A ^ i);
            bell->done_seq = seen;
        }
        __asm__ volatile("pause");
    }
}
HL_EXPORT(forge_doorbell, HL_VOID);

/* Sets the dispatcher's spin budget itself (to about forever) and returns. */
void spin_forever_between_calls(void) {
    ((volatile hl_doorbell *)HL_DOORBELL_ADDR)->spin = ~0ull;
}
HL_EXPORT(spin_forever_between_calls, HL_VOID);

/* Asks the host through the doorbell as hl_call_host does (the frame is
 * whatever the output buffer holds), for `port`, and waits for the answer:
 * spinning while a host thread watches, else exiting at HL_PORT_WAIT. */
static void ask_doorbell(uint64_t port) {
    volatile hl_doorbell *bell = (volatile hl_doorbell *)HL_DOORBELL_ADDR;
    uint64_t seq = bell->ask_seq + 1;
    bell->ask_port = port;
    __asm__ volatile("" ::: "memory");
    bell->ask_seq = seq;
    while (bell->answer_seq != seq) {
        if (bell->spin)
            __asm__ volatile("pause");
        else
            __asm__ volatile("outb %%al, %0" : : "i"(HL_PORT_WAIT), "a"(0) : "memory");
    }
}

/* Asks on the doorbell for a port that is neither a host call nor a print. */
void ask_unknown_port(void) { ask_doorbell(0x99); }
HL_EXPORT(ask_unknown_port, HL_VOID);

/* Asks on the doorbell for a host call whose frame is garbage. */
void ask_garbage_host_call(void) {
    uint8_t *out = (uint8_t *)hl_peb_get()->output_addr;
    for (int i = 0; i < 64; i++) out[i] = (uint8_t)(0xC3 ^ i);
    ask_doorbell(HL_PORT_HOSTCALL);
}
HL_EXPORT(ask_garbage_host_call, HL_VOID);

/* Asks for host function `name` (no arguments) through the doorbell, as a hot
 * call's hl_call_host does, then spins whatever happens: it ignores the spin
 * budget, the answer spin and the answer itself (the guest of a hot call whose
 * host function runs long, and that never parks). */
void ask_host_then_spin(const char *name) {
    volatile hl_doorbell *bell = (volatile hl_doorbell *)HL_DOORBELL_ADDR;
    uint8_t *out = (uint8_t *)hl_peb_get()->output_addr;
    hl_hostcall_frame *frame = (hl_hostcall_frame *)out;
    size_t name_length = strlen(name);
    memcpy(out + sizeof(*frame), name, name_length);
    frame->magic = HL_MAGIC_HOSTCALL;
    frame->name_length = (uint32_t)name_length;
    frame->argc = 0;
    frame->size = (uint32_t)(sizeof(*frame) + name_length);
    if (!bell->spin) hl_abort(2, "ask_host_then_spin: not a hot call");
    bell->ask_port = HL_PORT_HOSTCALL;
    __asm__ volatile("" ::: "memory");
    bell->ask_seq = bell->ask_seq + 1;
    for (;;) __asm__ volatile("pause");
}
HL_EXPORT(ask_host_then_spin, HL_VOID, HL_STR);

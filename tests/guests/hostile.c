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

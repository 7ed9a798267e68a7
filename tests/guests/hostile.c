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

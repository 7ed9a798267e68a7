/*
 * simpleguest: the guest bundled with hlasync, used by the demo, the tests
 * and the benchmarks. Every function here is part of a documented contract
 * (docs/guest-sdk.md); later checks rely on the names.
 */
#include <hlasync_guest.h>

int64_t add(int64_t a, int64_t b) { return a + b; }
HL_EXPORT(add, HL_INT, HL_INT, HL_INT);

const char *echo(const char *s) { return s; }
HL_EXPORT(echo, HL_STR, HL_STR);

hl_bytes echo_bytes(const uint8_t *data, size_t length) { return (hl_bytes){data, length}; }
HL_EXPORT(echo_bytes, HL_BYTES, HL_BYTES);

int64_t sum_bytes(const uint8_t *data, size_t length) {
    int64_t total = 0;
    for (size_t i = 0; i < length; i++) total += data[i];
    return total;
}
HL_EXPORT(sum_bytes, HL_INT, HL_BYTES);

__attribute__((noinline)) int64_t fib(int64_t n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
HL_EXPORT(fib, HL_INT, HL_INT);

double add_float(double a, double b) { return a + b; }
HL_EXPORT(add_float, HL_FLOAT, HL_FLOAT, HL_FLOAT);

bool negate(bool value) { return !value; }
HL_EXPORT(negate, HL_BOOL, HL_BOOL);

/* Never returns: the watchdog and interrupt() tests stop it. */
__attribute__((noinline)) void spin(void) {
    for (;;) __asm__ volatile("pause");
}
HL_EXPORT(spin, HL_VOID);

/* Busy-loops for `iterations` rounds and returns the count. */
int64_t spin_for(int64_t iterations) {
    int64_t done = 0;
    for (int64_t i = 0; i < iterations; i++) {
        __asm__ volatile("" : "+r"(done));
        done++;
    }
    return done;
}
HL_EXPORT(spin_for, HL_INT, HL_INT);

__attribute__((noinline)) int64_t divide_by_zero(void) {
    volatile int64_t zero = 0;
    return 100 / zero;
}
HL_EXPORT(divide_by_zero, HL_INT);

__attribute__((noinline)) void undefined_instruction(void) { __asm__ volatile("ud2"); }
HL_EXPORT(undefined_instruction, HL_VOID);

__attribute__((noinline)) void null_pointer_write(void) {
    volatile uintptr_t address = 0;
    *(volatile int64_t *)address = 42;
}
HL_EXPORT(null_pointer_write, HL_VOID);

#pragma GCC diagnostic ignored "-Winfinite-recursion"
__attribute__((noinline)) static int64_t recurse(int64_t depth) {
    volatile char frame[512];
    frame[0] = (char)depth;
    return recurse(depth + 1) + frame[0];
}

int64_t stack_overflow(void) { return recurse(0); }
HL_EXPORT(stack_overflow, HL_INT);

/* hlt is privileged: at CPL3 it raises #GP. */
__attribute__((noinline)) void privileged_instruction(void) { __asm__ volatile("hlt"); }
HL_EXPORT(privileged_instruction, HL_VOID);

void abort_guest(int64_t code, const char *message) { hl_abort(code, message); }
HL_EXPORT(abort_guest, HL_VOID, HL_INT, HL_STR);

int64_t call_host(const char *name, int64_t x) { return hl_call_host_int(name, "i", x); }
HL_EXPORT(call_host, HL_INT, HL_STR, HL_INT);

/* Calls host function `name` with 0, 1, ... `times` - 1 and returns the sum of
 * its results: many host calls in one call (the host-call benchmark). */
int64_t call_host_times(const char *name, int64_t times) {
    int64_t sum = 0;
    for (int64_t i = 0; i < times; i++) sum += hl_call_host_int(name, "i", i);
    return sum;
}
HL_EXPORT(call_host_times, HL_INT, HL_STR, HL_INT);

/* Calls host function `name` with a string and returns its string result. */
const char *call_host_str(const char *name, const char *text) {
    hl_value v = hl_call_host(name, "s", text);
    if (v.type != HL_STR) hl_abort(1, "call_host_str: host function did not return a str");
    return v.s;
}
HL_EXPORT(call_host_str, HL_STR, HL_STR, HL_STR);

void print_message(const char *message) { hl_print(message); }
HL_EXPORT(print_message, HL_VOID, HL_STR);

/* Copies `text` (truncated to 4095 bytes, NUL-terminated) to HL_SCRATCH_ADDR. */
void write_sentinel(const char *text) {
    char *scratch = (char *)HL_SCRATCH_ADDR;
    size_t length = strnlen(text, HL_SCRATCH_SIZE - 1);
    memcpy(scratch, text, length);
    scratch[length] = 0;
}
HL_EXPORT(write_sentinel, HL_VOID, HL_STR);

/* State that survives between calls until restore(). */
static int64_t counter;
int64_t increment(void) { return ++counter; }
HL_EXPORT(increment, HL_INT);

/* Allocates `size` bytes on the guest heap, fills them, frees them; returns the sum. */
int64_t heap_roundtrip(int64_t size) {
    uint8_t *p = malloc((size_t)size);
    if (!p) return -1;
    for (int64_t i = 0; i < size; i++) p[i] = (uint8_t)i;
    int64_t total = 0;
    for (int64_t i = 0; i < size; i++) total += p[i];
    free(p);
    return total;
}
HL_EXPORT(heap_roundtrip, HL_INT, HL_INT);

/* Formats with hl_snprintf: "<name>=<value>". */
const char *format_pair(const char *name, int64_t value) {
    static char buf[128];
    hl_snprintf(buf, sizeof buf, "%s=%ld", name, (long)value);
    return buf;
}
HL_EXPORT(format_pair, HL_STR, HL_STR, HL_INT);

/*
 * greeter: a small custom hlasync guest (see docs/guest-sdk.md).
 *
 * Build it with
 *     hlasync guest build examples/custom_guest/greeter.c -o greeter.elf
 * and list what it exports with
 *     hlasync guest functions greeter.elf
 * run.py beside this file builds it and calls every function.
 */
#include <hlasync_guest.h>

/* greet(str) -> str: formats a greeting with the time from the host function "now". */
const char *greet(const char *name) {
    static char message[256];
    int64_t now = hl_call_host_int("now", ""); /* the host registers "now" */
    hl_snprintf(message, sizeof message, "Hello, %s! The host says it is %ld.", name, now);
    return message; /* static storage: still valid when the dispatcher copies it out */
}
HL_EXPORT(greet, HL_STR, HL_STR);

/* repeat(str, int) -> str: the text `times` times, separated by spaces, built on the heap. */
const char *repeat(const char *text, int64_t times) {
    static char *previous; /* the last result, freed on the next call */
    if (times < 0) hl_abort(22, "repeat: times must not be negative");
    size_t length = strlen(text);
    size_t capacity = 16, used = 0;
    char *out = malloc(capacity);
    if (!out) hl_abort(12, "repeat: out of guest memory");
    out[0] = 0;
    for (int64_t i = 0; i < times; i++) {
        size_t need = used + length + 2; /* separator and NUL */
        if (need > capacity) {
            while (capacity < need) capacity *= 2;
            char *bigger = realloc(out, capacity);
            if (!bigger) hl_abort(12, "repeat: out of guest memory");
            out = bigger;
        }
        if (i) out[used++] = ' ';
        memcpy(out + used, text, length);
        used += length;
        out[used] = 0;
    }
    free(previous);
    previous = out;
    return out;
}
HL_EXPORT(repeat, HL_STR, HL_STR, HL_INT);

/* mean(bytes) -> float: the average byte value (HL_BYTES arrives as data + length). */
double mean(const uint8_t *data, size_t length) {
    if (length == 0) return 0.0;
    uint64_t total = 0;
    for (size_t i = 0; i < length; i++) total += data[i];
    return (double)total / (double)length;
}
HL_EXPORT(mean, HL_FLOAT, HL_BYTES);

/* shout(str) -> void: logs through the host function "log" and prints a line. */
void shout(const char *text) {
    hl_call_host("log", "si", text, (int64_t)strlen(text)); /* result (None) ignored */
    hl_printf("guest says: %s (%zu bytes)\n", text, strlen(text));
}
HL_EXPORT(shout, HL_VOID, HL_STR);

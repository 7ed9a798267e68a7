/*
 * A JS guest for the tests of the engine build (tests/js/test_runtime_build.py),
 * linked like the bundled jsruntime but with its own glue, so that it does not
 * change when jsruntime's glue does. It evaluates code and exposes a few libc
 * functions directly.
 */
#include <hlasync_guest.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "quickjs.h"

static JSRuntime *rt;
static JSContext *ctx;
static char *reply;

/* memory_limit and max_stack in bytes; 0: none, and the guest stack less 64 KiB. */
int64_t js_start(int64_t memory_limit, int64_t max_stack) {
    rt = JS_NewRuntime();
    if (!rt) return -1;
    if (memory_limit) JS_SetMemoryLimit(rt, (size_t)memory_limit);
    JS_SetMaxStackSize(rt, max_stack ? (size_t)max_stack : hl_peb_get()->stack_size - 64 * 1024);
    ctx = JS_NewContext(rt);
    return ctx ? 0 : -2;
}
HL_EXPORT(js_start, HL_INT, HL_INT, HL_INT);

static const char *keep(const char *s, size_t length) {
    free(reply);
    reply = malloc(length + 1);
    if (!reply) return "{\"error\": {\"message\": \"no memory for the reply\"}}";
    memcpy(reply, s, length + 1);
    return reply;
}

/* {"result": R} or {"error": {"name", "message", "stack"}} as JSON. */
const char *js_eval(const char *source) {
    JS_UpdateStackTop(rt);
    JSValue value = JS_Eval(ctx, source, strlen(source), "<eval>", JS_EVAL_TYPE_GLOBAL);
    JSValue wrapper = JS_NewObject(ctx);
    if (JS_IsException(value)) {
        JSValue thrown = JS_GetException(ctx), error = JS_NewObject(ctx);
        static const char *const fields[] = {"name", "message", "stack"};
        if (JS_IsObject(thrown)) {
            for (int i = 0; i < 3; i++)
                JS_SetPropertyStr(ctx, error, fields[i], JS_GetPropertyStr(ctx, thrown, fields[i]));
        } else { /* a thrown primitive, or null when even the error could not be made */
            JS_SetPropertyStr(ctx, error, "message", JS_ToString(ctx, thrown));
        }
        JS_FreeValue(ctx, thrown);
        JS_SetPropertyStr(ctx, wrapper, "error", error);
    } else {
        JS_SetPropertyStr(ctx, wrapper, "result", value);
    }
    JSValue text = JS_JSONStringify(ctx, wrapper, JS_UNDEFINED, JS_UNDEFINED);
    JS_FreeValue(ctx, wrapper);
    size_t length;
    const char *s = JS_ToCStringLen(ctx, &length, text);
    JS_FreeValue(ctx, text);
    if (!s) return "{\"error\": {\"message\": \"unprintable\"}}";
    const char *kept = keep(s, length);
    JS_FreeCString(ctx, s);
    return kept;
}
HL_EXPORT(js_eval, HL_STR, HL_STR);

/* printf and fprintf(stderr) reach the sandbox's output. */
int64_t libc_print(const char *text, double number) {
    int n = printf("out %s %g|", text, number);
    n += fprintf(stderr, "err %.3e|", number);
    putchar('!');
    puts("");
    return n;
}
HL_EXPORT(libc_print, HL_INT, HL_STR, HL_FLOAT);

const char *libc_format(double number, int64_t integer) {
    static char buf[256];
    snprintf(buf, sizeof buf, "%.17g %g %e %10.4f %-5d| %x %s", number, number, number, number,
             (int)integer, (unsigned)integer, "s");
    return buf;
}
HL_EXPORT(libc_format, HL_STR, HL_FLOAT, HL_INT);

double libc_strtod(const char *text) { return strtod(text, NULL); }
HL_EXPORT(libc_strtod, HL_FLOAT, HL_STR);

static int compare(const void *a, const void *b) {
    return (int)(*(const unsigned char *)a) - (int)(*(const unsigned char *)b);
}

const char *libc_qsort(const char *text) {
    static char buf[256];
    size_t n = strnlen(text, sizeof buf - 1);
    memcpy(buf, text, n);
    buf[n] = 0;
    qsort(buf, n, 1, compare);
    return buf;
}
HL_EXPORT(libc_qsort, HL_STR, HL_STR);

/* localtime_r of `seconds` as "YYYY-MM-DD HH:MM:SS yday wday gmtoff". */
const char *libc_localtime(int64_t seconds) {
    static char buf[64];
    time_t t = (time_t)seconds;
    struct tm tm;
    if (!localtime_r(&t, &tm)) return "error";
    snprintf(buf, sizeof buf, "%04d-%02d-%02d %02d:%02d:%02d %d %d %ld", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, tm.tm_yday, tm.tm_wday,
             tm.tm_gmtoff);
    return buf;
}
HL_EXPORT(libc_localtime, HL_STR, HL_INT);

/* CLOCK_REALTIME in nanoseconds, then CLOCK_MONOTONIC minus the previous
 * monotonic reading (never negative), as "realtime monotonic_step". */
const char *libc_clocks(void) {
    static char buf[64];
    static struct timespec last;
    struct timespec real, mono;
    clock_gettime(CLOCK_REALTIME, &real);
    clock_gettime(CLOCK_MONOTONIC, &mono);
    long long step = (mono.tv_sec - last.tv_sec) * 1000000000LL + (mono.tv_nsec - last.tv_nsec);
    last = mono;
    snprintf(buf, sizeof buf, "%lld %lld", (long long)real.tv_sec * 1000000000LL + real.tv_nsec,
             step);
    return buf;
}
HL_EXPORT(libc_clocks, HL_STR);

void libc_abort(void) { abort(); }
HL_EXPORT(libc_abort, HL_VOID);

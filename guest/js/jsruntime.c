/*
 * jsruntime, placeholder glue: proves that the QuickJS engine builds and runs
 * as a guest. (The real glue replaces this file.)
 *
 *   js_eval(source) -> JSON text
 *       {"result": R}                        R = JSON.stringify of the value
 *                                            (no "result" key when that is
 *                                            undefined: functions, undefined)
 *       {"error": {"name", "message", "stack"}}  what the code threw
 *   js_set_limits(memory_limit, max_stack) -> 0
 *       JS_SetMemoryLimit and JS_SetMaxStackSize, in bytes (0: keep the default)
 *
 * The runtime and context are made on the first call and kept (static). The
 * clock (Date.now() and Math.random's seed when the context is made) is the
 * host call `__hl_clock` (see guest/js/libc/time.c): register it first.
 */
#include <hlasync_guest.h>
#include <string.h>

#include "quickjs.h"

/* Stack left to C code below the deepest JS frame: the parser, the regexp
 * engine and printf use the same stack between QuickJS's overflow checks. */
#define STACK_RESERVE (64 * 1024)

static JSRuntime *rt;
static JSContext *ctx;
static char *reply; /* the last reply, freed by the next call */

static bool start(void) {
    if (ctx) return true;
    rt = JS_NewRuntime();
    if (!rt) return false;
    size_t stack = hl_peb_get()->stack_size;
    JS_SetMaxStackSize(rt, stack > 2 * STACK_RESERVE ? stack - STACK_RESERVE : stack / 2);
    ctx = JS_NewContext(rt);
    return ctx != NULL;
}

int64_t js_set_limits(int64_t memory_limit, int64_t max_stack) {
    if (!start()) return -1;
    if (memory_limit > 0) JS_SetMemoryLimit(rt, (size_t)memory_limit);
    if (max_stack > 0) JS_SetMaxStackSize(rt, (size_t)max_stack);
    return 0;
}
HL_EXPORT(js_set_limits, HL_INT, HL_INT, HL_INT);

/* {"error": {...}} describing the pending exception. */
static JSValue describe_exception(void) {
    JSValue thrown = JS_GetException(ctx);
    JSValue error = JS_NewObject(ctx);
    if (JS_IsObject(thrown)) {
        static const char *const fields[] = {"name", "message", "stack"};
        for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
            JS_SetPropertyStr(ctx, error, fields[i], JS_GetPropertyStr(ctx, thrown, fields[i]));
    } else {
        JS_SetPropertyStr(ctx, error, "message", JS_ToString(ctx, thrown));
    }
    JS_FreeValue(ctx, thrown);
    JSValue wrapper = JS_NewObject(ctx);
    JS_SetPropertyStr(ctx, wrapper, "error", error);
    return wrapper;
}

static const char *keep(JSValue text) {
    size_t length;
    const char *s = JS_ToCStringLen(ctx, &length, text);
    JS_FreeValue(ctx, text);
    free(reply);
    reply = NULL;
    if (!s) return "{\"error\": {\"name\": \"InternalError\", \"message\": \"out of memory\"}}";
    reply = malloc(length + 1);
    if (reply) memcpy(reply, s, length + 1);
    JS_FreeCString(ctx, s);
    return reply ? reply : "{\"error\": {\"name\": \"InternalError\", \"message\": \"out of memory\"}}";
}

const char *js_eval(const char *source) {
    if (!start()) return "{\"error\": {\"name\": \"InternalError\", \"message\": \"no runtime\"}}";
    JS_UpdateStackTop(rt); /* each call enters from the dispatcher */
    JSValue value = JS_Eval(ctx, source, strlen(source), "<eval>", JS_EVAL_TYPE_GLOBAL);
    JSValue wrapper;
    if (JS_IsException(value)) {
        wrapper = describe_exception();
    } else {
        wrapper = JS_NewObject(ctx);
        JS_SetPropertyStr(ctx, wrapper, "result", value);
    }
    JSValue text = JS_JSONStringify(ctx, wrapper, JS_UNDEFINED, JS_UNDEFINED);
    JS_FreeValue(ctx, wrapper);
    if (JS_IsException(text)) { /* a BigInt or a cycle in the result */
        wrapper = describe_exception();
        text = JS_JSONStringify(ctx, wrapper, JS_UNDEFINED, JS_UNDEFINED);
        JS_FreeValue(ctx, wrapper);
        if (JS_IsException(text)) {
            JS_FreeValue(ctx, JS_GetException(ctx));
            return "{\"error\": {\"name\": \"InternalError\", \"message\": \"unprintable\"}}";
        }
    }
    return keep(text);
}
HL_EXPORT(js_eval, HL_STR, HL_STR);

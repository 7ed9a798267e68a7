/*
 * jsruntime: the QuickJS engine as an hlasync guest. The host (hlasync.js)
 * drives it through the functions exported below; every reply is a status
 * byte followed by UTF-8 JSON:
 *
 *   'R' result        the handler's return value, JSON.stringify'd
 *   'E' error         {"name", "message", "stack"} of what the handler threw
 *   'S' syntax error  the same, for a handler or module that does not compile
 *   'U' unusable      {"message"}: returned undefined, or a value JSON cannot hold
 *   'N' not found     {"message"}: no handler of that name
 *   'O' ok            {} (set-up steps that succeeded)
 *
 * The host also talks to the engine through `hl_js_control` (found by symbol
 * in the ELF): to learn the JavaScript stack of a handler that runs too long,
 * it bumps `request` and waits, while the guest runs, for `answered` to catch
 * up; the interpreter's interrupt handler (polled every few thousand
 * operations) writes the stack there. Host functions, console output and the
 * clock are host calls to `__js_host`, `__js_console` and the libc's clock.
 */
#include <hlasync_guest.h>
#include <stdio.h>
#include <string.h>

#include "quickjs.h"

#define HL_JS_STACK_MAX 8192

typedef struct {
    volatile uint32_t request;  /* the host bumps it to ask for the JS stack */
    volatile uint32_t answered; /* the guest copies `request` here once `stack` holds it */
    volatile uint32_t length;   /* bytes of `stack` */
    volatile uint32_t running;  /* 1 while a handler runs */
    char stack[HL_JS_STACK_MAX];
} hl_js_control_t;

/* Read and written by the host through guest memory: keep it in .data, by name. */
__attribute__((used, aligned(64))) hl_js_control_t hl_js_control = {0};

static JSRuntime *rt;
static JSContext *ctx;
static JSValue handlers;     /* name -> handler function */
static JSValue host_modules; /* module name -> [function names] */
static uint64_t random_state[2];

/* ------------------------------------------------------------ replies */
typedef struct {
    char *data;
    size_t length, capacity;
} buffer_t;

static buffer_t reply;   /* what a call returns (copied out after it returns) */
static buffer_t printed; /* console output being joined */

static void buffer_append(buffer_t *buffer, const char *text, size_t length) {
    if (buffer->length + length > buffer->capacity) {
        size_t capacity = buffer->capacity ? buffer->capacity : 4096;
        while (capacity < buffer->length + length) capacity *= 2;
        char *grown = realloc(buffer->data, capacity);
        if (!grown) hl_abort(-20, "jsruntime: out of memory for a reply");
        buffer->data = grown;
        buffer->capacity = capacity;
    }
    memcpy(buffer->data + buffer->length, text, length);
    buffer->length += length;
}

static void reply_append(const char *text, size_t length) { buffer_append(&reply, text, length); }

static hl_bytes reply_text(char status, const char *json) {
    reply.length = 0;
    reply_append(&status, 1);
    reply_append(json, strlen(json));
    return (hl_bytes){(const uint8_t *)reply.data, reply.length};
}

/* A reply holding `value` as JSON (the caller keeps ownership of `value`). */
static hl_bytes reply_json(char status, JSValueConst value) {
    JSValue json = JS_JSONStringify(ctx, value, JS_UNDEFINED, JS_UNDEFINED);
    if (JS_IsException(json) || JS_IsUndefined(json)) {
        JS_FreeValue(ctx, JS_GetException(ctx));
        JS_FreeValue(ctx, json);
        return reply_text('U', "{\"message\":\"the value cannot be represented as JSON\"}");
    }
    size_t length;
    const char *text = JS_ToCStringLen(ctx, &length, json);
    JS_FreeValue(ctx, json);
    if (!text) {
        JS_FreeValue(ctx, JS_GetException(ctx));
        return reply_text('E', "{\"name\":\"InternalError\",\"message\":\"out of memory\"}");
    }
    reply.length = 0;
    reply_append(&status, 1);
    reply_append(text, length);
    JS_FreeCString(ctx, text);
    return (hl_bytes){(const uint8_t *)reply.data, reply.length};
}

/* A message object {"message": text} as a reply. */
static hl_bytes reply_message(char status, const char *message) {
    JSValue object = JS_NewObject(ctx);
    JS_SetPropertyStr(ctx, object, "message", JS_NewString(ctx, message));
    hl_bytes out = reply_json(status, object);
    JS_FreeValue(ctx, object);
    return out;
}

/* The pending exception as {"name", "message", "stack"}; thrown non-errors keep
 * their string form as the message. */
static hl_bytes reply_exception(char status) {
    JSValue exception = JS_GetException(ctx);
    JSValue described = JS_NewObject(ctx);
    if (JS_IsError(exception)) {
        static const char *const fields[] = {"name", "message", "stack"};
        for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) {
            JSValue field = JS_GetPropertyStr(ctx, exception, fields[i]);
            if (JS_IsException(field)) {
                JS_FreeValue(ctx, JS_GetException(ctx));
                continue;
            }
            JSValue text = JS_IsUndefined(field) ? JS_NewString(ctx, "") : JS_ToString(ctx, field);
            JS_FreeValue(ctx, field);
            if (JS_IsException(text)) {
                JS_FreeValue(ctx, JS_GetException(ctx));
                text = JS_NewString(ctx, "");
            }
            JS_SetPropertyStr(ctx, described, fields[i], text);
        }
    } else {
        JSValue text = JS_ToString(ctx, exception);
        if (JS_IsException(text)) {
            JS_FreeValue(ctx, JS_GetException(ctx));
            text = JS_NewString(ctx, "(a value that cannot be converted to a string)");
        }
        JS_SetPropertyStr(ctx, described, "name", JS_NewString(ctx, ""));
        JS_SetPropertyStr(ctx, described, "message", text);
        JS_SetPropertyStr(ctx, described, "stack", JS_NewString(ctx, ""));
    }
    JS_SetPropertyStr(ctx, described, "uncatchable", JS_NewBool(ctx, JS_IsUncatchableError(exception)));
    JS_FreeValue(ctx, exception);
    hl_bytes out = reply_json(status, described);
    JS_FreeValue(ctx, described);
    return out;
}

/* ------------------------------------------------- the JS stack, on request */
static void copy_stack(const char *text, size_t length) {
    if (length > HL_JS_STACK_MAX) length = HL_JS_STACK_MAX;
    memcpy(hl_js_control.stack, text, length);
    hl_js_control.length = (uint32_t)length;
}

static void answer_stack_request(void) {
    uint32_t request = hl_js_control.request;
    JSValue error = JS_NewError(ctx); /* its stack is built from the frames running now */
    const char *text = NULL;
    size_t length = 0;
    if (!JS_IsException(error)) {
        JSValue stack = JS_GetPropertyStr(ctx, error, "stack");
        if (JS_IsString(stack)) text = JS_ToCStringLen(ctx, &length, stack);
        JS_FreeValue(ctx, stack);
    }
    if (text) {
        copy_stack(text, length);
        JS_FreeCString(ctx, text);
    } else {
        copy_stack("", 0);
    }
    JS_FreeValue(ctx, JS_GetException(ctx));
    JS_FreeValue(ctx, error);
    __atomic_store_n(&hl_js_control.answered, request, __ATOMIC_RELEASE);
}

static int on_interrupt(JSRuntime *runtime, void *opaque) {
    (void)runtime, (void)opaque;
    if (__atomic_load_n(&hl_js_control.request, __ATOMIC_ACQUIRE) != hl_js_control.answered)
        answer_stack_request();
    return 0; /* never interrupts: stopping a guest is the host's job (it kicks the vCPU) */
}

/* ----------------------------------------------------- console and random */
static JSValue js_console(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv,
                          int magic) {
    static const char *const levels[] = {"log", "info", "warn", "error", "debug"};
    (void)this_value;
    printed.length = 0;
    for (int i = 0; i < argc; i++) {
        if (i) buffer_append(&printed, " ", 1);
        JSValue text;
        if (JS_IsString(argv[i]) || !JS_IsObject(argv[i]) || JS_IsFunction(c, argv[i])) {
            text = JS_ToString(c, argv[i]);
        } else {
            text = JS_JSONStringify(c, argv[i], JS_UNDEFINED, JS_UNDEFINED);
            if (JS_IsException(text) || JS_IsUndefined(text)) {
                JS_FreeValue(c, JS_GetException(c));
                JS_FreeValue(c, text);
                text = JS_ToString(c, argv[i]);
            }
        }
        if (JS_IsException(text)) return JS_EXCEPTION;
        size_t length;
        const char *part = JS_ToCStringLen(c, &length, text);
        JS_FreeValue(c, text);
        if (!part) return JS_EXCEPTION;
        buffer_append(&printed, part, length);
        JS_FreeCString(c, part);
    }
    buffer_append(&printed, "", 1); /* NUL */
    hl_call_host("__js_console", "ss", levels[magic], printed.data);
    return JS_UNDEFINED;
}

static uint64_t next_random(void) {
    /* xorshift128+, reseeded by the host for every call */
    uint64_t s1 = random_state[0];
    const uint64_t s0 = random_state[1];
    random_state[0] = s0;
    s1 ^= s1 << 23;
    random_state[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return random_state[1] + s0;
}

static JSValue js_random(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv) {
    (void)this_value, (void)argc, (void)argv;
    return JS_NewFloat64(c, (double)(next_random() >> 11) * 0x1.0p-53);
}

/* ------------------------------------------------------------ host calls */
/* A function exported by a host module: JSON arguments in, JSON result out; a
 * host-side exception comes back as {"error": {...}} and is thrown here. */
static JSValue js_host_function(JSContext *c, JSValueConst this_value, int argc,
                                JSValueConst *argv, int magic, JSValueConst *data) {
    (void)this_value, (void)magic;
    JSValue array = JS_NewArray(c);
    for (int i = 0; i < argc; i++) JS_SetPropertyUint32(c, array, (uint32_t)i, JS_DupValue(c, argv[i]));
    JSValue json = JS_JSONStringify(c, array, JS_UNDEFINED, JS_UNDEFINED);
    JS_FreeValue(c, array);
    if (JS_IsException(json)) return JS_EXCEPTION;
    const char *module = JS_ToCString(c, data[0]);
    const char *name = JS_ToCString(c, data[1]);
    const char *arguments = JS_ToCString(c, json);
    JS_FreeValue(c, json);
    JSValue result = JS_EXCEPTION;
    if (module && name && arguments) {
        hl_value answer = hl_call_host("__js_host", "sss", module, name, arguments);
        if (answer.type != HL_STR) {
            result = JS_ThrowInternalError(c, "host function %s.%s: malformed answer", module, name);
        } else {
            JSValue parsed = JS_ParseJSON(c, answer.s, answer.length, "<host>");
            if (JS_IsException(parsed)) {
                result = JS_EXCEPTION;
            } else if (JS_IsObject(parsed)) {
                JSValue error = JS_GetPropertyStr(c, parsed, "error");
                if (!JS_IsUndefined(error)) {
                    JSValue name_value = JS_GetPropertyStr(c, error, "name");
                    JSValue message = JS_GetPropertyStr(c, error, "message");
                    JSValue thrown = JS_NewError(c);
                    JS_SetPropertyStr(c, thrown, "name", name_value);
                    JS_SetPropertyStr(c, thrown, "message", message);
                    result = JS_Throw(c, thrown);
                } else {
                    result = JS_GetPropertyStr(c, parsed, "value");
                }
                JS_FreeValue(c, error);
                JS_FreeValue(c, parsed);
            } else {
                JS_FreeValue(c, parsed);
                result = JS_ThrowInternalError(c, "host function %s.%s: malformed answer", module, name);
            }
        }
    }
    JS_FreeCString(c, module);
    JS_FreeCString(c, name);
    JS_FreeCString(c, arguments);
    return result;
}

static int host_module_init(JSContext *c, JSModuleDef *module) {
    JSAtom atom = JS_GetModuleName(c, module);
    JSValue module_name = JS_AtomToString(c, atom);
    JSValue names = JS_GetProperty(c, host_modules, atom);
    JS_FreeAtom(c, atom);
    int64_t count = 0;
    JS_GetLength(c, names, &count);
    for (int64_t i = 0; i < count; i++) {
        JSValue name = JS_GetPropertyUint32(c, names, (uint32_t)i);
        const char *text = JS_ToCString(c, name);
        JSValue data[2] = {module_name, name};
        JSValue function = JS_NewCFunctionData2(c, js_host_function, text, 0, 0, 2, data);
        JS_SetModuleExport(c, module, text, function);
        JS_FreeCString(c, text);
        JS_FreeValue(c, name);
    }
    JS_FreeValue(c, names);
    JS_FreeValue(c, module_name);
    return 0;
}

static JSModuleDef *load_module(JSContext *c, const char *name, void *opaque) {
    (void)opaque;
    JS_ThrowReferenceError(c, "could not load module '%s': register it on the sandbox first", name);
    return NULL;
}

/* ---------------------------------------------------------------- set-up */
int64_t js_init(int64_t memory_limit, int64_t stack_limit) {
    if (rt) return 1;
    rt = JS_NewRuntime();
    if (!rt) return -1;
    JS_SetMemoryLimit(rt, (size_t)memory_limit);
    JS_SetMaxStackSize(rt, (size_t)stack_limit);
    JS_SetInterruptHandler(rt, on_interrupt, NULL);
    JS_SetModuleLoaderFunc(rt, NULL, load_module, NULL);
    ctx = JS_NewContext(rt);
    if (!ctx) return -2;
    handlers = JS_NewObject(ctx);
    host_modules = JS_NewObject(ctx);

    JSValue global = JS_GetGlobalObject(ctx);
    JSValue console = JS_NewObject(ctx);
    static const char *const levels[] = {"log", "info", "warn", "error", "debug"};
    for (int i = 0; i < 5; i++)
        JS_SetPropertyStr(ctx, console, levels[i],
                          JS_NewCFunctionMagic(ctx, js_console, levels[i], 0,
                                               JS_CFUNC_generic_magic, i));
    JS_SetPropertyStr(ctx, global, "console", console);
    JSValue math = JS_GetPropertyStr(ctx, global, "Math");
    JS_SetPropertyStr(ctx, math, "random", JS_NewCFunction(ctx, js_random, "random", 0));
    JS_FreeValue(ctx, math);
    JS_FreeValue(ctx, global);
    return 0;
}
HL_EXPORT(js_init, HL_INT, HL_INT, HL_INT);

/* Make module `name` export the host functions listed in `functions` (a JSON array). */
hl_bytes js_define_host_module(const char *name, const char *functions) {
    JSValue names = JS_ParseJSON(ctx, functions, strlen(functions), "<host functions>");
    if (JS_IsException(names)) return reply_exception('E');
    JS_SetPropertyStr(ctx, host_modules, name, names);
    JSModuleDef *module = JS_NewCModule(ctx, name, host_module_init);
    if (!module) return reply_exception('E');
    int64_t count = 0;
    JS_GetLength(ctx, names, &count);
    for (int64_t i = 0; i < count; i++) {
        JSValue function = JS_GetPropertyUint32(ctx, names, (uint32_t)i);
        const char *text = JS_ToCString(ctx, function);
        if (text) JS_AddModuleExport(ctx, module, text);
        JS_FreeCString(ctx, text);
        JS_FreeValue(ctx, function);
    }
    return reply_text('O', "{}");
}
HL_EXPORT(js_define_host_module, HL_BYTES, HL_STR, HL_STR);

/* Register an ES module under `name` (compiled now: imports resolve to it by name). */
hl_bytes js_add_module(const char *name, const char *source) {
    JSValue module = JS_Eval(ctx, source, strlen(source), name,
                             JS_EVAL_TYPE_MODULE | JS_EVAL_FLAG_COMPILE_ONLY);
    if (JS_IsException(module)) return reply_exception('S');
    JS_FreeValue(ctx, module);
    return reply_text('O', "{}");
}
HL_EXPORT(js_add_module, HL_BYTES, HL_STR, HL_STR);

/* Settle a promise by running queued jobs; returns its value or JS_EXCEPTION. */
static JSValue settle(JSValue value) {
    if (!JS_IsPromise(value)) return value;
    for (;;) {
        JSPromiseStateEnum state = JS_PromiseState(ctx, value);
        if (state == JS_PROMISE_FULFILLED) {
            JSValue result = JS_PromiseResult(ctx, value);
            JS_FreeValue(ctx, value);
            return result;
        }
        if (state == JS_PROMISE_REJECTED) {
            JSValue reason = JS_PromiseResult(ctx, value);
            JS_FreeValue(ctx, value);
            return JS_Throw(ctx, reason);
        }
        JSContext *job_context;
        int ran = JS_ExecutePendingJob(rt, &job_context);
        if (ran < 0) {
            JS_FreeValue(ctx, value);
            return JS_EXCEPTION;
        }
        if (ran == 0) {
            JS_FreeValue(ctx, value);
            return JS_ThrowInternalError(ctx, "the handler's promise can never settle (no pending jobs)");
        }
    }
}

/* Compile and run `source` as handler `name`: an ES module exporting `handler`, or
 * a script defining `function handler(event)` (in a scope of its own). `check`
 * only compiles it. Handler sources must not be empty. */
static hl_bytes add_handler(const char *name, const char *source, bool check) {
    size_t length = strlen(source);
    char filename[300];
    snprintf(filename, sizeof filename, "%s.js", name);
    JSValue handler;
    if (JS_DetectModule(source, length)) {
        JSValue module = JS_Eval(ctx, source, length, filename,
                                 JS_EVAL_TYPE_MODULE | JS_EVAL_FLAG_COMPILE_ONLY);
        if (JS_IsException(module)) return reply_exception('S');
        if (check) {
            JS_FreeValue(ctx, module);
            return reply_text('O', "{}");
        }
        JSModuleDef *def = JS_VALUE_GET_PTR(module);
        JSValue evaluated = settle(JS_EvalFunction(ctx, module));
        if (JS_IsException(evaluated)) return reply_exception('E');
        JS_FreeValue(ctx, evaluated);
        JSValue namespace = JS_GetModuleNamespace(ctx, def);
        handler = JS_GetPropertyStr(ctx, namespace, "handler");
        JS_FreeValue(ctx, namespace);
    } else {
        static const char prefix[] = "(function () {\n";
        static const char suffix[] =
            "\n;return typeof handler === \"function\" ? handler : undefined;\n})()";
        size_t total = sizeof prefix - 1 + length + sizeof suffix - 1;
        char *wrapped = malloc(total + 1);
        if (!wrapped) return reply_message('E', "out of memory");
        memcpy(wrapped, prefix, sizeof prefix - 1);
        memcpy(wrapped + sizeof prefix - 1, source, length);
        memcpy(wrapped + sizeof prefix - 1 + length, suffix, sizeof suffix);
        JSEvalOptions options = {
            .version = JS_EVAL_OPTIONS_VERSION,
            .eval_flags = JS_EVAL_TYPE_GLOBAL | (check ? JS_EVAL_FLAG_COMPILE_ONLY : 0),
            .filename = filename,
            .line_num = 0, /* the prefix line: the handler's first line is line 1 */
        };
        handler = JS_Eval2(ctx, wrapped, total, &options);
        free(wrapped);
        if (JS_IsException(handler)) {
            JSValue pending = JS_GetException(ctx);
            bool syntax = JS_IsError(pending);
            if (syntax) {
                JSValue kind = JS_GetPropertyStr(ctx, pending, "name");
                const char *text = JS_ToCString(ctx, kind);
                syntax = text && strcmp(text, "SyntaxError") == 0;
                JS_FreeCString(ctx, text);
                JS_FreeValue(ctx, kind);
            }
            JS_Throw(ctx, pending);
            return reply_exception(syntax ? 'S' : 'E');
        }
        if (check) {
            JS_FreeValue(ctx, handler);
            return reply_text('O', "{}");
        }
    }
    if (!JS_IsFunction(ctx, handler)) {
        JS_FreeValue(ctx, handler);
        return reply_message('S', "the handler must define `function handler(event)` "
                                  "or export a function named `handler`");
    }
    JS_SetPropertyStr(ctx, handlers, name, handler);
    return reply_text('O', "{}");
}

hl_bytes js_check_handler(const char *name, const char *source) {
    return add_handler(name, source, true);
}
HL_EXPORT(js_check_handler, HL_BYTES, HL_STR, HL_STR);

hl_bytes js_add_handler(const char *name, const char *source) {
    return add_handler(name, source, false);
}
HL_EXPORT(js_add_handler, HL_BYTES, HL_STR, HL_STR);

/* ------------------------------------------------------------------ calls */
hl_bytes js_call(const char *name, const uint8_t *event, size_t event_length, int64_t seed) {
    JS_UpdateStackTop(rt);
    random_state[0] = (uint64_t)seed ^ 0x9E3779B97F4A7C15ULL;
    random_state[1] = ((uint64_t)seed << 1) ^ 0xD1B54A32D192ED03ULL;
    if (!random_state[0] && !random_state[1]) random_state[1] = 1;
    JSValue handler = JS_GetPropertyStr(ctx, handlers, name);
    if (!JS_IsFunction(ctx, handler)) {
        JS_FreeValue(ctx, handler);
        return reply_message('N', "no handler of that name");
    }
    /* JS_ParseJSON wants a NUL after the text: the host sends one. */
    JSValue argument = JS_ParseJSON(ctx, (const char *)event, event_length, "<event>");
    if (JS_IsException(argument)) {
        JS_FreeValue(ctx, handler);
        return reply_exception('E');
    }
    hl_js_control.running = 1;
    JSValue result = settle(JS_Call(ctx, handler, JS_UNDEFINED, 1, &argument));
    hl_js_control.running = 0;
    JS_FreeValue(ctx, argument);
    JS_FreeValue(ctx, handler);
    if (JS_IsException(result)) return reply_exception('E');
    if (JS_IsUndefined(result))
        return reply_message('U', "the handler returned undefined: return a JSON value");
    hl_bytes out = reply_json('R', result);
    JS_FreeValue(ctx, result);
    return out;
}
HL_EXPORT(js_call, HL_BYTES, HL_STR, HL_BYTES, HL_INT);

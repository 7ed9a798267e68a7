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
 * Imports resolve against the modules the host registered, with hyperlight-js's
 * rules (normalize_module), and then the built-in ones. The built-ins every
 * context has (console, print, require, String.bytesFrom; the modules console,
 * io, crypto and require) are builtins.c.
 */
#include <hlasync_guest.h>
#include <stdio.h>
#include <string.h>

#include "builtins.h"
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
static JSContext *ctx;       /* the main context: ES modules, host modules, module handlers */
static JSValue handlers;     /* name -> handler function (of any context) */
static JSValue host_modules; /* module name -> [function names] */
static JSValue module_sources; /* ES module name -> source, compiled when first imported */
static uint64_t random_state[2];

/* A script handler runs in a context of its own: its globals meet no other
 * handler's, and its lines are numbered from 1 with no wrapper around it. */
typedef struct {
    char *name;
    JSContext *ctx;
} script_context_t;

#define MAX_SCRIPT_HANDLERS 256
static script_context_t scripts[MAX_SCRIPT_HANDLERS];
static size_t script_count;

static JSContext *context_of(const char *name) {
    for (size_t i = 0; i < script_count; i++)
        if (strcmp(scripts[i].name, name) == 0) return scripts[i].ctx;
    return ctx;
}

/* ------------------------------------------------------------ replies */
typedef struct {
    char *data;
    size_t length, capacity;
} buffer_t;

static buffer_t reply; /* what a call returns (copied out after it returns) */

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
/* The stack of the JavaScript frames running now into `out` (at most `room`
 * bytes, not terminated); its length. */
static size_t current_stack(char *out, size_t room) {
    JSValue error = JS_NewError(ctx); /* its stack is built from the frames running now */
    const char *text = NULL;
    size_t length = 0;
    if (!JS_IsException(error)) {
        JSValue stack = JS_GetPropertyStr(ctx, error, "stack");
        if (JS_IsString(stack)) text = JS_ToCStringLen(ctx, &length, stack);
        JS_FreeValue(ctx, stack);
    }
    if (length > room) length = room;
    if (text) {
        memcpy(out, text, length);
        JS_FreeCString(ctx, text);
    } else {
        length = 0;
    }
    JS_FreeValue(ctx, JS_GetException(ctx));
    JS_FreeValue(ctx, error);
    return length;
}

static void answer_stack_request(void) {
    uint32_t request = hl_js_control.request;
    hl_js_control.length = (uint32_t)current_stack(hl_js_control.stack, HL_JS_STACK_MAX);
    __atomic_store_n(&hl_js_control.answered, request, __ATOMIC_RELEASE);
}

/* For a debugger stopped in the engine (docs/debugging.md): in gdb,
 * `printf "%s", hl_js_stack()` prints the JavaScript frames running now
 * (gdb runs this function in the guest and stops again when it returns). */
__attribute__((used, retain, noinline)) const char *hl_js_stack(void) {
    static char text[HL_JS_STACK_MAX + 1];
    size_t length = ctx ? current_stack(text, HL_JS_STACK_MAX) : 0;
    text[length] = 0;
    return text;
}

static int on_interrupt(JSRuntime *runtime, void *opaque) {
    (void)runtime, (void)opaque;
    if (__atomic_load_n(&hl_js_control.request, __ATOMIC_ACQUIRE) != hl_js_control.answered)
        answer_stack_request();
    return 0; /* never interrupts: stopping a guest is the host's job (it kicks the vCPU) */
}

/* --------------------------------------------------------------- random */
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

/* Host module `name`, exporting `names` (an array of function names), in
 * context `c`: the main context defines each when it is registered, a script
 * handler's context when it first imports it. NULL with an exception pending. */
static JSModuleDef *new_host_module(JSContext *c, const char *name, JSValueConst names) {
    JSModuleDef *module = JS_NewCModule(c, name, host_module_init);
    if (!module) return NULL;
    int64_t count = 0;
    JS_GetLength(c, names, &count);
    for (int64_t i = 0; i < count; i++) {
        JSValue function = JS_GetPropertyUint32(c, names, (uint32_t)i);
        const char *text = JS_ToCString(c, function);
        if (text) JS_AddModuleExport(c, module, text);
        JS_FreeCString(c, text);
        JS_FreeValue(c, function);
    }
    return module;
}

/* ------------------------------------------------------ module resolution */
/* Whether `name` is a module registered on the sandbox: an ES module (`add_module`)
 * or a host module. */
static bool is_registered(const char *name) {
    JSValue source = JS_GetPropertyStr(ctx, module_sources, name);
    bool found = JS_IsString(source);
    JS_FreeValue(ctx, source);
    if (found) return true;
    JSValue functions = JS_GetPropertyStr(ctx, host_modules, name);
    found = JS_IsArray(functions);
    JS_FreeValue(ctx, functions);
    return found;
}

/* Whether `specifier` is a path ("./x", "../x", "/x", "." or ".."), not a name. */
static bool is_path(const char *specifier) {
    if (specifier[0] == '/') return true;
    if (specifier[0] != '.') return false;
    const char *rest = specifier[1] == '.' ? specifier + 2 : specifier + 1;
    return *rest == '/' || *rest == '\0';
}

/* Path `specifier` from the root of the registered modules: a relative one from
 * the directory of `base`, "/x" from the root; "." and ".." segments folded, ".."
 * stopping at the root. */
static char *module_path(JSContext *c, const char *base, const char *specifier) {
    size_t base_length = 0;
    if (specifier[0] == '.') {
        const char *slash = strrchr(base, '/');
        base_length = slash ? (size_t)(slash - base) : 0;
    }
    char *path = js_malloc(c, base_length + strlen(specifier) + 2);
    if (!path) return NULL;
    memcpy(path, base, base_length);
    size_t length = base_length;
    const char *segment = specifier;
    while (*segment) {
        const char *end = strchr(segment, '/');
        size_t size = end ? (size_t)(end - segment) : strlen(segment);
        if (size == 2 && segment[0] == '.' && segment[1] == '.') {
            while (length && path[length - 1] != '/') length--;
            if (length) length--; /* the slash before the dropped segment */
        } else if (size && !(size == 1 && segment[0] == '.')) {
            if (length) path[length++] = '/';
            memcpy(path + length, segment, size);
            length += size;
        }
        segment += size;
        if (*segment == '/') segment++;
    }
    path[length] = '\0';
    return path;
}

/* The module that `specifier`, imported by module `base`, names. A name (`money`,
 * `lib/util`, a host module) is taken as it is. A path follows hyperlight-js's
 * resolver (its extensions .js and .mjs, and index files) over the registered
 * modules instead of a file system: the first registered of P, P.js, P.mjs,
 * P/index.js and P/index.mjs, P being the path from the root (module_path). None
 * is: P, which load_module then reports missing. */
static char *normalize_module(JSContext *c, const char *base, const char *specifier, void *opaque) {
    (void)opaque;
    if (!is_path(specifier)) return js_strdup(c, specifier);
    char *path = module_path(c, base, specifier);
    if (!path) return NULL;
    static const char *const suffixes[] = {"", ".js", ".mjs", "/index.js", "/index.mjs"};
    size_t length = strlen(path);
    char *candidate = js_malloc(c, length + sizeof "/index.mjs");
    if (!candidate) {
        js_free(c, path);
        return NULL;
    }
    for (size_t i = 0; i < sizeof suffixes / sizeof *suffixes; i++) {
        if (i && length == 0) break; /* the root is no module, and has no index */
        memcpy(candidate, path, length);
        strcpy(candidate + length, suffixes[i]);
        if (is_registered(candidate)) {
            js_free(c, path);
            return candidate;
        }
    }
    js_free(c, candidate);
    return path;
}

/* Module `name` for context `c`, when it is not yet defined there: a host
 * module, a registered ES module (compiled now), else a built-in one
 * (builtins.c), so that what the sandbox registers comes first. */
static JSModuleDef *load_module(JSContext *c, const char *name, void *opaque) {
    (void)opaque;
    JSValue functions = JS_GetPropertyStr(ctx, host_modules, name);
    if (JS_IsArray(functions)) {
        JSModuleDef *module = new_host_module(c, name, functions);
        JS_FreeValue(ctx, functions);
        return module;
    }
    JS_FreeValue(ctx, functions);
    JSValue source = JS_GetPropertyStr(ctx, module_sources, name);
    if (!JS_IsString(source)) {
        JS_FreeValue(ctx, source);
        if (builtins_has_module(name)) return builtins_new_module(c, name);
        JS_ThrowReferenceError(c, "could not load module '%s': no module of that name is registered "
                                  "on the sandbox (a relative import also finds NAME.js, NAME.mjs, "
                                  "NAME/index.js and NAME/index.mjs)", name);
        return NULL;
    }
    size_t length;
    const char *text = JS_ToCStringLen(ctx, &length, source);
    JS_FreeValue(ctx, source);
    if (!text) return NULL;
    JSValue module = JS_Eval(c, text, length, name, JS_EVAL_TYPE_MODULE | JS_EVAL_FLAG_COMPILE_ONLY);
    JS_FreeCString(ctx, text);
    if (JS_IsException(module)) return NULL;
    JSModuleDef *def = JS_VALUE_GET_PTR(module);
    JS_FreeValue(c, module);
    return def;
}

/* ---------------------------------------------------------------- set-up */
/* A context with the built-ins (builtins.c) and the host-seeded Math.random. */
static JSContext *new_context(void) {
    JSContext *c = JS_NewContext(rt);
    if (!c) return NULL;
    if (builtins_add_globals(c) < 0) {
        JS_FreeValue(c, JS_GetException(c));
        JS_FreeContext(c);
        return NULL;
    }
    JSValue global = JS_GetGlobalObject(c);
    JSValue math = JS_GetPropertyStr(c, global, "Math");
    JS_SetPropertyStr(c, math, "random", JS_NewCFunction(c, js_random, "random", 0));
    JS_FreeValue(c, math);
    JS_FreeValue(c, global);
    return c;
}

int64_t js_init(int64_t memory_limit, int64_t stack_limit) {
    if (rt) return 1;
    rt = JS_NewRuntime();
    if (!rt) return -1;
    JS_SetMemoryLimit(rt, (size_t)memory_limit);
    JS_SetMaxStackSize(rt, (size_t)stack_limit);
    JS_SetInterruptHandler(rt, on_interrupt, NULL);
    JS_SetModuleLoaderFunc(rt, normalize_module, load_module, NULL);
    if (builtins_init(rt) < 0) return -1;
    ctx = new_context();
    if (!ctx) return -2;
    /* no prototype: a name such as "toString" or "__proto__" is only a name */
    handlers = JS_NewObjectProto(ctx, JS_NULL);
    host_modules = JS_NewObjectProto(ctx, JS_NULL);
    module_sources = JS_NewObjectProto(ctx, JS_NULL);
    return 0;
}
HL_EXPORT(js_init, HL_INT, HL_INT, HL_INT);

/* Make module `name` export the host functions listed in `functions` (a JSON array). */
hl_bytes js_define_host_module(const char *name, const char *functions) {
    if (!ctx) return reply_text('E', "{\"name\":\"InternalError\",\"message\":\"no engine\"}");
    JSValue names = JS_ParseJSON(ctx, functions, strlen(functions), "<host functions>");
    if (JS_IsException(names)) return reply_exception('E');
    JS_SetPropertyStr(ctx, host_modules, name, names);
    if (!new_host_module(ctx, name, names)) return reply_exception('E');
    return reply_text('O', "{}");
}
HL_EXPORT(js_define_host_module, HL_BYTES, HL_STR, HL_STR);

/* Register ES module `name`: compiled when first imported (so modules may be
 * registered in any order); a syntax error surfaces then, naming its file. */
hl_bytes js_add_module(const char *name, const char *source) {
    if (!ctx) return reply_text('E', "{\"name\":\"InternalError\",\"message\":\"no engine\"}");
    JS_SetPropertyStr(ctx, module_sources, name, JS_NewString(ctx, source));
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

/* Whether the pending exception is a SyntaxError (it stays pending). */
static bool pending_is_syntax_error(void) {
    JSValue pending = JS_GetException(ctx);
    bool syntax = false;
    if (JS_IsError(pending)) {
        JSValue kind = JS_GetPropertyStr(ctx, pending, "name");
        const char *text = JS_ToCString(ctx, kind);
        syntax = text && strcmp(text, "SyntaxError") == 0;
        JS_FreeCString(ctx, text);
        JS_FreeValue(ctx, kind);
    }
    JS_Throw(ctx, pending);
    return syntax;
}

/* Whether a line of `source` starts with an export statement, or (`imports`) an
 * import statement (a dynamic import() is not one). */
static bool has_statement(const char *source, bool imports) {
    const char *line = source;
    while (*line) {
        while (*line == ' ' || *line == '\t' || *line == '\r') line++;
        const char *keyword = NULL;
        if (imports && strncmp(line, "import", 6) == 0) keyword = line + 6;
        else if (strncmp(line, "export", 6) == 0) keyword = line + 6;
        if (keyword && (*keyword == ' ' || *keyword == '\t' || *keyword == '{' ||
                        *keyword == '*' || *keyword == '"' || *keyword == '\''))
            return true;
        line = strchr(line, '\n');
        if (!line) break;
        line++;
    }
    return false;
}

/* Whether `source` is an ES module: a line starts with an import or export statement. */
static bool is_module_source(const char *source) { return has_statement(source, true); }

/* Compile handler module `source` (length `length`) as `filename`. A module that
 * exports nothing gets `export { handler };` after its last line, as hyperlight-js
 * adds it (its runtime's register_handler): every line and column of the source
 * stays where it was. If that does not compile (no `handler` is defined, or the
 * source has an error of its own), the source is compiled as it is, so that an
 * error is the source's own, at its own position. */
static JSValue compile_handler_module(const char *source, size_t length, const char *filename) {
    const int flags = JS_EVAL_TYPE_MODULE | JS_EVAL_FLAG_COMPILE_ONLY;
    if (!has_statement(source, false)) {
        static const char appendix[] = "\nexport { handler };";
        char *exported = malloc(length + sizeof appendix);
        if (exported) {
            memcpy(exported, source, length);
            memcpy(exported + length, appendix, sizeof appendix); /* with its NUL */
            JSValue module = JS_Eval(ctx, exported, length + sizeof appendix - 1, filename, flags);
            free(exported);
            if (!JS_IsException(module)) return module;
            JS_FreeValue(ctx, JS_GetException(ctx));
        }
    }
    return JS_Eval(ctx, source, length, filename, flags);
}

/* Compile and run `source` as handler `name`: an ES module exporting `handler`, or
 * a script defining `function handler(event)` (in a scope of its own). `check`
 * only compiles it. Handler sources must not be empty. */
static hl_bytes add_handler(const char *name, const char *source, bool check) {
    if (!ctx) return reply_text('E', "{\"name\":\"InternalError\",\"message\":\"no engine\"}");
    size_t length = strlen(source);
    char filename[300];
    snprintf(filename, sizeof filename, "%s.js", name);
    JSValue handler;
    if (is_module_source(source)) {
        JSValue module = compile_handler_module(source, length, filename);
        if (JS_IsException(module)) {
            if (check && !pending_is_syntax_error()) { /* imports resolve at load() */
                JS_FreeValue(ctx, JS_GetException(ctx));
                return reply_text('O', "{}");
            }
            return reply_exception(pending_is_syntax_error() ? 'S' : 'E');
        }
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
        /* A context of its own (reused when the handler is replaced); a check only
         * compiles, in a scratch context. */
        JSContext *own = check ? new_context() : context_of(name);
        if (!own) return reply_message('E', "out of memory (a context for the handler)");
        if (!check && own == ctx) {
            if (script_count == MAX_SCRIPT_HANDLERS)
                return reply_message('E', "too many script handlers (at most 256)");
            own = new_context();
            char *copy = malloc(strlen(name) + 1);
            if (!own || !copy) {
                if (own) JS_FreeContext(own);
                free(copy);
                return reply_message('E', "out of memory");
            }
            strcpy(copy, name);
            scripts[script_count++] = (script_context_t){copy, own};
        }
        int flags = JS_EVAL_TYPE_GLOBAL | (check ? JS_EVAL_FLAG_COMPILE_ONLY : 0);
        JSValue result = JS_Eval(own, source, length, filename, flags);
        if (JS_IsException(result)) {
            bool syntax = pending_is_syntax_error(); /* exceptions belong to the runtime */
            if (check) JS_FreeContext(own);
            return reply_exception(syntax ? 'S' : 'E');
        }
        JS_FreeValue(own, result);
        if (check) {
            JS_FreeContext(own);
            return reply_text('O', "{}");
        }
        JSValue global = JS_GetGlobalObject(own);
        handler = JS_GetPropertyStr(own, global, "handler");
        JS_FreeValue(own, global);
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
/* Call handler `name` with the JSON `event`; `seed` seeds Math.random, and a
 * non-zero `gc` runs the garbage collector once the handler has returned or
 * thrown (hyperlight-js's gc flag: what a kept-state sandbox wants). */
hl_bytes js_call(const char *name, const uint8_t *event, size_t event_length, int64_t seed,
                 int64_t gc) {
    if (!ctx) return reply_text('E', "{\"name\":\"InternalError\",\"message\":\"no engine\"}");
    JS_UpdateStackTop(rt);
    random_state[0] = (uint64_t)seed ^ 0x9E3779B97F4A7C15ULL;
    random_state[1] = ((uint64_t)seed << 1) ^ 0xD1B54A32D192ED03ULL;
    if (!random_state[0] && !random_state[1]) random_state[1] = 1;
    JSValue handler = JS_GetPropertyStr(ctx, handlers, name);
    if (!JS_IsFunction(ctx, handler)) {
        JS_FreeValue(ctx, handler);
        return reply_message('N', "no handler of that name");
    }
    /* JS_ParseJSON wants a NUL after the text: the host sends one (not part of it). */
    if (event_length && event[event_length - 1] == 0) event_length--;
    JSContext *own = context_of(name); /* the event's objects belong to the handler's realm */
    JSValue argument = JS_ParseJSON(own, (const char *)event, event_length, "<event>");
    if (JS_IsException(argument)) {
        JS_FreeValue(ctx, handler);
        JS_Throw(ctx, JS_GetException(own));
        return reply_exception('E');
    }
    hl_js_control.running = 1;
    JSValue result = settle(JS_Call(own, handler, JS_UNDEFINED, 1, &argument));
    hl_js_control.running = 0;
    JS_FreeValue(ctx, argument);
    JS_FreeValue(ctx, handler);
    if (gc) {
        JSValue pending = JS_IsException(result) ? JS_GetException(own) : JS_UNDEFINED;
        JS_RunGC(rt);
        if (JS_IsException(result)) JS_Throw(own, pending);
    }
    if (JS_IsException(result)) {
        if (own != ctx) JS_Throw(ctx, JS_GetException(own));
        return reply_exception('E');
    }
    if (JS_IsUndefined(result))
        return reply_message('U', "the handler returned undefined: return a JSON value");
    hl_bytes out = reply_json('R', result);
    JS_FreeValue(ctx, result);
    return out;
}
HL_EXPORT(js_call, HL_BYTES, HL_STR, HL_BYTES, HL_INT, HL_INT);

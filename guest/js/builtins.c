/*
 * The built-ins every context of the JavaScript runtime has (builtins.h):
 *
 *   globals  console.{log,info,warn,error,debug}, print(text), require(name),
 *            String.bytesFrom(data, "base64url")
 *   modules  "console" {log}, "io" {print, flush}, "crypto" {createHmac, Hmac},
 *            "require" {require, default}
 *
 * as hyperlight-js's runtime defines them (docs/javascript.md, "Built-ins",
 * says where they differ). All of it runs in the guest: HMAC and SHA-2 are
 * sha2.c; console and print text is the only thing that leaves, through the
 * `__js_console` host call (level, text).
 */
#include "builtins.h"

#include <hlasync_guest.h>
#include <stdio.h>
#include <string.h>

#include "sha2.h"

#define COUNT(array) (sizeof(array) / sizeof *(array))

/* The host call that takes console and print output: (level, text). */
#define OUTPUT_CALL "__js_console"

static const char *const CONSOLE_LEVELS[] = {"log", "info", "warn", "error", "debug"};

/* ------------------------------------------------------------- helpers */
static const char *type_name(JSContext *c, JSValueConst value) {
    if (JS_IsUndefined(value)) return "undefined";
    if (JS_IsNull(value)) return "null";
    if (JS_IsBool(value)) return "boolean";
    if (JS_IsNumber(value)) return "number";
    if (JS_IsBigInt(value)) return "bigint";
    if (JS_IsString(value)) return "string";
    if (JS_IsSymbol(value)) return "symbol";
    if (JS_IsFunction(c, value)) return "function";
    return "object";
}

/* Whether `text` (length bytes) equals the ASCII `name`, ignoring ASCII case.
 * (hyperlight-js lowercases with Rust's to_lowercase: no other character
 * lowercases to a letter of the names compared here.) */
static bool equals_ignoring_case(const char *text, size_t length, const char *name) {
    if (length != strlen(name)) return false;
    for (size_t i = 0; i < length; i++) {
        char ch = text[i];
        if (ch >= 'A' && ch <= 'Z') ch = (char)(ch - 'A' + 'a');
        if (ch != name[i]) return false;
    }
    return true;
}

/* Throw TypeError `<kind>: "<name>" (<choices>)`, `name` (length bytes) cut
 * after 40 bytes, at a character boundary. */
static JSValue throw_unknown(JSContext *c, const char *kind, const char *name, size_t length,
                             const char *choices) {
    size_t shown = length;
    if (shown > 40) {
        shown = 40;
        while (shown && ((unsigned char)name[shown] & 0xC0) == 0x80) shown--;
    }
    return JS_ThrowTypeError(c, "%s: \"%.*s%s\" (%s)", kind, (int)shown, name,
                             shown < length ? "..." : "", choices);
}

/* Where QuickJS's UTF-8 (JS_ToCStringLen) of a string holds a lone surrogate:
 * it writes one as the three bytes ED A0..BF xx, which are no UTF-8 (a valid
 * ED is followed by 80..9F). -1 if none. */
static ptrdiff_t lone_surrogate(const char *text, size_t length) {
    for (size_t i = 0; i + 2 < length; i++)
        if ((unsigned char)text[i] == 0xED && (unsigned char)text[i + 1] >= 0xA0) return (ptrdiff_t)i;
    return -1;
}

/* A growing block of text (console arguments being joined). */
typedef struct {
    char *data;
    size_t length, capacity;
} text_t;

static bool text_append(text_t *text, const char *part, size_t length) {
    if (length > text->capacity - text->length) {
        size_t capacity = text->capacity ? text->capacity : 256;
        while (capacity - text->length < length) {
            if (capacity > SIZE_MAX / 2) return false;
            capacity *= 2;
        }
        char *grown = realloc(text->data, capacity);
        if (!grown) return false;
        text->data = grown;
        text->capacity = capacity;
    }
    memcpy(text->data + text->length, part, length);
    text->length += length;
    return true;
}

/* -------------------------------------------------------------- output */
/* The most text one output host call can carry: the output buffer less the
 * call's frame (hl_call_host aborts the guest on anything longer). */
static size_t output_room(const char *level) {
    size_t capacity = (size_t)hl_peb_get()->output_size;
    size_t frame = sizeof(hl_hostcall_frame) + 2 * sizeof(hl_slot) + strlen(OUTPUT_CALL) + strlen(level);
    return capacity > frame ? capacity - frame : 0;
}

/* `text` in a new NUL-terminated block as the host can read it: UTF-8 with
 * neither a NUL (a C string ends there) nor a lone surrogate (the host refuses
 * text that is not UTF-8), each written as U+FFFD; `spare` more bytes after it.
 * NULL when out of memory. */
static char *host_text(const char *text, size_t length, size_t spare, size_t *out_length) {
    size_t nuls = 0;
    for (size_t i = 0; i < length; i++) nuls += text[i] == '\0';
    char *out = malloc(length + 2 * nuls + spare + 1);
    if (!out) return NULL;
    size_t n = 0;
    for (size_t i = 0; i < length; i++) {
        unsigned char byte = (unsigned char)text[i];
        if (byte == 0 || (byte == 0xED && i + 2 < length && (unsigned char)text[i + 1] >= 0xA0)) {
            memcpy(out + n, "\xEF\xBF\xBD", 3);
            n += 3;
            if (byte) i += 2;
        } else {
            out[n++] = (char)byte;
        }
    }
    out[n] = '\0';
    *out_length = n;
    return out;
}

/* The end of a piece of `text` starting at `start` of at most `room` bytes,
 * not inside a character. */
static size_t piece_end(const char *text, size_t length, size_t start, size_t room) {
    if (length - start <= room) return length;
    size_t end = start + room;
    while (end > start && ((unsigned char)text[end] & 0xC0) == 0x80) end--;
    return end;
}

static const char CUT_NOTE[] = " [... %zu more bytes: the output buffer holds no more]";

/* Send `text` to the host's output as `level`. A console line (`whole`) is one
 * call, cut with a note where the output buffer cannot hold it; print text
 * goes in as many calls as it needs. -1 (out of memory thrown) or 0. */
static int output(JSContext *c, const char *level, const char *text, size_t length, bool whole) {
    size_t room = output_room(level);
    size_t note_room = sizeof CUT_NOTE + 20;
    size_t n;
    char *out = host_text(text, length, whole ? note_room : 0, &n);
    if (!out) {
        JS_ThrowOutOfMemory(c);
        return -1;
    }
    if (whole) {
        if (n > room && room > note_room) {
            size_t keep = piece_end(out, n, 0, room - note_room);
            snprintf(out + keep, note_room, CUT_NOTE, n - keep);
            n = keep + strlen(out + keep);
        }
        if (n <= room) hl_call_host(OUTPUT_CALL, "ss", level, out);
    } else {
        for (size_t start = 0, end; start < n; start = end) {
            end = piece_end(out, n, start, room);
            if (end == start) break; /* not even one character fits */
            char saved = out[end];
            out[end] = '\0';
            hl_call_host(OUTPUT_CALL, "ss", level, out + start);
            out[end] = saved;
        }
    }
    free(out);
    return 0;
}

/* console.log/info/warn/error/debug (magic: the level): the arguments joined
 * with spaces, objects as JSON, one host call. */
static JSValue js_console(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv,
                          int magic) {
    (void)this_value;
    text_t line = {0};
    for (int i = 0; i < argc; i++) {
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
        if (JS_IsException(text)) goto fail;
        size_t length;
        const char *part = JS_ToCStringLen(c, &length, text);
        JS_FreeValue(c, text);
        if (!part) goto fail;
        bool appended = (!i || text_append(&line, " ", 1)) && text_append(&line, part, length);
        JS_FreeCString(c, part);
        if (!appended) {
            JS_ThrowOutOfMemory(c);
            goto fail;
        }
    }
    int sent = output(c, CONSOLE_LEVELS[magic], line.data ? line.data : "", line.length, true);
    free(line.data);
    return sent < 0 ? JS_EXCEPTION : JS_UNDEFINED;
fail:
    free(line.data);
    return JS_EXCEPTION;
}

/* print(text): `text` with no newline; print("") sends nothing. */
static JSValue js_print(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv) {
    (void)this_value;
    JSValueConst text = argc > 0 ? argv[0] : JS_UNDEFINED;
    if (!JS_IsString(text))
        return JS_ThrowTypeError(c, "print: the text must be a string, got %s", type_name(c, text));
    size_t length;
    const char *bytes = JS_ToCStringLen(c, &length, text);
    if (!bytes) return JS_EXCEPTION;
    int sent = length ? output(c, "print", bytes, length, false) : 0;
    JS_FreeCString(c, bytes);
    return sent < 0 ? JS_EXCEPTION : JS_UNDEFINED;
}

/* io.flush(): nothing is buffered (every print is a host call). */
static JSValue js_flush(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv) {
    (void)c, (void)this_value, (void)argc, (void)argv;
    return JS_UNDEFINED;
}

/* --------------------------------------------------------------- bytes */
/* The bytes of a string (its UTF-8), an ArrayBuffer or a typed array (the
 * bytes it views), borrowed from the engine: valid until JavaScript runs
 * again (a call may detach a buffer); bytes_release after. */
typedef struct {
    const uint8_t *data;
    size_t length;
    const char *string; /* to free, for a string */
} bytes_t;

static void bytes_release(JSContext *c, bytes_t *bytes) {
    if (bytes->string) JS_FreeCString(c, bytes->string);
    bytes->string = NULL;
}

/* `what` names the function and argument in messages ("Hmac.update: data"). */
static int get_bytes(JSContext *c, JSValueConst value, const char *what, bytes_t *bytes) {
    static const uint8_t none[1];
    *bytes = (bytes_t){none, 0, NULL};
    if (JS_IsString(value)) {
        size_t length;
        const char *text = JS_ToCStringLen(c, &length, value);
        if (!text) return -1;
        if (lone_surrogate(text, length) >= 0) {
            JS_FreeCString(c, text);
            JS_ThrowTypeError(c, "%s: the string has a lone surrogate (a UTF-16 code unit "
                                 "D800-DFFF without its pair), which has no UTF-8 form", what);
            return -1;
        }
        *bytes = (bytes_t){(const uint8_t *)text, length, text};
        return 0;
    }
    size_t offset = 0, length = 0, size;
    JSValue buffer;
    if (JS_IsArrayBuffer(value)) {
        buffer = JS_DupValue(c, value);
    } else if (JS_GetTypedArrayType(value) >= 0) {
        buffer = JS_GetTypedArrayBuffer(c, value, &offset, &length, NULL); /* a detached one throws */
        if (JS_IsException(buffer)) return -1;
    } else {
        JS_ThrowTypeError(c, "%s must be a string, an ArrayBuffer or a typed array (Uint8Array), got %s",
                          what, type_name(c, value));
        return -1;
    }
    uint8_t *data = JS_GetArrayBuffer(c, &size, buffer);
    JS_FreeValue(c, buffer); /* `value` keeps it alive */
    if (!data && JS_HasException(c)) return -1;
    if (JS_IsArrayBuffer(value)) length = size;
    if (offset > size || length > size - offset) {
        JS_ThrowTypeError(c, "%s: the typed array lies outside its buffer", what);
        return -1;
    }
    if (data && length) *bytes = (bytes_t){data + offset, length, NULL};
    return 0;
}

/* -------------------------------------------------------------- base64 */
static const char BASE64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char BASE64URL[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* RFC 4648 base64 of `data` into `out` (4 * ceil(length / 3) + 1 bytes), with
 * `=` padding or without; returns the characters written. */
static size_t base64_encode(const uint8_t *data, size_t length, const char *alphabet, bool pad,
                            char *out) {
    size_t n = 0, i = 0;
    for (; i + 3 <= length; i += 3) {
        uint32_t group = (uint32_t)data[i] << 16 | (uint32_t)data[i + 1] << 8 | data[i + 2];
        out[n++] = alphabet[group >> 18];
        out[n++] = alphabet[(group >> 12) & 63];
        out[n++] = alphabet[(group >> 6) & 63];
        out[n++] = alphabet[group & 63];
    }
    if (i < length) {
        uint32_t group = (uint32_t)data[i] << 16 | (i + 1 < length ? (uint32_t)data[i + 1] << 8 : 0);
        out[n++] = alphabet[group >> 18];
        out[n++] = alphabet[(group >> 12) & 63];
        if (i + 1 < length) out[n++] = alphabet[(group >> 6) & 63];
        else if (pad) out[n++] = '=';
        if (pad) out[n++] = '=';
    }
    out[n] = '\0';
    return n;
}

/* The value of a base64 character of either alphabet (`+` or `-` is 62, `/`
 * or `_` 63), -1 for any other. */
static int base64_value(unsigned char ch) {
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+' || ch == '-') return 62;
    if (ch == '/' || ch == '_') return 63;
    return -1;
}

/* String.bytesFrom(data, "base64url"): the text whose UTF-8 `data` encodes.
 * As hyperlight-js: trailing `=` are dropped, then the rest must be canonical
 * unpadded base64 (no other character, no length of 4n + 1, no bits set past
 * the last byte), and the bytes become a string as UTF-8 (JS_NewStringLen:
 * bytes that are no UTF-8 become U+FFFD). hyperlight-js reads the standard
 * alphabet only (`+` `/`); base64url's `-` `_` are read too. */
static JSValue js_bytes_from(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv) {
    (void)this_value;
    JSValueConst data = argc > 0 ? argv[0] : JS_UNDEFINED;
    JSValueConst encoding = argc > 1 ? argv[1] : JS_UNDEFINED;
    if (!JS_IsString(encoding))
        return JS_ThrowTypeError(c, "String.bytesFrom: the encoding must be the string "
                                    "'base64url', got %s", type_name(c, encoding));
    size_t name_length;
    const char *name = JS_ToCStringLen(c, &name_length, encoding);
    if (!name) return JS_EXCEPTION;
    bool supported = name_length == 9 && memcmp(name, "base64url", 9) == 0;
    JS_FreeCString(c, name);
    if (!supported)
        return JS_ThrowTypeError(c, "String.bytesFrom: unsupported encoding, only 'base64url' "
                                    "is supported");
    bytes_t text;
    if (get_bytes(c, data, "String.bytesFrom: data", &text) < 0) return JS_EXCEPTION;
    size_t length = text.length;
    while (length && text.data[length - 1] == '=') length--;
    JSValue result = JS_EXCEPTION;
    uint8_t *out = NULL;
    out = js_malloc(c, length / 4 * 3 + 3);
    if (!out) goto done;
    size_t n = 0;
    uint32_t group = 0;
    for (size_t i = 0; i < length; i++) {
        int value = base64_value(text.data[i]);
        if (value < 0) {
            unsigned char ch = text.data[i];
            char shown[16];
            snprintf(shown, sizeof shown, ch >= 0x20 && ch < 0x7F ? "'%c'" : "byte 0x%02x", ch);
            JS_ThrowSyntaxError(c, "String.bytesFrom: %s at offset %zu is no base64url character",
                                shown, i);
            goto done;
        }
        group = group << 6 | (uint32_t)value;
        if (i % 4 == 3) {
            out[n++] = (uint8_t)(group >> 16);
            out[n++] = (uint8_t)(group >> 8);
            out[n++] = (uint8_t)group;
            group = 0;
        }
    }
    size_t tail = length % 4; /* 2 characters: one more byte, 3: two more */
    if (tail == 1) {
        JS_ThrowSyntaxError(c, "String.bytesFrom: %zu base64 characters (without padding) encode no "
                               "whole number of bytes", length);
        goto done;
    }
    uint32_t unused = tail == 2 ? group & 0xF : tail == 3 ? group & 0x3 : 0;
    if (unused) {
        JS_ThrowSyntaxError(c, "String.bytesFrom: the last character (offset %zu) sets bits past "
                               "the last byte: not canonical base64", length - 1);
        goto done;
    }
    if (tail == 2) out[n++] = (uint8_t)(group >> 4);
    if (tail == 3) {
        out[n++] = (uint8_t)(group >> 10);
        out[n++] = (uint8_t)(group >> 2);
    }
    result = JS_NewStringLen(c, (const char *)out, n);
done:
    js_free(c, out);
    bytes_release(c, &text);
    return result;
}

/* ---------------------------------------------------------------- Hmac */
static JSClassID hmac_class_id;

typedef struct {
    hmac_ctx state;
    uint8_t mac[SHA2_MAX_DIGEST];
    bool finished; /* `mac` is the MAC of what was given since the last one */
} hmac_object;

static void hmac_finalizer(JSRuntime *runtime, JSValueConst value) {
    js_free_rt(runtime, JS_GetOpaque(value, hmac_class_id));
}

static const JSClassDef hmac_class = {"Hmac", .finalizer = hmac_finalizer};

/* new Hmac(algorithm, key): sha256, sha384 or sha512 in any case; the key a
 * string (UTF-8), an ArrayBuffer or a typed array, of any length. */
static JSValue js_hmac_constructor(JSContext *c, JSValueConst new_target, int argc, JSValueConst *argv) {
    JSValueConst algorithm = argc > 0 ? argv[0] : JS_UNDEFINED;
    if (!JS_IsString(algorithm))
        return JS_ThrowTypeError(c, "Hmac: the algorithm must be a string ('sha256', 'sha384' or "
                                    "'sha512'), got %s", type_name(c, algorithm));
    bytes_t key;
    if (get_bytes(c, argc > 1 ? argv[1] : JS_UNDEFINED, "Hmac: the key", &key) < 0) return JS_EXCEPTION;
    size_t length;
    const char *name = JS_ToCStringLen(c, &length, algorithm);
    if (!name) {
        bytes_release(c, &key);
        return JS_EXCEPTION;
    }
    static const struct {
        const char *name;
        sha2_kind kind;
    } algorithms[] = {{"sha256", SHA2_256}, {"sha384", SHA2_384}, {"sha512", SHA2_512}};
    int found = -1;
    for (size_t i = 0; i < COUNT(algorithms); i++)
        if (equals_ignoring_case(name, length, algorithms[i].name)) found = (int)i;
    if (found < 0) {
        throw_unknown(c, "Invalid algorithm", name, length, "sha256, sha384 or sha512");
        JS_FreeCString(c, name);
        bytes_release(c, &key);
        return JS_EXCEPTION;
    }
    JS_FreeCString(c, name);
    hmac_object *object = js_mallocz(c, sizeof *object);
    if (object) hmac_init(&object->state, algorithms[found].kind, key.data, key.length);
    bytes_release(c, &key);
    if (!object) return JS_EXCEPTION;
    JSValue prototype = JS_GetPropertyStr(c, new_target, "prototype");
    if (JS_IsException(prototype)) {
        js_free(c, object);
        return JS_EXCEPTION;
    }
    if (!JS_IsObject(prototype)) {
        JS_FreeValue(c, prototype);
        prototype = JS_GetClassProto(c, hmac_class_id);
    }
    JSValue hmac = JS_NewObjectProtoClass(c, prototype, hmac_class_id);
    JS_FreeValue(c, prototype);
    if (JS_IsException(hmac)) {
        js_free(c, object);
        return JS_EXCEPTION;
    }
    JS_SetOpaque(hmac, object);
    return hmac;
}

static void hmac_finish(hmac_object *object) {
    hmac_final(&object->state, object->mac); /* and starts the next MAC */
    object->finished = true;
}

/* hmac.update(data): adds data (a string as UTF-8, an ArrayBuffer or a typed
 * array); returns the Hmac. After a digest, it starts a new MAC with the key. */
static JSValue js_hmac_update(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv) {
    hmac_object *object = JS_GetOpaque2(c, this_value, hmac_class_id);
    if (!object) return JS_EXCEPTION;
    bytes_t data;
    if (get_bytes(c, argc > 0 ? argv[0] : JS_UNDEFINED, "Hmac.update: the data", &data) < 0)
        return JS_EXCEPTION;
    object->finished = false;
    hmac_update(&object->state, data.data, data.length);
    bytes_release(c, &data);
    return JS_DupValue(c, this_value);
}

/* hmac.finalize(): computes the MAC now (digest does when needed); returns the Hmac. */
static JSValue js_hmac_finalize(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv) {
    (void)argc, (void)argv;
    hmac_object *object = JS_GetOpaque2(c, this_value, hmac_class_id);
    if (!object) return JS_EXCEPTION;
    hmac_finish(object);
    return JS_DupValue(c, this_value);
}

/* hmac.digest(format): the MAC as hex, base64 or base64url (no padding), any
 * case; computed once, so every digest until the next update gives it. */
static JSValue js_hmac_digest(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv) {
    hmac_object *object = JS_GetOpaque2(c, this_value, hmac_class_id);
    if (!object) return JS_EXCEPTION;
    if (!object->finished) hmac_finish(object);
    JSValueConst format = argc > 0 ? argv[0] : JS_UNDEFINED;
    if (!JS_IsString(format))
        return JS_ThrowTypeError(c, "Hmac.digest: the format must be 'hex', 'base64' or "
                                    "'base64url', got %s", type_name(c, format));
    size_t length;
    const char *name = JS_ToCStringLen(c, &length, format);
    if (!name) return JS_EXCEPTION;
    size_t size = sha2_digest_size(object->state.inner.kind);
    char text[2 * SHA2_MAX_DIGEST + 1];
    size_t n = 0;
    bool known = true;
    if (equals_ignoring_case(name, length, "hex")) {
        for (size_t i = 0; i < size; i++) {
            text[n++] = "0123456789abcdef"[object->mac[i] >> 4];
            text[n++] = "0123456789abcdef"[object->mac[i] & 15];
        }
    } else if (equals_ignoring_case(name, length, "base64")) {
        n = base64_encode(object->mac, size, BASE64, true, text);
    } else if (equals_ignoring_case(name, length, "base64url")) {
        n = base64_encode(object->mac, size, BASE64URL, false, text);
    } else {
        known = false;
        throw_unknown(c, "Unsupported format", name, length, "hex, base64 or base64url");
    }
    JS_FreeCString(c, name);
    return known ? JS_NewStringLen(c, text, n) : JS_EXCEPTION;
}

static const JSCFunctionListEntry hmac_methods[] = {
    JS_CFUNC_DEF("update", 1, js_hmac_update),
    JS_CFUNC_DEF("digest", 1, js_hmac_digest),
    JS_CFUNC_DEF("finalize", 0, js_hmac_finalize),
    JS_PROP_STRING_DEF("[Symbol.toStringTag]", "Hmac", JS_PROP_CONFIGURABLE),
};

/* crypto.createHmac(algorithm, key): new Hmac(algorithm, key) (data[0]: Hmac). */
static JSValue js_create_hmac(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv,
                              int magic, JSValueConst *data) {
    (void)this_value, (void)magic;
    return JS_CallConstructor(c, data[0], argc, argv);
}

/* The Hmac constructor of context `c`, its prototype the class's there. */
static JSValue new_hmac_class(JSContext *c) {
    JSValue prototype = JS_NewObject(c);
    if (JS_IsException(prototype)) return JS_EXCEPTION;
    if (JS_SetPropertyFunctionList(c, prototype, hmac_methods, COUNT(hmac_methods)) < 0) {
        JS_FreeValue(c, prototype);
        return JS_EXCEPTION;
    }
    JSValue constructor = JS_NewCFunction2(c, js_hmac_constructor, "Hmac", 2, JS_CFUNC_constructor, 0);
    if (JS_IsException(constructor) || JS_SetConstructor(c, constructor, prototype) < 0) {
        JS_FreeValue(c, constructor);
        JS_FreeValue(c, prototype);
        return JS_EXCEPTION;
    }
    JS_SetClassProto(c, hmac_class_id, prototype); /* takes it */
    return constructor;
}

/* ------------------------------------------------------------- require */
/* require(name): module `name`'s namespace, imported now as `import` would,
 * relative names from the calling script or module. The import's promise is
 * settled by running queued jobs, as hyperlight-js's require does; a module
 * that waits for something no job settles (a top-level await) gives its
 * promise instead. */
static JSValue js_require(JSContext *c, JSValueConst this_value, int argc, JSValueConst *argv) {
    (void)this_value;
    JSValueConst specifier = argc > 0 ? argv[0] : JS_UNDEFINED;
    if (!JS_IsString(specifier))
        return JS_ThrowTypeError(c, "require: the module name must be a string, got %s",
                                 type_name(c, specifier));
    const char *name = JS_ToCString(c, specifier);
    if (!name) return JS_EXCEPTION;
    JSAtom caller = JS_GetScriptOrModuleName(c, 1); /* 0 is require itself */
    const char *base = caller == JS_ATOM_NULL ? NULL : JS_AtomToCString(c, caller);
    if (caller != JS_ATOM_NULL) JS_FreeAtom(c, caller);
    JSValue promise = JS_LoadModule(c, base ? base : "", name);
    JS_FreeCString(c, base);
    JS_FreeCString(c, name);
    if (JS_IsException(promise)) return JS_EXCEPTION;
    JSRuntime *runtime = JS_GetRuntime(c);
    for (;;) {
        JSPromiseStateEnum state = JS_PromiseState(c, promise);
        if (state == JS_PROMISE_FULFILLED || state == JS_PROMISE_REJECTED) {
            JSValue result = JS_PromiseResult(c, promise);
            JS_FreeValue(c, promise);
            return state == JS_PROMISE_FULFILLED ? result : JS_Throw(c, result);
        }
        JSContext *job_context;
        int ran = JS_ExecutePendingJob(runtime, &job_context);
        if (ran < 0) {
            JS_FreeValue(c, promise);
            return JS_EXCEPTION;
        }
        if (ran == 0) return promise;
    }
}

/* ------------------------------------------------------------- modules */
static int set_export(JSContext *c, JSModuleDef *module, const char *name, JSValue value) {
    if (JS_IsException(value)) return -1;
    return JS_SetModuleExport(c, module, name, value);
}

static int console_module_init(JSContext *c, JSModuleDef *module) {
    return set_export(c, module, "log",
                      JS_NewCFunctionMagic(c, js_console, "log", 0, JS_CFUNC_generic_magic, 0));
}

static int io_module_init(JSContext *c, JSModuleDef *module) {
    if (set_export(c, module, "print", JS_NewCFunction(c, js_print, "print", 1)) < 0) return -1;
    return set_export(c, module, "flush", JS_NewCFunction(c, js_flush, "flush", 0));
}

static int crypto_module_init(JSContext *c, JSModuleDef *module) {
    JSValue hmac = new_hmac_class(c);
    if (JS_IsException(hmac)) return -1;
    JSValue create =
        JS_NewCFunctionData2(c, js_create_hmac, "createHmac", 2, 0, 1, (JSValueConst *)&hmac);
    if (set_export(c, module, "Hmac", hmac) < 0) {
        JS_FreeValue(c, create);
        return -1;
    }
    return set_export(c, module, "createHmac", create);
}

static int require_module_init(JSContext *c, JSModuleDef *module) {
    JSValue require = JS_NewCFunction(c, js_require, "require", 1);
    if (set_export(c, module, "require", JS_DupValue(c, require)) < 0) {
        JS_FreeValue(c, require);
        return -1;
    }
    return set_export(c, module, "default", require); /* import require from "require" */
}

static const struct {
    const char *name;
    JSModuleInitFunc *init;
    const char *exports[3];
} modules[] = {
    {"console", console_module_init, {"log"}},
    {"io", io_module_init, {"print", "flush"}},
    {"crypto", crypto_module_init, {"createHmac", "Hmac"}},
    {"require", require_module_init, {"require", "default"}},
};

bool builtins_has_module(const char *name) {
    for (size_t i = 0; i < COUNT(modules); i++)
        if (strcmp(modules[i].name, name) == 0) return true;
    return false;
}

JSModuleDef *builtins_new_module(JSContext *c, const char *name) {
    for (size_t i = 0; i < COUNT(modules); i++) {
        if (strcmp(modules[i].name, name) != 0) continue;
        JSModuleDef *module = JS_NewCModule(c, name, modules[i].init);
        if (!module) return NULL;
        for (size_t e = 0; e < COUNT(modules[i].exports) && modules[i].exports[e]; e++)
            if (JS_AddModuleExport(c, module, modules[i].exports[e]) < 0) return NULL;
        return module;
    }
    JS_ThrowReferenceError(c, "no built-in module '%s'", name);
    return NULL;
}

/* ------------------------------------------------------------- globals */
int builtins_init(JSRuntime *runtime) {
    JS_NewClassID(runtime, &hmac_class_id);
    return JS_NewClass(runtime, hmac_class_id, &hmac_class);
}

/* Define `name` on `object` (as the engine's own globals: writable, configurable,
 * not enumerable); `value` may be JS_EXCEPTION (out of memory). */
static int define(JSContext *c, JSValueConst object, const char *name, JSValue value) {
    if (JS_IsException(value)) return -1;
    return JS_DefinePropertyValueStr(c, object, name, value, JS_PROP_WRITABLE | JS_PROP_CONFIGURABLE);
}

int builtins_add_globals(JSContext *c) {
    JSValue global = JS_GetGlobalObject(c);
    JSValue console = JS_NewObject(c);
    int status = JS_IsException(console) ? -1 : 0;
    for (size_t i = 0; status >= 0 && i < COUNT(CONSOLE_LEVELS); i++) {
        JSValue method =
            JS_NewCFunctionMagic(c, js_console, CONSOLE_LEVELS[i], 0, JS_CFUNC_generic_magic, (int)i);
        status = JS_IsException(method) ? -1 : JS_SetPropertyStr(c, console, CONSOLE_LEVELS[i], method);
    }
    if (status >= 0) status = JS_SetPropertyStr(c, global, "console", console);
    else JS_FreeValue(c, console);
    if (status >= 0) status = define(c, global, "print", JS_NewCFunction(c, js_print, "print", 1));
    if (status >= 0) status = define(c, global, "require", JS_NewCFunction(c, js_require, "require", 1));
    if (status >= 0) {
        JSValue string = JS_GetPropertyStr(c, global, "String");
        status = define(c, string, "bytesFrom", JS_NewCFunction(c, js_bytes_from, "bytesFrom", 2));
        JS_FreeValue(c, string);
    }
    JS_FreeValue(c, global);
    return status < 0 ? -1 : 0;
}

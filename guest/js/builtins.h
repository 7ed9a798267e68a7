/*
 * The built-ins of the JavaScript runtime, as hyperlight-js's runtime has them
 * (its src/hyperlight-js-runtime/src/globals and modules): the globals every
 * context gets (console, print, require, String.bytesFrom) and the built-in
 * modules console, io, crypto and require. Everything runs in the guest; the
 * only host call is the console's (`__js_console`).
 */
#ifndef HL_JS_BUILTINS_H
#define HL_JS_BUILTINS_H

#include <stdbool.h>

#include "quickjs.h"

/* Once per runtime, before its first context: the classes the built-ins define. */
int builtins_init(JSRuntime *rt);

/* Add the built-in globals to context `c`; -1 with an exception pending if
 * the engine is out of memory. */
int builtins_add_globals(JSContext *c);

/* Whether `name` is a built-in module. */
bool builtins_has_module(const char *name);

/* Built-in module `name` (builtins_has_module) defined in context `c`, for the
 * engine's module loader; NULL with an exception pending when out of memory. */
JSModuleDef *builtins_new_module(JSContext *c, const char *name);

#endif

/*
 * The rest of the libc the JS guest needs that musl's sources cannot give
 * as they are (they reach for thread-local storage, locales or system calls):
 * errno, abort, assert, strerror and a UTF-8 wcrtomb.
 */
#include <errno.h>
#include <hlasync_guest.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

/* One thread, so errno is a plain global (musl's lives in thread-local storage). */
static int errno_value;
int *__errno_location(void) { return &errno_value; }
hidden int *___errno_location(void) { return &errno_value; } /* musl's internal name */

_Noreturn void abort(void) { hl_abort(-4, "abort() called"); }

_Noreturn void __assert_fail(const char *expr, const char *file, int line, const char *func) {
    char message[512];
    hl_snprintf(message, sizeof message, "assertion failed: %s (%s:%d, %s)", expr, file, line, func);
    hl_abort(-4, message);
}

char *strerror(int e) {
    switch (e) {
    case 0: return "No error information";
    case EINVAL: return "Invalid argument";
    case ERANGE: return "Result not representable";
    case ENOMEM: return "Out of memory";
    case EOVERFLOW: return "Value too large for data type";
    case EILSEQ: return "Illegal byte sequence";
    case ETIMEDOUT: return "Operation timed out";
    default: return "Unknown error";
    }
}

/* Always UTF-8 (musl's asks the thread's locale). */
size_t wcrtomb(char *restrict s, wchar_t wc, mbstate_t *restrict st) {
    (void)st;
    unsigned c = (unsigned)wc;
    if (!s) return 1;
    if (c < 0x80) {
        s[0] = (char)c;
        return 1;
    }
    if (c < 0x800) {
        s[0] = (char)(0xc0 | (c >> 6));
        s[1] = (char)(0x80 | (c & 0x3f));
        return 2;
    }
    if (c < 0xd800 || (c - 0xe000) < 0x2000) {
        s[0] = (char)(0xe0 | (c >> 12));
        s[1] = (char)(0x80 | ((c >> 6) & 0x3f));
        s[2] = (char)(0x80 | (c & 0x3f));
        return 3;
    }
    if (c - 0x10000 < 0x100000) {
        s[0] = (char)(0xf0 | (c >> 18));
        s[1] = (char)(0x80 | ((c >> 12) & 0x3f));
        s[2] = (char)(0x80 | ((c >> 6) & 0x3f));
        s[3] = (char)(0x80 | (c & 0x3f));
        return 4;
    }
    errno = EILSEQ;
    return (size_t)-1;
}

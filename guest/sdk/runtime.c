/*
 * hlasync guest runtime: entry point, call dispatcher, host calls, print,
 * abort, heap and the basic mem and str functions. Linked into every guest.
 */
#include <hlasync_guest.h>

extern const hl_function_record __hl_functions_start[];
extern const hl_function_record __hl_functions_end[];

static const hl_peb *peb;

/* The host sets RSP to the stack top and RIP here. Its CFI marks the
 * outermost frame (no return address), so unwinders stop cleanly here. */
__asm__(".section .text.hl_start, \"ax\", @progbits\n"
        ".globl _hl_start\n"
        ".type _hl_start, @function\n"
        "_hl_start:\n"
        "    .cfi_startproc\n"
        "    .cfi_undefined rip\n"
        "    xorl %ebp, %ebp\n"
        "    call hl_main\n"
        "    ud2\n"
        "    .cfi_endproc\n"
        ".size _hl_start, . - _hl_start\n"
        ".text\n");

#define HL_OUT(port) __asm__ volatile("outb %%al, %0" : : "i"(port), "a"(0) : "memory")

const hl_peb *hl_peb_get(void) { return peb; }

/* ---------------------------------------------------------------- strings */
void *memcpy(void *dst, const void *src, size_t n) {
    void *ret = dst;
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
    return ret;
}

void *memmove(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d == s || n == 0) return dst;
    if (d < s || d >= s + n) return memcpy(dst, src, n);
    d += n - 1;
    s += n - 1;
    __asm__ volatile("std\n\trep movsb\n\tcld" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return dst;
}

void *memset(void *dst, int c, size_t n) {
    void *ret = dst;
    __asm__ volatile("rep stosb" : "+D"(dst), "+c"(n) : "a"(c) : "memory");
    return ret;
}

int memcmp(const void *a, const void *b, size_t n) {
    const unsigned char *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

size_t strnlen(const char *s, size_t max) {
    size_t n = 0;
    while (n < max && s[n]) n++;
    return n;
}

int strcmp(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n) {
    for (; n; n--, a++, b++) {
        if (*a != *b) return (unsigned char)*a - (unsigned char)*b;
        if (!*a) return 0;
    }
    return 0;
}

char *strcpy(char *dst, const char *src) { return memcpy(dst, src, strlen(src) + 1); }

char *strncpy(char *dst, const char *src, size_t n) {
    size_t len = strnlen(src, n);
    memcpy(dst, src, len);
    memset(dst + len, 0, n - len);
    return dst;
}

char *strchr(const char *s, int c) {
    for (;; s++) {
        if (*s == (char)c) return (char *)s;
        if (!*s) return 0;
    }
}

/* ------------------------------------------------------------ doorbell asks */
static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* Hand the frame in the output buffer to the host through the doorbell, when a
 * host thread watches it (spin non-zero: a hot call), and wait for the answer
 * there; 0 when nobody watches (the caller exits at its port instead). */
static int hl_ask_doorbell(uint64_t port) {
    volatile hl_doorbell *bell = (volatile hl_doorbell *)HL_DOORBELL_ADDR;
    if (!bell->spin) return 0;
    uint64_t seq = bell->ask_seq + 1;
    bell->ask_port = port;
    __asm__ volatile("" ::: "memory"); /* the frame and port are written before ... */
    bell->ask_seq = seq;               /* ... the ask is announced */
    uint64_t start = rdtsc();
    while (bell->answer_seq != seq) {
        /* spin is re-read: the host ends every wait by zeroing it */
        if (!bell->spin || rdtsc() - start >= bell->answer_spin)
            HL_OUT(HL_PORT_WAIT); /* the host answers the ask before it resumes us */
        else
            __builtin_ia32_pause();
    }
    __asm__ volatile("" ::: "memory"); /* the answer is read after its announcement */
    return 1;
}

#define HL_ASK(port)                              \
    do {                                          \
        if (!hl_ask_doorbell(port)) HL_OUT(port);        \
    } while (0)

/* ------------------------------------------------------------ print/abort */
static size_t message_frame(uint32_t magic, int64_t code, const char *text, size_t length) {
    hl_message_frame *frame = (hl_message_frame *)peb->output_addr;
    size_t room = peb->output_size - sizeof(*frame);
    if (length > room) length = room;
    memmove((char *)(frame + 1), text, length);
    frame->magic = magic;
    frame->length = (uint32_t)length;
    frame->code = code;
    return length;
}

void hl_write(const void *data, size_t length) {
    const char *p = data;
    while (length) {
        size_t sent = message_frame(HL_MAGIC_PRINT, 0, p, length);
        HL_ASK(HL_PORT_PRINT);
        p += sent;
        length -= sent;
    }
}

void hl_print(const char *text) { hl_write(text, strlen(text)); }

void hl_abort(int64_t code, const char *message) {
    message_frame(HL_MAGIC_ABORT, code, message, strlen(message));
    for (;;) HL_OUT(HL_PORT_ABORT); /* the host never resumes an aborted guest */
}

/* ------------------------------------------------------------ formatting */
typedef struct {
    char *buf;
    size_t size, len;
} fmt_out;

static void put(fmt_out *o, char c) {
    if (o->len + 1 < o->size) o->buf[o->len] = c;
    o->len++;
}

typedef struct {
    int width, precision; /* precision < 0: none */
    bool left, zero;
} fmt_spec;

static void put_padded(fmt_out *o, const char *text, size_t length, const fmt_spec *spec, bool number) {
    size_t pad = spec->width > 0 && (size_t)spec->width > length ? (size_t)spec->width - length : 0;
    if (!spec->left) {
        /* Zero padding goes after the sign of a number. */
        if (spec->zero && number && length && text[0] == '-') put(o, *text++), length--;
        for (size_t i = 0; i < pad; i++) put(o, spec->zero && number ? '0' : ' ');
    }
    for (size_t i = 0; i < length; i++) put(o, text[i]);
    if (spec->left)
        for (size_t i = 0; i < pad; i++) put(o, ' ');
}

static size_t format_unsigned(char *out, uint64_t v, unsigned base, bool upper) {
    char digits[24];
    size_t n = 0;
    do {
        unsigned d = v % base;
        digits[n++] = (char)(d < 10 ? '0' + d : (upper ? 'A' : 'a') + d - 10);
        v /= base;
    } while (v);
    for (size_t i = 0; i < n; i++) out[i] = digits[n - 1 - i];
    return n;
}

static size_t format_double(char *out, double v, int precision) {
    size_t n = 0;
    if (v != v) return memcpy(out, "nan", 3), 3;
    if (v < 0) out[n++] = '-', v = -v;
    if (v > 1.8e19) return memcpy(out + n, "inf", 3), n + 3; /* beyond uint64: not formatted */
    if (precision < 0) precision = 6;
    if (precision > 17) precision = 17;
    double scale = 1;
    for (int i = 0; i < precision; i++) scale *= 10;
    uint64_t whole = (uint64_t)v;
    uint64_t frac = (uint64_t)((v - (double)whole) * scale + 0.5);
    if ((double)frac >= scale) whole++, frac = 0;
    n += format_unsigned(out + n, whole, 10, false);
    if (precision) {
        out[n++] = '.';
        char digits[24];
        size_t d = format_unsigned(digits, frac, 10, false);
        for (size_t i = d; i < (size_t)precision; i++) out[n++] = '0';
        memcpy(out + n, digits, d);
        n += d;
    }
    return n;
}

/* Supports flags - and 0, width, .precision, the l/ll/z/h/hh length modifiers and
 * the conversions d i u x X p c s f %. An unsupported conversion is printed as
 * is, and so is everything after it (its argument type is unknown). */
int hl_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap) {
    fmt_out o = {buf, size, 0};
    char text[64];
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        const char *start = fmt++;
        fmt_spec spec = {0, -1, false, false};
        for (;; fmt++) {
            if (*fmt == '-') spec.left = true;
            else if (*fmt == '0') spec.zero = true;
            else break;
        }
        while (*fmt >= '0' && *fmt <= '9') spec.width = spec.width * 10 + (*fmt++ - '0');
        if (*fmt == '.') {
            spec.precision = 0;
            for (fmt++; *fmt >= '0' && *fmt <= '9'; fmt++) spec.precision = spec.precision * 10 + (*fmt - '0');
        }
        int longs = 0;
        while (*fmt == 'l') longs++, fmt++;
        if (*fmt == 'z') longs = 2, fmt++;
        while (*fmt == 'h') fmt++;
        size_t n = 0;
        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
            if (v < 0) text[n++] = '-';
            n += format_unsigned(text + n, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, false);
            put_padded(&o, text, n, &spec, true);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t v = longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            n = format_unsigned(text, v, *fmt == 'u' ? 10 : 16, *fmt == 'X');
            put_padded(&o, text, n, &spec, true);
            break;
        }
        case 'p':
            text[0] = '0', text[1] = 'x';
            n = 2 + format_unsigned(text + 2, (uintptr_t)va_arg(ap, void *), 16, false);
            put_padded(&o, text, n, &spec, false);
            break;
        case 'c':
            text[0] = (char)va_arg(ap, int);
            put_padded(&o, text, 1, &spec, false);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s) s = "(null)";
            size_t length = spec.precision >= 0 ? strnlen(s, (size_t)spec.precision) : strlen(s);
            put_padded(&o, s, length, &spec, false);
            break;
        }
        case 'f':
            n = format_double(text, va_arg(ap, double), spec.precision);
            put_padded(&o, text, n, &spec, true);
            break;
        case '%':
            put(&o, '%');
            break;
        default:
            for (const char *p = start; *p; p++) put(&o, *p);
            fmt = start + strlen(start) - 1;
        }
    }
    if (size) buf[o.len < size ? o.len : size - 1] = 0;
    return (int)o.len;
}

int hl_snprintf(char *buf, size_t size, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = hl_vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int hl_printf(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = hl_vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    hl_write(buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
    return n;
}

/* ------------------------------------------------------------------ heap */
/*
 * Segregated free lists with immediate coalescing, in the manner of TLSF:
 * malloc, free and realloc take constant time whatever the number of blocks
 * (the first-fit list this replaces walked every free block).
 *
 * Every block ("chunk") starts with a 16-byte header: its size (header
 * included, a multiple of 16, so payloads stay 16-byte aligned) with a flag
 * saying the chunk before it is free, and a tag (in use or free, xor the
 * chunk's address) that catches double frees and stray pointers. A free chunk
 * also holds its free-list links after the header and its size in its last 8
 * bytes, so that free neighbours are found and merged at once: two free
 * chunks are never adjacent.
 *
 * Free chunks are kept in bins: one per size below 1 KiB (16-byte steps), then
 * eight per power of two. A bitmap of non-empty bins gives the smallest bin
 * that fits with a count-trailing-zeros. Nothing is written at the end of the
 * heap (no fence, no size tag on the last chunk): its pages stay untouched, and
 * out of snapshots and dumps, until a block is allocated there.
 */
typedef struct {
    uint64_t head; /* chunk bytes | PREV_FREE */
    uint64_t tag;  /* TAG_USED or TAG_FREE, xor the chunk's address */
} chunk;

typedef struct { /* in a free chunk, after the header: neighbours in its bin */
    uint32_t next, prev; /* chunk index (see to_index), 0: none */
} links;

#define HEAP_ALIGN 16
#define HEADER ((uint64_t)sizeof(chunk))
#define MIN_CHUNK 32 /* header + links + the size at the end */
#define PREV_FREE 1ULL
#define TAG_USED 0x5553454455534544ULL
#define TAG_FREE 0x4545524645455246ULL
#define SMALL_SHIFT 10 /* chunks below 1 KiB: one bin per size */
#define SMALL_BINS (1u << (SMALL_SHIFT - 4))
#define SPLITS 8 /* bins per power of two above */
#define NBINS 256

static uint8_t *heap_base, *heap_end;
static uint32_t bins[NBINS];
static uint64_t bin_bits[NBINS / 64];

static inline uint64_t chunk_size(const chunk *c) { return c->head & ~(uint64_t)(HEAP_ALIGN - 1); }
static inline chunk *after(chunk *c) { return (chunk *)((uint8_t *)c + chunk_size(c)); }
static inline bool is_last(chunk *c) { return (uint8_t *)after(c) >= heap_end; }
static inline links *links_of(chunk *c) { return (links *)(c + 1); }
static inline uint32_t to_index(const chunk *c) { return (uint32_t)(((const uint8_t *)c - heap_base) >> 4) + 1; }
static inline chunk *from_index(uint32_t i) { return (chunk *)(heap_base + ((uint64_t)(i - 1) << 4)); }
static inline bool is_free(const chunk *c) { return c->tag == (TAG_FREE ^ (uint64_t)c); }
static inline bool is_used(const chunk *c) { return c->tag == (TAG_USED ^ (uint64_t)c); }

static unsigned bin_of(uint64_t size) {
    if (size < (1u << SMALL_SHIFT)) return (unsigned)(size >> 4);
    unsigned top = 63 - (unsigned)__builtin_clzll(size);
    unsigned bin = SMALL_BINS + (top - SMALL_SHIFT) * SPLITS + (unsigned)((size >> (top - 3)) & (SPLITS - 1));
    return bin < NBINS ? bin : NBINS - 1;
}

/* The first non-empty bin at or after `start`, or -1. */
static int first_bin(unsigned start) {
    for (unsigned word = start / 64; word < NBINS / 64; word++) {
        uint64_t bits = bin_bits[word];
        if (word == start / 64) bits &= ~0ULL << (start % 64);
        if (bits) return (int)(word * 64 + (unsigned)__builtin_ctzll(bits));
    }
    return -1;
}

/* Make `c` a free chunk of `size` bytes in its bin; the chunk after it learns. */
static void insert(chunk *c, uint64_t size) {
    c->head = size | (c->head & PREV_FREE);
    c->tag = TAG_FREE ^ (uint64_t)c;
    unsigned bin = bin_of(size);
    links *l = links_of(c);
    l->prev = 0;
    l->next = bins[bin];
    if (bins[bin]) links_of(from_index(bins[bin]))->prev = to_index(c);
    bins[bin] = to_index(c);
    bin_bits[bin / 64] |= 1ULL << (bin % 64);
    if (!is_last(c)) {
        *(uint64_t *)((uint8_t *)c + size - 8) = size;
        after(c)->head |= PREV_FREE;
    }
}

static void unlink_chunk(chunk *c) {
    unsigned bin = bin_of(chunk_size(c));
    links *l = links_of(c);
    if (l->prev) links_of(from_index(l->prev))->next = l->next;
    else bins[bin] = l->next;
    if (l->next) links_of(from_index(l->next))->prev = l->prev;
    if (!bins[bin]) bin_bits[bin / 64] &= ~(1ULL << (bin % 64));
}

/* Trim in-use chunk `c` to `need` bytes; the rest, merged with a free chunk
 * after it, goes back to the bins. */
static void trim(chunk *c, uint64_t need) {
    uint64_t size = chunk_size(c);
    if (size - need < MIN_CHUNK) return;
    c->head = need | (c->head & PREV_FREE);
    chunk *rest = after(c);
    rest->head = size - need; /* the chunk before it, c, is in use */
    chunk *next = after(rest);
    uint64_t rest_size = size - need;
    if (!is_last(rest) && is_free(next)) {
        unlink_chunk(next);
        rest_size += chunk_size(next);
    }
    insert(rest, rest_size);
}

static void heap_init(uint64_t addr, uint64_t size) {
    uint64_t start = (addr + HEAP_ALIGN - 1) & ~(uint64_t)(HEAP_ALIGN - 1);
    uint64_t stop = (addr + size) & ~(uint64_t)(HEAP_ALIGN - 1);
    if (stop < start + MIN_CHUNK) return; /* no heap: malloc returns NULL */
    heap_base = (uint8_t *)start;
    heap_end = (uint8_t *)stop;
    chunk *first = (chunk *)heap_base;
    first->head = 0;
    insert(first, (uint64_t)(heap_end - heap_base));
}

/* The chunk of a pointer malloc returned, or abort (code -2) naming `who`. */
static chunk *checked_chunk(void *ptr, const char *who) {
    uint8_t *p = ptr;
    chunk *c = (chunk *)p - 1;
    static char message[96];
    const char *what = 0;
    if (((uintptr_t)p & (HEAP_ALIGN - 1)) || p < heap_base + HEADER || p >= heap_end)
        what = "invalid pointer (not from malloc)";
    else if (is_free(c))
        what = "double free (the block is already free)";
    else if (!is_used(c) || chunk_size(c) < MIN_CHUNK || chunk_size(c) > (uint64_t)(heap_end - (uint8_t *)c))
        what = "invalid pointer (no heap block starts there)";
    if (what) {
        hl_snprintf(message, sizeof message, "%s: %s", who, what);
        hl_abort(-2, message);
    }
    return c;
}

void *malloc(size_t size) {
    if (size > (uint64_t)(heap_end - heap_base)) return 0;
    uint64_t need = (size + HEADER + HEAP_ALIGN - 1) & ~(uint64_t)(HEAP_ALIGN - 1);
    if (need < MIN_CHUNK) need = MIN_CHUNK;
    unsigned bin = bin_of(need);
    chunk *c = 0;
    if (bins[bin] && chunk_size(from_index(bins[bin])) >= need) {
        c = from_index(bins[bin]); /* small bins hold one size: always this one */
    } else {
        int larger = first_bin(bin + 1);
        if (larger >= 0) {
            c = from_index(bins[larger]);
        } else { /* last resort before NULL: any chunk of this bin that fits */
            for (uint32_t i = bins[bin]; i && !c; i = links_of(from_index(i))->next)
                if (chunk_size(from_index(i)) >= need) c = from_index(i);
        }
    }
    if (!c) return 0;
    unlink_chunk(c);
    c->tag = TAG_USED ^ (uint64_t)c;
    if (!is_last(c)) after(c)->head &= ~PREV_FREE;
    trim(c, need);
    return c + 1;
}

void free(void *ptr) {
    if (!ptr) return;
    chunk *c = checked_chunk(ptr, "free()");
    uint64_t size = chunk_size(c);
    c->tag = TAG_FREE ^ (uint64_t)c; /* stays a double-free marker even once merged */
    chunk *next = after(c);
    if (is_last(c)) {
        /* nothing after it */
    } else if (is_free(next)) {
        unlink_chunk(next);
        size += chunk_size(next);
    } else if (!is_used(next)) {
        hl_abort(-2, "free(): heap corruption (the header after the block was overwritten)");
    }
    if (c->head & PREV_FREE) {
        uint64_t before = *((uint64_t *)c - 1);
        chunk *prev = (chunk *)((uint8_t *)c - before);
        if (before < MIN_CHUNK || (uint8_t *)prev < heap_base || !is_free(prev) || chunk_size(prev) != before)
            hl_abort(-2, "free(): heap corruption (the free block before it was overwritten)");
        unlink_chunk(prev);
        size += before;
        c = prev;
    }
    insert(c, size);
}

size_t malloc_usable_size(void *ptr) {
    return ptr ? chunk_size(checked_chunk(ptr, "malloc_usable_size()")) - HEADER : 0;
}

void *calloc(size_t count, size_t size) {
    if (size && count > (size_t)-1 / size) return 0;
    void *p = malloc(count * size);
    if (p) memset(p, 0, count * size);
    return p;
}

void *realloc(void *ptr, size_t size) {
    if (!ptr) return malloc(size);
    chunk *c = checked_chunk(ptr, "realloc()");
    if (size > (uint64_t)(heap_end - heap_base)) return 0;
    uint64_t need = (size + HEADER + HEAP_ALIGN - 1) & ~(uint64_t)(HEAP_ALIGN - 1);
    if (need < MIN_CHUNK) need = MIN_CHUNK;
    uint64_t have = chunk_size(c);
    chunk *next = after(c);
    if (need > have && !is_last(c) && is_free(next) && have + chunk_size(next) >= need) {
        unlink_chunk(next); /* grow in place into the free chunk after it */
        have += chunk_size(next);
        c->head = have | (c->head & PREV_FREE);
        if (!is_last(c)) after(c)->head &= ~PREV_FREE;
    }
    if (need <= have) {
        trim(c, need);
        return ptr;
    }
    void *p = malloc(size);
    if (p) {
        memcpy(p, ptr, have - HEADER);
        free(ptr);
    }
    return p;
}

/* ------------------------------------------------------------ host calls */
hl_value hl_call_host_v(const char *name, const char *fmt, va_list ap) {
    uint8_t *out = (uint8_t *)peb->output_addr;
    size_t cap = peb->output_size;
    size_t argc = strlen(fmt);
    size_t name_length = strlen(name);
    if (argc > HL_MAX_ARGS) hl_abort(-3, "hl_call_host: too many arguments");
    hl_hostcall_frame *frame = (hl_hostcall_frame *)out;
    hl_slot *slots = (hl_slot *)(frame + 1);
    size_t pos = sizeof(*frame) + argc * sizeof(hl_slot);
    if (name_length > cap - pos) hl_abort(-3, "hl_call_host: name does not fit the output buffer");
    memcpy(out + pos, name, name_length);
    pos += name_length;
    for (size_t i = 0; i < argc; i++) {
        hl_slot *slot = &slots[i];
        const void *data = 0;
        size_t length = 0;
        slot->length = 0;
        switch (fmt[i]) {
        case 'i':
            slot->type = HL_INT;
            slot->value = (uint64_t)va_arg(ap, int64_t);
            break;
        case 'f': {
            double d = va_arg(ap, double);
            slot->type = HL_FLOAT;
            memcpy(&slot->value, &d, sizeof d);
            break;
        }
        case 'b':
            slot->type = HL_BOOL;
            slot->value = va_arg(ap, int) != 0;
            break;
        case 's':
            slot->type = HL_STR;
            data = va_arg(ap, const char *);
            length = strlen(data);
            break;
        case 'y':
            slot->type = HL_BYTES;
            data = va_arg(ap, const uint8_t *);
            length = va_arg(ap, size_t);
            break;
        default:
            hl_abort(-3, "hl_call_host: unknown format letter");
        }
        if (data) {
            if (length > cap - pos) hl_abort(-3, "hl_call_host: arguments do not fit the output buffer");
            memmove(out + pos, data, length);
            slot->value = pos;
            slot->length = (uint32_t)length;
            pos += length;
        }
    }
    frame->magic = HL_MAGIC_HOSTCALL;
    frame->name_length = (uint32_t)name_length;
    frame->argc = (uint32_t)argc;
    frame->size = (uint32_t)pos;
    HL_ASK(HL_PORT_HOSTCALL);

    const hl_result_frame *result = (const hl_result_frame *)out;
    if (result->magic != HL_MAGIC_RESULT || result->status != HL_STATUS_OK)
        hl_abort(-3, "hl_call_host: malformed response from the host");
    hl_value v;
    v.type = result->type;
    v.length = result->length;
    switch (result->type) {
    case HL_STR:
    case HL_BYTES:
        v.data = (const uint8_t *)(result + 1);
        break;
    case HL_FLOAT:
        memcpy(&v.f, &result->value, sizeof v.f);
        break;
    case HL_BOOL:
        v.b = result->value != 0;
        break;
    default:
        v.i = (int64_t)result->value;
    }
    return v;
}

hl_value hl_call_host(const char *name, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    hl_value v = hl_call_host_v(name, fmt, ap);
    va_end(ap);
    return v;
}

int64_t hl_call_host_int(const char *name, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    hl_value v = hl_call_host_v(name, fmt, ap);
    va_end(ap);
    if (v.type != HL_INT) hl_abort(-3, "hl_call_host_int: host function did not return an int");
    return v.i;
}

/* ------------------------------------------------------------ dispatcher */
typedef struct {
    uint64_t a, b;
} hl_pair;
typedef hl_pair (*hl_int_fn)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, double,
                             double, double, double, double, double, double, double);
typedef double (*hl_float_fn)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, double,
                              double, double, double, double, double, double, double);

static void result_frame(uint32_t status, uint32_t type, uint64_t value, const void *payload,
                         size_t length) {
    hl_result_frame *result = (hl_result_frame *)peb->output_addr;
    size_t room = peb->output_size - sizeof(*result);
    if (length > room) {
        status = HL_STATUS_ERROR;
        type = HL_VOID;
        payload = "result does not fit the output buffer";
        length = strlen(payload);
    }
    if (length) memmove(result + 1, payload, length);
    result->magic = HL_MAGIC_RESULT;
    result->status = status;
    result->type = type;
    result->length = (uint32_t)length;
    result->value = value;
}

static void dispatch_error(const char *message) {
    result_frame(HL_STATUS_ERROR, HL_VOID, 0, message, strlen(message));
}

static void dispatch(void) {
    const hl_call_frame *call = (const hl_call_frame *)peb->input_addr;
    size_t count = (size_t)(__hl_functions_end - __hl_functions_start);
    if (call->magic != HL_MAGIC_CALL) return dispatch_error("malformed call frame");
    if (call->index >= count) return dispatch_error("function index out of range");
    const hl_function_record *fn = &__hl_functions_start[call->index];
    if (call->argc != fn->argc) return dispatch_error("argument count does not match");
    uint64_t ints[6] = {0};
    double floats[8] = {0};
    unsigned ni = 0, nf = 0;
    for (uint32_t i = 0; i < call->argc; i++) {
        const hl_slot *slot = &call->args[i];
        if (slot->type != fn->args[i]) return dispatch_error("argument type does not match");
        unsigned need_int = slot->type == HL_BYTES ? 2 : slot->type == HL_FLOAT ? 0 : 1;
        if (ni + need_int > 6 || (slot->type == HL_FLOAT && nf >= 8))
            return dispatch_error("too many arguments for registers");
        switch (slot->type) {
        case HL_FLOAT:
            memcpy(&floats[nf++], &slot->value, sizeof(double));
            break;
        case HL_STR:
            ints[ni++] = peb->input_addr + slot->value;
            break;
        case HL_BYTES:
            ints[ni++] = peb->input_addr + slot->value;
            ints[ni++] = slot->length;
            break;
        default:
            ints[ni++] = slot->value;
        }
    }
    if (fn->ret == HL_FLOAT) {
        double d = ((hl_float_fn)fn->fn)(ints[0], ints[1], ints[2], ints[3], ints[4], ints[5],
                                         floats[0], floats[1], floats[2], floats[3], floats[4],
                                         floats[5], floats[6], floats[7]);
        uint64_t bits;
        memcpy(&bits, &d, sizeof bits);
        return result_frame(HL_STATUS_OK, HL_FLOAT, bits, 0, 0);
    }
    hl_pair r = ((hl_int_fn)fn->fn)(ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], floats[0],
                                    floats[1], floats[2], floats[3], floats[4], floats[5],
                                    floats[6], floats[7]);
    switch (fn->ret) {
    case HL_VOID:
        return result_frame(HL_STATUS_OK, HL_VOID, 0, 0, 0);
    case HL_BOOL:
        return result_frame(HL_STATUS_OK, HL_BOOL, (uint8_t)r.a != 0, 0, 0);
    case HL_STR: {
        const char *s = (const char *)r.a;
        if (!s) return dispatch_error("function returned a NULL string");
        size_t room = peb->output_size - sizeof(hl_result_frame);
        size_t length = strnlen(s, room + 1);
        return result_frame(HL_STATUS_OK, HL_STR, 0, s, length);
    }
    case HL_BYTES:
        if (!r.a && r.b) return dispatch_error("function returned NULL bytes");
        return result_frame(HL_STATUS_OK, HL_BYTES, 0, (const void *)r.a, r.b);
    default:
        return result_frame(HL_STATUS_OK, HL_INT, r.a, 0, 0);
    }
}


/* Every call starts with clean x87/SSE state: no values or modes left by the last
 * call. (The host restores the general registers; this is much cheaper here.) */
static void reset_vector_state(void) {
    static const uint32_t mxcsr_default = 0x1f80;
    __asm__ volatile("fninit\n\t"
                     "ldmxcsr %0\n\t"
                     "pxor %%xmm0, %%xmm0\n\t"
                     "pxor %%xmm1, %%xmm1\n\t"
                     "pxor %%xmm2, %%xmm2\n\t"
                     "pxor %%xmm3, %%xmm3\n\t"
                     "pxor %%xmm4, %%xmm4\n\t"
                     "pxor %%xmm5, %%xmm5\n\t"
                     "pxor %%xmm6, %%xmm6\n\t"
                     "pxor %%xmm7, %%xmm7\n\t"
                     "pxor %%xmm8, %%xmm8\n\t"
                     "pxor %%xmm9, %%xmm9\n\t"
                     "pxor %%xmm10, %%xmm10\n\t"
                     "pxor %%xmm11, %%xmm11\n\t"
                     "pxor %%xmm12, %%xmm12\n\t"
                     "pxor %%xmm13, %%xmm13\n\t"
                     "pxor %%xmm14, %%xmm14\n\t"
                     "pxor %%xmm15, %%xmm15"
                     :
                     : "m"(mxcsr_default)
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
                       "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory");
}

/* ------------------------------------------------------------ parking */
_Static_assert(__builtin_offsetof(hl_doorbell, spin) == HL_BELL_SPIN, "HL_BELL_SPIN");
_Static_assert(__builtin_offsetof(hl_doorbell, go) == HL_BELL_GO, "HL_BELL_GO");
_Static_assert(__builtin_offsetof(hl_doorbell, parked) == HL_BELL_PARKED, "HL_BELL_PARKED");
_Static_assert(__builtin_offsetof(hl_peb, stack_top) == HL_PEB_STACK_TOP, "HL_PEB_STACK_TOP");
_Static_assert(__builtin_offsetof(hl_peb, xsave_mask) == HL_PEB_XSAVE_MASK, "HL_PEB_XSAVE_MASK");
_Static_assert(__builtin_offsetof(hl_peb, fsgsbase) == HL_PEB_FSGSBASE, "HL_PEB_FSGSBASE");
_Static_assert(__builtin_offsetof(hl_peb, segments) == HL_PEB_SEGMENTS, "HL_PEB_SEGMENTS");

/* An XSAVE image (standard form) of a clean state: its header's XSTATE_BV is
 * zero, so XRSTOR puts every component it is asked for in its initial state
 * (x87 and SSE registers zero and empty, the upper halves of the vector
 * registers and the mask registers zero) and loads MXCSR 0x1F80 from the
 * legacy area; FXRSTOR of its first 512 bytes does the same for x87/MMX/SSE
 * (FCW 0x37F: all exceptions masked, 64-bit precision). */
const uint8_t hl_clean_xsave[576] __attribute__((aligned(64))) = {
    [0] = 0x7f, [1] = 0x03, [24] = 0x80, [25] = 0x1f};

/* What code here may set, for hl_park to reset (read once, at
 * initialisation, and handed to the host, which puts it in the PEB): XCR0,
 * the XSAVE components enabled, or 0 where `xgetbv` is not allowed; and
 * whether `rdfsbase` (and so wrfsbase/wrgsbase) is allowed. Where one is
 * not, the host, which boots the guest, resumes it past the instruction at
 * the hl_*_probe label with rax, rcx and rdx zero. */
uint64_t hl_probe_xcr0(void);
uint64_t hl_probe_fsgsbase(void);
__asm__(".text\n"
        ".globl hl_probe_xcr0\n"
        ".type hl_probe_xcr0, @function\n"
        "hl_probe_xcr0:\n"
        "    xorl %ecx, %ecx\n"
        "    xorl %eax, %eax\n"
        "    xorl %edx, %edx\n"
        ".globl hl_xgetbv_probe\n"
        "hl_xgetbv_probe:\n"
        "    xgetbv\n"
        "    shlq $32, %rdx\n"
        "    orq %rdx, %rax\n"
        "    ret\n"
        ".size hl_probe_xcr0, . - hl_probe_xcr0\n"
        ".globl hl_probe_fsgsbase\n"
        ".type hl_probe_fsgsbase, @function\n"
        "hl_probe_fsgsbase:\n"
        "    movl $1, %ecx\n"
        ".globl hl_rdfsbase_probe\n"
        "hl_rdfsbase_probe:\n"
        "    rdfsbase %rax\n"
        "    movl %ecx, %eax\n"
        "    ret\n"
        ".size hl_probe_fsgsbase, . - hl_probe_fsgsbase\n");

__attribute__((noreturn)) void hl_park(uint64_t token);

#define HL_ASM_STR2(x) #x
#define HL_ASM_STR(x) HL_ASM_STR2(x)
/* hl_park's reload of segment register `reg` if it differs from the PEB's
 * selector at byte `at` of its segments word (clobbers eax and ecx). */
#define HL_PARK_SEGMENT(reg, at)                                                        \
    "    movl %" reg ", %eax\n"                                                         \
    "    movzwl " HL_ASM_STR(HL_PEB_ADDR) " + " HL_ASM_STR(HL_PEB_SEGMENTS) " + " at ", %ecx\n" \
    "    cmpl %ecx, %eax\n"                                                             \
    "    je 7f\n"                                                                       \
    "    movl %ecx, %" reg "\n"                                                         \
    "7:\n"

/* hl_park(token): see hlasync_guest.h. Written in assembly so that, from the
 * moment it announces the park, it touches no memory but the doorbell's go,
 * spin and parked words: the stack and everything else may be put back by
 * the host meanwhile. Its CFI marks it the outermost frame. */
__asm__(".section .text.hl_park, \"ax\", @progbits\n"
        ".globl hl_park\n"
        ".type hl_park, @function\n"
        "hl_park:\n"
        "    .cfi_startproc\n"
        "    .cfi_undefined rip\n"
        "    movq %rdi, %r8\n"
        "    movl $" HL_ASM_STR(HL_DOORBELL_ADDR) ", %r9d\n"
        /* x87, MMX, SSE and every vector and mask register the host found code
         * here can set (the PEB is read-only to the guest) */
        "    movq " HL_ASM_STR(HL_PEB_ADDR) " + " HL_ASM_STR(HL_PEB_XSAVE_MASK) ", %rax\n"
        "    testq %rax, %rax\n"
        "    jz 5f\n"
        "    movq %rax, %rdx\n"
        "    shrq $32, %rdx\n"
        "    xrstor hl_clean_xsave(%rip)\n"
        "    jmp 6f\n"
        "5:  fxrstor hl_clean_xsave(%rip)\n"
        /* Data segments as they were at initialisation (the PEB holds their
         * selectors): a load costs ~16 us where this runs under PVM, so only
         * those a call changed are loaded again; then the FS and GS bases,
         * where code here may set them with wrfsbase/wrgsbase (the PEB says). */
        "6:\n" HL_PARK_SEGMENT("ds", "0")
        HL_PARK_SEGMENT("es", "2")
        HL_PARK_SEGMENT("fs", "4")
        HL_PARK_SEGMENT("gs", "6")
        "    cmpq $0, " HL_ASM_STR(HL_PEB_ADDR) " + " HL_ASM_STR(HL_PEB_FSGSBASE) "\n"
        "    je 8f\n"
        "    xorl %ecx, %ecx\n"
        "    rdfsbase %rax\n" /* a write costs more than a read under PVM */
        "    testq %rax, %rax\n"
        "    jz 7f\n"
        "    wrfsbase %rcx\n"
        "7:  rdgsbase %rax\n"
        "    testq %rax, %rax\n"
        "    jz 8f\n"
        "    wrgsbase %rcx\n"
        "8:\n"
        "    pushq $2\n"
        "    popfq\n" /* flags as the host set them: DF, AC, TF and the rest clear */
        "    xorl %eax, %eax\n"
        "    xorl %ebx, %ebx\n"
        "    xorl %ecx, %ecx\n"
        "    xorl %edx, %edx\n"
        "    xorl %esi, %esi\n"
        "    xorl %edi, %edi\n"
        "    xorl %ebp, %ebp\n"
        "    xorl %r10d, %r10d\n"
        "    xorl %r11d, %r11d\n"
        "    xorl %r12d, %r12d\n"
        "    xorl %r13d, %r13d\n"
        "    xorl %r14d, %r14d\n"
        "    xorl %r15d, %r15d\n"
        "    movq %r8, " HL_ASM_STR(HL_BELL_PARKED) "(%r9)\n" /* parked: nothing left but r8, r9 */
        "1:  rdtsc\n"
        "    shlq $32, %rdx\n"
        "    orq %rdx, %rax\n"
        "    movq %rax, %r10\n" /* the spin starts */
        "2:  cmpq %r8, " HL_ASM_STR(HL_BELL_GO) "(%r9)\n"
        "    je 4f\n"
        "    movq " HL_ASM_STR(HL_BELL_SPIN) "(%r9), %r11\n" /* re-read: zero ends the spin */
        "    testq %r11, %r11\n"
        "    jz 3f\n"
        "    rdtsc\n"
        "    shlq $32, %rdx\n"
        "    orq %rdx, %rax\n"
        "    subq %r10, %rax\n"
        "    cmpq %r11, %rax\n"
        "    jae 3f\n"
        "    pause\n"
        "    jmp 2b\n"
        "3:  xorl %eax, %eax\n"
        "    outb %al, $" HL_ASM_STR(HL_PORT_PARKED) "\n" /* until the host resumes it */
        "    jmp 1b\n"
        "4:  xorl %eax, %eax\n"
        "    xorl %edx, %edx\n"
        "    xorl %r10d, %r10d\n"
        "    xorl %r11d, %r11d\n"
        "    movq %rax, " HL_ASM_STR(HL_BELL_PARKED) "(%r9)\n"
        "    movq %rax, " HL_ASM_STR(HL_BELL_GO) "(%r9)\n"
        "    movq " HL_ASM_STR(HL_PEB_ADDR) " + " HL_ASM_STR(HL_PEB_STACK_TOP) ", %rsp\n"
        "    xorl %r8d, %r8d\n"
        "    xorl %r9d, %r9d\n"
        "    call hl_main\n"
        "    ud2\n"
        "    .cfi_endproc\n"
        ".size hl_park, . - hl_park\n"
        ".text\n");

/* The dispatcher. Entered once from _hl_start, which sets up the PEB, heap
 * and ready frame; and from hl_park after each park, with everything it needs
 * in memory (the PEB pointer, the heap, the doorbell). */
__attribute__((noreturn, used)) void hl_main(void) {
    if (!peb) {
        const hl_peb *layout = (const hl_peb *)HL_PEB_ADDR;
        if (layout->magic != HL_MAGIC_PEB || layout->abi_version != HL_ABI_VERSION)
            __builtin_trap();
        peb = layout;
        heap_init(peb->heap_addr, peb->heap_size);
        uint32_t *ready = (uint32_t *)peb->output_addr;
        ready[0] = HL_MAGIC_READY;
        ready[1] = HL_ABI_VERSION;
        ready[2] = (uint32_t)(__hl_functions_end - __hl_functions_start);
        ready[3] = HL_FEATURE_DOORBELL | HL_FEATURE_PARK;
        uint16_t ds, es, fs, gs;
        __asm__ volatile("movw %%ds, %0\n\tmovw %%es, %1\n\tmovw %%fs, %2\n\tmovw %%gs, %3"
                         : "=r"(ds), "=r"(es), "=r"(fs), "=r"(gs));
        uint64_t segments = ds | (uint64_t)es << 16 | (uint64_t)fs << 32 | (uint64_t)gs << 48;
        uint64_t can_set[3] = {hl_probe_xcr0(), hl_probe_fsgsbase(), segments}; /* for the PEB */
        memcpy(&ready[4], can_set, sizeof can_set);
    }
    volatile hl_doorbell *bell = (volatile hl_doorbell *)HL_DOORBELL_ADDR;
    /* The last call handled is done_seq itself, in memory: a host that puts
     * the vCPU back at this loop without resetting memory (after a failed
     * host call) marks the call handled there, so it is never run twice. */
    for (;;) {
        if (bell->spin && bell->req_seq == bell->done_seq) {
            bell->spinning = 1;
            uint64_t start = rdtsc(); /* spin is re-read: the host ends a spin by zeroing it */
            while (bell->req_seq == bell->done_seq && rdtsc() - start < bell->spin)
                __builtin_ia32_pause();
            bell->spinning = 0;
        }
        if (bell->req_seq == bell->done_seq) {
            HL_OUT(HL_PORT_RETURN); /* park until the host posts a call or asks for a spin */
            continue;
        }
        uint64_t seq = bell->req_seq;
        uint64_t park = bell->park; /* the park's token; the host writes it before req_seq */
        __asm__ volatile("" ::: "memory"); /* the call frame is read after its announcement */
        reset_vector_state();
        dispatch();
        __asm__ volatile("" ::: "memory"); /* the result frame is written before ... */
        bell->done_seq = seq;              /* ... it is announced */
        if (park) hl_park(park);
    }
}

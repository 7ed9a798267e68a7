/*
 * hlasync guest SDK.
 *
 * A guest is a freestanding, static x86-64 ELF that runs at CPL3 inside an
 * hlasync micro-VM. It exports functions with HL_EXPORT; the host reads their
 * names and signatures from the ELF section ".hl_functions" and calls them
 * with typed arguments. Guests call back into the host with hl_call_host().
 *
 *     #include <hlasync_guest.h>
 *
 *     int64_t add(int64_t a, int64_t b) { return a + b; }
 *     HL_EXPORT(add, HL_INT, HL_INT, HL_INT);
 *
 * Build: hlasync guest build my.c -o my.elf
 *
 * C types of each hlasync type, as parameter and as return value:
 *   HL_VOID   -                         void
 *   HL_INT    int64_t                   int64_t
 *   HL_FLOAT  double                    double
 *   HL_BOOL   bool                      bool
 *   HL_STR    const char * (NUL-term.)  const char * (NUL-terminated)
 *   HL_BYTES  const uint8_t *, size_t   hl_bytes
 * (HL_BYTES takes two parameters: data and length.) At most six integer-class
 * parameters (a HL_BYTES counts two) and eight HL_FLOAT parameters.
 * String and byte arguments live in the input buffer and stay valid for the
 * whole call; returned strings and bytes are copied out after the function
 * returns, so returning an argument, a static or a heap block is fine.
 */
#ifndef HLASYNC_GUEST_H
#define HLASYNC_GUEST_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- ABI constants (mirrored in hlasync/abi.py; a test keeps them equal) ---- */
#define HL_ABI_VERSION 1
#define HL_IMAGE_BASE 0x100000
#define HL_SCRATCH_ADDR 0x101000 /* 4 KiB writable page at a fixed address */
#define HL_SCRATCH_SIZE 0x1000
#define HL_PEB_ADDR 0xF0000 /* read-only page describing the memory layout */
#define HL_DOORBELL_ADDR 0xF1000 /* the call doorbell, shared with the host (hl_doorbell) */

/* What the guest's ready frame says it can do (its fourth word). */
#define HL_FEATURE_DOORBELL 1u
#define HL_FEATURE_PARK 2u /* parks in hl_park after a call when the doorbell asks */

#define HL_PORT_RETURN 0x10   /* call finished (or initialisation done) */
#define HL_PORT_HOSTCALL 0x11 /* host-call frame in the output buffer */
#define HL_PORT_PRINT 0x12    /* print frame in the output buffer */
#define HL_PORT_ABORT 0x13    /* abort frame in the output buffer */
#define HL_PORT_WAIT 0x14     /* waiting for the answer to a doorbell ask */
#define HL_PORT_PARKED 0x15   /* parked in hl_park, nothing to do until the host says go */

#define HL_MAGIC_PEB 0x31424550484cULL /* "HLPEB1" */
#define HL_MAGIC_READY 0x5944524c      /* "LRDY" */
#define HL_MAGIC_CALL 0x4c4c434c       /* "LCLL" */
#define HL_MAGIC_RESULT 0x5453524c     /* "LRST" */
#define HL_MAGIC_HOSTCALL 0x5453484c   /* "LHST" */
#define HL_MAGIC_PRINT 0x5452504c      /* "LPRT" */
#define HL_MAGIC_ABORT 0x5442414c      /* "LABT" */

#define HL_STATUS_OK 0
#define HL_STATUS_ERROR 1

#define HL_VOID 0
#define HL_INT 1
#define HL_FLOAT 2
#define HL_BOOL 3
#define HL_STR 4
#define HL_BYTES 5

#define HL_MAX_ARGS 8
#define HL_NAME_MAX 39

/* ---- Layout, written by the host at HL_PEB_ADDR before the guest starts ---- */
typedef struct {
    uint64_t magic;
    uint64_t abi_version;
    uint64_t input_addr, input_size;
    uint64_t output_addr, output_size;
    uint64_t heap_addr, heap_size;
    uint64_t stack_top, stack_size;
    uint64_t memory_size;
    uint64_t xsave_mask; /* the XSAVE components hl_park resets (0: none; by the host) */
    uint64_t fsgsbase;   /* 1 where code here may run wrfsbase/wrgsbase (by the host) */
    uint64_t segments;   /* ds, es, fs, gs as initialisation found them, 16 bits each */
} hl_peb;

/* ---- The doorbell page: calls without a VM exit ----
 * The host writes a call frame into the input buffer, then req_seq + 1. The
 * dispatcher runs a call whenever req_seq differs from done_seq (the last call
 * it handled), writes the result frame, then done_seq = req_seq. With spin non-zero it
 * then waits for the next req_seq by spinning up to spin TSC ticks, so that a
 * host thread watching done_seq sees results and posts calls with no exit;
 * otherwise (and when the spin ends) it parks with an exit (HL_PORT_RETURN).
 *
 * Host calls and prints of a call posted this way (spin non-zero: a host
 * thread watches) are asked the same way: the guest writes the frame into the
 * output buffer, the port it would have used into ask_port, then ask_seq + 1,
 * and spins up to answer_spin ticks until answer_seq == ask_seq (the answer is
 * then in the output buffer). When the wait runs out, or the host zeroes spin,
 * it exits at HL_PORT_WAIT; the host answers the ask before it resumes it.
 *
 * Parking (HL_FEATURE_PARK): when park was non-zero as a call was posted, the
 * dispatcher announces the call done and enters hl_park with that value as
 * the park's token (the host picks a new one for every call). hl_park resets everything of the call
 * that registers hold (general registers, flags, data segments, x87/MMX/SSE
 * from a clean image), announces parked = token, and then touches nothing
 * but registers while it waits for go == token, exiting at HL_PORT_PARKED
 * whenever spin is zero or runs out. So the host may put back every page of
 * memory the call changed while the guest waits there, without stopping it:
 * go sends it into hl_main with a fresh stack, zeroed registers and memory
 * as the host left it.
 * Host and guest fields sit on their own cache lines. */
typedef struct {
    uint64_t req_seq;     /* host -> guest: the latest call posted */
    uint64_t spin;        /* host -> guest: TSC ticks to spin for the next call */
    uint64_t answer_seq;  /* host -> guest: the latest ask answered */
    uint64_t answer_spin; /* host -> guest: TSC ticks to spin for an answer */
    uint64_t park;        /* host -> guest: non-zero: park in hl_park after this call, with this token */
    uint64_t go;          /* host -> guest: leave the park whose token this is */
    uint64_t host_reserved[2];
    uint64_t done_seq; /* guest -> host: the latest call finished */
    uint64_t spinning; /* guest -> host: 1 while the dispatcher spins */
    uint64_t ask_seq;  /* guest -> host: the latest host call or print asked */
    uint64_t ask_port; /* guest -> host: HL_PORT_HOSTCALL or HL_PORT_PRINT */
    uint64_t parked;   /* guest -> host: the token of the park hl_park waits in */
    uint64_t guest_reserved[3];
} hl_doorbell;

/* Byte offsets of the words hl_park uses (its code is assembly). */
#define HL_BELL_SPIN 0x08
#define HL_BELL_GO 0x28
#define HL_BELL_PARKED 0x60
#define HL_PEB_STACK_TOP 0x40
#define HL_PEB_XSAVE_MASK 0x58
#define HL_PEB_FSGSBASE 0x60
#define HL_PEB_SEGMENTS 0x68

/* ---- Frames (all little-endian, in the input and output buffers) ---- */
typedef struct {
    uint32_t type;   /* HL_INT, ... */
    uint32_t length; /* bytes of a HL_STR (without NUL) or HL_BYTES value */
    uint64_t value;  /* the value, or the data's offset from the buffer start */
} hl_slot;

typedef struct { /* input buffer: host -> guest */
    uint32_t magic;  /* HL_MAGIC_CALL */
    uint32_t index;  /* position of the function in .hl_functions */
    uint32_t argc;
    uint32_t size;   /* bytes of the whole frame */
    hl_slot args[];
} hl_call_frame;

typedef struct { /* output buffer: result of a call, or of a host call */
    uint32_t magic;  /* HL_MAGIC_RESULT */
    uint32_t status; /* HL_STATUS_OK, or HL_STATUS_ERROR with a message */
    uint32_t type;
    uint32_t length; /* payload bytes */
    uint64_t value;
    /* payload follows (HL_STR without NUL, HL_BYTES, or error text) */
} hl_result_frame;

typedef struct { /* output buffer: guest -> host call */
    uint32_t magic;  /* HL_MAGIC_HOSTCALL */
    uint32_t name_length;
    uint32_t argc;
    uint32_t size;
    /* argc hl_slot, then the name, then argument data */
} hl_hostcall_frame;

typedef struct { /* output buffer: debug print and abort */
    uint32_t magic;  /* HL_MAGIC_PRINT or HL_MAGIC_ABORT */
    uint32_t length; /* message bytes */
    int64_t code;    /* abort code (0 for print) */
    /* message follows */
} hl_message_frame;

/* ---- Exporting functions ---- */
typedef struct {
    char name[HL_NAME_MAX + 1];
    uint8_t ret;
    uint8_t argc;
    uint8_t args[HL_MAX_ARGS];
    uint8_t reserved[6];
    const void *fn;
} hl_function_record;

_Static_assert(sizeof(hl_function_record) == 64, "hl_function_record is 64 bytes");

typedef struct {
    const void *data;
    uint64_t length;
} hl_bytes;

#define HL_EXPORT(fn, ret, ...)                                                              \
    _Static_assert(sizeof(#fn) <= HL_NAME_MAX + 1, "hlasync: function name too long");       \
    _Static_assert(sizeof((uint8_t[]){0, ##__VA_ARGS__}) <= HL_MAX_ARGS + 1,                 \
                   "hlasync: too many parameters");                                         \
    __attribute__((used, section(".hl_functions"), aligned(8)))                             \
    static const hl_function_record hl_record_##fn = {                                       \
        #fn, (ret), sizeof((uint8_t[]){0, ##__VA_ARGS__}) - 1, {__VA_ARGS__}, {0}, (const void *)(fn)}

/* ---- Talking to the host ---- */
typedef struct {
    uint32_t type;
    uint64_t length;
    union {
        int64_t i;
        double f;
        bool b;
        const char *s;      /* valid until the next host call, print or return */
        const uint8_t *data;
    };
} hl_value;

/*
 * Call a registered host function. fmt has one letter per argument:
 *   i int64_t, f double, b bool (int), s const char *, y const uint8_t * + size_t
 * e.g. hl_call_host("double", "i", (int64_t)21). If the host function raises,
 * the call does not return: the host unwinds the guest and fails the call.
 */
hl_value hl_call_host(const char *name, const char *fmt, ...);
hl_value hl_call_host_v(const char *name, const char *fmt, va_list ap);
int64_t hl_call_host_int(const char *name, const char *fmt, ...);

void hl_print(const char *text);
void hl_write(const void *data, size_t length);
int hl_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int hl_snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int hl_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
__attribute__((noreturn)) void hl_abort(int64_t code, const char *message);

const hl_peb *hl_peb_get(void);

/* ---- Heap ---- */
void *malloc(size_t size);
void *calloc(size_t count, size_t size);
void *realloc(void *ptr, size_t size);
void free(void *ptr);
size_t malloc_usable_size(void *ptr); /* bytes the block can hold, at least as asked */

/* ---- mem* / str* ---- */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strcpy(char *dst, const char *src);
char *strncpy(char *dst, const char *src, size_t n);
char *strchr(const char *s, int c);

#ifdef __cplusplus
}
#endif

#endif /* HLASYNC_GUEST_H */

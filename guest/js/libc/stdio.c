/*
 * stdout and stderr for musl's stdio (vfprintf, fwrite, fputs... are musl's,
 * compiled from the pinned sources): two unbuffered FILEs whose bytes go to
 * the host with hl_write. Unbuffered, so nothing printed is left behind in the
 * guest when a call returns; musl's vfprintf still gathers each printf into
 * one write through its own small buffer.
 */
#include <hlasync_guest.h>

#include "stdio_impl.h" /* musl's FILE layout */

static size_t write_to_host(FILE *f, const unsigned char *data, size_t length) {
    size_t pending = (size_t)(f->wpos - f->wbase);
    if (pending) hl_write(f->wbase, pending);
    if (length) hl_write(data, length);
    f->wend = f->buf + f->buf_size;
    f->wpos = f->wbase = f->buf;
    return length;
}

static unsigned char stdout_unget[UNGET], stderr_unget[UNGET];

hidden FILE __stdout_FILE = {
    .buf = stdout_unget + UNGET,
    .buf_size = 0,
    .fd = 1,
    .flags = F_PERM | F_NORD,
    .lbf = EOF,
    .write = write_to_host,
    .lock = -1, /* one thread: never lock */
};
hidden FILE __stderr_FILE = {
    .buf = stderr_unget + UNGET,
    .buf_size = 0,
    .fd = 2,
    .flags = F_PERM | F_NORD,
    .lbf = EOF,
    .write = write_to_host,
    .lock = -1,
};
#undef stdout /* musl's internal stdio.h makes them macros */
#undef stderr
FILE *const stdout = &__stdout_FILE;
FILE *const stderr = &__stderr_FILE;

/* Referenced by musl's stdio; with lock = -1 they are never called. */
int __lockfile(FILE *f) {
    (void)f;
    return 0;
}
void __unlockfile(FILE *f) { (void)f; }

int fflush(FILE *f) {
    (void)f; /* nothing is ever buffered */
    return 0;
}

int fputc(int c, FILE *f) {
    unsigned char byte = (unsigned char)c;
    return fwrite(&byte, 1, 1, f) == 1 ? byte : EOF;
}

int putc(int c, FILE *f) { return fputc(c, f); }

int putchar(int c) { return fputc(c, stdout); }

int puts(const char *s) {
    size_t length = strlen(s);
    if (fwrite(s, 1, length, stdout) != length || fputc('\n', stdout) == EOF) return EOF;
    return 0;
}

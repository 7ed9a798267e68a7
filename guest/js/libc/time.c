/*
 * Clocks for the guest's libc. The guest has no clock of its own: the time
 * comes from the host through the host call `__hl_clock`, which takes no
 * arguments and returns the seconds since the Unix epoch as a float (an int
 * is accepted too). Every clock_gettime, gettimeofday and time() is one host
 * call. The monotonic clocks are the same time, never allowed to go back.
 * There are no time zones: local time is UTC.
 */
#include <errno.h>
#include <hlasync_guest.h>
#include <sys/time.h>
#include <time.h>

int __secs_to_tm(long long t, struct tm *tm); /* musl's calendar arithmetic */

static double host_seconds(void) {
    hl_value v = hl_call_host("__hl_clock", "");
    if (v.type == HL_FLOAT) return v.f;
    if (v.type == HL_INT) return (double)v.i;
    hl_abort(-3, "__hl_clock: the host function must return seconds since the epoch as a float");
}

static void split(double seconds, struct timespec *ts) {
    double whole = __builtin_floor(seconds);
    long nanoseconds = (long)((seconds - whole) * 1e9);
    if (nanoseconds > 999999999) nanoseconds = 999999999;
    ts->tv_sec = (time_t)whole;
    ts->tv_nsec = nanoseconds;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    static double monotonic_last;
    double now;
    switch (clock) {
    case CLOCK_REALTIME:
    case CLOCK_REALTIME_COARSE:
        now = host_seconds();
        break;
    case CLOCK_MONOTONIC:
    case CLOCK_MONOTONIC_RAW:
    case CLOCK_MONOTONIC_COARSE:
    case CLOCK_BOOTTIME:
        now = host_seconds();
        if (now < monotonic_last) now = monotonic_last;
        monotonic_last = now;
        break;
    default:
        errno = EINVAL;
        return -1;
    }
    split(now, ts);
    return 0;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    (void)tz;
    if (!tv) return 0;
    struct timespec ts;
    split(host_seconds(), &ts);
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = (suseconds_t)(ts.tv_nsec / 1000);
    return 0;
}

time_t time(time_t *t) {
    struct timespec ts;
    split(host_seconds(), &ts);
    if (t) *t = ts.tv_sec;
    return ts.tv_sec;
}

struct tm *gmtime_r(const time_t *restrict t, struct tm *restrict tm) {
    if (__secs_to_tm(*t, tm) < 0) {
        errno = EOVERFLOW;
        return 0;
    }
    tm->tm_isdst = 0;
    tm->__tm_gmtoff = 0;
    tm->__tm_zone = "UTC";
    return tm;
}

struct tm *localtime_r(const time_t *restrict t, struct tm *restrict tm) { return gmtime_r(t, tm); }

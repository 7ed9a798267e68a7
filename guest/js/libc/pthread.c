/*
 * pthreads for a guest with one thread: QuickJS guards shared state with
 * mutexes, condition variables and pthread_once. Locks cannot be contended,
 * so they do nothing; a wait without a timeout could never end, so it aborts
 * the guest instead of hanging (the embedder should make Atomics.wait throw:
 * JS_SetCanBlock(rt, false)).
 */
#include <errno.h>
#include <hlasync_guest.h>
#include <pthread.h>

int pthread_once(pthread_once_t *once, void (*init)(void)) {
    if (!*once) {
        *once = 1;
        init();
    }
    return 0;
}

int pthread_mutex_init(pthread_mutex_t *restrict m, const pthread_mutexattr_t *restrict a) {
    (void)m, (void)a;
    return 0;
}
int pthread_mutex_destroy(pthread_mutex_t *m) { return (void)m, 0; }
int pthread_mutex_lock(pthread_mutex_t *m) { return (void)m, 0; }
int pthread_mutex_trylock(pthread_mutex_t *m) { return (void)m, 0; }
int pthread_mutex_unlock(pthread_mutex_t *m) { return (void)m, 0; }

int pthread_condattr_init(pthread_condattr_t *a) { return (void)a, 0; }
int pthread_condattr_destroy(pthread_condattr_t *a) { return (void)a, 0; }
int pthread_condattr_setclock(pthread_condattr_t *a, clockid_t clock) {
    (void)a, (void)clock;
    return 0;
}

int pthread_cond_init(pthread_cond_t *restrict c, const pthread_condattr_t *restrict a) {
    (void)c, (void)a;
    return 0;
}
int pthread_cond_destroy(pthread_cond_t *c) { return (void)c, 0; }
int pthread_cond_signal(pthread_cond_t *c) { return (void)c, 0; }
int pthread_cond_broadcast(pthread_cond_t *c) { return (void)c, 0; }

int pthread_cond_wait(pthread_cond_t *restrict c, pthread_mutex_t *restrict m) {
    (void)c, (void)m;
    hl_abort(-4, "pthread_cond_wait: the guest has one thread, nothing could ever wake it");
}

int pthread_cond_timedwait(pthread_cond_t *restrict c, pthread_mutex_t *restrict m,
                           const struct timespec *restrict until) {
    (void)c, (void)m, (void)until;
    return ETIMEDOUT; /* nobody else can signal: the time is as good as up */
}

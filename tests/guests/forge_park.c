/* A guest that forges its park (the hot-restore tests): its functions answer
 * their own call and say they parked without parking, to check that the host
 * stays bounded and that memory is still put back. Only C writes to the
 * user-writable doorbell and calls of the runtime's hl_park. */
#include <hlasync_guest.h>

void hl_park(uint64_t token); /* the SDK runtime's (a global symbol) */

/* Pages of their own, written only here (never "hot"). */
static volatile uint64_t victim[512] __attribute__((aligned(4096)));
static volatile uint64_t victims[64][512] __attribute__((aligned(4096)));

/* Writes a void result frame and announces call `seq` done. */
static void answer_void(volatile hl_doorbell *bell, uint64_t seq) {
    hl_result_frame *r = (hl_result_frame *)hl_peb_get()->output_addr;
    r->magic = HL_MAGIC_RESULT;
    r->status = HL_STATUS_OK;
    r->type = HL_VOID;
    r->length = 0;
    r->value = 0;
    __asm__ volatile("" ::: "memory");
    bell->done_seq = seq;
}

int64_t add(int64_t a, int64_t b) { return a + b; }
HL_EXPORT(add, HL_INT, HL_INT, HL_INT);

/* Answers its call, says parked with the call's token and keeps running: it
 * writes each of 64 pages again as soon as the host's in-place restore has
 * put it back, then parks for real. `pages` heap pages written first make
 * the host's copy longer. */
void plant_racing_many(int64_t value, int64_t pages) {
    volatile hl_doorbell *bell = (volatile hl_doorbell *)HL_DOORBELL_ADDR;
    uint64_t token = bell->park, seq = bell->req_seq;
    volatile uint8_t *heap = (volatile uint8_t *)hl_peb_get()->heap_addr;
    for (int64_t i = 0; i < pages; i++) heap[i * 4096] = 1;
    for (int i = 0; i < 64; i++) victims[i][0] = (uint64_t)value;
    answer_void(bell, seq);
    bell->parked = token;
    uint64_t left = ~0ULL, start = __builtin_ia32_rdtsc();
    while (left && __builtin_ia32_rdtsc() - start < 20000000000ULL) {
        for (int i = 0; i < 64; i++)
            if ((left >> i & 1) && victims[i][0] != (uint64_t)value) {
                victims[i][0] = (uint64_t)value;
                left &= ~(1ULL << i);
            }
    }
    hl_park(token);
}
HL_EXPORT(plant_racing_many, HL_VOID, HL_INT, HL_INT);

/* How many of the 64 pages hold `value`. */
int64_t count_victims(int64_t value) {
    int64_t n = 0;
    for (int i = 0; i < 64; i++) n += victims[i][0] == (uint64_t)value;
    return n;
}
HL_EXPORT(count_victims, HL_INT, HL_INT);

/* Answers its call, says parked, and writes memory only once the next call
 * lets it go (after the host's restore): that call can read it. */
void plant_after_go(int64_t value) {
    volatile hl_doorbell *bell = (volatile hl_doorbell *)HL_DOORBELL_ADDR;
    uint64_t token = bell->park, seq = bell->req_seq;
    answer_void(bell, seq);
    bell->parked = token;
    while (bell->go != token) __builtin_ia32_pause();
    victim[1] = (uint64_t)value;
    hl_park(token); /* go == token already: straight into hl_main and the call */
}
HL_EXPORT(plant_after_go, HL_VOID, HL_INT);

int64_t read_victim(int64_t i) { return (int64_t)victim[i & 511]; }
HL_EXPORT(read_victim, HL_INT, HL_INT);

/* Answers its call and spins for ever without ever saying parked. */
void answer_and_spin(void) {
    volatile hl_doorbell *bell = (volatile hl_doorbell *)HL_DOORBELL_ADDR;
    answer_void(bell, bell->req_seq);
    for (;;) __builtin_ia32_pause();
}
HL_EXPORT(answer_and_spin, HL_VOID);

/*
 * SHA-256, SHA-384, SHA-512 as FIPS 180-4 defines them (sections 4.1.2,
 * 4.1.3, 5.1, 6.2 and 6.4), HMAC as RFC 2104 defines it.
 *
 * The constants are the spec's: K256 the first 32 bits of the fractional
 * parts of the cube roots of the first 64 primes (4.2.2), K512 the first 64
 * bits of those of the first 80 primes (4.2.3), H256 and H512 the first 32
 * or 64 bits of the fractional parts of the square roots of the first 8
 * primes (5.3.3, 5.3.5), H384 those of the 9th to 16th primes (5.3.4).
 * They were computed with integer arithmetic from those definitions; the
 * tests check every algorithm against Python's hashlib and hmac.
 */
#include "sha2.h"

#include <string.h>

static const uint32_t K256[64] = {
    0x428a2f98U, 0x71374491U, 0xb5c0fbcfU, 0xe9b5dba5U, 0x3956c25bU, 0x59f111f1U,
    0x923f82a4U, 0xab1c5ed5U, 0xd807aa98U, 0x12835b01U, 0x243185beU, 0x550c7dc3U,
    0x72be5d74U, 0x80deb1feU, 0x9bdc06a7U, 0xc19bf174U, 0xe49b69c1U, 0xefbe4786U,
    0x0fc19dc6U, 0x240ca1ccU, 0x2de92c6fU, 0x4a7484aaU, 0x5cb0a9dcU, 0x76f988daU,
    0x983e5152U, 0xa831c66dU, 0xb00327c8U, 0xbf597fc7U, 0xc6e00bf3U, 0xd5a79147U,
    0x06ca6351U, 0x14292967U, 0x27b70a85U, 0x2e1b2138U, 0x4d2c6dfcU, 0x53380d13U,
    0x650a7354U, 0x766a0abbU, 0x81c2c92eU, 0x92722c85U, 0xa2bfe8a1U, 0xa81a664bU,
    0xc24b8b70U, 0xc76c51a3U, 0xd192e819U, 0xd6990624U, 0xf40e3585U, 0x106aa070U,
    0x19a4c116U, 0x1e376c08U, 0x2748774cU, 0x34b0bcb5U, 0x391c0cb3U, 0x4ed8aa4aU,
    0x5b9cca4fU, 0x682e6ff3U, 0x748f82eeU, 0x78a5636fU, 0x84c87814U, 0x8cc70208U,
    0x90befffaU, 0xa4506cebU, 0xbef9a3f7U, 0xc67178f2U,
};

static const uint32_t H256[8] = {
    0x6a09e667U, 0xbb67ae85U, 0x3c6ef372U, 0xa54ff53aU,
    0x510e527fU, 0x9b05688cU, 0x1f83d9abU, 0x5be0cd19U,
};

static const uint64_t K512[80] = {
    0x428a2f98d728ae22ULL, 0x7137449123ef65cdULL, 0xb5c0fbcfec4d3b2fULL, 0xe9b5dba58189dbbcULL,
    0x3956c25bf348b538ULL, 0x59f111f1b605d019ULL, 0x923f82a4af194f9bULL, 0xab1c5ed5da6d8118ULL,
    0xd807aa98a3030242ULL, 0x12835b0145706fbeULL, 0x243185be4ee4b28cULL, 0x550c7dc3d5ffb4e2ULL,
    0x72be5d74f27b896fULL, 0x80deb1fe3b1696b1ULL, 0x9bdc06a725c71235ULL, 0xc19bf174cf692694ULL,
    0xe49b69c19ef14ad2ULL, 0xefbe4786384f25e3ULL, 0x0fc19dc68b8cd5b5ULL, 0x240ca1cc77ac9c65ULL,
    0x2de92c6f592b0275ULL, 0x4a7484aa6ea6e483ULL, 0x5cb0a9dcbd41fbd4ULL, 0x76f988da831153b5ULL,
    0x983e5152ee66dfabULL, 0xa831c66d2db43210ULL, 0xb00327c898fb213fULL, 0xbf597fc7beef0ee4ULL,
    0xc6e00bf33da88fc2ULL, 0xd5a79147930aa725ULL, 0x06ca6351e003826fULL, 0x142929670a0e6e70ULL,
    0x27b70a8546d22ffcULL, 0x2e1b21385c26c926ULL, 0x4d2c6dfc5ac42aedULL, 0x53380d139d95b3dfULL,
    0x650a73548baf63deULL, 0x766a0abb3c77b2a8ULL, 0x81c2c92e47edaee6ULL, 0x92722c851482353bULL,
    0xa2bfe8a14cf10364ULL, 0xa81a664bbc423001ULL, 0xc24b8b70d0f89791ULL, 0xc76c51a30654be30ULL,
    0xd192e819d6ef5218ULL, 0xd69906245565a910ULL, 0xf40e35855771202aULL, 0x106aa07032bbd1b8ULL,
    0x19a4c116b8d2d0c8ULL, 0x1e376c085141ab53ULL, 0x2748774cdf8eeb99ULL, 0x34b0bcb5e19b48a8ULL,
    0x391c0cb3c5c95a63ULL, 0x4ed8aa4ae3418acbULL, 0x5b9cca4f7763e373ULL, 0x682e6ff3d6b2b8a3ULL,
    0x748f82ee5defb2fcULL, 0x78a5636f43172f60ULL, 0x84c87814a1f0ab72ULL, 0x8cc702081a6439ecULL,
    0x90befffa23631e28ULL, 0xa4506cebde82bde9ULL, 0xbef9a3f7b2c67915ULL, 0xc67178f2e372532bULL,
    0xca273eceea26619cULL, 0xd186b8c721c0c207ULL, 0xeada7dd6cde0eb1eULL, 0xf57d4f7fee6ed178ULL,
    0x06f067aa72176fbaULL, 0x0a637dc5a2c898a6ULL, 0x113f9804bef90daeULL, 0x1b710b35131c471bULL,
    0x28db77f523047d84ULL, 0x32caab7b40c72493ULL, 0x3c9ebe0a15c9bebcULL, 0x431d67c49c100d4cULL,
    0x4cc5d4becb3e42b6ULL, 0x597f299cfc657e2aULL, 0x5fcb6fab3ad6faecULL, 0x6c44198c4a475817ULL,
};

static const uint64_t H384[8] = {
    0xcbbb9d5dc1059ed8ULL, 0x629a292a367cd507ULL, 0x9159015a3070dd17ULL, 0x152fecd8f70e5939ULL,
    0x67332667ffc00b31ULL, 0x8eb44a8768581511ULL, 0xdb0c2e0d64f98fa7ULL, 0x47b5481dbefa4fa4ULL,
};

static const uint64_t H512[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static inline uint32_t rotr32(uint32_t x, unsigned n) { return (x >> n) | (x << (32 - n)); }
static inline uint64_t rotr64(uint64_t x, unsigned n) { return (x >> n) | (x << (64 - n)); }

static inline uint32_t load32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t load64(const uint8_t *p) {
    return (uint64_t)load32(p) << 32 | load32(p + 4);
}

static inline void store32(uint8_t *p, uint32_t x) {
    p[0] = (uint8_t)(x >> 24), p[1] = (uint8_t)(x >> 16), p[2] = (uint8_t)(x >> 8), p[3] = (uint8_t)x;
}

static inline void store64(uint8_t *p, uint64_t x) {
    store32(p, (uint32_t)(x >> 32));
    store32(p + 4, (uint32_t)x);
}

/* Ch, Maj and the four sigma functions of 4.1.2 and 4.1.3. */
#define CH(x, y, z) (((x) & (y)) ^ (~(x) & (z)))
#define MAJ(x, y, z) (((x) & (y)) ^ ((x) & (z)) ^ ((y) & (z)))

/* 6.2.2: one 512-bit block into the SHA-256 state. */
static void compress256(uint32_t h[8], const uint8_t block[64]) {
    uint32_t w[64];
    for (int t = 0; t < 16; t++) w[t] = load32(block + 4 * t);
    for (int t = 16; t < 64; t++) {
        uint32_t s0 = rotr32(w[t - 15], 7) ^ rotr32(w[t - 15], 18) ^ (w[t - 15] >> 3);
        uint32_t s1 = rotr32(w[t - 2], 17) ^ rotr32(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = s1 + w[t - 7] + s0 + w[t - 16];
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int t = 0; t < 64; t++) {
        uint32_t t1 = k + (rotr32(e, 6) ^ rotr32(e, 11) ^ rotr32(e, 25)) + CH(e, f, g) + K256[t] + w[t];
        uint32_t t2 = (rotr32(a, 2) ^ rotr32(a, 13) ^ rotr32(a, 22)) + MAJ(a, b, c);
        k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

/* 6.4.2: one 1024-bit block into the SHA-512 (or SHA-384) state. */
static void compress512(uint64_t h[8], const uint8_t block[128]) {
    uint64_t w[80];
    for (int t = 0; t < 16; t++) w[t] = load64(block + 8 * t);
    for (int t = 16; t < 80; t++) {
        uint64_t s0 = rotr64(w[t - 15], 1) ^ rotr64(w[t - 15], 8) ^ (w[t - 15] >> 7);
        uint64_t s1 = rotr64(w[t - 2], 19) ^ rotr64(w[t - 2], 61) ^ (w[t - 2] >> 6);
        w[t] = s1 + w[t - 7] + s0 + w[t - 16];
    }
    uint64_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int t = 0; t < 80; t++) {
        uint64_t t1 = k + (rotr64(e, 14) ^ rotr64(e, 18) ^ rotr64(e, 41)) + CH(e, f, g) + K512[t] + w[t];
        uint64_t t2 = (rotr64(a, 28) ^ rotr64(a, 34) ^ rotr64(a, 39)) + MAJ(a, b, c);
        k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

size_t sha2_digest_size(sha2_kind kind) {
    return kind == SHA2_256 ? 32 : kind == SHA2_384 ? 48 : 64;
}

size_t sha2_block_size(sha2_kind kind) { return kind == SHA2_256 ? 64 : 128; }

void sha2_init(sha2_ctx *ctx, sha2_kind kind) {
    memset(ctx, 0, sizeof *ctx);
    ctx->kind = kind;
    if (kind == SHA2_256)
        memcpy(ctx->h.w32, H256, sizeof H256);
    else
        memcpy(ctx->h.w64, kind == SHA2_384 ? H384 : H512, sizeof H512);
}

static void compress(sha2_ctx *ctx, const uint8_t *block) {
    if (ctx->kind == SHA2_256)
        compress256(ctx->h.w32, block);
    else
        compress512(ctx->h.w64, block);
}

void sha2_update(sha2_ctx *ctx, const uint8_t *data, size_t length) {
    size_t size = sha2_block_size(ctx->kind);
    ctx->length += length;
    if (ctx->used) {
        size_t take = size - ctx->used < length ? size - ctx->used : length;
        memcpy(ctx->block + ctx->used, data, take);
        ctx->used += take, data += take, length -= take;
        if (ctx->used < size) return;
        compress(ctx, ctx->block);
        ctx->used = 0;
    }
    for (; length >= size; data += size, length -= size) compress(ctx, data);
    memcpy(ctx->block, data, length);
    ctx->used = length;
}

/* 5.1.1 and 5.1.2: a 1 bit, zeros, and the message's length in bits as a 64-bit
 * (SHA-256) or 128-bit (SHA-384/512) big-endian number ending the last block. */
void sha2_final(sha2_ctx *ctx, uint8_t *digest) {
    size_t size = sha2_block_size(ctx->kind);
    size_t length_field = ctx->kind == SHA2_256 ? 8 : 16;
    uint64_t bits_high = ctx->length >> 61, bits_low = ctx->length << 3;
    ctx->block[ctx->used++] = 0x80;
    if (ctx->used > size - length_field) {
        memset(ctx->block + ctx->used, 0, size - ctx->used);
        compress(ctx, ctx->block);
        ctx->used = 0;
    }
    memset(ctx->block + ctx->used, 0, size - ctx->used);
    store64(ctx->block + size - 8, bits_low);
    if (length_field == 16) store64(ctx->block + size - 16, bits_high);
    compress(ctx, ctx->block);
    if (ctx->kind == SHA2_256) {
        for (int i = 0; i < 8; i++) store32(digest + 4 * i, ctx->h.w32[i]);
    } else {
        uint8_t full[64];
        for (int i = 0; i < 8; i++) store64(full + 8 * i, ctx->h.w64[i]);
        memcpy(digest, full, sha2_digest_size(ctx->kind)); /* SHA-384: the leftmost 384 bits */
    }
}

/* RFC 2104 section 2: a key longer than the block is hashed first; the key,
 * padded with zeros to a block, XORed with ipad (0x36) starts the inner hash
 * and with opad (0x5c) the outer one. */
void hmac_init(hmac_ctx *ctx, sha2_kind kind, const uint8_t *key, size_t key_length) {
    size_t size = sha2_block_size(kind);
    uint8_t padded[SHA2_MAX_BLOCK] = {0};
    if (key_length > size) {
        sha2_init(&ctx->inner, kind);
        sha2_update(&ctx->inner, key, key_length);
        sha2_final(&ctx->inner, padded);
    } else if (key_length) {
        memcpy(padded, key, key_length);
    }
    uint8_t pad[SHA2_MAX_BLOCK];
    for (size_t i = 0; i < size; i++) pad[i] = padded[i] ^ 0x36;
    sha2_init(&ctx->inner_start, kind);
    sha2_update(&ctx->inner_start, pad, size);
    for (size_t i = 0; i < size; i++) pad[i] = padded[i] ^ 0x5c;
    sha2_init(&ctx->outer_start, kind);
    sha2_update(&ctx->outer_start, pad, size);
    ctx->inner = ctx->inner_start;
    memset(padded, 0, sizeof padded);
    memset(pad, 0, sizeof pad);
}

void hmac_update(hmac_ctx *ctx, const uint8_t *data, size_t length) {
    sha2_update(&ctx->inner, data, length);
}

void hmac_final(hmac_ctx *ctx, uint8_t *mac) {
    uint8_t inner[SHA2_MAX_DIGEST];
    sha2_final(&ctx->inner, inner);
    sha2_ctx outer = ctx->outer_start;
    sha2_update(&outer, inner, sha2_digest_size(outer.kind));
    sha2_final(&outer, mac);
    ctx->inner = ctx->inner_start;
}

/*
 * SHA-256, SHA-384 and SHA-512 (FIPS 180-4) and HMAC over them (RFC 2104),
 * for the `crypto` built-in module of the JavaScript runtime (builtins.c).
 * Plain C with no allocation: the state lives in the caller's structs.
 */
#ifndef HL_JS_SHA2_H
#define HL_JS_SHA2_H

#include <stddef.h>
#include <stdint.h>

typedef enum { SHA2_256, SHA2_384, SHA2_512 } sha2_kind;

#define SHA2_MAX_DIGEST 64 /* SHA-512's */
#define SHA2_MAX_BLOCK 128 /* SHA-384's and SHA-512's */

typedef struct {
    sha2_kind kind;
    union {
        uint32_t w32[8]; /* SHA-256 */
        uint64_t w64[8]; /* SHA-384, SHA-512 */
    } h;
    uint64_t length;                /* bytes hashed so far */
    uint8_t block[SHA2_MAX_BLOCK];  /* the block being filled */
    size_t used;                    /* bytes of it */
} sha2_ctx;

size_t sha2_digest_size(sha2_kind kind);
size_t sha2_block_size(sha2_kind kind);
void sha2_init(sha2_ctx *ctx, sha2_kind kind);
void sha2_update(sha2_ctx *ctx, const uint8_t *data, size_t length);
/* Writes sha2_digest_size() bytes; `ctx` must be initialised again before reuse. */
void sha2_final(sha2_ctx *ctx, uint8_t *digest);

/* HMAC (RFC 2104): the hash states after the key's inner and outer pads are
 * kept, so that a MAC is finished and the next one started without the key. */
typedef struct {
    sha2_ctx inner;       /* the message so far */
    sha2_ctx inner_start; /* after (K ^ ipad): where every message starts */
    sha2_ctx outer_start; /* after (K ^ opad) */
} hmac_ctx;

void hmac_init(hmac_ctx *ctx, sha2_kind kind, const uint8_t *key, size_t key_length);
void hmac_update(hmac_ctx *ctx, const uint8_t *data, size_t length);
/* Writes sha2_digest_size() bytes and starts a new message with the same key. */
void hmac_final(hmac_ctx *ctx, uint8_t *mac);

#endif

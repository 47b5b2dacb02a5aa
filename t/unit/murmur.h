/*
 * Copyright (C) ngx_infer authors
 *
 * nginx's ngx_murmur_hash2 (src/core/ngx_murmurhash.c), which the signals
 * parser calls and which only the nginx binary has, for the programs in
 * t/unit that link the parser alone: MurmurHash2, 32 bits, seed 0.
 * Include it once per program, after ngx_core.h.
 */


#ifndef _NGX_INFER_UNIT_MURMUR_H_INCLUDED_
#define _NGX_INFER_UNIT_MURMUR_H_INCLUDED_


uint32_t
ngx_murmur_hash2(u_char *data, size_t len)
{
    uint32_t  h, k;

    h = (uint32_t) len;

    for ( /* void */ ; len >= 4; data += 4, len -= 4) {
        k = (uint32_t) data[0] | (uint32_t) data[1] << 8
            | (uint32_t) data[2] << 16 | (uint32_t) data[3] << 24;

        k *= 0x5bd1e995;
        k ^= k >> 24;
        k *= 0x5bd1e995;

        h = h * 0x5bd1e995 ^ k;
    }

    if (len) {
        if (len == 3) {
            h ^= (uint32_t) data[2] << 16;
        }

        if (len >= 2) {
            h ^= (uint32_t) data[1] << 8;
        }

        h ^= data[0];
        h *= 0x5bd1e995;
    }

    h ^= h >> 13;
    h *= 0x5bd1e995;
    h ^= h >> 15;

    return h;
}


#endif /* _NGX_INFER_UNIT_MURMUR_H_INCLUDED_ */

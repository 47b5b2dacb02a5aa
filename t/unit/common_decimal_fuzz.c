/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for ngx_infer_common/ngx_http_infer_decimal.h: the
 * amounts of money of prices, costs and budgets.
 *
 * The first byte picks the scale (0 to 18), the rest is the text.  The
 * verdict and the value are compared with an oracle written another way
 * (split at the point, each part read in 128 bits); every amount read is
 * written back and read again to itself; and the cost of the first bytes
 * taken as a count and a price is compared with the same product in 128
 * bits.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ngx_http_infer_decimal.h"
#include "unit.h"


static int64_t oracle(const unsigned char *p, size_t len, unsigned scale);


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char     *p, buf[NGX_HTTP_INFER_DECIMAL_LEN + 8], *end;
    int64_t     v, w;
    uint64_t    tokens, price;
    unsigned    scale;

    if (size == 0) {
        return 0;
    }

    scale = data[0] % 19;
    size--;

    p = malloc(size ? size : 1);
    if (p == NULL) {
        return 0;
    }

    memcpy(p, data + 1, size);

    v = ngx_http_infer_decimal_parse(p, size, scale);

    if (getenv("FUZZ_VERBOSE")) {
        fprintf(stderr, "scale=%u v=%lld oracle=%lld\n", scale,
                (long long) v, (long long) oracle(p, size, scale));
    }

    check(v == oracle(p, size, scale));

    if (v >= 0) {
        end = ngx_http_infer_decimal_print(buf, (uint64_t) v, scale);
        check((size_t) (end - buf) <= NGX_HTTP_INFER_DECIMAL_LEN);

        w = ngx_http_infer_decimal_parse(buf, end - buf, scale);
        check(w == v);

        /* written without a trailing zero after the point */
        check(memchr(buf, '.', end - buf) == NULL || end[-1] != '0');
    }

    if (size >= 12) {
        memcpy(&tokens, p, 4);
        tokens &= 0x7fffffff;
        memcpy(&price, p + 4, 8);
        price %= 1000000000001ULL;      /* the most a price may be */

        check(ngx_http_infer_decimal_cost(tokens, price)
              == (uint64_t) (((unsigned __int128) tokens * price) / 1000));
    }

    free(p);

    return 0;
}


static int64_t
oracle(const unsigned char *p, size_t len, unsigned scale)
{
    size_t              i, dot, ndot, nint, nfrac;
    unsigned __int128   v;

    ndot = 0;
    dot = len;

    for (i = 0; i < len; i++) {
        if (p[i] == '.') {
            ndot++;
            dot = i;

        } else if (p[i] < '0' || p[i] > '9') {
            return -1;
        }
    }

    if (ndot > 1) {
        return -1;
    }

    nint = dot;
    nfrac = (dot == len) ? 0 : len - dot - 1;

    if (nint + nfrac == 0 || nfrac > scale) {
        return -1;
    }

    v = 0;

    for (i = 0; i < nint; i++) {
        v = v * 10 + (p[i] - '0');

        if (v > ((unsigned __int128) 1 << 60)) {
            return -1;
        }
    }

    for (i = 0; i < scale; i++) {
        v = v * 10 + ((i < nfrac) ? (p[dot + 1 + i] - '0') : 0);

        if (v > ((unsigned __int128) 1 << 120)) {
            return -1;
        }
    }

    return (v > NGX_HTTP_INFER_DECIMAL_MAX) ? -1 : (int64_t) v;
}

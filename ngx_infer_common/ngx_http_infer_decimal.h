
/*
 * Copyright (C) ngx_infer authors
 *
 * Amounts of money as exact integers: a decimal text ("0.15", "50",
 * "0.000125") read into units of 10^-scale (prices per million tokens in
 * micro-dollars, scale 6; costs and budgets in nano-dollars, scale 9),
 * and written back with the zeros after the point left out.  Pure: no
 * nginx state, fuzzed by t/unit/common_decimal_fuzz.c.  Static inline
 * only, as everything in ngx_infer_common.
 */


#ifndef _NGX_HTTP_INFER_DECIMAL_H_INCLUDED_
#define _NGX_HTTP_INFER_DECIMAL_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


/* the largest amount: 2^53 units, exact in Redis's Lua numbers too */
#define NGX_HTTP_INFER_DECIMAL_MAX  9007199254740992LL

/* the longest text decimal_print() writes */
#define NGX_HTTP_INFER_DECIMAL_LEN  (NGX_INT64_LEN + 2)


/*
 * "123", "123.", "0.5", ".5": digits with at most scale of them after the
 * point; -1 for anything else, or an amount over the largest.
 */

static ngx_inline int64_t
ngx_http_infer_decimal_parse(u_char *p, size_t len, ngx_uint_t scale)
{
    u_char      *last;
    int64_t      v;
    ngx_uint_t   digits, frac, point;

    last = p + len;
    v = 0;
    digits = 0;
    frac = 0;
    point = 0;

    for ( /* void */ ; p < last; p++) {

        if (*p == '.' && !point) {
            point = 1;
            continue;
        }

        if (*p < '0' || *p > '9') {
            return -1;
        }

        if (point && ++frac > scale) {
            return -1;
        }

        if (v > (NGX_HTTP_INFER_DECIMAL_MAX - (*p - '0')) / 10) {
            return -1;
        }

        v = v * 10 + (*p - '0');
        digits++;
    }

    if (digits == 0) {
        return -1;
    }

    for ( /* void */ ; frac < scale; frac++) {
        if (v > NGX_HTTP_INFER_DECIMAL_MAX / 10) {
            return -1;
        }

        v *= 10;
    }

    return v;
}


/* "0.00015", "50", "0": v units of 10^-scale, at most scale 18 */

static ngx_inline u_char *
ngx_http_infer_decimal_print(u_char *p, uint64_t v, ngx_uint_t scale)
{
    u_char      frac[20];
    uint64_t    unit;
    ngx_uint_t  i, n;

    for (unit = 1, i = 0; i < scale; i++) {
        unit *= 10;
    }

    p = ngx_sprintf(p, "%uL", v / unit);

    v %= unit;

    if (v == 0) {
        return p;
    }

    for (i = scale; i > 0; i--) {
        frac[i - 1] = (u_char) ('0' + v % 10);
        v /= 10;
    }

    for (n = scale; frac[n - 1] == '0'; n--) { /* void */ }

    *p++ = '.';

    return ngx_cpymem(p, frac, n);
}


/*
 * The cost of tokens at a price per million tokens in micro-dollars, in
 * nano-dollars, rounded down: tokens * price / 1000, without overflow for
 * a count below 2^31 and a price up to 8.5 10^12 (the route module takes
 * prices up to 10^12, a million dollars per million tokens).
 */

static ngx_inline uint64_t
ngx_http_infer_decimal_cost(uint64_t tokens, uint64_t price)
{
    return tokens * (price / 1000) + tokens * (price % 1000) / 1000;
}


#endif /* _NGX_HTTP_INFER_DECIMAL_H_INCLUDED_ */

/*
 * Copyright (C) ngx_infer authors
 *
 * The byte skipping the request scanner and the usage parser share: the
 * next byte of a JSON string that needs a look, 16 bytes at a time with
 * SSE2, 8 at a time in a 64-bit word, else one at a time.  Static inline,
 * as the two parsers' hot loops want it.
 */


#ifndef _NGX_HTTP_INFER_ROUTE_LEX_H_INCLUDED_
#define _NGX_HTTP_INFER_ROUTE_LEX_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>

#if (defined __SSE2__ && defined __GNUC__)
#include <emmintrin.h>
#define NGX_HTTP_INFER_LEX_SSE2  1
#else
#define NGX_HTTP_INFER_LEX_SSE2  0
#endif

/* a byte's index from the lowest flag of a word, where the order allows */
#if (NGX_HAVE_LITTLE_ENDIAN && defined __GNUC__)
#define NGX_HTTP_INFER_LEX_CTZ   1
#else
#define NGX_HTTP_INFER_LEX_CTZ   0
#endif


#define NGX_HTTP_INFER_LEX_ONES   0x0101010101010101ULL
#define NGX_HTTP_INFER_LEX_HIGHS  0x8080808080808080ULL

/*
 * The bytes of v that are zero, or below n (n <= 0x80), flagged by their
 * high bit.  A borrow only ever flags bytes above a flagged one, so the
 * lowest flag is exact, whatever the byte order.
 */

#define ngx_http_infer_lex_zero(v)                                           \
    (((v) - NGX_HTTP_INFER_LEX_ONES) & ~(v) & NGX_HTTP_INFER_LEX_HIGHS)

#define ngx_http_infer_lex_below(v, n)                                       \
    (((v) - NGX_HTTP_INFER_LEX_ONES * (n)) & ~(v) & NGX_HTTP_INFER_LEX_HIGHS)


/* the first '"', '\\' or control character from p on, or last */

static ngx_inline u_char *
ngx_http_infer_route_special(u_char *p, u_char *last)
{
    uint64_t   v, q, b;
#if (NGX_HTTP_INFER_LEX_SSE2)
    int        m;
    __m128i    x, y, quote, bslash, ctl;

    quote = _mm_set1_epi8('"');
    bslash = _mm_set1_epi8('\\');
    ctl = _mm_set1_epi8(0x1f);

    while (last - p >= 16) {
        x = _mm_loadu_si128((const __m128i *) p);

        /* '"', '\\', or (unsigned) <= 0x1f */
        y = _mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, bslash));
        y = _mm_or_si128(y, _mm_cmpeq_epi8(_mm_min_epu8(x, ctl), x));

        m = _mm_movemask_epi8(y);

        if (m) {
            return p + __builtin_ctz(m);
        }

        p += 16;
    }
#endif

    while (last - p >= 8) {
        ngx_memcpy(&v, p, 8);

        q = v ^ (NGX_HTTP_INFER_LEX_ONES * '"');
        b = v ^ (NGX_HTTP_INFER_LEX_ONES * '\\');

        v = ngx_http_infer_lex_zero(q) | ngx_http_infer_lex_zero(b)
            | ngx_http_infer_lex_below(v, 0x20);

        if (v) {
#if (NGX_HTTP_INFER_LEX_CTZ)
            return p + (__builtin_ctzll(v) >> 3);
#else
            break;
#endif
        }

        p += 8;
    }

    while (p < last && *p != '"' && *p != '\\' && *p >= 0x20) {
        p++;
    }

    return p;
}


#endif /* _NGX_HTTP_INFER_ROUTE_LEX_H_INCLUDED_ */

/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for the metric page parser:
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined \
 *       -I ... t/unit/balance_signals_fuzz.c \
 *       ngx_infer_balance/ngx_http_infer_balance_signals.c
 *
 * An input is "MS" then the page: bit 0 of M picks the names (the
 * defaults, or one-letter names easy to hit, one in two signals); S and
 * the rest of M seed where the page is cut.  The page is fed in one
 * buffer, then cut where the seed says, then a byte at a time, each
 * buffer from an allocation of exactly its size (ASan sees any read past
 * it): the results must not depend on the cuts, must not change with
 * CRLF for LF, and must be what the header promises.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ngx_http_infer_balance_signals.h"
#include "unit.h"
#include "murmur.h"


static void run(const u_char *page, size_t len,
    ngx_http_infer_signals_conf_t *conf, ngx_uint_t seed,
    ngx_uint_t bytewise, ngx_http_infer_signals_t *out);
static void check_result(ngx_http_infer_signals_t *s,
    ngx_http_infer_signals_conf_t *conf, const u_char *page, size_t len);
static void check_same(ngx_http_infer_signals_t *a,
    ngx_http_infer_signals_t *b);
static void check_crlf(const u_char *page, size_t len,
    ngx_http_infer_signals_conf_t *conf, ngx_http_infer_signals_t *a);


/* static: the line buffer makes them large */

static ngx_http_infer_signals_t  a, b, c, d;

static ngx_str_t  short_names[NGX_HTTP_INFER_SIGNALS][3] = {
    { ngx_string("q"), ngx_string("qq"), ngx_string("vllm:q") },
    { ngx_string("r"), ngx_null_string, ngx_null_string },
    { ngx_string("k"), ngx_string("kk"), ngx_string("q") },
    { ngx_string("l"), ngx_string("ll"), ngx_null_string }
};


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t                          len;
    ngx_uint_t                      seed, i, j;
    ngx_http_infer_signals_conf_t   conf;

    if (size < 2) {
        return 0;
    }

    if (data[0] & 1) {
        for (i = 0; i < NGX_HTTP_INFER_SIGNALS; i++) {
            for (j = 0; j < 3 && short_names[i][j].len; j++) {
                conf.names[i][j] = short_names[i][j];
            }

            conf.nnames[i] = j;
        }

    } else {
        ngx_http_infer_signals_default(&conf);
    }

    seed = data[1] | (data[0] & 0xfe) << 7;

    data += 2;
    len = size - 2;

    run(data, len, &conf, 0, 0, &a);
    check_result(&a, &conf, data, len);

    run(data, len, &conf, seed | 1, 0, &b);
    check_same(&a, &b);

    /* a byte at a time costs an allocation a byte */

    if (len <= 1024) {
        run(data, len, &conf, 0, 1, &c);
        check_same(&a, &c);
    }

    check_crlf(data, len, &conf, &a);

    return 0;
}


/* seed 0: one buffer; else buffers of 1 to 64 bytes, from a xorshift */

static void
run(const u_char *page, size_t len, ngx_http_infer_signals_conf_t *conf,
    ngx_uint_t seed, ngx_uint_t bytewise, ngx_http_infer_signals_t *out)
{
    u_char                    *copy;
    size_t                     at, n;
    uint32_t                   x;
    ngx_http_infer_signals_t  *s;

    s = malloc(sizeof(ngx_http_infer_signals_t));
    check(s != NULL);

    memset(s, 0xa5, sizeof(ngx_http_infer_signals_t));
    ngx_http_infer_signals_init(s, conf);

    check(s->found == 0 && s->samples == 0 && s->skipped == 0);

    x = (uint32_t) seed * 2654435761U + 1;

    for (at = 0; at < len || (at == 0 && len == 0); at += n) {

        if (bytewise) {
            n = 1;

        } else if (seed) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            n = 1 + (x & ((x >> 8) & 1 ? 63 : 7));

        } else {
            n = len;
        }

        if (n > len - at) {
            n = len - at;
        }

        copy = malloc(n ? n : 1);
        check(copy != NULL);
        memcpy(copy, page + at, n);

        ngx_http_infer_signals_feed(s, copy, n);

        free(copy);

        check(s->line_len <= NGX_HTTP_INFER_SIGNALS_LINE_MAX + 1);
        check(!s->skipping
              || s->line_len == NGX_HTTP_INFER_SIGNALS_LINE_MAX + 1);

        if (len == 0) {
            break;
        }
    }

    ngx_http_infer_signals_finish(s);

    check(s->line_len == 0 && s->skipping == 0);

    /* once more, and an empty buffer: nothing is left to parse */
    ngx_http_infer_signals_finish(s);
    ngx_http_infer_signals_feed(s, NULL, 0);

    memcpy(out, s, sizeof(ngx_http_infer_signals_t));
    free(s);
}


static void
check_result(ngx_http_infer_signals_t *s,
    ngx_http_infer_signals_conf_t *conf, const u_char *page, size_t len)
{
    size_t      lines, k;
    ngx_uint_t  i, bit;

    check((s->found & ~(ngx_uint_t) 0xf) == 0);

    for (i = 0; i < NGX_HTTP_INFER_SIGNALS; i++) {
        bit = (ngx_uint_t) 1 << i;

        if (s->found & bit) {
            check(s->name_index[i] < conf->nnames[i]);

        } else {
            check(s->name_index[i] == NGX_HTTP_INFER_SIGNALS_NAMES);
        }

        if (i < 3) {
            check(s->value[i] <= NGX_HTTP_INFER_SIGNALS_VALUE_MAX);
            check(s->value[i] >= -NGX_HTTP_INFER_SIGNALS_VALUE_MAX);
            check((s->found & bit) || s->value[i] == 0);
        }
    }

    if (!(s->found & (1 << NGX_HTTP_INFER_SIGNAL_LORA))) {
        check(s->lora_stamp == 0 && s->max_lora == 0);
        check(s->nrunning == 0 && s->nwaiting == 0);
    }

    check(s->lora_stamp <= NGX_HTTP_INFER_SIGNALS_VALUE_MAX);
    check(s->lora_stamp >= -NGX_HTTP_INFER_SIGNALS_VALUE_MAX);
    check(s->max_lora <= NGX_MAX_INT32_VALUE);

    /* an adapter takes a byte at least, and a comma between two */
    check(s->nrunning + s->nwaiting <= len / 2 + 1);

    for (i = s->nrunning; i < NGX_HTTP_INFER_SIGNALS_LORA_MAX; i++) {
        check(s->running[i] == 0);
    }

    for (i = s->nwaiting; i < NGX_HTTP_INFER_SIGNALS_LORA_MAX; i++) {
        check(s->waiting[i] == 0);
    }

    lines = (len > 0);

    for (k = 0; k < len; k++) {
        lines += (page[k] == '\n' && k + 1 < len);
    }

    check(s->samples + s->skipped <= lines);
}


static void
check_same(ngx_http_infer_signals_t *a, ngx_http_infer_signals_t *b)
{
    check(a->value[0] == b->value[0]);
    check(a->value[1] == b->value[1]);
    check(a->value[2] == b->value[2]);
    check(a->found == b->found);
    check(a->lora_stamp == b->lora_stamp);
    check(a->max_lora == b->max_lora);
    check(a->nrunning == b->nrunning);
    check(a->nwaiting == b->nwaiting);
    check(memcmp(a->running, b->running, sizeof(a->running)) == 0);
    check(memcmp(a->waiting, b->waiting, sizeof(a->waiting)) == 0);
    check(a->samples == b->samples);
    check(a->skipped == b->skipped);
    check(memcmp(a->name_index, b->name_index, sizeof(a->name_index)) == 0);
}


/* the page with CRLF for each LF (none with a CR) says the same */

static void
check_crlf(const u_char *page, size_t len,
    ngx_http_infer_signals_conf_t *conf, ngx_http_infer_signals_t *a)
{
    u_char  *crlf;
    size_t   i, n;

    if (memchr(page, '\r', len) != NULL) {
        return;
    }

    crlf = malloc(2 * len + 1);
    check(crlf != NULL);

    for (i = 0, n = 0; i < len; i++) {
        if (page[i] == '\n') {
            crlf[n++] = '\r';
        }

        crlf[n++] = page[i];
    }

    run(crlf, n, conf, len + 7, 0, &d);
    check_same(a, &d);

    free(crlf);
}

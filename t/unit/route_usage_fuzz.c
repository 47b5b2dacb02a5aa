/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for the token usage parser:
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined \
 *       -I ... t/unit/route_usage_fuzz.c \
 *       ngx_infer_route/ngx_http_infer_route_usage.c
 *
 * An input is "MS" then the body: bit 0 of M picks SSE (else JSON), bit 1
 * strip; S seeds where the body is cut.  The body is fed in one buffer,
 * then cut where S says, then a byte at a time, each buffer from an
 * allocation of exactly its size (ASan sees any read past it): the
 * results must not depend on the cuts, and what the header promises must
 * hold after every feed.  A JSON body that is one line is also sent as
 * one SSE event: both modes must read the same usage from it.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ngx_http_infer_route_usage.h"
#include "unit.h"


typedef struct {
    ngx_uint_t    error;                /* a feed returned NGX_ERROR */
    ngx_int_t     final;                /* a feed after finish() */
} result_t;


static void run(const u_char *body, size_t len, ngx_uint_t mode,
    ngx_uint_t strip, ngx_uint_t seed, ngx_uint_t bytewise,
    ngx_http_infer_usage_t *u, result_t *r);
static void check_feed(const u_char *body, size_t len,
    ngx_http_infer_usage_t *u, off_t *event_start);
static void check_same(ngx_http_infer_usage_t *a, result_t *ra,
    ngx_http_infer_usage_t *b, result_t *rb);
static void check_as_event(const u_char *body, size_t len,
    ngx_http_infer_usage_t *json, result_t *rj);


/* static: the line buffer makes them large */

static ngx_http_infer_usage_t  a, b, c, e;


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t      len;
    result_t    ra, rb, rc;
    ngx_uint_t  mode, strip, seed;

    if (size < 2) {
        return 0;
    }

    mode = (data[0] & 1) ? NGX_HTTP_INFER_USAGE_SSE
                         : NGX_HTTP_INFER_USAGE_JSON;
    strip = (data[0] >> 1) & 1;
    seed = data[1] | (data[0] & 0xfc) << 6;

    data += 2;
    len = size - 2;

    run(data, len, mode, strip, 0, 0, &a, &ra);
    run(data, len, mode, strip, seed | 1, 0, &b, &rb);
    check_same(&a, &ra, &b, &rb);

    /* a byte at a time costs an allocation a byte */

    if (len <= 1024) {
        run(data, len, mode, strip, 0, 1, &c, &rc);
        check_same(&a, &ra, &c, &rc);
    }

    if (mode == NGX_HTTP_INFER_USAGE_JSON) {
        check_as_event(data, len, &a, &ra);
    }

    return 0;
}


/* seed 0: one buffer; else buffers of 1 to 64 bytes, from a xorshift */

static void
run(const u_char *body, size_t len, ngx_uint_t mode, ngx_uint_t strip,
    ngx_uint_t seed, ngx_uint_t bytewise, ngx_http_infer_usage_t *u,
    result_t *r)
{
    off_t                    event_start;
    u_char                  *copy;
    size_t                   at, n, size;
    uint32_t                 x;
    ngx_int_t                rc;
    ngx_http_infer_usage_t  *out;

    /* exactly as large as the module allocates it, for ASan to watch */
    size = NGX_HTTP_INFER_USAGE_SIZE(mode);
    out = u;

    u = malloc(size);
    check(u != NULL);

    memset(u, 0xa5, size);
    ngx_http_infer_usage_init(u, mode, strip);

    check(u->offset == 0 && u->event_start == 0);
    check(u->found == 0 && u->done == 0 && u->content_events == 0);

    r->error = 0;
    event_start = 0;
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
        memcpy(copy, body + at, n);

        rc = ngx_http_infer_usage_feed(u, copy, n);

        free(copy);

        check(rc == NGX_OK || rc == NGX_ERROR);
        check(mode == NGX_HTTP_INFER_USAGE_JSON || rc == NGX_OK);

        if (rc == NGX_ERROR) {
            r->error = 1;

        } else {
            /* an error sticks */
            check(!r->error);
        }

        check(u->offset == (off_t) (at + n));

        if (mode == NGX_HTTP_INFER_USAGE_SSE) {
            check_feed(body, at + n, u, &event_start);
        }

        if (len == 0) {
            break;
        }
    }

    ngx_http_infer_usage_finish(u);

    r->final = ngx_http_infer_usage_feed(u, (u_char *) "", 0);

    check(r->final == NGX_OK || r->final == NGX_ERROR);
    check(!r->error || r->final == NGX_ERROR);
    check(u->event_start == (off_t) len);

    memcpy(out, u, size);
    free(u);
}


/* what must hold after each feed of an SSE stream, fed bytes so far */

static void
check_feed(const u_char *body, size_t fed, ngx_http_infer_usage_t *u,
    off_t *event_start)
{
    off_t  s, e;

    /* it only moves on, to the end of a line, never past what was fed */

    check(u->event_start >= *event_start);
    check(u->event_start <= (off_t) fed);
    check(u->event_start == 0
          || body[u->event_start - 1] == '\n'
          || body[u->event_start - 1] == '\r');

    /* a held event begins with its first line */

    if (u->event_start < (off_t) fed) {
        check(body[u->event_start] != '\n' && body[u->event_start] != '\r');
    }

    *event_start = u->event_start;

    s = u->usage_event_start;
    e = u->usage_event_end;

    if (!u->strip) {
        check(s == 0 && e == 0);
        return;
    }

    if (e == 0) {
        check(s == 0);
        return;
    }

    /* a usage event: whole lines, ending with the blank one, sent out */

    check(u->found);
    check(s < e && e <= u->event_start);
    check(body[s] != '\n' && body[s] != '\r');
    check(body[e - 1] == '\n' || body[e - 1] == '\r');
    check(s == 0 || body[s - 1] == '\n' || body[s - 1] == '\r');
}


static void
check_same(ngx_http_infer_usage_t *a, result_t *ra, ngx_http_infer_usage_t *b,
    result_t *rb)
{
    check(ra->error == rb->error);
    check(ra->final == rb->final);
    check(a->found == b->found);
    check(a->done == b->done);
    check(a->prompt_tokens == b->prompt_tokens);
    check(a->completion_tokens == b->completion_tokens);
    check(a->total_tokens == b->total_tokens);
    check(a->cached_tokens == b->cached_tokens);
    check(a->reasoning_tokens == b->reasoning_tokens);
    check(a->content_events == b->content_events);
    check(a->usage_event_start == b->usage_event_start);
    check(a->usage_event_end == b->usage_event_end);
    check(a->event_start == b->event_start);
    check(a->offset == b->offset);
    check(a->events == b->events);
    check(a->null_start == b->null_start);
    check(a->null_end == b->null_end);

    /* a "usage": null to drop lies inside the stream, before its end */
    check(a->null_start <= a->null_end && a->null_end <= a->offset);
    check(a->strip || a->null_end == 0);

    if (!a->found) {
        check(a->prompt_tokens == -1 && a->completion_tokens == -1
              && a->total_tokens == -1 && a->cached_tokens == -1
              && a->reasoning_tokens == -1);
    }

    check(a->prompt_tokens >= -1 && a->completion_tokens >= -1
          && a->total_tokens >= -1 && a->cached_tokens >= -1
          && a->reasoning_tokens >= -1);
}


/*
 * The JSON answer on one line as the data of one SSE event: valid, it
 * says the same; not, the event says nothing.
 */

static void
check_as_event(const u_char *body, size_t len, ngx_http_infer_usage_t *json,
    result_t *rj)
{
    u_char                  *p;
    ngx_http_infer_usage_t  *u;

    if (len > NGX_HTTP_INFER_USAGE_LINE_MAX - 6
        || memchr(body, '\n', len) || memchr(body, '\r', len)
        || (len >= 6 && memcmp(body, "[DONE]", 6) == 0))
    {
        return;
    }

    p = malloc(len + 8);
    u = &e;

    check(p != NULL);

    memcpy(p, "data: ", 6);
    memcpy(p + 6, body, len);
    memcpy(p + 6 + len, "\n\n", 2);

    ngx_http_infer_usage_init(u, NGX_HTTP_INFER_USAGE_SSE, 1);
    check(ngx_http_infer_usage_feed(u, p, len + 8) == NGX_OK);
    check(u->event_start == (off_t) len + 8);

    free(p);

    check(u->done == 0);

    if (rj->error || rj->final != NGX_OK) {
        check(u->found == 0 && u->content_events == 0);
        check(u->prompt_tokens == -1 && u->total_tokens == -1);
        return;
    }

    check(u->found == json->found);
    check(u->prompt_tokens == json->prompt_tokens);
    check(u->completion_tokens == json->completion_tokens);
    check(u->total_tokens == json->total_tokens);
    check(u->cached_tokens == json->cached_tokens);
    check(u->reasoning_tokens == json->reasoning_tokens);

    if (u->usage_event_end) {
        check(u->found);
        check(u->usage_event_start == 0);
        check(u->usage_event_end == (off_t) len + 8);
    }
}

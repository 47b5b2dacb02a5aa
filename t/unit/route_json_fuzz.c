/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for ngx_http_infer_route_json_scan():
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined \
 *       -I ... t/unit/route_json_fuzz.c \
 *       ngx_infer_route/ngx_http_infer_route_json.c
 *
 * Each input is scanned from a buffer of exactly its size (ASan sees any
 * read past it), with several prefix_max values, and the results checked
 * against what must hold whatever the input.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ngx_http_infer_route_json.h"
#include "unit.h"


static ngx_int_t run(u_char *p, size_t len, size_t prefix_max,
    ngx_http_infer_route_body_t *b);
static void check_one(u_char *p, size_t len, ngx_int_t rc,
    ngx_http_infer_route_body_t *b);
static void check_same(ngx_int_t rc1, ngx_http_infer_route_body_t *b1,
    ngx_int_t rc2, ngx_http_infer_route_body_t *b2);


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                       *p;
    size_t                        all;
    ngx_int_t                     rc, rc2;
    ngx_uint_t                    i;
    ngx_http_infer_route_body_t   b, b2;
    static size_t                 prefix[] = { 0, 1, 7, 256 };

    p = malloc(size ? size : 1);
    if (p == NULL) {
        return 0;
    }

    memcpy(p, data, size);

    /* the whole prompt text stream */

    rc = run(p, size, (size_t) -1, &b);
    check_one(p, size, rc, &b);

    all = b.prefix_len;

    if (rc == NGX_OK) {
        /* the stream is the text plus one separator between strings */
        check(all >= b.prompt_bytes);

    } else {
        check(all <= size);
    }

    for (i = 0; i < sizeof(prefix) / sizeof(prefix[0]); i++) {
        rc2 = run(p, size, prefix[i], &b2);
        check_one(p, size, rc2, &b2);
        check_same(rc, &b, rc2, &b2);

        if (rc == NGX_OK) {
            check(b2.prefix_len == (prefix[i] < all ? prefix[i] : all));
        }
    }

    /* a hash over exactly the whole stream is the same hash */

    rc2 = run(p, size, all, &b2);
    check_same(rc, &b, rc2, &b2);

    if (rc == NGX_OK) {
        check(b2.prefix_len == all);
        check(b2.prefix_hash == b.prefix_hash);
    }

    free(p);

    return 0;
}


static ngx_int_t
run(u_char *p, size_t len, size_t prefix_max, ngx_http_infer_route_body_t *b)
{
    /* garbage in the outputs: the scanner must set them all */
    memset(b, 0xa5, sizeof(ngx_http_infer_route_body_t));
    b->prefix_max = prefix_max;

    return ngx_http_infer_route_json_scan(p, len, b);
}


static void
check_one(u_char *p, size_t len, ngx_int_t rc,
    ngx_http_infer_route_body_t *b)
{
    size_t  i;

    check(rc == NGX_OK || rc == NGX_ERROR || rc == NGX_DECLINED);
    check(b->prefix_len <= b->prefix_max);
    check(b->model_len <= NGX_HTTP_INFER_MODEL_MAX);

    if (b->prefix_max == 0 || b->prefix_len == 0) {
        check(b->prefix_hash == 14695981039346656037ULL);
    }

    if (rc == NGX_ERROR) {
        check(b->error != NULL);
        check(b->error[0] != '\0');
        check(b->error_offset <= len);
        return;
    }

    check(b->error == NULL);
    check(b->error_offset == 0);

    for (i = 0; i < len; i++) {
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\n' && p[i] != '\r') {
            break;
        }
    }

    check(i < len);

    if (rc == NGX_DECLINED) {
        check(p[i] != '{');
        check(!b->has_model);
        check(b->stream == -1 && b->include_usage == -1);
        check(b->max_tokens == -1);
        check(b->prompt_bytes == 0 && b->messages == 0);
        check(b->prefix_len == 0);
        check(b->model_start == 0 && b->model_end == 0);
        check(b->stream_options_start == 0 && b->stream_options_end == 0);
        check(b->object_end == 0);
        return;
    }

    /* NGX_OK: an object from p[i] to p[object_end], then whitespace */

    check(p[i] == '{');
    check(b->object_end > i && b->object_end < len);
    check(p[b->object_end] == '}');

    for (i = b->object_end + 1; i < len; i++) {
        check(p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r');
    }

    check(b->stream >= -1 && b->stream <= 1);
    check(b->include_usage >= -1 && b->include_usage <= 1);
    check(b->max_tokens >= -1 && b->max_tokens <= 0x7fffffff);
    check(b->prompt_bytes < len);
    check(b->messages < len);

    if (b->has_model) {
        check(b->model_start < b->model_end);
        check(b->model_end <= b->object_end);
        check(p[b->model_start] == '"' && p[b->model_end - 1] == '"');

        /* no escape: the name is the raw bytes */
        if (memchr(p + b->model_start + 1, '\\',
                   b->model_end - b->model_start - 2) == NULL)
        {
            check(b->model_len == b->model_end - b->model_start - 2);
            check(memcmp(b->model, p + b->model_start + 1, b->model_len)
                  == 0);
        }

    } else {
        check(b->model_start == 0 && b->model_end == 0);
        check(b->model_len == 0);
    }

    if (b->stream_options_end) {
        check(b->stream_options_start < b->stream_options_end);
        check(b->stream_options_end <= b->object_end);
        check(p[b->stream_options_start] == '{');
        check(p[b->stream_options_end - 1] == '}');

    } else {
        check(b->stream_options_start == 0);
        check(b->include_usage == -1);
    }
}


/* everything but the prefix hash is independent of prefix_max */

static void
check_same(ngx_int_t rc1, ngx_http_infer_route_body_t *b1, ngx_int_t rc2,
    ngx_http_infer_route_body_t *b2)
{
    check(rc1 == rc2);
    check(b1->error == b2->error);
    check(b1->error_offset == b2->error_offset);

    if (rc1 == NGX_ERROR) {
        return;
    }

    check(b1->has_model == b2->has_model);
    check(b1->model_len == b2->model_len);
    check(memcmp(b1->model, b2->model, b1->model_len) == 0);
    check(b1->stream == b2->stream);
    check(b1->include_usage == b2->include_usage);
    check(b1->max_tokens == b2->max_tokens);
    check(b1->prompt_bytes == b2->prompt_bytes);
    check(b1->messages == b2->messages);
    check(b1->model_start == b2->model_start);
    check(b1->model_end == b2->model_end);
    check(b1->stream_options_start == b2->stream_options_start);
    check(b1->stream_options_end == b2->stream_options_end);
    check(b1->object_end == b2->object_end);
}

/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for ngx_http_infer_route_traceparent_parse():
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined \
 *       -I ... t/unit/route_traceparent_fuzz.c \
 *       ngx_infer_route/ngx_http_infer_route_traceparent.c
 *
 * Each input is parsed from a buffer of exactly its size (ASan sees any
 * read past it), and the verdict compared with an oracle written from
 * the W3C text in another way: split on "-", then each field checked.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ngx_http_infer_route_traceparent.h"
#include "unit.h"


static int oracle(const unsigned char *p, size_t len);
static int hex(const unsigned char *p, size_t n, int *zero);


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                        *p;
    ngx_int_t                      rc;
    ngx_http_infer_route_traceparent_t   tp;

    p = malloc(size ? size : 1);
    if (p == NULL) {
        return 0;
    }

    memcpy(p, data, size);

    rc = ngx_http_infer_route_traceparent_parse(p, size, &tp);

    if (getenv("FUZZ_VERBOSE")) {
        fprintf(stderr, "rc=%d oracle=%d\n", (int) rc, oracle(p, size));
    }

    check((rc == NGX_OK) == oracle(p, size));

    if (rc == NGX_OK) {
        check(tp.trace_id == p + 3);
        check(tp.parent_id == p + 36);
        check(tp.flags == p + 53);
    }

    free(p);

    return 0;
}


/* lowercase hex only; *zero: all of them '0' */

static int
hex(const unsigned char *p, size_t n, int *zero)
{
    size_t  i;

    *zero = 1;

    for (i = 0; i < n; i++) {
        if (strchr("0123456789abcdef", p[i]) == NULL || p[i] == '\0') {
            return 0;
        }

        if (p[i] != '0') {
            *zero = 0;
        }
    }

    return 1;
}


static int
oracle(const unsigned char *p, size_t len)
{
    int                   zero;
    size_t                f, start, i, want[4] = { 2, 32, 16, 2 };
    const unsigned char  *field[4];

    /* four fields separated by "-", then the end, or "-" and more */

    start = 0;

    for (f = 0; f < 4; f++) {
        for (i = start; i < len && p[i] != '-'; i++) { /* void */ }

        if (i - start != want[f]) {
            return 0;
        }

        field[f] = p + start;

        if (f < 3 && i == len) {
            return 0;
        }

        start = i + 1;
    }

    /* i: the end of the flags */

    if (!hex(field[0], 2, &zero) || memcmp(field[0], "ff", 2) == 0) {
        return 0;
    }

    if (memcmp(field[0], "00", 2) == 0 ? i != len : i != len && p[i] != '-')
    {
        return 0;
    }

    if (!hex(field[1], 32, &zero) || zero) {
        return 0;
    }

    if (!hex(field[2], 16, &zero) || zero) {
        return 0;
    }

    return hex(field[3], 2, &zero);
}

/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for the JWKS parser, ngx_http_infer_auth_keyset_jwks(),
 * and for ngx_http_infer_auth_jwks_body(), which collects a JWKS answer
 * from the buffers of a subrequest:
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined \
 *       -ffunction-sections -Wl,--gc-sections -I ... \
 *       t/unit/auth_jwks_fuzz.c t/unit/ngx_shim.c \
 *       ngx_infer_auth/ngx_http_infer_auth_jwt.c \
 *       ngx_infer_auth/ngx_http_infer_auth_jwks.c -ljansson -lcrypto
 *
 * An input is "C" then a JWKS document: C seeds where the document is cut
 * into buffers, each an allocation of exactly its size, for the body
 * filter, which must give back the document whole.  The keys the parser
 * keeps must each fit their algorithm, and a document with none usable
 * and some skipped must fail.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ngx_http_infer_auth.h"
#include "unit.h"


#define CHUNKS  8


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static ngx_log_t  log_;


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                           err[NGX_HTTP_INFER_AUTH_ERRSTR];
    size_t                           at, n, len;
    ngx_buf_t                        b[CHUNKS];
    ngx_int_t                        rc;
    ngx_uint_t                       i, nb;
    ngx_chain_t                      cl[CHUNKS];
    ngx_pool_t                      *pool;
    ngx_http_request_t               r;
    ngx_http_infer_auth_key_t       *k;
    ngx_http_infer_auth_keyset_t    *ks;
    ngx_http_infer_auth_jwks_body_t  body;
    u_char                          *part[CHUNKS];

    if (size < 1) {
        return 0;
    }

    log_.log_level = NGX_LOG_DEBUG_ALL;

    pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, &log_);
    check(pool != NULL);

    ngx_memzero(&r, sizeof(ngx_http_request_t));
    r.pool = pool;

    /* the document in up to CHUNKS buffers, the last taking the rest */

    len = size - 1;
    at = 0;

    for (nb = 0; nb < CHUNKS; nb++) {
        n = (nb == CHUNKS - 1) ? len - at
                               : ngx_min(len - at, (size_t) (data[0] >> 4)
                                                   * (nb + 1) * 3);

        part[nb] = malloc(n ? n : 1);
        check(part[nb] != NULL);
        memcpy(part[nb], data + 1 + at, n);

        ngx_memzero(&b[nb], sizeof(ngx_buf_t));
        b[nb].pos = part[nb];
        b[nb].last = part[nb] + n;
        b[nb].start = b[nb].pos;
        b[nb].end = b[nb].last;
        b[nb].temporary = 1;
        b[nb].last_buf = (nb == CHUNKS - 1);

        cl[nb].buf = &b[nb];
        cl[nb].next = NULL;

        at += n;
    }

    ngx_memzero(&body, sizeof(body));

    /* fed in two calls, as two passes of the body filter would */

    i = data[0] & 7;

    if (i > 0) {
        for (n = 0; n + 1 < i; n++) {
            cl[n].next = &cl[n + 1];
        }

        check(ngx_http_infer_auth_jwks_body(&r, &body, &cl[0]) == NGX_OK);
    }

    for (n = i; n + 1 < CHUNKS; n++) {
        cl[n].next = &cl[n + 1];
    }

    check(ngx_http_infer_auth_jwks_body(&r, &body, &cl[i]) == NGX_OK);

    for (n = 0; n < CHUNKS; n++) {
        check(b[n].pos == b[n].last);
    }

    check(!body.failed);
    check(body.len == len && body.len <= body.size);
    check(len == 0 || memcmp(body.data, data + 1, len) == 0);

    /* the parser, over the document in a buffer of exactly its size */

    for (n = 0; n < CHUNKS; n++) {
        free(part[n]);
    }

    part[0] = malloc(len ? len : 1);
    check(part[0] != NULL);
    memcpy(part[0], data + 1, len);

    ks = ngx_http_infer_auth_keyset_create(&log_);
    check(ks != NULL);

    memset(err, 0, sizeof(err));

    rc = ngx_http_infer_auth_keyset_jwks(ks, part[0], len, err);

    check(rc == NGX_OK || rc == NGX_ERROR);
    check(strlen((char *) err) < sizeof(err));

    if (rc == NGX_ERROR) {
        check(err[0] != '\0');
        check(ks->keys.nelts == 0);

    } else if (ks->skipped) {
        check(err[0] != '\0');
        check(ks->keys.nelts > 0);
    }

    k = ks->keys.elts;

    for (i = 0; i < ks->keys.nelts; i++) {
        check(k[i].alg != NULL);
        check(ngx_http_infer_auth_alg(&k[i].alg->name) == k[i].alg);

        if (k[i].alg->family == NGX_HTTP_INFER_AUTH_HMAC) {
            check(k[i].pkey == NULL);
            check(k[i].secret.len >= k[i].alg->size);

        } else {
            check(k[i].pkey != NULL);
            check(k[i].secret.len == 0);
        }

        check(k[i].kid.len == 0 || k[i].kid.data != NULL);
    }

    ngx_http_infer_auth_keyset_free(ks);

    free(part[0]);
    ngx_destroy_pool(pool);

    return 0;
}

/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for what the rate-limit module makes of Redis's
 * bytes: hiredis's reader with our bound on it,
 * ngx_http_infer_ratelimit_redis_bound(), and the admission's answer read
 * by ngx_http_infer_ratelimit_redis_answer():
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fuse-ld=lld \
 *       -ffunction-sections -Wl,--gc-sections -I ... \
 *       t/unit/ratelimit_redis_fuzz.c t/unit/ngx_shim.c \
 *       ngx_infer_ratelimit/ngx_http_infer_ratelimit_redis.c -lhiredis
 *
 * An input is "NC" then what Redis sends: N % 5 limits on the request, C
 * the size of the pieces it arrives in.  Every reply the reader gives is
 * an array of at most 1 + 3 * 1024 elements none of them an array, or no
 * array; it is taken as an admission's answer when it is an array of
 * 1 + 3 * N non-negative integers, and then the items hold its numbers,
 * else the items are left as they were.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>

#include "ngx_http_infer_ratelimit.h"
#include "unit.h"


#define REPLY_MAX  (1 + 3 * 1024)


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_reply(redisReply *rr, ngx_uint_t n);


static ngx_http_infer_ratelimit_limit_t  limits[4];


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int           rc;
    char         *piece;
    void         *reply;
    size_t        at, chunk, len;
    ngx_uint_t    n;
    redisReader  *reader;

    if (size < 2) {
        return 0;
    }

    n = data[0] % 5;
    chunk = data[1] ? data[1] : size;
    data += 2;
    size -= 2;

    reader = redisReaderCreate();
    check(reader != NULL);

    ngx_http_infer_ratelimit_redis_bound(reader);
    ngx_http_infer_ratelimit_redis_bound(reader);

    rc = REDIS_OK;

    for (at = 0; at < size && rc == REDIS_OK; at += len) {
        len = ngx_min(chunk, size - at);

        /* each piece from an allocation of exactly its size */

        piece = malloc(len);
        check(piece != NULL);
        memcpy(piece, data + at, len);

        rc = redisReaderFeed(reader, piece, len);
        free(piece);

        while (rc == REDIS_OK) {
            reply = NULL;
            rc = redisReaderGetReply(reader, &reply);

            if (rc != REDIS_OK || reply == NULL) {
                break;
            }

            check_reply(reply, n);
            freeReplyObject(reply);
        }
    }

    check(rc == REDIS_OK || reader->err != 0);

    redisReaderFree(reader);

    return 0;
}


static void
check_reply(redisReply *rr, ngx_uint_t n)
{
    size_t                            i;
    ngx_int_t                         rc;
    ngx_uint_t                        ok;
    ngx_http_infer_ratelimit_item_t   items[4], before[4];

    if (rr->type == REDIS_REPLY_ARRAY) {
        check(rr->elements <= REPLY_MAX);

        for (i = 0; i < rr->elements; i++) {
            check(rr->element[i] != NULL);
            check(rr->element[i]->type != REDIS_REPLY_ARRAY);
        }
    }

    ok = (rr->type == REDIS_REPLY_ARRAY && rr->elements == 1 + 3 * n);

    for (i = 0; ok && i < rr->elements; i++) {
        ok = (rr->element[i]->type == REDIS_REPLY_INTEGER
              && rr->element[i]->integer >= 0);
    }

    memset(items, 0x5a, sizeof(items));

    for (i = 0; i < n; i++) {
        limits[i].limit = 100 + i;
        items[i].limit = &limits[i];
    }

    memcpy(before, items, sizeof(items));

    rc = ngx_http_infer_ratelimit_redis_answer(rr, items, n);

    check(rc == NGX_OK || rc == NGX_DECLINED);
    check((rc == NGX_OK) == ok);

    if (rc != NGX_OK) {
        check(memcmp(items, before, sizeof(items)) == 0);
        return;
    }

    for (i = 0; i < n; i++) {
        check(items[i].limit == &limits[i]);
        check(items[i].known == 1);
        check(items[i].limit_n == 100 + i);
        check(items[i].remaining
              == (uint64_t) rr->element[1 + 3 * i]->integer);
        check(items[i].reset
              == (ngx_msec_t) rr->element[2 + 3 * i]->integer);
        check(items[i].retry
              == (ngx_msec_t) rr->element[3 + 3 * i]->integer);
        check(items[i].refused == (items[i].retry > 0));
        check(items[i].where == (rr->element[0]->integer == 1
                                 ? NGX_HTTP_INFER_RL_IN_REDIS
                                 : NGX_HTTP_INFER_RL_NOWHERE));
    }

    /* the items past n are untouched */
    check(memcmp(&items[n], &before[n], (4 - n) * sizeof(items[0])) == 0);
}

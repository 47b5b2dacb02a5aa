
/*
 * Copyright (C) ngx_infer authors
 *
 * Admissions batched (infer_ratelimit_redis ... batch=N): while one
 * admission of this worker is in flight, the next ones wait, and go in
 * one call when it is back (or at once when N of them wait): one EVALSHA
 * in mode "b", each request still checked and charged all-or-nothing,
 * one after the other, as separate calls would be.  What Redis saves is
 * the cost of a call (its parsing, the script's entry, TIME): a busy
 * worker's admissions cost Redis a fraction of a call each.  A request
 * waits at most for the answer in flight (one round trip), and no longer
 * than its own timeout.  Not with a Redis Cluster, whose calls go to
 * the slots' masters.
 *
 * The members are the requests' waiters, as they would be sent alone;
 * the batch's argv points into theirs, and its answer is cut into one
 * part per member, read as its own answer
 * (ngx_http_infer_ratelimit_redis_answered()).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_ratelimit.h"


typedef struct {
    ngx_http_infer_ratelimit_waiter_t  *member[NGX_HTTP_INFER_RL_BATCH_MAX];
    ngx_uint_t                          n;
    ngx_uint_t                          keys;
    ngx_uint_t                          inflight;  /* admissions sent, not
                                                      answered */
    ngx_http_infer_ratelimit_redis_t   *rd;
} ngx_http_infer_ratelimit_batch_queue_t;


typedef struct {
    ngx_uint_t                          n;
    ngx_http_infer_ratelimit_waiter_t  *member[NGX_HTTP_INFER_RL_BATCH_MAX];
    int                                 argc;
    const char                        **argv;
    size_t                             *argvlen;
    unsigned                            retried:1;
} ngx_http_infer_ratelimit_batch_t;


static void ngx_http_infer_ratelimit_batch_flush(void);
static void ngx_http_infer_ratelimit_batch_fail(
    ngx_http_infer_ratelimit_waiter_t *w);
static void ngx_http_infer_ratelimit_batch_reply(redisAsyncContext *ac,
    void *reply, void *privdata);


static ngx_http_infer_ratelimit_batch_queue_t  ngx_http_infer_ratelimit_batch;


/* an admission: sent now if none is in flight, else it waits its turn */

void
ngx_http_infer_ratelimit_batch_add(ngx_http_infer_ratelimit_waiter_t *w,
    ngx_http_infer_ratelimit_redis_t *rd)
{
    ngx_http_infer_ratelimit_batch_queue_t  *q;

    q = &ngx_http_infer_ratelimit_batch;

    w->rd = rd;

    if (q->inflight == 0) {
        if (ngx_http_infer_ratelimit_redis_call(w, rd) != NGX_OK) {
            ngx_http_infer_ratelimit_batch_fail(w);
            return;
        }

        w->gated = 1;
        q->inflight++;
        return;
    }

    if (q->keys + w->nitems > NGX_HTTP_INFER_RL_BATCH_KEYS) {
        ngx_http_infer_ratelimit_batch_flush();
    }

    q->member[q->n++] = w;
    q->keys += w->nitems;
    q->rd = rd;

    w->queued = 1;

    ngx_add_timer(&w->ev, rd->rcf->timeout);

    if (q->n >= ngx_min(rd->rcf->batch, NGX_HTTP_INFER_RL_BATCH_MAX)) {
        ngx_http_infer_ratelimit_batch_flush();
    }
}


/* a waiter that leaves before its batch is sent: timed out, or gone */

void
ngx_http_infer_ratelimit_batch_remove(ngx_http_infer_ratelimit_waiter_t *w)
{
    ngx_uint_t                               i;
    ngx_http_infer_ratelimit_batch_queue_t  *q;

    q = &ngx_http_infer_ratelimit_batch;

    w->queued = 0;

    /* never sent: the corrections it carried wait for the next call */
    ngx_http_infer_ratelimit_coalesce_restore(w->items, w->nitems);

    for (i = 0; i < q->n; i++) {
        if (q->member[i] == w) {
            q->keys -= w->nitems;
            q->n--;
            ngx_memmove(&q->member[i], &q->member[i + 1],
                        (q->n - i)
                        * sizeof(ngx_http_infer_ratelimit_waiter_t *));
            return;
        }
    }
}


/* an admission sent alone, or a batch, was answered (or failed) */

void
ngx_http_infer_ratelimit_batch_answered(void)
{
    ngx_http_infer_ratelimit_batch_queue_t  *q;

    q = &ngx_http_infer_ratelimit_batch;

    if (q->inflight) {
        q->inflight--;
    }

    if (q->inflight == 0) {
        ngx_http_infer_ratelimit_batch_flush();
    }
}


/*
 * What waits goes now: alone, as it would have, or in one call of mode
 * "b": EVALSHA sha nkeys keys... b count nkeys-of-each... args...
 */

static void
ngx_http_infer_ratelimit_batch_flush(void)
{
    u_char                                  *p;
    size_t                                   size;
    ngx_uint_t                               i, j, argc, k, a, nkeys;
    ngx_http_infer_ratelimit_batch_t        *b;
    ngx_http_infer_ratelimit_waiter_t       *w;
    ngx_http_infer_ratelimit_batch_queue_t  *q;

    q = &ngx_http_infer_ratelimit_batch;

    if (q->n == 0) {
        return;
    }

    if (ngx_http_infer_ratelimit_redis_open() != NGX_OK) {
        goto failed;
    }

    if (q->n == 1) {
        w = q->member[0];
        q->n = 0;
        q->keys = 0;
        w->queued = 0;

        if (ngx_http_infer_ratelimit_redis_call(w, q->rd) != NGX_OK) {
            ngx_http_infer_ratelimit_batch_fail(w);
            return;
        }

        w->gated = 1;
        q->inflight++;
        return;
    }

    nkeys = q->keys;
    argc = 5 + q->n + 6 * nkeys;

    size = sizeof(ngx_http_infer_ratelimit_batch_t)
           + argc * (sizeof(char *) + sizeof(size_t))
           + (q->n + 2) * (NGX_INT_T_LEN + 1);

    b = ngx_alloc(size, ngx_cycle->log);
    if (b == NULL) {
        goto failed;
    }

    b->n = q->n;
    b->retried = 0;
    b->argc = (int) argc;
    b->argv = (const char **) (b + 1);
    b->argvlen = (size_t *) (b->argv + argc);
    p = (u_char *) (b->argvlen + argc);

    b->argv[0] = "EVALSHA";
    b->argvlen[0] = 7;
    b->argv[1] = (char *) ngx_http_infer_ratelimit_redis_evalsha();
    b->argvlen[1] = 40;

    b->argv[2] = (char *) p;
    p = ngx_sprintf(p, "%ui", nkeys);
    b->argvlen[2] = p - (u_char *) b->argv[2];

    /* the members' keys, then "b", the count, each one's keys, the args */

    k = 3;
    a = 3 + nkeys;

    b->argv[a] = "b";
    b->argvlen[a++] = 1;

    b->argv[a] = (char *) p;
    p = ngx_sprintf(p, "%ui", b->n);
    b->argvlen[a] = p - (u_char *) b->argv[a];
    a++;

    for (i = 0; i < b->n; i++) {
        w = q->member[i];
        b->member[i] = w;

        for (j = 0; j < w->nitems; j++) {
            b->argv[k] = w->argv[3 + j];
            b->argvlen[k++] = w->argvlen[3 + j];
        }

        b->argv[a] = (char *) p;
        p = ngx_sprintf(p, "%ui", w->nitems);
        b->argvlen[a] = p - (u_char *) b->argv[a];
        a++;
    }

    for (i = 0; i < b->n; i++) {
        w = b->member[i];

        /* after the waiter's keys and its "a": 5 arguments a key */

        for (j = 0; j < 5 * w->nitems; j++) {
            b->argv[a] = w->argv[4 + w->nitems + j];
            b->argvlen[a++] = w->argvlen[4 + w->nitems + j];
        }
    }

    q->n = 0;
    q->keys = 0;

    if (redisAsyncCommandArgv(q->rd->ac, ngx_http_infer_ratelimit_batch_reply,
                              b, b->argc, b->argv, b->argvlen)
        != REDIS_OK)
    {
        for (i = 0; i < b->n; i++) {
            b->member[i]->queued = 0;
            ngx_http_infer_ratelimit_batch_fail(b->member[i]);
        }

        ngx_free(b);
        return;
    }

    for (i = 0; i < b->n; i++) {
        b->member[i]->queued = 0;
        b->member[i]->pending = 1;
    }

    q->inflight++;

    return;

failed:

    for (i = 0; i < q->n; i++) {
        q->member[i]->queued = 0;
        ngx_http_infer_ratelimit_batch_fail(q->member[i]);
    }

    q->n = 0;
    q->keys = 0;
}


/* the outage policy decides, from the event loop */

static void
ngx_http_infer_ratelimit_batch_fail(ngx_http_infer_ratelimit_waiter_t *w)
{
    /* never sent: the corrections it carried wait for the next call */
    ngx_http_infer_ratelimit_coalesce_restore(w->items, w->nitems);

    w->answered = 1;
    w->rc = NGX_DECLINED;

    if (w->ev.timer_set) {
        ngx_del_timer(&w->ev);
    }

    ngx_post_event(&w->ev, &ngx_posted_events);
}


static void
ngx_http_infer_ratelimit_batch_reply(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_http_infer_ratelimit_batch_t *b = privdata;

    size_t        want, at;
    ngx_uint_t    i;
    redisReply   *rr = reply, part, *answer;
    ngx_str_t    *script;

    if (rr && rr->type == REDIS_REPLY_ERROR && !b->retried
        && rr->len >= 8 && ngx_strncmp(rr->str, "NOSCRIPT", 8) == 0)
    {
        /* the script was flushed: sent again with it */

        b->retried = 1;
        script = ngx_http_infer_ratelimit_redis_script();
        b->argv[0] = "EVAL";
        b->argvlen[0] = 4;
        b->argv[1] = (char *) script->data;
        b->argvlen[1] = script->len;

        if (redisAsyncCommandArgv(ac, ngx_http_infer_ratelimit_batch_reply,
                                  b, b->argc, b->argv, b->argvlen)
            == REDIS_OK)
        {
            return;
        }
    }

    want = 0;

    for (i = 0; i < b->n; i++) {
        want += 1 + 3 * b->member[i]->nitems;
    }

    if (rr && rr->type == REDIS_REPLY_ARRAY && rr->elements != want) {
        ngx_http_infer_ratelimit_redis_error(
            ngx_http_infer_ratelimit_redis_main(),
            "the script answered a batch something unexpected");

        /* each member fails, as with no answer */
        rr = NULL;
    }

    ngx_memzero(&part, sizeof(redisReply));
    part.type = REDIS_REPLY_ARRAY;

    at = 0;

    for (i = 0; i < b->n; i++) {
        answer = rr;

        if (rr && rr->type == REDIS_REPLY_ARRAY) {
            part.elements = 1 + 3 * b->member[i]->nitems;
            part.element = rr->element + at;
            at += part.elements;
            answer = &part;

            if (part.element[0]->type == REDIS_REPLY_INTEGER
                && part.element[0]->integer == -1)
            {
                /* its keys failed in the script, the others' did not */
                ngx_http_infer_ratelimit_redis_error(
                    ngx_http_infer_ratelimit_redis_main(),
                    "the script failed for one admission of a batch");
                answer = NULL;
            }
        }

        ngx_http_infer_ratelimit_redis_answered(ac, b->member[i], answer);
    }

    ngx_free(b);

    ngx_http_infer_ratelimit_batch_answered();
}


/*
 * Copyright (C) ngx_infer authors
 *
 * Approximate limits (infer_ratelimit_limit ... approximate[=time]): for
 * rates too high to ask Redis about every request.  Each worker admits
 * from what Redis said was left of a key at its last sync, less what the
 * worker used since; every "sync" interval it sends, in one call for all
 * its keys, the units it used, and Redis answers what is left now (script
 * mode "s").  A key is synced when the worker used it, or only asked
 * about it, since the last sync; an idle key costs nothing.
 *
 * The share: between two syncs a worker admits up to its share of what
 * was left at the last one (of the whole limit before the first), that
 * is the left units divided by the workers of the fleet (replicas= of
 * infer_ratelimit_redis times worker_processes), rounded up; and one
 * request more than that when it has admitted nothing since, so that a
 * request larger than the share is not refused for ever.  A worker's
 * "left" does not count what the others used since they last synced, so
 * the fleet may go past the limit, by at most what it admits in one
 * interval, and by at most one share of the whole limit and one request
 * per worker (when replicas= is right).  Redis stays the one account: it
 * is charged everything that was admitted, and a debt refuses until the
 * bucket refills, as for an exact limit.
 *
 * While Redis cannot be reached, the workers go on admitting from what
 * they knew (a share that only shrinks); on_error does not apply.  The
 * units of a sync that got no answer are not sent again (they may have
 * been counted): an outage undercounts, it never counts twice.
 *
 * The keys live in the worker's heap, in an rbtree and an LRU queue; at
 * NGX_HTTP_INFER_RL_APPROX_MAX keys the least recently used one with no
 * units pending is forgotten.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_ratelimit.h"


#define NGX_HTTP_INFER_RL_APPROX_MAX   65536

/* keys per sync call: the reply is one array of 1 + 3 per key */
#define NGX_HTTP_INFER_RL_APPROX_CALL  1000


typedef struct {
    ngx_rbtree_node_t                   node;   /* first, then the item:
                                                   ngx_http_infer_ratelimit
                                                   _key_insert()'s order */
    ngx_http_infer_ratelimit_item_t     item;   /* limit, key, id, window */
    ngx_queue_t                         queue;  /* LRU, newest first */
    ngx_queue_t                         dirtyq; /* to sync */
    int64_t                             pending;    /* used since */
    int64_t                             sent;       /* in the sync call */
    int64_t                             remaining;  /* Redis's; -1: none */
    ngx_msec_t                          reset;
    unsigned                            touched:1;  /* asked since */
    unsigned                            syncing:1;
    unsigned                            dirty:1;    /* in dirtyq */
} ngx_http_infer_ratelimit_approx_node_t;


typedef struct {
    ngx_http_infer_ratelimit_redis_conf_t  *rcf;
    ngx_msec_t                          interval;
    int64_t                             workers;    /* of the fleet */
    ngx_rbtree_t                        tree;
    ngx_rbtree_node_t                   sentinel;
    ngx_queue_t                         lru;
    ngx_queue_t                         dirty;  /* used or asked since */
    ngx_uint_t                          n;
    ngx_event_t                         timer;
    ngx_log_t                          *log;

    /* the sync in flight: its items, and their nodes */
    ngx_http_infer_ratelimit_item_t    *items;
    ngx_http_infer_ratelimit_approx_node_t  **nodes;
    ngx_uint_t                          nitems;
} ngx_http_infer_ratelimit_approx_t;


static ngx_http_infer_ratelimit_approx_node_t *
    ngx_http_infer_ratelimit_approx_node(
    ngx_http_infer_ratelimit_approx_t *ax,
    ngx_http_infer_ratelimit_item_t *item, ngx_uint_t create);
static void ngx_http_infer_ratelimit_approx_mark(
    ngx_http_infer_ratelimit_approx_t *ax,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n);
static void ngx_http_infer_ratelimit_approx_dirty(
    ngx_http_infer_ratelimit_approx_t *ax,
    ngx_http_infer_ratelimit_approx_node_t *an);
static void ngx_http_infer_ratelimit_approx_timer(ngx_event_t *ev);


static ngx_http_infer_ratelimit_approx_t  ngx_http_infer_ratelimit_approx;


/* the keys of a request, to be synced (after their units moved) */

static void
ngx_http_infer_ratelimit_approx_mark(ngx_http_infer_ratelimit_approx_t *ax,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n)
{
    ngx_uint_t                               i;
    ngx_http_infer_ratelimit_approx_node_t  *an;

    for (i = 0; i < n; i++) {
        an = ngx_http_infer_ratelimit_approx_node(ax, &items[i], 0);

        if (an) {
            ngx_http_infer_ratelimit_approx_dirty(ax, an);
        }
    }
}


/* the key is to be synced; the timer runs while any key is */

static void
ngx_http_infer_ratelimit_approx_dirty(ngx_http_infer_ratelimit_approx_t *ax,
    ngx_http_infer_ratelimit_approx_node_t *an)
{
    if (!an->dirty) {
        an->dirty = 1;
        ngx_queue_insert_tail(&ax->dirty, &an->dirtyq);
    }

    if (ngx_exiting || ngx_quit) {
        /* a worker that quits does not wait for the timer */
        ngx_http_infer_ratelimit_approx_sync();
        return;
    }

    if (!ax->timer.timer_set) {
        ngx_add_timer(&ax->timer, ax->interval);

        /* connected ahead of the sync, and told if the worker quits */
        (void) ngx_http_infer_ratelimit_redis_open();
    }
}


ngx_int_t
ngx_http_infer_ratelimit_approx_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_redis_conf_t *rcf, ngx_msec_t interval)
{
    ngx_core_conf_t                    *ccf;
    ngx_http_infer_ratelimit_approx_t  *ax;

    ax = &ngx_http_infer_ratelimit_approx;

    ngx_memzero(ax, sizeof(ngx_http_infer_ratelimit_approx_t));

    if (interval == 0) {
        return NGX_OK;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    ax->rcf = rcf;
    ax->interval = interval;
    ax->workers = (int64_t) (rcf->replicas * ngx_max(ccf->worker_processes, 1));
    ax->log = cycle->log;

    ngx_rbtree_init(&ax->tree, &ax->sentinel,
                    ngx_http_infer_ratelimit_key_insert);
    ngx_queue_init(&ax->lru);
    ngx_queue_init(&ax->dirty);

    ax->timer.handler = ngx_http_infer_ratelimit_approx_timer;
    ax->timer.data = ax;
    ax->timer.log = cycle->log;
    ax->timer.cancelable = 1;

    return NGX_OK;
}


void
ngx_http_infer_ratelimit_approx_exit_process(ngx_cycle_t *cycle)
{
    ngx_queue_t                             *q;
    ngx_http_infer_ratelimit_approx_t       *ax;
    ngx_http_infer_ratelimit_approx_node_t  *an;

    ax = &ngx_http_infer_ratelimit_approx;

    if (ax->rcf == NULL) {
        return;
    }

    if (ax->timer.timer_set) {
        ngx_del_timer(&ax->timer);
    }

    while (!ngx_queue_empty(&ax->lru)) {
        q = ngx_queue_head(&ax->lru);
        ngx_queue_remove(q);
        an = ngx_queue_data(q, ngx_http_infer_ratelimit_approx_node_t,
                            queue);
        ngx_free(an);
    }

    /* the sync in flight, if any, is answered with NULL: ignored */
    ngx_free(ax->items);
    ax->items = NULL;
    ax->nodes = NULL;
    ax->rcf = NULL;
}


/*
 * Admits a request's approximate limits from what this worker knows, all
 * or none: NGX_OK (each charged here, where IN_APPROX) or NGX_BUSY (none
 * charged; the refused ones marked).  With shadow set, a refusal is only
 * reported: the request goes on, and all are charged.
 */

ngx_int_t
ngx_http_infer_ratelimit_approx_admit(ngx_http_infer_ratelimit_item_t *items,
    ngx_uint_t n, ngx_uint_t shadow)
{
    int64_t                                  left, used, share;
    ngx_uint_t                               i, refused;
    ngx_http_infer_ratelimit_item_t         *item;
    ngx_http_infer_ratelimit_approx_t       *ax;
    ngx_http_infer_ratelimit_approx_node_t  *an;

    ax = &ngx_http_infer_ratelimit_approx;

    if (n == 0 || ax->rcf == NULL) {
        return NGX_OK;
    }

    refused = 0;

    for (i = 0; i < n; i++) {
        item = &items[i];

        an = ngx_http_infer_ratelimit_approx_node(ax, item, 1);

        if (an == NULL) {
            /* no memory: not counted, as an outage with fail_open */
            continue;
        }

        an->touched = 1;

        /* what was left at the last sync, and used here since */

        left = (an->remaining >= 0) ? an->remaining
                                    : (int64_t) item->limit->limit;
        used = an->pending + an->sent;
        share = (left + ax->workers - 1) / ax->workers;

        item->known = 1;
        item->limit_n = item->limit->limit;
        item->reset = an->reset;
        item->remaining = (left - used > 0) ? (uint64_t) (left - used) : 0;

        if (used + (int64_t) item->cost > share
            && !(used <= 0 && (int64_t) item->cost <= left))
        {
            item->refused = 1;
            /*
             * when the next sync may tell otherwise, or the units refill
             * (a calendar window's, when it ends)
             */
            item->retry = item->limit->calendar
                ? an->reset
                : (ngx_msec_t) ((long double) (item->cost
                                               - ngx_min(item->cost,
                                                         item->remaining))
                                * item->limit->window / item->limit->limit);
            item->retry = ngx_min(ngx_max(item->retry, ax->interval),
                                  item->limit->window);
            refused = 1;
            continue;
        }

        item->refused = 0;
        item->remaining -= ngx_min(item->remaining, item->cost);
    }

    if (refused && !shadow) {
        ngx_http_infer_ratelimit_approx_mark(ax, items, n);
        return NGX_BUSY;
    }

    for (i = 0; i < n; i++) {
        item = &items[i];

        an = ngx_http_infer_ratelimit_approx_node(ax, item, 0);

        if (an) {
            an->pending += (int64_t) item->cost;
            item->where = NGX_HTTP_INFER_RL_IN_APPROX;
        }
    }

    ngx_http_infer_ratelimit_approx_mark(ax, items, n);

    return refused ? NGX_BUSY : NGX_OK;
}


/*
 * The request's charges taken back (another limit refused it), or moved
 * by its reconciliation (item->delta, where IN_APPROX).
 */

void
ngx_http_infer_ratelimit_approx_move(ngx_http_infer_ratelimit_item_t *items,
    ngx_uint_t n, ngx_uint_t undo)
{
    ngx_uint_t                               i;
    ngx_http_infer_ratelimit_approx_t       *ax;
    ngx_http_infer_ratelimit_approx_node_t  *an;

    ax = &ngx_http_infer_ratelimit_approx;

    if (ax->rcf == NULL) {
        return;
    }

    for (i = 0; i < n; i++) {
        if (items[i].where != NGX_HTTP_INFER_RL_IN_APPROX) {
            continue;
        }

        an = ngx_http_infer_ratelimit_approx_node(ax, &items[i], 0);

        if (an == NULL) {
            /* forgotten meanwhile: the correction is lost */
            continue;
        }

        if (undo) {
            an->pending -= (int64_t) items[i].cost;
            items[i].where = NGX_HTTP_INFER_RL_NOWHERE;

        } else if (items[i].delta) {
            an->pending += items[i].delta;
            ngx_http_infer_ratelimit_approx_dirty(ax, an);
        }
    }
}


/* every key used or asked about since the last sync, in one call */

void
ngx_http_infer_ratelimit_approx_sync(void)
{
    ngx_queue_t                             *q;
    ngx_uint_t                               n;
    ngx_http_infer_ratelimit_item_t         *item;
    ngx_http_infer_ratelimit_approx_t       *ax;
    ngx_http_infer_ratelimit_approx_node_t  *an;

    ax = &ngx_http_infer_ratelimit_approx;

    if (ax->rcf == NULL || ax->items) {
        /* one sync at a time: the next tick sends what is left */
        return;
    }

    n = 0;

    for (q = ngx_queue_head(&ax->dirty);
         q != ngx_queue_sentinel(&ax->dirty);
         q = ngx_queue_next(q))
    {
        n++;
    }

    if (n == 0) {
        return;
    }

    n = ngx_min(n, NGX_HTTP_INFER_RL_APPROX_CALL);

    ax->items = ngx_alloc(n * (sizeof(ngx_http_infer_ratelimit_item_t)
                          + sizeof(ngx_http_infer_ratelimit_approx_node_t *)),
                          ax->log);
    if (ax->items == NULL) {
        return;
    }

    ax->nodes = (ngx_http_infer_ratelimit_approx_node_t **) (ax->items + n);
    ax->nitems = 0;

    while (!ngx_queue_empty(&ax->dirty) && ax->nitems < n) {
        q = ngx_queue_head(&ax->dirty);
        ngx_queue_remove(q);

        an = ngx_queue_data(q, ngx_http_infer_ratelimit_approx_node_t,
                            dirtyq);
        an->dirty = 0;

        item = &ax->items[ax->nitems];
        *item = an->item;
        item->delta = an->pending;
        item->pre = 0;
        item->floor = 0;
        item->known = 0;
        item->unsent = 0;

        an->sent = an->pending;
        an->pending = 0;
        an->touched = 0;
        an->syncing = 1;

        ax->nodes[ax->nitems++] = an;
    }

    if (ngx_http_infer_ratelimit_redis_eval(NULL, ax->rcf,
                                            NGX_HTTP_INFER_RL_SYNC,
                                            ax->items, ax->nitems, NULL)
        != NGX_OK)
    {
        /* not sent: nothing was counted, the units wait for the next */
        ngx_http_infer_ratelimit_approx_synced(NGX_DECLINED, 0);
    }
}


/*
 * The sync's answer, in ax->items: each item answered is known.  The
 * units of the others are not sent again unless their call never left
 * (sent == 0, or, for a cluster's part, item->unsent).
 */

void
ngx_http_infer_ratelimit_approx_synced(ngx_int_t rc, ngx_uint_t sent)
{
    ngx_uint_t                               i;
    ngx_http_infer_ratelimit_approx_t       *ax;
    ngx_http_infer_ratelimit_approx_node_t  *an;

    ax = &ngx_http_infer_ratelimit_approx;

    if (ax->items == NULL) {
        return;
    }

    for (i = 0; i < ax->nitems; i++) {
        an = ax->nodes[i];

        if (ax->items[i].known) {
            an->remaining = (int64_t) ax->items[i].remaining;
            an->reset = ax->items[i].reset;

        } else if (!sent || ax->items[i].unsent) {
            an->pending += an->sent;
            an->touched = 1;
        }

        an->sent = 0;
        an->syncing = 0;

        if (an->pending || an->touched) {
            /* what came meanwhile, or what the call could not take */
            if (!an->dirty) {
                an->dirty = 1;
                ngx_queue_insert_tail(&ax->dirty, &an->dirtyq);
            }
        }
    }

    ngx_free(ax->items);
    ax->items = NULL;
    ax->nodes = NULL;
    ax->nitems = 0;

    if (rc == NGX_OK && (ngx_exiting || ngx_quit)
        && !ngx_queue_empty(&ax->dirty))
    {
        /* a quitting worker sends what came while it waited */
        ngx_http_infer_ratelimit_approx_sync();
    }
}


/* the answer's items, for the Redis client to parse it into */

ngx_http_infer_ratelimit_item_t *
ngx_http_infer_ratelimit_approx_items(ngx_uint_t *n)
{
    *n = ngx_http_infer_ratelimit_approx.nitems;

    return ngx_http_infer_ratelimit_approx.items;
}


static void
ngx_http_infer_ratelimit_approx_timer(ngx_event_t *ev)
{
    ngx_http_infer_ratelimit_approx_t  *ax = ev->data;

    ngx_http_infer_ratelimit_approx_sync();

    if (!ngx_queue_empty(&ax->dirty)) {
        ngx_add_timer(&ax->timer, ax->interval);
    }
}


/* the item's key, found, or made when create is set */

static ngx_http_infer_ratelimit_approx_node_t *
ngx_http_infer_ratelimit_approx_node(ngx_http_infer_ratelimit_approx_t *ax,
    ngx_http_infer_ratelimit_item_t *item, ngx_uint_t create)
{
    uint32_t                                 hash;
    ngx_queue_t                             *q;
    ngx_http_infer_ratelimit_approx_node_t  *an;

    an = (ngx_http_infer_ratelimit_approx_node_t *)
             ngx_http_infer_ratelimit_key_find(&ax->tree, item, &hash);

    if (an) {
        ngx_queue_remove(&an->queue);
        ngx_queue_insert_head(&ax->lru, &an->queue);
        return an;
    }

    if (!create) {
        return NULL;
    }

    if (ax->n >= NGX_HTTP_INFER_RL_APPROX_MAX) {
        /* the least recently used key with nothing to send */

        for (q = ngx_queue_last(&ax->lru);
             q != ngx_queue_sentinel(&ax->lru);
             q = ngx_queue_prev(q))
        {
            an = ngx_queue_data(q, ngx_http_infer_ratelimit_approx_node_t,
                                queue);

            if (!an->pending && !an->syncing && !an->dirty) {
                ngx_queue_remove(q);
                ngx_rbtree_delete(&ax->tree, &an->node);
                ngx_free(an);
                ax->n--;
                break;
            }
        }

        if (ax->n >= NGX_HTTP_INFER_RL_APPROX_MAX) {
            return NULL;
        }
    }

    an = ngx_alloc(sizeof(ngx_http_infer_ratelimit_approx_node_t)
                   + item->id.len + item->key.len + item->window.len,
                   ax->log);
    if (an == NULL) {
        return NULL;
    }

    ngx_memzero(an, sizeof(ngx_http_infer_ratelimit_approx_node_t));

    ngx_http_infer_ratelimit_key_copy(&an->item, item, (u_char *) (an + 1));
    an->node.key = hash;
    an->remaining = -1;

    ngx_rbtree_insert(&ax->tree, &an->node);
    ngx_queue_insert_head(&ax->lru, &an->queue);
    ax->n++;

    return an;
}

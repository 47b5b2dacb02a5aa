
/*
 * Copyright (C) ngx_infer authors
 *
 * The local limiter: every limit's GCRA in a shared-memory zone, one node
 * per (limit name, key), as limit_req keeps its nodes.  Used alone (the
 * local mode) and as Redis's fallback (on_error=local).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer_ratelimit.h"


/*
 * The zone: one node per (limit name, key) holding the key's theoretical
 * arrival time, in an rbtree for lookups and an LRU queue for expiry, as
 * limit_req keeps its nodes.
 */

typedef struct {
    u_char                      color;
    u_char                      counter;    /* tat counts: requests in
                                               flight, or a calendar
                                               window's units */
    u_short                     len;
    ngx_queue_t                 queue;
    uint64_t                    tat;        /* ns, ngx_current_msec's */
    uint64_t                    end;        /* a calendar window's end, ms
                                               since the epoch; 0: none */
    u_char                      data[1];
} ngx_http_infer_ratelimit_node_t;


typedef struct {
    ngx_rbtree_t                rbtree;
    ngx_rbtree_node_t           sentinel;
    ngx_queue_t                 queue;
    uint64_t                    now;        /* the latest clock seen */
} ngx_http_infer_ratelimit_shctx_t;


typedef struct {
    ngx_http_infer_ratelimit_shctx_t  *sh;
    ngx_slab_pool_t            *shpool;
} ngx_http_infer_ratelimit_zone_t;


static ngx_int_t ngx_http_infer_ratelimit_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);


/*
 * A GCRA of limit units per win ns: units as ns of its TAT, and ns as
 * units, multiplied before divided, in 128 bits.  An emission interval
 * (win / limit) in whole ns would be truncated: a budget of 1000 USD an
 * hour, 10^12 nano-dollars in 3.6 10^12 ns, would get 3 ns a unit instead
 * of 3.6, and admit 20 % more.
 */

#if (defined __SIZEOF_INT128__)
typedef unsigned __int128  ngx_http_infer_ratelimit_wide_t;
#else
typedef long double        ngx_http_infer_ratelimit_wide_t;
#endif

static ngx_inline uint64_t
ngx_http_infer_ratelimit_ns(uint64_t units, uint64_t win, uint64_t limit)
{
    return (uint64_t) ((ngx_http_infer_ratelimit_wide_t) units * win / limit);
}


static ngx_inline uint64_t
ngx_http_infer_ratelimit_units(uint64_t ns, uint64_t win, uint64_t limit)
{
    return (uint64_t) ((ngx_http_infer_ratelimit_wide_t) ns * limit / win);
}


static void
ngx_http_infer_ratelimit_rbtree_insert_value(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t                **p;
    ngx_http_infer_ratelimit_node_t   *lrn, *lrnt;

    for ( ;; ) {

        if (node->key < temp->key) {
            p = &temp->left;

        } else if (node->key > temp->key) {
            p = &temp->right;

        } else { /* node->key == temp->key */

            lrn = (ngx_http_infer_ratelimit_node_t *) &node->color;
            lrnt = (ngx_http_infer_ratelimit_node_t *) &temp->color;

            p = (ngx_memn2cmp(lrn->data, lrnt->data, lrn->len, lrnt->len) < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}


static ngx_http_infer_ratelimit_node_t *
ngx_http_infer_ratelimit_lookup(ngx_http_infer_ratelimit_zone_t *z,
    ngx_http_infer_ratelimit_item_t *item)
{
    ngx_int_t                          rc;
    ngx_rbtree_node_t                 *node, *sentinel;
    ngx_http_infer_ratelimit_node_t   *lrn;

    node = z->sh->rbtree.root;
    sentinel = z->sh->rbtree.sentinel;

    while (node != sentinel) {

        if (item->hash < node->key) {
            node = node->left;
            continue;
        }

        if (item->hash > node->key) {
            node = node->right;
            continue;
        }

        lrn = (ngx_http_infer_ratelimit_node_t *) &node->color;

        rc = ngx_memn2cmp(item->id.data, lrn->data, item->id.len, lrn->len);

        if (rc == 0) {
            return lrn;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


/*
 * Frees up to n least recently used nodes whose bucket is full again, or
 * whose count of requests in flight is 0 (they carry no state), or with
 * n == 0 the oldest one whatever it holds, when memory ran out.  A count
 * still in use is not stale however old: it goes back to the head.
 */

static void
ngx_http_infer_ratelimit_expire(ngx_http_infer_ratelimit_zone_t *z,
    uint64_t now, ngx_uint_t n)
{
    ngx_uint_t                         force;
    ngx_queue_t                       *q;
    ngx_rbtree_node_t                 *node;
    ngx_http_infer_ratelimit_node_t   *lrn;

    force = (n == 0);
    if (force) {
        n = 1;
    }

    while (n--) {

        if (ngx_queue_empty(&z->sh->queue)) {
            return;
        }

        q = ngx_queue_last(&z->sh->queue);

        lrn = ngx_queue_data(q, ngx_http_infer_ratelimit_node_t, queue);

        if (!force && lrn->counter && lrn->tat > 0
            && (lrn->end == 0 || lrn->end > (uint64_t) ngx_time() * 1000))
        {
            ngx_queue_remove(q);
            ngx_queue_insert_head(&z->sh->queue, q);
            continue;
        }

        if (!force && !lrn->counter && lrn->tat > now) {
            return;
        }

        ngx_queue_remove(q);

        node = (ngx_rbtree_node_t *)
                   ((u_char *) lrn - offsetof(ngx_rbtree_node_t, color));

        ngx_rbtree_delete(&z->sh->rbtree, node);

        ngx_slab_free_locked(z->shpool, node);
    }
}


/*
 * The item's node, found or made.  Expiry happens before an evaluation
 * looks up its first node; once it holds some, only the first may force
 * out the oldest node, which could be one it holds otherwise.
 */

static ngx_http_infer_ratelimit_node_t *
ngx_http_infer_ratelimit_node(ngx_http_infer_ratelimit_zone_t *z,
    ngx_http_infer_ratelimit_item_t *item, uint64_t now, ngx_uint_t first)
{
    size_t                             size;
    ngx_rbtree_node_t                 *node;
    ngx_http_infer_ratelimit_node_t   *lrn;

    lrn = ngx_http_infer_ratelimit_lookup(z, item);

    if (lrn) {
        ngx_queue_remove(&lrn->queue);
        ngx_queue_insert_head(&z->sh->queue, &lrn->queue);
        return lrn;
    }

    size = offsetof(ngx_rbtree_node_t, color)
           + offsetof(ngx_http_infer_ratelimit_node_t, data)
           + item->id.len;

    node = ngx_slab_alloc_locked(z->shpool, size);

    if (node == NULL) {
        if (!first) {
            return NULL;
        }

        ngx_http_infer_ratelimit_expire(z, now, 0);

        node = ngx_slab_alloc_locked(z->shpool, size);
        if (node == NULL) {
            return NULL;
        }
    }

    node->key = item->hash;

    lrn = (ngx_http_infer_ratelimit_node_t *) &node->color;

    lrn->len = (u_short) item->id.len;
    lrn->counter = (item->limit->kind == NGX_HTTP_INFER_RL_CONCURRENCY
                    || item->limit->calendar);
    lrn->tat = 0;
    lrn->end = item->end;
    ngx_memcpy(lrn->data, item->id.data, item->id.len);

    ngx_rbtree_insert(&z->sh->rbtree, node);
    ngx_queue_insert_head(&z->sh->queue, &lrn->queue);

    return lrn;
}


/*
 * GCRA for all of a request's limits at once (and a plain count for the
 * in-flight ones), under the zone's lock, so that either every limit is
 * charged or none is.  With local set, only
 * the items whose outage policy is "local" are counted, each limit
 * divided by divisor.
 */

ngx_int_t
ngx_http_infer_ratelimit_zone_eval(ngx_shm_zone_t *zone,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n, ngx_uint_t local,
    ngx_uint_t divisor)
{
    uint64_t                           now, win, lim, tat, next, wall;
    ngx_uint_t                         i, refused, held;
    ngx_http_infer_ratelimit_item_t   *item;
    ngx_http_infer_ratelimit_node_t   *lrn, **nodes;
    ngx_http_infer_ratelimit_zone_t   *z;
    ngx_http_infer_ratelimit_node_t   *stack[16];

    if (zone == NULL) {
        return NGX_DECLINED;
    }

    z = zone->data;

    if (n > 16) {
        nodes = ngx_alloc(n * sizeof(ngx_http_infer_ratelimit_node_t *),
                          ngx_cycle->log);
        if (nodes == NULL) {
            return NGX_ERROR;
        }

    } else {
        nodes = stack;
    }

    now = (uint64_t) ngx_current_msec * 1000000;
    wall = (uint64_t) ngx_time() * 1000 + (ngx_timeofday())->msec;
    refused = 0;
    held = 0;

    ngx_shmtx_lock(&z->shpool->mutex);

    /*
     * Each worker caches its own clock: the zone's never goes back, or a
     * worker a millisecond late would see another's charge in its future.
     */

    if (now < z->sh->now) {
        now = z->sh->now;

    } else {
        z->sh->now = now;
    }

    ngx_http_infer_ratelimit_expire(z, now, n + 1);

    for (i = 0; i < n; i++) {
        item = &items[i];
        nodes[i] = NULL;

        if (local && item->limit->on_error != NGX_HTTP_INFER_RL_LOCAL) {
            continue;
        }

        item->limit_n = item->limit->limit / divisor;
        if (item->limit_n == 0) {
            item->limit_n = 1;
        }

        lrn = ngx_http_infer_ratelimit_node(z, item, now, held == 0);

        if (lrn == NULL) {
            /* no memory even after expiry: this limit is not counted */
            ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                          "infer ratelimit: zone \"%V\" is full",
                          &zone->shm.name);
            continue;
        }

        nodes[i] = lrn;
        held++;

        item->known = 1;

        if (local && item->cost > item->limit_n) {
            /*
             * a replica's share of the limit smaller than one request's
             * estimate: during an outage, one such request at a time
             */
            item->cost = item->limit_n;
        }

        if (item->limit->calendar) {
            /* a count until the window ends; the window names the node */
            item->reset = (item->end > wall) ? item->end - wall : 1;

            if (item->cost > item->limit_n
                || lrn->tat + item->cost > item->limit_n)
            {
                item->refused = 1;
                item->remaining = item->limit_n - ngx_min(lrn->tat,
                                                          item->limit_n);
                item->retry = item->reset;
                refused = 1;
                continue;
            }

            item->refused = 0;
            item->remaining = item->limit_n - lrn->tat - item->cost;
            item->retry = 0;
            continue;
        }

        if (item->limit->kind == NGX_HTTP_INFER_RL_CONCURRENCY) {
            item->reset = 0;

            if (lrn->tat + item->cost > item->limit_n) {
                item->refused = 1;
                item->remaining = 0;
                item->retry = 1000;
                refused = 1;
                continue;
            }

            item->refused = 0;
            item->remaining = item->limit_n - lrn->tat - item->cost;
            item->retry = 0;
            continue;
        }

        win = (uint64_t) item->limit->window * 1000000;
        lim = item->limit_n;
        tat = ngx_max(lrn->tat, now);

        if (item->cost > item->limit_n) {
            /* can never fit: as long a wait as a whole window */
            item->refused = 1;
            item->remaining = (tat - now >= win)
                ? 0 : ngx_http_infer_ratelimit_units(now + win - tat, win, lim);
            item->reset = (tat - now) / 1000000;
            item->retry = item->limit->window;
            refused = 1;
            continue;
        }

        next = tat + ngx_http_infer_ratelimit_ns(item->cost, win, lim);

        if (next - now > win) {
            item->refused = 1;
            /* a debt may have pushed tat past the window */
            item->remaining = (tat - now >= win)
                ? 0 : ngx_http_infer_ratelimit_units(now + win - tat, win, lim);
            item->reset = (tat - now + 999999) / 1000000;
            item->retry = (next - now - win + 999999) / 1000000;
            refused = 1;
            continue;
        }

        item->refused = 0;
        item->remaining = ngx_http_infer_ratelimit_units(now + win - next, win,
                                                         lim);
        item->reset = (next - now + 999999) / 1000000;
        item->retry = 0;
    }

    if (!refused) {
        for (i = 0; i < n; i++) {
            if (nodes[i] == NULL) {
                continue;
            }

            item = &items[i];
            item->where = NGX_HTTP_INFER_RL_IN_ZONE;

            if (nodes[i]->counter) {
                nodes[i]->tat += item->cost;
                continue;
            }

            win = (uint64_t) item->limit->window * 1000000;

            nodes[i]->tat = ngx_max(nodes[i]->tat, now)
                            + ngx_http_infer_ratelimit_ns(item->cost, win,
                                                          item->limit_n);
        }
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    if (nodes != stack) {
        ngx_free(nodes);
    }

    return refused ? NGX_BUSY : NGX_OK;
}


/*
 * Redis mode, for the limits whose outage policy is "local".  The zone
 * keeps this gateway's own use of each key, in its share of the limit
 * (the limit divided by the replicas): every request Redis admitted is
 * charged there too (zone_mirror), at most emptying the share, since
 * what a gateway is let to use beyond its share is Redis's to decide.
 * An outage then goes on from what the gateway used, not from a full
 * share.  And each admission tells Redis how far ahead that share is
 * (zone_floor, converted to units of the whole limit): a Redis that lost
 * its keys (restarted empty) or did not see what was counted here during
 * an outage starts the key from this gateway's use, not from a full
 * bucket.  For one gateway (replicas=1) the zone and Redis then hold the
 * same bucket, and an outage or a restart gives a tenant nothing more.
 */

static ngx_uint_t
ngx_http_infer_ratelimit_mirrors(ngx_http_infer_ratelimit_item_t *item)
{
    return item->limit->on_error == NGX_HTTP_INFER_RL_LOCAL
           && item->limit->kind != NGX_HTTP_INFER_RL_CONCURRENCY
           && !item->limit->calendar;
}


void
ngx_http_infer_ratelimit_zone_floor(ngx_shm_zone_t *zone,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n, ngx_uint_t divisor,
    ngx_msec_t slack)
{
    uint64_t                           now, d;
    ngx_uint_t                         i;
    ngx_http_infer_ratelimit_item_t   *item;
    ngx_http_infer_ratelimit_node_t   *lrn;
    ngx_http_infer_ratelimit_zone_t   *z;

    if (zone == NULL) {
        return;
    }

    z = zone->data;

    now = (uint64_t) ngx_current_msec * 1000000;

    ngx_shmtx_lock(&z->shpool->mutex);

    now = ngx_max(now, z->sh->now);

    for (i = 0; i < n; i++) {
        item = &items[i];
        item->floor = 0;

        if (!ngx_http_infer_ratelimit_mirrors(item)) {
            continue;
        }

        lrn = ngx_http_infer_ratelimit_lookup(z, item);

        /*
         * the zone is charged when Redis's reply comes, later than Redis
         * charged: less the slack, the floor never binds a key that Redis
         * keeps as it should; a unit of the share is as long as divisor
         * units of the limit
         */

        d = (uint64_t) slack * 1000000;

        if (lrn && lrn->tat > now + d) {
            item->floor = (lrn->tat - now - d) / divisor / 1000;
        }
    }

    ngx_shmtx_unlock(&z->shpool->mutex);
}


void
ngx_http_infer_ratelimit_zone_mirror(ngx_shm_zone_t *zone,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n, ngx_uint_t divisor)
{
    uint64_t                           now, win, share, tat;
    ngx_uint_t                         i, held;
    ngx_http_infer_ratelimit_item_t   *item;
    ngx_http_infer_ratelimit_node_t   *lrn;
    ngx_http_infer_ratelimit_zone_t   *z;

    if (zone == NULL) {
        return;
    }

    z = zone->data;

    now = (uint64_t) ngx_current_msec * 1000000;
    held = 0;

    ngx_shmtx_lock(&z->shpool->mutex);

    if (now < z->sh->now) {
        now = z->sh->now;

    } else {
        z->sh->now = now;
    }

    ngx_http_infer_ratelimit_expire(z, now, n + 1);

    for (i = 0; i < n; i++) {
        item = &items[i];

        if (item->where != NGX_HTTP_INFER_RL_IN_REDIS
            || !ngx_http_infer_ratelimit_mirrors(item))
        {
            continue;
        }

        lrn = ngx_http_infer_ratelimit_node(z, item, now, held == 0);

        if (lrn == NULL) {
            continue;
        }

        held++;
        item->mirrored = 1;

        share = ngx_max(item->limit->limit / divisor, 1);
        win = (uint64_t) item->limit->window * 1000000;

        /* never back: a debt counted here during an outage stays */

        tat = (item->cost >= share)
              ? now + win
              : ngx_min(ngx_max(lrn->tat, now)
                        + ngx_http_infer_ratelimit_ns(item->cost, win, share),
                        now + win);

        lrn->tat = ngx_max(lrn->tat, tat);
    }

    ngx_shmtx_unlock(&z->shpool->mutex);
}


/*
 * Moves each item's node by its delta: a refund back, a debt forward from
 * now if the bucket refilled meanwhile (its node may even have been
 * reused during a long stream), as an admission would charge it.  A
 * mirrored node moves in units of its share, and at most to empty.
 */

void
ngx_http_infer_ratelimit_zone_reconcile(ngx_shm_zone_t *zone,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n, ngx_uint_t divisor)
{
    uint64_t                           d, now, win, share;
    ngx_uint_t                         i;
    ngx_http_infer_ratelimit_item_t   *item;
    ngx_http_infer_ratelimit_node_t   *lrn;
    ngx_http_infer_ratelimit_zone_t   *z;

    z = zone->data;

    now = (uint64_t) ngx_current_msec * 1000000;

    ngx_shmtx_lock(&z->shpool->mutex);

    now = ngx_max(now, z->sh->now);

    for (i = 0; i < n; i++) {
        item = &items[i];

        if ((item->where != NGX_HTTP_INFER_RL_IN_ZONE && !item->mirrored)
            || item->delta == 0)
        {
            continue;
        }

        lrn = ngx_http_infer_ratelimit_lookup(z, item);

        if (lrn == NULL && item->delta > 0) {
            lrn = ngx_http_infer_ratelimit_node(z, item, now, 1);
        }

        if (lrn == NULL) {
            continue;
        }

        /* a count moves by units, a TAT by units of emission interval */

        win = (uint64_t) item->limit->window * 1000000;
        share = item->mirrored ? ngx_max(item->limit->limit / divisor, 1)
                               : item->limit_n;

        d = (uint64_t) ((item->delta > 0) ? item->delta : - item->delta);

        if (!lrn->counter) {
            d = ngx_http_infer_ratelimit_ns(d, win, share);
        }

        if (item->delta > 0) {
            d += lrn->counter ? lrn->tat : ngx_max(lrn->tat, now);

            lrn->tat = item->mirrored
                       ? ngx_max(lrn->tat, ngx_min(d, now + win)) : d;

        } else {
            lrn->tat = (lrn->tat > d) ? lrn->tat - d : 0;
        }
    }

    ngx_shmtx_unlock(&z->shpool->mutex);
}


static ngx_int_t
ngx_http_infer_ratelimit_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_infer_ratelimit_zone_t  *ozone = data;

    size_t                            len;
    ngx_http_infer_ratelimit_zone_t  *z;

    z = shm_zone->data;

    if (ozone) {
        /* a reload: the counters go on */
        z->sh = ozone->sh;
        z->shpool = ozone->shpool;
        return NGX_OK;
    }

    z->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        z->sh = z->shpool->data;
        return NGX_OK;
    }

    z->sh = ngx_slab_alloc(z->shpool, sizeof(ngx_http_infer_ratelimit_shctx_t));
    if (z->sh == NULL) {
        return NGX_ERROR;
    }

    z->shpool->data = z->sh;

    ngx_rbtree_init(&z->sh->rbtree, &z->sh->sentinel,
                    ngx_http_infer_ratelimit_rbtree_insert_value);

    ngx_queue_init(&z->sh->queue);

    len = sizeof(" in infer_ratelimit_zone \"\"") + shm_zone->shm.name.len;

    z->shpool->log_ctx = ngx_slab_alloc(z->shpool, len);
    if (z->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(z->shpool->log_ctx, " in infer_ratelimit_zone \"%V\"%Z",
                &shm_zone->shm.name);

    z->shpool->log_nomem = 0;

    return NGX_OK;
}


ngx_shm_zone_t *
ngx_http_infer_ratelimit_zone_add(ngx_conf_t *cf, ngx_str_t *name,
    size_t size)
{
    ngx_shm_zone_t                   *shm_zone;
    ngx_http_infer_ratelimit_zone_t  *z;

    z = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_ratelimit_zone_t));
    if (z == NULL) {
        return NULL;
    }

    shm_zone = ngx_shared_memory_add(cf, name, size,
                                     &ngx_http_infer_ratelimit_module);
    if (shm_zone == NULL) {
        return NULL;
    }

    if (shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "zone \"%V\" is already used", name);
        return NULL;
    }

    shm_zone->init = ngx_http_infer_ratelimit_init_zone;
    shm_zone->data = z;

    return shm_zone;
}

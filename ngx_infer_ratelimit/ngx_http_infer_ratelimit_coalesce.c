
/*
 * Copyright (C) ngx_infer authors
 *
 * Reconciliations coalesced: the corrections that the LOG phase makes to
 * Redis's counts (a token reservation becoming the real usage, a budget
 * its cost) are not on any request's path, so each worker sums them per
 * key for "coalesce=" and sends them all in one call: one EVALSHA "r"
 * with many keys, instead of one per request.  Redis does the work of one
 * script call for every key that moved, however many requests moved it.
 *
 * A request that releases an in-flight count is reconciled at once, as
 * before, with all of its corrections: a release held back would refuse
 * a request that fits.  And an admission of a key with a correction
 * pending carries it (coalesce_admit; restored if the admission cannot
 * be sent): the script makes it first, so a
 * worker's calls on one key keep their order, and a busy key's
 * corrections cost no call at all.
 *
 * The sums live in a pool of the worker's, made again after each flush,
 * in an rbtree by key: memory is bounded by the keys of one interval,
 * and a flush is forced at NGX_HTTP_INFER_RL_COALESCE_MAX keys.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_ratelimit.h"


/* keys per call: the script answers one array per call, bounded */
#define NGX_HTTP_INFER_RL_COALESCE_MAX  512


typedef struct {
    ngx_rbtree_node_t                   node;   /* key: crc32 of the id */
    ngx_http_infer_ratelimit_item_t     item;   /* its id, limit, delta */
} ngx_http_infer_ratelimit_pending_t;


typedef struct {
    ngx_http_infer_ratelimit_redis_conf_t  *rcf;
    ngx_pool_t                         *pool;
    ngx_rbtree_t                        tree;
    ngx_rbtree_node_t                   sentinel;
    ngx_uint_t                          n;
    ngx_event_t                         timer;
    ngx_log_t                          *log;
} ngx_http_infer_ratelimit_coalesce_t;


static ngx_int_t ngx_http_infer_ratelimit_coalesce_reset(
    ngx_http_infer_ratelimit_coalesce_t *co);
static ngx_http_infer_ratelimit_pending_t *
    ngx_http_infer_ratelimit_coalesce_find(
    ngx_http_infer_ratelimit_coalesce_t *co,
    ngx_http_infer_ratelimit_item_t *item, uint32_t *hash);
static void ngx_http_infer_ratelimit_coalesce_timer(ngx_event_t *ev);
static ngx_int_t ngx_http_infer_ratelimit_key_cmp(
    ngx_http_infer_ratelimit_item_t *a, ngx_http_infer_ratelimit_item_t *b);


static ngx_http_infer_ratelimit_coalesce_t  ngx_http_infer_ratelimit_coalesce;


ngx_int_t
ngx_http_infer_ratelimit_coalesce_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_redis_conf_t *rcf)
{
    ngx_http_infer_ratelimit_coalesce_t  *co;

    co = &ngx_http_infer_ratelimit_coalesce;

    ngx_memzero(co, sizeof(ngx_http_infer_ratelimit_coalesce_t));

    if (rcf->coalesce == 0) {
        return NGX_OK;
    }

    co->rcf = rcf;
    co->log = cycle->log;

    co->timer.handler = ngx_http_infer_ratelimit_coalesce_timer;
    co->timer.data = co;
    co->timer.log = cycle->log;
    co->timer.cancelable = 1;

    return ngx_http_infer_ratelimit_coalesce_reset(co);
}


void
ngx_http_infer_ratelimit_coalesce_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_infer_ratelimit_coalesce_t  *co;

    co = &ngx_http_infer_ratelimit_coalesce;

    if (co->rcf == NULL) {
        return;
    }

    /* handed to hiredis, which fails it if nothing is written before */
    ngx_http_infer_ratelimit_coalesce_flush();

    if (co->timer.timer_set) {
        ngx_del_timer(&co->timer);
    }

    ngx_destroy_pool(co->pool);
    co->pool = NULL;
    co->rcf = NULL;
}


/*
 * The request's corrections, summed into the pending ones; NGX_DECLINED
 * when coalescing is off, or the request must be reconciled at once.
 */

ngx_int_t
ngx_http_infer_ratelimit_coalesce_add(ngx_http_infer_ratelimit_item_t *items,
    ngx_uint_t n)
{
    uint32_t                              hash;
    ngx_uint_t                            i;
    ngx_http_infer_ratelimit_item_t      *item;
    ngx_http_infer_ratelimit_pending_t    *pd;
    ngx_http_infer_ratelimit_coalesce_t  *co;

    co = &ngx_http_infer_ratelimit_coalesce;

    if (co->rcf == NULL || ngx_exiting || ngx_quit) {
        /* a worker that quits sends its corrections as they come */
        return NGX_DECLINED;
    }

    for (i = 0; i < n; i++) {
        if (items[i].where == NGX_HTTP_INFER_RL_IN_REDIS
            && items[i].limit->kind == NGX_HTTP_INFER_RL_CONCURRENCY)
        {
            return NGX_DECLINED;
        }
    }

    if (co->n + n > NGX_HTTP_INFER_RL_COALESCE_MAX) {
        ngx_http_infer_ratelimit_coalesce_flush();
    }

    for (i = 0; i < n; i++) {
        item = &items[i];

        if (item->where != NGX_HTTP_INFER_RL_IN_REDIS || item->delta == 0) {
            continue;
        }

        pd = ngx_http_infer_ratelimit_coalesce_find(co, item, &hash);

        if (pd) {
            pd->item.delta += item->delta;
            continue;
        }

        /* the item, with its id, key and window in the pool */

        pd = ngx_palloc(co->pool, sizeof(ngx_http_infer_ratelimit_pending_t)
                                  + item->id.len + item->key.len
                                  + item->window.len);
        if (pd == NULL) {
            /* those summed already must not be sent twice */
            ngx_log_error(NGX_LOG_ALERT, co->log, 0,
                          "infer ratelimit: no memory to coalesce a "
                          "correction: lost");
            return NGX_OK;
        }

        ngx_http_infer_ratelimit_key_copy(&pd->item, item, (u_char *) (pd + 1));
        pd->node.key = hash;

        ngx_rbtree_insert(&co->tree, &pd->node);
        co->n++;
    }

    if (!co->timer.timer_set) {
        /* the pool is made again then, even if admissions took all */
        ngx_add_timer(&co->timer, co->rcf->coalesce);
    }

    return NGX_OK;
}


/*
 * Before an admission: the correction pending for each of its keys rides
 * with it, made by the script before it admits (item->pre), so that a
 * worker's admissions always see its earlier corrections, as when each
 * was sent at once, and a busy key costs no call of its own.
 */

void
ngx_http_infer_ratelimit_coalesce_admit(ngx_http_infer_ratelimit_item_t *items,
    ngx_uint_t n)
{
    uint32_t                              hash;
    ngx_uint_t                            i;
    ngx_http_infer_ratelimit_pending_t   *pd;
    ngx_http_infer_ratelimit_coalesce_t  *co;

    co = &ngx_http_infer_ratelimit_coalesce;

    for (i = 0; i < n; i++) {
        items[i].pre = 0;

        if (co->rcf == NULL || co->n == 0) {
            continue;
        }

        pd = ngx_http_infer_ratelimit_coalesce_find(co, &items[i], &hash);

        if (pd) {
            /* the key stays, at 0: the next correction sums into it */
            items[i].pre = pd->item.delta;
            pd->item.delta = 0;
        }
    }
}


/*
 * The admission that carried them could not be sent: the corrections go
 * back to be sent with the next flush.
 */

void
ngx_http_infer_ratelimit_coalesce_restore(
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n)
{
    uint32_t                              hash;
    ngx_uint_t                            i;
    ngx_http_infer_ratelimit_pending_t   *pd;
    ngx_http_infer_ratelimit_coalesce_t  *co;

    co = &ngx_http_infer_ratelimit_coalesce;

    for (i = 0; i < n; i++) {
        if (items[i].pre == 0 || co->rcf == NULL) {
            continue;
        }

        pd = ngx_http_infer_ratelimit_coalesce_find(co, &items[i], &hash);

        if (pd) {
            pd->item.delta += items[i].pre;
        }

        items[i].pre = 0;
    }
}


/* the pending correction of an item's key, and the key's hash */

static ngx_http_infer_ratelimit_pending_t *
ngx_http_infer_ratelimit_coalesce_find(ngx_http_infer_ratelimit_coalesce_t *co,
    ngx_http_infer_ratelimit_item_t *item, uint32_t *hash)
{
    return (ngx_http_infer_ratelimit_pending_t *)
               ngx_http_infer_ratelimit_key_find(&co->tree, item, hash);
}


/*
 * The order of the trees of keys (here, and of approximate limits): an
 * rbtree node followed by its item; by the id's hash mixed with the
 * limit's address, then the limit, then the id.
 */

static ngx_int_t
ngx_http_infer_ratelimit_key_cmp(ngx_http_infer_ratelimit_item_t *a,
    ngx_http_infer_ratelimit_item_t *b)
{
    if (a->limit != b->limit) {
        return ((uintptr_t) a->limit < (uintptr_t) b->limit) ? -1 : 1;
    }

    return ngx_memn2cmp(a->id.data, b->id.data, a->id.len, b->id.len);
}


ngx_rbtree_node_t *
ngx_http_infer_ratelimit_key_find(ngx_rbtree_t *tree,
    ngx_http_infer_ratelimit_item_t *item, uint32_t *hash)
{
    ngx_int_t           rc;
    ngx_rbtree_node_t  *node, *sentinel;

    *hash = ngx_crc32_short(item->id.data, item->id.len)
            ^ (uint32_t) (uintptr_t) item->limit;

    node = tree->root;
    sentinel = tree->sentinel;

    while (node != sentinel) {
        if (*hash != node->key) {
            node = (*hash < node->key) ? node->left : node->right;
            continue;
        }

        rc = ngx_http_infer_ratelimit_key_cmp(item,
                               (ngx_http_infer_ratelimit_item_t *) (node + 1));

        if (rc == 0) {
            return node;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


/*
 * A tree's copy of an item: its id, key and window in p, which has
 * room for the three (they are the request's, in its pool).
 */

void
ngx_http_infer_ratelimit_key_copy(ngx_http_infer_ratelimit_item_t *dst,
    ngx_http_infer_ratelimit_item_t *src, u_char *p)
{
    *dst = *src;

    dst->id.data = p;
    p = ngx_cpymem(p, src->id.data, src->id.len);
    dst->key.data = p;
    p = ngx_cpymem(p, src->key.data, src->key.len);
    dst->window.data = p;
    ngx_memcpy(p, src->window.data, src->window.len);
}


void
ngx_http_infer_ratelimit_key_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t  **p;

    for ( ;; ) {

        if (node->key != temp->key) {
            p = (node->key < temp->key) ? &temp->left : &temp->right;

        } else {
            p = (ngx_http_infer_ratelimit_key_cmp(
                     (ngx_http_infer_ratelimit_item_t *) (node + 1),
                     (ngx_http_infer_ratelimit_item_t *) (temp + 1)) < 0)
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


/* every pending correction in one call, then a new pool */

void
ngx_http_infer_ratelimit_coalesce_flush(void)
{
    ngx_uint_t                            n;
    ngx_rbtree_node_t                    *node;
    ngx_http_infer_ratelimit_item_t      *items;
    ngx_http_infer_ratelimit_coalesce_t  *co;

    co = &ngx_http_infer_ratelimit_coalesce;

    if (co->rcf == NULL) {
        return;
    }

    /* with no key pending (all rode with admissions), the pool is reset */

    items = co->n ? ngx_palloc(co->pool,
                               co->n * sizeof(ngx_http_infer_ratelimit_item_t))
                  : NULL;

    if (items) {
        n = 0;

        for (node = ngx_rbtree_min(co->tree.root, co->tree.sentinel);
             node;
             node = ngx_rbtree_next(&co->tree, node))
        {
            items[n] = ((ngx_http_infer_ratelimit_pending_t *) node)->item;

            if (items[n].delta != 0) {
                n++;
            }
        }

        /* Redis unavailable: lost, as one request's would be */
        (void) ngx_http_infer_ratelimit_redis_eval(NULL, co->rcf,
                                                   NGX_HTTP_INFER_RL_RECONCILE,
                                                   items, n, NULL);
    }

    if (co->timer.timer_set) {
        ngx_del_timer(&co->timer);
    }

    ngx_destroy_pool(co->pool);
    co->pool = NULL;

    (void) ngx_http_infer_ratelimit_coalesce_reset(co);
}


static ngx_int_t
ngx_http_infer_ratelimit_coalesce_reset(ngx_http_infer_ratelimit_coalesce_t *co)
{
    co->pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, co->log);
    if (co->pool == NULL) {
        co->rcf = NULL;
        return NGX_ERROR;
    }

    ngx_rbtree_init(&co->tree, &co->sentinel,
                    ngx_http_infer_ratelimit_key_insert);
    co->n = 0;

    return NGX_OK;
}


static void
ngx_http_infer_ratelimit_coalesce_timer(ngx_event_t *ev)
{
    ngx_http_infer_ratelimit_coalesce_flush();
}

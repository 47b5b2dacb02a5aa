
/*
 * Copyright (C) ngx_infer authors
 *
 * infer_auth_jwks_uri: a JWKS fetched through a subrequest to an internal
 * location, never blocking a worker, kept in shared memory for all the
 * workers, fetched again on a TTL and on an unknown kid, and used as it
 * was while the identity provider is down.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_auth.h"


static void ngx_http_infer_auth_jwks_sync(ngx_http_infer_auth_jwks_uri_t *u,
    ngx_log_t *log);
static ngx_int_t ngx_http_infer_auth_jwks_fetch(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_jwks_uri_t *u);
static ngx_int_t ngx_http_infer_auth_jwks_done(ngx_http_request_t *r,
    void *data, ngx_int_t rc);
static void ngx_http_infer_auth_jwks_store(ngx_http_infer_auth_jwks_uri_t *u,
    u_char *data, size_t len, ngx_log_t *log);
static ngx_int_t ngx_http_infer_auth_wait(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx);
static void ngx_http_infer_auth_wait_handler(ngx_http_request_t *r);
static ngx_http_infer_auth_jwks_node_t *ngx_http_infer_auth_jwks_node(
    ngx_http_infer_auth_jwks_uri_t *u);
static ngx_int_t ngx_http_infer_auth_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);


/*
 * Makes sure the JWKS URL's keys are there and fresh before the token is
 * checked.  One request at a time, across workers, fetches (the node's
 * "fetching" deadline is the lock); the others go on with the keys they
 * have, or, when they have none or the token names an unknown kid, wait
 * for that fetch.  A request fetches or waits once at most.
 */

ngx_int_t
ngx_http_infer_auth_jwks_prepare(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_jwks_uri_t *u)
{
    ngx_uint_t                        cold, stale, unknown, busy, fetch;
    ngx_msec_t                        now;
    ngx_msec_int_t                    since;
    ngx_slab_pool_t                  *shpool;
    ngx_http_infer_auth_jwks_node_t  *node;

    ngx_http_infer_auth_jwks_sync(u, r->connection->log);

    node = u->node;

    if (node == NULL || ctx->fetched) {
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) u->zone->shm.addr;
    now = ngx_current_msec;

    ngx_shmtx_lock(&shpool->mutex);

    if (ctx->waiting) {
        busy = (ngx_msec_int_t) (node->fetching - now) > 0;

        if (!busy || node->generation != ctx->wait_generation
            || (ngx_msec_int_t) (now - ctx->wait_until) >= 0)
        {
            ngx_shmtx_unlock(&shpool->mutex);

            ctx->waiting = 0;
            ctx->fetched = 1;

            ngx_http_infer_auth_jwks_sync(u, r->connection->log);
            return NGX_OK;
        }

        ngx_shmtx_unlock(&shpool->mutex);

        return ngx_http_infer_auth_wait(r, ctx);
    }

    /*
     * A provider that fails is asked again once per refresh interval, not
     * for every request (with no keys yet, once a second at most): stale
     * keys go on serving meanwhile.
     */

    since = (ngx_msec_int_t) (now - node->attempted);

    cold = (node->generation == 0)
           && (node->attempted == 0
               || since >= (ngx_msec_int_t) ngx_min(u->refresh, 1000));
    stale = node->generation
            && ngx_time() - node->fetched >= u->ttl
            && since >= (ngx_msec_int_t) u->refresh;
    unknown = ctx->unknown_kid && since >= (ngx_msec_int_t) u->refresh;
    busy = (ngx_msec_int_t) (node->fetching - now) > 0;

    fetch = 0;

    if ((cold || stale || unknown) && !busy) {
        node->fetching = now + u->timeout;
        node->attempted = now;
        fetch = 1;

    } else if ((node->generation == 0 || ctx->unknown_kid) && busy) {
        ctx->waiting = 1;
        ctx->wait_generation = node->generation;
        ctx->wait_until = now + u->timeout;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (fetch) {
        return ngx_http_infer_auth_jwks_fetch(r, ctx, u);
    }

    if (ctx->waiting) {
        return ngx_http_infer_auth_wait(r, ctx);
    }

    return NGX_OK;
}


/*
 * Brings the worker's keys up to the shared JWKS: parsed again only when
 * another generation was stored.
 */

static void
ngx_http_infer_auth_jwks_sync(ngx_http_infer_auth_jwks_uri_t *u,
    ngx_log_t *log)
{
    u_char                        err[NGX_HTTP_INFER_AUTH_ERRSTR];
    u_char                       *copy;
    size_t                        len;
    ngx_uint_t                    generation;
    ngx_slab_pool_t              *shpool;
    ngx_http_infer_auth_keyset_t *ks;

    if (u->node == NULL) {
        u->node = ngx_http_infer_auth_jwks_node(u);

        if (u->node == NULL) {
            return;
        }
    }

    shpool = (ngx_slab_pool_t *) u->zone->shm.addr;
    copy = NULL;
    len = 0;

    ngx_shmtx_lock(&shpool->mutex);

    generation = u->node->generation;

    if (generation != u->generation && u->node->len) {
        len = u->node->len;
        copy = ngx_alloc(len, log);

        if (copy) {
            ngx_memcpy(copy, u->node->data, len);
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (copy == NULL) {
        return;
    }

    /* the key set outlives the request whose log this is */

    ks = ngx_http_infer_auth_keyset_create(ngx_cycle->log);

    if (ks == NULL) {
        ngx_free(copy);
        return;
    }

    if (ngx_http_infer_auth_keyset_jwks(ks, copy, len, err) != NGX_OK) {
        /* it was checked before it was stored: not expected */
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "infer_auth_jwks_uri \"%V\": %s", &u->uri, err);
        ngx_http_infer_auth_keyset_free(ks);
        ngx_free(copy);
        return;
    }

    ngx_free(copy);

    ngx_http_infer_auth_keyset_free(u->keys);

    u->keys = ks;
    u->generation = generation;

    /* no token is trusted from the cache on a key set that went */
    ngx_http_infer_auth_key_epoch++;
}


static ngx_int_t
ngx_http_infer_auth_jwks_fetch(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_jwks_uri_t *u)
{
    ngx_str_t                         server;
    ngx_table_elt_t                  *host;
    ngx_http_request_t               *sr;
    ngx_http_infer_auth_jwks_body_t  *body;
    ngx_http_post_subrequest_t  *ps;

    static ngx_str_t  get = ngx_string("GET");

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer auth: fetching JWKS from \"%V\"", &u->uri);

    ps = ngx_palloc(r->pool, sizeof(ngx_http_post_subrequest_t));
    if (ps == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ps->handler = ngx_http_infer_auth_jwks_done;
    ps->data = u;

    ctx->fetched = 1;

    /* the phases run again once the subrequest is done */
    r->write_event_handler = ngx_http_core_run_phases;

    /*
     * not an in-memory subrequest: nginx fails one whose answer outgrows
     * subrequest_output_buffer_size, and the client's connection with
     * it; the body filter takes the answer instead
     */

    if (ngx_http_subrequest(r, &u->uri, NULL, &sr, ps,
                            NGX_HTTP_SUBREQUEST_WAITED)
        != NGX_OK)
    {
        ngx_http_infer_auth_jwks_store(u, NULL, 0, r->connection->log);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    body = ngx_pcalloc(r->pool, sizeof(ngx_http_infer_auth_jwks_body_t));
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_set_ctx(sr, body, ngx_http_infer_auth_module);

    /* a GET without the client's body */

    sr->method = NGX_HTTP_GET;
    sr->method_name = get;
    sr->header_only = 0;

    sr->request_body = ngx_pcalloc(r->pool, sizeof(ngx_http_request_body_t));
    if (sr->request_body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /*
     * none of the client's headers (its credentials, a Range that would
     * spoil every fetch ...) go to the identity provider: the subrequest
     * gets a header list of its own, empty, and no body to announce
     */
    server = sr->headers_in.server;
    host = sr->headers_in.host;

    ngx_memzero(&sr->headers_in, sizeof(ngx_http_headers_in_t));

    if (ngx_list_init(&sr->headers_in.headers, r->pool, 1,
                      sizeof(ngx_table_elt_t))
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    sr->headers_in.server = server;
    sr->headers_in.host = host;
    sr->headers_in.content_length_n = -1;
    sr->headers_in.keep_alive_n = -1;

    return NGX_AGAIN;
}


static ngx_int_t
ngx_http_infer_auth_jwks_done(ngx_http_request_t *r, void *data,
    ngx_int_t rc)
{
    ngx_http_infer_auth_jwks_uri_t *u = data;

    u_char                           err[NGX_HTTP_INFER_AUTH_ERRSTR];
    ngx_http_infer_auth_keyset_t     *ks;
    ngx_http_infer_auth_jwks_body_t  *b;

    b = ngx_http_get_module_ctx(r, ngx_http_infer_auth_module);

    if (rc != NGX_OK || r->headers_out.status != NGX_HTTP_OK
        || b == NULL || b->failed || b->len == 0)
    {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "infer_auth_jwks_uri \"%V\": the fetch failed "
                      "(status %ui%s), keeping the keys cached",
                      &u->uri, r->headers_out.status,
                      (b && b->failed) ? ", an answer too large or "
                      "buffered to a file" : "");

        ngx_http_infer_auth_jwks_store(u, NULL, 0, r->connection->log);

        /* the client's request goes on: with the cached keys, or a 503 */
        return NGX_OK;
    }

    /* checked before the other workers see it */

    ks = ngx_http_infer_auth_keyset_create(ngx_cycle->log);

    if (ks == NULL
        || ngx_http_infer_auth_keyset_jwks(ks, b->data, b->len, err)
           != NGX_OK)
    {
        if (ks) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "infer_auth_jwks_uri \"%V\": %s, keeping the keys "
                          "cached", &u->uri, err);
        }

        ngx_http_infer_auth_keyset_free(ks);
        ngx_http_infer_auth_jwks_store(u, NULL, 0, r->connection->log);

        return NGX_OK;
    }

    if (ks->skipped) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "infer_auth_jwks_uri \"%V\": %ui keys skipped, the "
                      "first: %s", &u->uri, ks->skipped, err);
    }

    ngx_http_infer_auth_keyset_free(ks);
    ngx_http_infer_auth_jwks_store(u, b->data, b->len, r->connection->log);

    return NGX_OK;
}


/*
 * Ends a fetch: with data, a new generation for every worker; without,
 * only the lock goes, and the cached keys stay.
 */

static void
ngx_http_infer_auth_jwks_store(ngx_http_infer_auth_jwks_uri_t *u,
    u_char *data, size_t len, ngx_log_t *log)
{
    u_char                           *copy;
    ngx_slab_pool_t                  *shpool;
    ngx_http_infer_auth_jwks_node_t  *node;

    node = u->node;
    shpool = (ngx_slab_pool_t *) u->zone->shm.addr;

    ngx_shmtx_lock(&shpool->mutex);

    node->fetching = ngx_current_msec;

    if (data) {
        copy = ngx_slab_alloc_locked(shpool, len);

        if (copy == NULL) {
            ngx_shmtx_unlock(&shpool->mutex);
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "infer_auth_jwks_uri \"%V\": a JWKS of %uz bytes "
                          "does not fit in the shared zone", &u->uri, len);
            return;
        }

        ngx_memcpy(copy, data, len);

        if (node->data) {
            ngx_slab_free_locked(shpool, node->data);
        }

        node->data = copy;
        node->len = len;
        node->generation++;
        node->fetched = ngx_time();
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (data) {
        ngx_log_error(NGX_LOG_INFO, log, 0,
                      "infer_auth_jwks_uri \"%V\": keys fetched", &u->uri);
    }
}


/* limit_req's way of delaying a request in its phase */

static ngx_int_t
ngx_http_infer_auth_wait(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx)
{
    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_infer_auth_wait_handler;

    r->connection->write->delayed = 1;
    ngx_add_timer(r->connection->write, NGX_HTTP_INFER_AUTH_POLL);

    return NGX_AGAIN;
}


static void
ngx_http_infer_auth_wait_handler(ngx_http_request_t *r)
{
    ngx_event_t  *wev;

    wev = r->connection->write;

    if (wev->delayed) {
        if (ngx_handle_write_event(wev, 0) != NGX_OK) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        }

        return;
    }

    if (ngx_handle_read_event(r->connection->read, 0) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);
}


/* the URL's node in the shared zone, made on first use */

static ngx_http_infer_auth_jwks_node_t *
ngx_http_infer_auth_jwks_node(ngx_http_infer_auth_jwks_uri_t *u)
{
    ngx_queue_t                      *q;
    ngx_slab_pool_t                  *shpool;
    ngx_http_infer_auth_shctx_t      *sh;
    ngx_http_infer_auth_jwks_node_t  *node;

    shpool = (ngx_slab_pool_t *) u->zone->shm.addr;
    sh = u->zone->data;

    ngx_shmtx_lock(&shpool->mutex);

    for (q = ngx_queue_head(&sh->nodes);
         q != ngx_queue_sentinel(&sh->nodes);
         q = ngx_queue_next(q))
    {
        node = ngx_queue_data(q, ngx_http_infer_auth_jwks_node_t, queue);

        if (node->uri.len == u->uri.len
            && ngx_strncmp(node->uri.data, u->uri.data, u->uri.len) == 0)
        {
            goto done;
        }
    }

    node = ngx_slab_calloc_locked(shpool,
                         sizeof(ngx_http_infer_auth_jwks_node_t) + u->uri.len);
    if (node == NULL) {
        goto done;
    }

    node->uri.data = (u_char *) node
                     + sizeof(ngx_http_infer_auth_jwks_node_t);
    node->uri.len = u->uri.len;
    ngx_memcpy(node->uri.data, u->uri.data, u->uri.len);

    ngx_queue_insert_tail(&sh->nodes, &node->queue);

done:

    ngx_shmtx_unlock(&shpool->mutex);

    return node;
}


static ngx_int_t
ngx_http_infer_auth_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_slab_pool_t              *shpool;
    ngx_http_infer_auth_shctx_t  *sh;

    if (data) {
        /* a reload keeps the fetched keys */
        shm_zone->data = data;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        shm_zone->data = shpool->data;
        return NGX_OK;
    }

    sh = ngx_slab_alloc(shpool, sizeof(ngx_http_infer_auth_shctx_t));
    if (sh == NULL) {
        return NGX_ERROR;
    }

    ngx_queue_init(&sh->nodes);

    shpool->data = sh;
    shm_zone->data = sh;

    shpool->log_ctx = (u_char *) " in infer_auth_jwks_uri zone";
    shpool->log_nomem = 0;

    return NGX_OK;
}


char *
ngx_http_infer_auth_jwks_uri_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_auth_loc_conf_t *lcf = conf;

    ngx_str_t                        *value, s, name;
    ngx_uint_t                        i;
    ngx_msec_t                        t;
    ngx_http_infer_auth_jwks_uri_t   *u;
    ngx_http_infer_auth_main_conf_t  *amcf;

    if (lcf->jwks_uri != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 0 || value[1].data[0] != '/') {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_auth_jwks_uri \"%V\" must be a URI of "
                           "this server, such as \"/_jwks\", whose location "
                           "proxies to the identity provider", &value[1]);
        return NGX_CONF_ERROR;
    }

    u = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_auth_jwks_uri_t));
    if (u == NULL) {
        return NGX_CONF_ERROR;
    }

    u->uri = value[1];
    u->ttl = 600;
    u->refresh = 30000;
    u->timeout = 5000;

    for (i = 2; i < cf->args->nelts; i++) {

        s = value[i];

        if (ngx_strncmp(s.data, "ttl=", 4) == 0) {
            t = ngx_http_infer_param_sec(&s, 4);

            if (t == (ngx_msec_t) NGX_ERROR || t == 0) {
                goto invalid;
            }

            u->ttl = (time_t) t;
            continue;
        }

        if (ngx_strncmp(s.data, "refresh=", 8) == 0) {
            t = ngx_http_infer_param_msec(&s, 8);

            if (t == (ngx_msec_t) NGX_ERROR) {
                goto invalid;
            }

            u->refresh = t;
            continue;
        }

        if (ngx_strncmp(s.data, "timeout=", 8) == 0) {
            t = ngx_http_infer_param_msec(&s, 8);

            if (t == (ngx_msec_t) NGX_ERROR || t == 0) {
                goto invalid;
            }

            u->timeout = t;
            continue;
        }

        goto invalid;
    }

    amcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_infer_auth_module);

    if (amcf->zone == NULL) {
        ngx_str_set(&name, "infer_auth_jwks");

        /* room for a JWKS of the largest size twice, while one replaces
         * the other */
        amcf->zone = ngx_shared_memory_add(cf, &name,
                                           4 * NGX_HTTP_INFER_AUTH_JWKS_MAX,
                                           &ngx_http_infer_auth_module);
        if (amcf->zone == NULL) {
            return NGX_CONF_ERROR;
        }

        amcf->zone->init = ngx_http_infer_auth_init_zone;
    }

    u->zone = amcf->zone;
    lcf->jwks_uri = u;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


/*
 * The subrequest's answer, taken as it passes the body filter (and kept
 * from the client's answer): at most NGX_HTTP_INFER_AUTH_JWKS_MAX bytes,
 * from memory buffers.  NGX_OK: consumed.
 */

ngx_int_t
ngx_http_infer_auth_jwks_body(ngx_http_request_t *r,
    ngx_http_infer_auth_jwks_body_t *body, ngx_chain_t *in)
{
    u_char       *p;
    size_t        n, size;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (body->failed || ngx_buf_special(b)) {
            goto consumed;
        }

        if (!ngx_buf_in_memory(b)) {
            /* proxy_max_temp_file_size 0 keeps a JWKS in memory */
            body->failed = 1;
            goto consumed;
        }

        n = b->last - b->pos;

        if (n == 0) {
            /* nothing to copy, from a body that may have no buffer yet */
            goto consumed;
        }

        if (body->len + n > NGX_HTTP_INFER_AUTH_JWKS_MAX) {
            body->failed = 1;
            goto consumed;
        }

        if (body->len + n > body->size) {
            size = ngx_max(2 * body->size, body->len + n);
            size = ngx_max(size, 4096);

            p = ngx_pnalloc(r->pool, size);
            if (p == NULL) {
                body->failed = 1;
                goto consumed;
            }

            if (body->len) {
                ngx_memcpy(p, body->data, body->len);
            }

            body->data = p;
            body->size = size;
        }

        ngx_memcpy(body->data + body->len, b->pos, n);
        body->len += n;

    consumed:

        b->pos = b->last;

        if (b->in_file) {
            b->file_pos = b->file_last;
        }
    }

    return NGX_OK;
}

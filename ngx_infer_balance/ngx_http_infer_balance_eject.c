/*
 * Copyright (C) ngx_infer authors
 *
 * Outlier ejection for infer_balance pools (infer_balance_eject): a peer
 * whose answers fail so many times in a row, whose metric page cannot be
 * read so many times in a row, or whose time to the first byte of its
 * answers runs far above its peers', is taken out of the pool, for all
 * workers, for a time that grows each time it is ejected again soon after
 * coming back.  Never more than max_share of the peers are out at once,
 * and never all of them.  A peer comes back when its time is up, with its
 * counts of failures as they were: one more failure sends it out again,
 * one success clears them.
 *
 * The state is the peer's node in the pool's zone; an ejection is decided
 * under the zone's mutex so that two workers cannot both take the last
 * share of the pool, and a return is claimed by an atomic compare-and-set,
 * so that it is logged once.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_balance.h"


static void ngx_http_infer_balance_eject(
    ngx_http_infer_balance_srv_conf_t *bcf, ngx_uint_t n, ngx_uint_t why,
    ngx_uint_t figure, ngx_uint_t told, ngx_log_t *log);
static ngx_uint_t ngx_http_infer_balance_slow(
    ngx_http_infer_balance_srv_conf_t *bcf, ngx_uint_t n, ngx_uint_t *ratio);
static ngx_int_t ngx_http_infer_balance_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);


ngx_str_t  ngx_http_infer_balance_eject_reasons[] = {
    ngx_string("errors"),
    ngx_string("scrapes"),
    ngx_string("slow")
};


static ngx_http_output_body_filter_pt  ngx_http_next_body_filter;


/* the peers of n's list, primary or backup: [*first, *last) */

static void
ngx_http_infer_balance_list(ngx_http_infer_balance_srv_conf_t *bcf,
    ngx_uint_t n, ngx_uint_t *first, ngx_uint_t *last)
{
    ngx_http_upstream_rr_peers_t  *peers;

    peers = bcf->upstream->peer.data;

    if (n < peers->number) {
        *first = 0;
        *last = peers->number;

    } else {
        *first = peers->number;
        *last = bcf->number;
    }
}


ngx_uint_t
ngx_http_infer_balance_ejected(ngx_http_infer_balance_srv_conf_t *bcf,
    ngx_uint_t n, ngx_msec_t now)
{
    ngx_atomic_uint_t               until;
    ngx_http_infer_balance_node_t  *node;

    node = &bcf->sh->node[n];
    until = node->ejected;

    if (until == 0) {
        return 0;
    }

    if ((ngx_msec_int_t) (until - now) > 0) {
        return 1;
    }

    /* its time is up: the first worker to see it brings it back */

    if (ngx_atomic_cmp_set(&node->ejected, until, 0)) {
        node->returned = now ? now : 1;

        /* judged slow afresh, from its answers after coming back */
        node->ttfb = 0;
        node->samples = 0;

        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "infer balance: \"%V\" of upstream \"%V\" is back "
                      "after ejection", &bcf->name[n], &bcf->upstream->host);
    }

    return 0;
}


/*
 * An answer of peer n: failed (a connection error, a timeout, an invalid
 * header, a 5xx, an answer cut short) or not; ttfb is its time to the
 * first byte, 0 when unknown.
 */

void
ngx_http_infer_balance_answered(ngx_http_infer_balance_srv_conf_t *bcf,
    ngx_uint_t n, ngx_uint_t failed, ngx_msec_t ttfb, ngx_log_t *log)
{
    ngx_uint_t                       errors, ratio;
    ngx_http_infer_balance_node_t   *node;
    ngx_http_infer_balance_eject_t  *ej;

    ej = bcf->eject;
    node = &bcf->sh->node[n];

    if (failed) {
        if (ej->errors == 0) {
            return;
        }

        errors = ngx_atomic_fetch_add(&node->errors, 1) + 1;

        if (errors >= ej->errors) {
            ngx_http_infer_balance_eject(bcf, n, NGX_HTTP_INFER_EJECT_ERRORS,
                                         errors, errors == ej->errors, log);
        }

        return;
    }

    if (node->errors) {
        node->errors = 0;
    }

    if (ej->slow == 0 || ttfb == 0) {
        return;
    }

    ttfb = ngx_min(ttfb, 3600000);

    node->ttfb = ngx_http_infer_balance_ewma(node->ttfb, ttfb,
                                           NGX_HTTP_INFER_BALANCE_PACE_SCALE);

    if (ngx_atomic_fetch_add(&node->samples, 1) + 1
        < NGX_HTTP_INFER_BALANCE_SLOW_SAMPLES)
    {
        return;
    }

    if (ngx_http_infer_balance_slow(bcf, n, &ratio)) {
        ngx_http_infer_balance_eject(bcf, n, NGX_HTTP_INFER_EJECT_SLOW,
                                     ratio, 1, log);
    }
}


/*
 * Slow: its average time to the first byte is above slow= times the
 * average of its list's other peers (those in the pool with as many
 * answers counted), and above NGX_HTTP_INFER_BALANCE_SLOW_MIN.  *ratio:
 * the two's ratio, x 100.
 */

static ngx_uint_t
ngx_http_infer_balance_slow(ngx_http_infer_balance_srv_conf_t *bcf,
    ngx_uint_t n, ngx_uint_t *ratio)
{
    uint64_t                        sum, mine;
    ngx_uint_t                      i, first, last, k;
    ngx_http_infer_balance_node_t  *node;

    node = bcf->sh->node;
    mine = node[n].ttfb;

    if (mine < NGX_HTTP_INFER_BALANCE_SLOW_MIN
               * NGX_HTTP_INFER_BALANCE_PACE_SCALE)
    {
        return 0;
    }

    ngx_http_infer_balance_list(bcf, n, &first, &last);

    sum = 0;
    k = 0;

    for (i = first; i < last; i++) {
        if (i == n || node[i].ejected
            || node[i].samples < NGX_HTTP_INFER_BALANCE_SLOW_SAMPLES)
        {
            continue;
        }

        sum += node[i].ttfb;
        k++;
    }

    if (k == 0) {
        return 0;
    }

    sum = ngx_max(sum / k, 1);

    if (mine * 100 <= bcf->eject->slow * sum) {
        return 0;
    }

    *ratio = (ngx_uint_t) ngx_min(mine * 100 / sum, 1000000);

    return 1;
}


/* a scrape of peer n, from the worker that scraped it */

void
ngx_http_infer_balance_scraped(ngx_http_infer_balance_srv_conf_t *bcf,
    ngx_uint_t n, ngx_uint_t failed)
{
    ngx_uint_t                      errors;
    ngx_http_infer_balance_node_t  *node;

    if (bcf->eject == NULL || bcf->eject->scrapes == 0) {
        return;
    }

    node = &bcf->sh->node[n];

    if (!failed) {
        node->scrape_errors = 0;
        return;
    }

    errors = ngx_atomic_fetch_add(&node->scrape_errors, 1) + 1;

    if (errors >= bcf->eject->scrapes) {
        ngx_http_infer_balance_eject(bcf, n, NGX_HTTP_INFER_EJECT_SCRAPES,
                                     errors, errors == bcf->eject->scrapes,
                                     ngx_cycle->log);
    }
}


/*
 * Takes peer n out, unless it is out already or its list has its share
 * out; told: log a refusal (once per count crossing its threshold).
 */

static void
ngx_http_infer_balance_eject(ngx_http_infer_balance_srv_conf_t *bcf,
    ngx_uint_t n, ngx_uint_t why, ngx_uint_t figure, ngx_uint_t told,
    ngx_log_t *log)
{
    ngx_uint_t                       i, first, last, out, cap, mult;
    ngx_msec_t                       now, time;
    ngx_atomic_uint_t                until;
    ngx_slab_pool_t                 *shpool;
    ngx_http_infer_balance_node_t   *node;
    ngx_http_infer_balance_eject_t  *ej;

    ej = bcf->eject;
    node = bcf->sh->node;
    now = ngx_current_msec;

    ngx_http_infer_balance_list(bcf, n, &first, &last);

    /* a share of the list, at least one, never all */

    cap = (last - first) * ej->max_share / 100;
    cap = ngx_max(cap, 1);
    cap = ngx_min(cap, last - first - 1);

    shpool = (ngx_slab_pool_t *) bcf->shm_zone->shm.addr;

    ngx_shmtx_lock(&shpool->mutex);

    if (ngx_http_infer_balance_ejected(bcf, n, now)) {
        ngx_shmtx_unlock(&shpool->mutex);
        return;
    }

    out = 0;

    for (i = first; i < last; i++) {
        until = node[i].ejected;

        if (until && (ngx_msec_int_t) (until - now) > 0) {
            out++;
        }
    }

    if (out >= cap) {
        ngx_shmtx_unlock(&shpool->mutex);

        if (told) {
            ngx_log_error(NGX_LOG_WARN, log, 0,
                          "infer balance: \"%V\" of upstream \"%V\" is not "
                          "ejected (%V): %ui of its %ui peers are out "
                          "already, the most max_share= allows",
                          &bcf->name[n], &bcf->upstream->host,
                          &ngx_http_infer_balance_eject_reasons[why], out,
                          last - first);
        }

        return;
    }

    /* the time grows while the peer is ejected again within max_time */

    mult = node[n].multiplier;

    if (node[n].returned == 0
        || (ngx_msec_int_t) (now - node[n].returned)
           > (ngx_msec_int_t) ej->max_time)
    {
        mult = 0;
    }

    mult++;
    time = (mult > ej->max_time / ej->time) ? ej->max_time
                                            : ej->time * mult;

    node[n].multiplier = mult;
    node[n].why = why;
    node[n].ejected = (now + time) ? now + time : 1;
    (void) ngx_atomic_fetch_add(&node[n].ejections, 1);

    ngx_shmtx_unlock(&shpool->mutex);

    if (why == NGX_HTTP_INFER_EJECT_SLOW) {
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "infer balance: \"%V\" of upstream \"%V\" ejected for "
                      "%M ms: its first bytes take %ui.%02ui times its "
                      "peers'", &bcf->name[n], &bcf->upstream->host, time,
                      figure / 100, figure % 100);

    } else {
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "infer balance: \"%V\" of upstream \"%V\" ejected for "
                      "%M ms: %ui %s in a row", &bcf->name[n],
                      &bcf->upstream->host, time, figure,
                      why == NGX_HTTP_INFER_EJECT_ERRORS
                      ? "failed answers" : "failed scrapes");
    }
}


/* the time of the first byte of an answer from a balanced peer */

static ngx_int_t
ngx_http_infer_balance_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_chain_t                   *cl;
    ngx_http_infer_balance_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_balance_module);

    if (ctx && ctx->first == 0 && ctx->endpoint.len && r->upstream) {
        for (cl = in; cl; cl = cl->next) {
            if (ngx_buf_size(cl->buf)) {
                ctx->first = ngx_current_msec ? ngx_current_msec : 1;
                break;
            }
        }
    }

    return ngx_http_next_body_filter(r, in);
}


/* from postconfiguration: the filter, when a pool ejects slow peers */

ngx_int_t
ngx_http_infer_balance_eject_init(ngx_conf_t *cf)
{
    ngx_http_infer_balance_main_conf_t  *bmcf;

    bmcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_infer_balance_module);

    if (bmcf->timing) {
        ngx_http_next_body_filter = ngx_http_top_body_filter;
        ngx_http_top_body_filter = ngx_http_infer_balance_body_filter;
    }

    return NGX_OK;
}


char *
ngx_http_infer_balance_eject_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_balance_srv_conf_t  *bcf = conf;

    ngx_int_t                           n;
    ngx_str_t                          *value;
    ngx_uint_t                          i;
    ngx_msec_t                          ms;
    ngx_http_infer_balance_eject_t     *ej;
    ngx_http_infer_balance_main_conf_t *bmcf;

    if (bcf->eject) {
        return "is duplicate";
    }

    ej = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_balance_eject_t));
    if (ej == NULL) {
        return NGX_CONF_ERROR;
    }

    ej->errors = 5;
    ej->time = 10000;
    ej->max_time = 300000;
    ej->max_share = 50;

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "errors=", 7) == 0) {
            n = ngx_atoi(value[i].data + 7, value[i].len - 7);

            if (n == NGX_ERROR || n > 10000) {
                goto invalid;
            }

            ej->errors = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "scrapes=", 8) == 0) {
            n = ngx_atoi(value[i].data + 8, value[i].len - 8);

            if (n == NGX_ERROR || n > 10000) {
                goto invalid;
            }

            ej->scrapes = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "slow=", 5) == 0) {
            n = ngx_atofp(value[i].data + 5, value[i].len - 5, 2);

            if (n == NGX_ERROR || n < 150 || n > 100000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\": a ratio from 1.5 to "
                                   "1000, two decimals at most", &value[i]);
                return NGX_CONF_ERROR;
            }

            ej->slow = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "time=", 5) == 0) {
            ms = ngx_http_infer_param_msec(&value[i], 5);

            if (ms == (ngx_msec_t) NGX_ERROR || ms < 100 || ms > 86400000) {
                goto invalid;
            }

            ej->time = ms;
            continue;
        }

        if (ngx_strncmp(value[i].data, "max_time=", 9) == 0) {
            ms = ngx_http_infer_param_msec(&value[i], 9);

            if (ms == (ngx_msec_t) NGX_ERROR || ms > 86400000) {
                goto invalid;
            }

            ej->max_time = ms;
            continue;
        }

        if (ngx_strncmp(value[i].data, "max_share=", 10) == 0) {
            if (value[i].len < 12 || value[i].data[value[i].len - 1] != '%') {
                goto invalid;
            }

            n = ngx_atoi(value[i].data + 10, value[i].len - 11);

            if (n == NGX_ERROR || n == 0 || n > 100) {
                goto invalid;
            }

            ej->max_share = n;
            continue;
        }

        goto invalid;
    }

    if (ej->max_time < ej->time) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"infer_balance_eject\" max_time= is below "
                           "time=");
        return NGX_CONF_ERROR;
    }

    if (ej->errors == 0 && ej->scrapes == 0 && ej->slow == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"infer_balance_eject\" ejects on nothing: "
                           "errors=0 needs scrapes= or slow=");
        return NGX_CONF_ERROR;
    }

    bcf->eject = ej;

    if (ej->slow) {
        bmcf = ngx_http_conf_get_module_main_conf(cf,
                                                 ngx_http_infer_balance_module);
        bmcf->timing = 1;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);
    return NGX_CONF_ERROR;
}

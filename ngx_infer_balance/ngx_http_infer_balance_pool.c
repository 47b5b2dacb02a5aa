/*
 * Copyright (C) ngx_infer authors
 *
 * A balanced pool as a whole: shedding requests of low priority when
 * every peer is saturated, and the status page of every pool.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_balance.h"


/* the longest Retry-After of a shed request, seconds */
#define NGX_HTTP_INFER_BALANCE_RETRY_MAX  60


static ngx_uint_t ngx_http_infer_balance_saturated(
    ngx_http_infer_balance_srv_conf_t *bcf, ngx_uint_t *queue);
static ngx_int_t ngx_http_infer_balance_status_handler(ngx_http_request_t *r);
static u_char *ngx_http_infer_balance_status_eject(u_char *p,
    ngx_http_infer_balance_srv_conf_t *bcf, ngx_uint_t n, ngx_msec_t now);


/*
 * Shedding, for the route module's content phase: when every peer of the
 * request's pool is past the thresholds, a request of low priority gets a
 * 429 now rather than a place at the end of every queue.  NGX_DECLINED:
 * go on to the pool.
 */

ngx_int_t
ngx_http_infer_balance_shed(ngx_http_request_t *r, ngx_str_t *upstream)
{
    time_t                               sec;
    ngx_str_t                            value, msg;
    ngx_int_t                            priority;
    ngx_uint_t                           i, queue;
    ngx_http_infer_balance_ctx_t        *ctx;
    ngx_http_infer_balance_shed_t       *shed;
    ngx_http_upstream_srv_conf_t       **uscfp;
    ngx_http_upstream_main_conf_t       *umcf;
    ngx_http_infer_balance_srv_conf_t   *bcf;

    umcf = ngx_http_get_module_main_conf(r, ngx_http_upstream_module);
    uscfp = umcf->upstreams.elts;
    bcf = NULL;

    for (i = 0; i < umcf->upstreams.nelts; i++) {
        if (uscfp[i]->srv_conf
            && uscfp[i]->host.len == upstream->len
            && ngx_strncasecmp(uscfp[i]->host.data, upstream->data,
                               upstream->len) == 0)
        {
            bcf = ngx_http_conf_upstream_srv_conf(uscfp[i],
                                               ngx_http_infer_balance_module);
            break;
        }
    }

    if (bcf == NULL || !bcf->enable || bcf->shed == NULL || bcf->sh == NULL) {
        return NGX_DECLINED;
    }

    shed = bcf->shed;

    if (!ngx_http_infer_balance_saturated(bcf, &queue)) {
        return NGX_DECLINED;
    }

    priority = 0;

    if (shed->priority) {
        if (ngx_http_complex_value(r, shed->priority, &value) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        priority = value.len ? ngx_atoi(value.data, value.len) : 0;

        if (priority == NGX_ERROR) {
            priority = 0;
        }
    }

    if ((ngx_uint_t) priority >= shed->admit) {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "infer balance: pool saturated, priority %i admitted",
                       priority);
        return NGX_DECLINED;
    }

    ctx = ngx_http_infer_balance_get_ctx(r);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->reason = NGX_HTTP_INFER_BALANCE_SHED;

    /* the time the shortest queue takes to drain, roughly */

    sec = (time_t) ((queue * shed->wait / 1000 + 999) / 1000);
    sec = ngx_max(sec, 1);
    sec = ngx_min(sec, NGX_HTTP_INFER_BALANCE_RETRY_MAX);

    if (ngx_http_infer_retry_after(r, sec) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "infer balance: upstream \"%V\" saturated, request of "
                  "priority %i shed", upstream, priority);

    ngx_str_set(&msg, "The model's servers are saturated; "
                      "retry after the time in Retry-After.");

    return ngx_http_infer_send_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                     "server_overloaded", "pool_saturated",
                                     &msg);
}


/*
 * Saturated: every primary peer not down has fresh signals past a
 * threshold.  A peer without fresh signals may have room: no shedding.
 * *queue: the shortest queue, thousandths.
 */

static ngx_uint_t
ngx_http_infer_balance_saturated(ngx_http_infer_balance_srv_conf_t *bcf,
    ngx_uint_t *queue)
{
    ngx_uint_t                      i, n, past, q;
    ngx_msec_t                      now;
    ngx_http_upstream_rr_peer_t    *peer;
    ngx_http_upstream_rr_peers_t   *peers;
    ngx_http_infer_balance_node_t  *node;
    ngx_http_infer_balance_shed_t  *shed;

    shed = bcf->shed;
    peers = bcf->upstream->peer.data;
    now = ngx_current_msec;
    n = 0;
    q = (ngx_uint_t) -1;

    for (peer = peers->peer, i = 0; peer; peer = peer->next, i++) {

        if (peer->down
            || (bcf->eject && ngx_http_infer_balance_ejected(bcf, i, now)))
        {
            continue;
        }

        node = &bcf->sh->node[i];

        if (!ngx_http_infer_balance_fresh(bcf, node, now)) {
            return 0;
        }

        past = (shed->queue
                && (node->found & (1 << NGX_HTTP_INFER_SIGNAL_QUEUE))
                && node->value[NGX_HTTP_INFER_SIGNAL_QUEUE] >= shed->queue)
               || (shed->kv
                   && (node->found & (1 << NGX_HTTP_INFER_SIGNAL_KV))
                   && node->value[NGX_HTTP_INFER_SIGNAL_KV] >= shed->kv);

        if (!past) {
            return 0;
        }

        q = ngx_min(q, (ngx_uint_t) node->value[NGX_HTTP_INFER_SIGNAL_QUEUE]);
        n++;
    }

    *queue = q;

    return n != 0;
}


/*
 * The status page: every balanced pool, each peer's tokens in flight,
 * picks and last signals, as JSON.
 */

static ngx_int_t
ngx_http_infer_balance_status_handler(ngx_http_request_t *r)
{
    u_char                               *p;
    size_t                                len;
    ngx_int_t                             rc;
    ngx_buf_t                            *b;
    ngx_uint_t                            i, k, j, n, fresh, queue;
    ngx_msec_t                            now;
    ngx_http_upstream_rr_peer_t          *peer;
    ngx_http_upstream_rr_peers_t         *peers, *list;
    ngx_http_infer_balance_node_t        *node;
    ngx_http_infer_balance_scrape_t      *scf;
    ngx_http_infer_balance_srv_conf_t   **pool, *bcf;
    ngx_http_infer_balance_main_conf_t   *bmcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    bmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_balance_module);
    pool = bmcf->pools.elts;

    len = sizeof("{\"pools\":[]}\n");

    for (i = 0; i < bmcf->pools.nelts; i++) {
        /* names escaped as \u00XX at worst */

        len += 256 + pool[i]->upstream->host.len * 6
               + (pool[i]->scrape ? pool[i]->scrape->uri.len * 6 : 0)
               + pool[i]->number * (NGX_HTTP_INFER_BALANCE_STATUS_PEER
                                    + NGX_SOCKADDR_STRLEN * 6);
    }

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    now = ngx_current_msec;
    p = ngx_cpymem(b->last, "{\"pools\":[", sizeof("{\"pools\":[") - 1);

    for (i = 0; i < bmcf->pools.nelts; i++) {
        bcf = pool[i];
        scf = bcf->scrape;

        if (i) {
            *p++ = ',';
        }

        p = ngx_cpymem(p, "{\"upstream\":\"", sizeof("{\"upstream\":\"") - 1);
        p = (u_char *) ngx_escape_json(p, bcf->upstream->host.data,
                                       bcf->upstream->host.len);

        p = ngx_sprintf(p, "\",\"average_tokens\":%uA",
                        bcf->sh->average
                        / NGX_HTTP_INFER_BALANCE_AVERAGE_SCALE);

        p = ngx_sprintf(p, ",\"saturated\":%s,\"scrape\":",
                        (bcf->shed && ngx_http_infer_balance_saturated(bcf,
                                                                   &queue))
                        ? "true" : "false");

        if (scf) {
            p = ngx_cpymem(p, "{\"uri\":\"", sizeof("{\"uri\":\"") - 1);
            p = (u_char *) ngx_escape_json(p, scf->uri.data, scf->uri.len);
            p = ngx_sprintf(p, "\",\"interval_ms\":%M,\"timeout_ms\":%M,"
                            "\"stale_ms\":%M}", scf->interval, scf->timeout,
                            scf->stale);

        } else {
            p = ngx_cpymem(p, "null", 4);
        }

        p = ngx_cpymem(p, ",\"eject\":", sizeof(",\"eject\":") - 1);

        if (bcf->eject) {
            p = ngx_sprintf(p, "{\"errors\":%ui,\"scrapes\":%ui,"
                            "\"slow\":%ui.%02ui,\"time_ms\":%M,"
                            "\"max_time_ms\":%M,\"max_share\":%ui}",
                            bcf->eject->errors, bcf->eject->scrapes,
                            bcf->eject->slow / 100, bcf->eject->slow % 100,
                            bcf->eject->time, bcf->eject->max_time,
                            bcf->eject->max_share);

        } else {
            p = ngx_cpymem(p, "null", 4);
        }

        p = ngx_cpymem(p, ",\"endpoints\":[", sizeof(",\"endpoints\":[") - 1);

        peers = bcf->upstream->peer.data;
        n = 0;

        for (list = peers; list; list = list->next) {
            for (peer = list->peer; peer; peer = peer->next, n++) {
                node = &bcf->sh->node[n];
                fresh = ngx_http_infer_balance_fresh(bcf, node, now);

                if (n) {
                    *p++ = ',';
                }

                p = ngx_cpymem(p, "{\"endpoint\":\"",
                               sizeof("{\"endpoint\":\"") - 1);
                p = (u_char *) ngx_escape_json(p, peer->name.data,
                                               peer->name.len);

                p = ngx_sprintf(p, "\",\"backup\":%s,\"tokens_in_flight\":%uA,"
                                "\"picks\":%uA,\"fresh\":%s,\"age_ms\":",
                                (list == peers) ? "false" : "true",
                                node->tokens, node->picks,
                                fresh ? "true" : "false");

                if (node->updated) {
                    p = ngx_sprintf(p, "%M",
                                    (ngx_msec_int_t) (now - node->updated) > 0
                                    ? now - node->updated : 0);

                } else {
                    p = ngx_cpymem(p, "null", 4);
                }

                for (k = 0; k < 3; k++) {
                    p = ngx_sprintf(p, ",\"%s\":",
                                    k == 0 ? "queue"
                                    : (k == 1 ? "running" : "kv_cache"));

                    if (node->found & (1 << k)) {
                        j = node->value[k];
                        p = ngx_sprintf(p, "%ui.%03ui", j / 1000, j % 1000);

                    } else {
                        p = ngx_cpymem(p, "null", 4);
                    }
                }

                p = ngx_sprintf(p, ",\"pace_us_per_token\":%uA",
                                node->pace
                                / NGX_HTTP_INFER_BALANCE_PACE_SCALE);

                p = ngx_sprintf(p, ",\"lora_running\":%uA,"
                                "\"lora_waiting\":%uA,\"max_lora\":%uA,"
                                "\"scrapes\":%uA,\"scrape_failures\":%uA",
                                node->nrunning, node->nwaiting,
                                node->max_lora, node->scrapes,
                                node->failures);

                p = ngx_http_infer_balance_status_eject(p, bcf, n, now);
                *p++ = '}';
            }
        }

        *p++ = ']';
        *p++ = '}';
    }

    p = ngx_cpymem(p, "]}\n", 3);
    b->last = p;

    return ngx_http_infer_send_json(r, NGX_HTTP_OK, b);
}


/*
 * A peer's ejection state, on the status page: the counts stay 0 in a
 * pool without infer_balance_eject.
 */

static u_char *
ngx_http_infer_balance_status_eject(u_char *p,
    ngx_http_infer_balance_srv_conf_t *bcf, ngx_uint_t n, ngx_msec_t now)
{
    ngx_msec_int_t                  left;
    ngx_http_infer_balance_node_t  *node;

    node = &bcf->sh->node[n];

    if (bcf->eject && ngx_http_infer_balance_ejected(bcf, n, now)) {
        left = (ngx_msec_int_t) (node->ejected - now);

        p = ngx_sprintf(p, ",\"ejected\":true,\"ejected_ms\":%M,"
                        "\"ejected_for\":\"%V\"", (ngx_msec_t) left,
                        &ngx_http_infer_balance_eject_reasons[node->why]);

    } else {
        p = ngx_cpymem(p, ",\"ejected\":false,\"ejected_ms\":null,"
                       "\"ejected_for\":null",
                       sizeof(",\"ejected\":false,\"ejected_ms\":null,"
                              "\"ejected_for\":null") - 1);
    }

    p = ngx_sprintf(p, ",\"ejections\":%uA,\"errors_in_a_row\":%uA,"
                    "\"scrape_errors_in_a_row\":%uA,\"ttfb_ms\":",
                    node->ejections, node->errors, node->scrape_errors);

    if (node->samples) {
        return ngx_sprintf(p, "%uA",
                           node->ttfb / NGX_HTTP_INFER_BALANCE_PACE_SCALE);
    }

    return ngx_cpymem(p, "null", 4);
}


/*
 * The pools on the metrics module's page: each endpoint's ejection state
 * and tokens in flight.
 */

static ngx_str_t  ngx_http_infer_balance_export_names[] = {
    ngx_string("infer_balance_ejected"),
    ngx_string("infer_balance_ejections"),
    ngx_string("infer_balance_tokens_in_flight")
};

static ngx_str_t  ngx_http_infer_balance_export_help[] = {
    ngx_string("1 while infer_balance_eject has the endpoint out of its "
               "pool, else 0."),
    ngx_string("Times infer_balance_eject took the endpoint out, since its "
               "pool's zone was made."),
    ngx_string("Tokens in flight on the endpoint, estimated, counted by "
               "every worker.")
};


size_t
ngx_http_infer_balance_export_size(void *conf)
{
    ngx_http_infer_balance_main_conf_t *bmcf = conf;

    size_t                               len;
    ngx_uint_t                           i, n;
    ngx_http_infer_balance_srv_conf_t  **pool;

    pool = bmcf->pools.elts;
    len = 3 * 256;

    for (i = 0; i < bmcf->pools.nelts; i++) {
        for (n = 0; n < pool[i]->number; n++) {

            /* three series; a label's character escaped in two at worst */

            len += 3 * (128 + 2 * (pool[i]->upstream->host.len
                                   + pool[i]->name[n].len));
        }
    }

    return len;
}


static u_char *
ngx_http_infer_balance_label(u_char *p, ngx_str_t *value)
{
    u_char  *s, *last;

    last = value->data + value->len;

    for (s = value->data; s < last; s++) {
        if (*s == '\\' || *s == '"' || *s == '\n') {
            *p++ = '\\';
            *p++ = (*s == '\n') ? 'n' : *s;
            continue;
        }

        *p++ = *s;
    }

    return p;
}


u_char *
ngx_http_infer_balance_export_write(void *conf, u_char *p,
    ngx_http_infer_export_meta_pt meta, ngx_uint_t om)
{
    ngx_http_infer_balance_main_conf_t *bmcf = conf;

    ngx_uint_t                           f, i, n, type;
    ngx_msec_t                           now;
    ngx_atomic_uint_t                    value;
    ngx_http_infer_balance_srv_conf_t  **pool, *bcf;

    if (bmcf->pools.nelts == 0) {
        return p;
    }

    pool = bmcf->pools.elts;
    now = ngx_current_msec;

    for (f = 0; f < 3; f++) {
        type = (f == 1) ? NGX_HTTP_INFER_EXPORT_COUNTER
                        : NGX_HTTP_INFER_EXPORT_GAUGE;

        p = meta(p, &ngx_http_infer_balance_export_names[f], type,
                 &ngx_http_infer_balance_export_help[f], om);

        for (i = 0; i < bmcf->pools.nelts; i++) {
            bcf = pool[i];

            for (n = 0; n < bcf->number; n++) {
                value = (f == 0) ? (bcf->eject
                                    && ngx_http_infer_balance_ejected(bcf, n,
                                                                      now))
                        : (f == 1) ? bcf->sh->node[n].ejections
                        : bcf->sh->node[n].tokens;

                p = ngx_sprintf(p, "%V%s{upstream=\"",
                                &ngx_http_infer_balance_export_names[f],
                                (f == 1) ? "_total" : "");
                p = ngx_http_infer_balance_label(p, &bcf->upstream->host);
                p = ngx_cpymem(p, "\",endpoint=\"",
                               sizeof("\",endpoint=\"") - 1);
                p = ngx_http_infer_balance_label(p, &bcf->name[n]);
                p = ngx_sprintf(p, "\"} %uA\n", value);
            }
        }
    }

    return p;
}


char *
ngx_http_infer_balance_shed_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_balance_srv_conf_t  *bcf = conf;

    ngx_int_t                           n;
    ngx_str_t                          *value, s;
    ngx_uint_t                          i;
    ngx_msec_t                          ms;
    ngx_http_infer_balance_shed_t      *shed;
    ngx_http_compile_complex_value_t    ccv;
    ngx_http_infer_balance_main_conf_t *bmcf;

    if (bcf->shed) {
        return "is duplicate";
    }

    shed = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_balance_shed_t));
    if (shed == NULL) {
        return NGX_CONF_ERROR;
    }

    shed->admit = 1;
    shed->wait = 100;

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "queue=", 6) == 0) {
            n = ngx_atofp(value[i].data + 6, value[i].len - 6, 3);

            if (n == NGX_ERROR || n == 0) {
                goto invalid;
            }

            shed->queue = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "kv=", 3) == 0) {
            n = ngx_atofp(value[i].data + 3, value[i].len - 3, 3);

            if (n == NGX_ERROR || n == 0 || n > 1000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"%V\": a fraction above 0, "
                                   "at most 1", &value[i]);
                return NGX_CONF_ERROR;
            }

            shed->kv = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "admit=", 6) == 0) {
            n = ngx_atoi(value[i].data + 6, value[i].len - 6);

            if (n == NGX_ERROR || n == 0) {
                goto invalid;
            }

            shed->admit = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "wait=", 5) == 0) {
            ms = ngx_http_infer_param_msec(&value[i], 5);

            if (ms == (ngx_msec_t) NGX_ERROR || ms > 60000) {
                goto invalid;
            }

            shed->wait = ms;
            continue;
        }

        if (ngx_strncmp(value[i].data, "priority=", 9) == 0) {
            shed->priority = ngx_palloc(cf->pool,
                                        sizeof(ngx_http_complex_value_t));
            if (shed->priority == NULL) {
                return NGX_CONF_ERROR;
            }

            s.data = value[i].data + 9;
            s.len = value[i].len - 9;

            ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

            ccv.cf = cf;
            ccv.value = &s;
            ccv.complex_value = shed->priority;

            if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        goto invalid;
    }

    if (shed->queue == 0 && shed->kv == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"infer_balance_shed\" needs queue= or kv=");
        return NGX_CONF_ERROR;
    }

    bcf->shed = shed;

    bmcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_infer_balance_module);
    bmcf->shedding = 1;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);
    return NGX_CONF_ERROR;
}


char *
ngx_http_infer_balance_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler) {
        return "is duplicate";
    }

    clcf->handler = ngx_http_infer_balance_status_handler;

    return NGX_CONF_OK;
}

/*
 * Copyright (C) ngx_infer authors
 *
 * ngx_http_infer_metrics_module: Prometheus metrics per model and
 * tenant, kept in shared memory.  A request is recorded in LOG, once its
 * answer is complete; it is counted in flight from PRECONTENT (the model
 * and the tenant are known by then) until its pool is freed.  The pages
 * (/metrics, /healthz, /readyz) are in ngx_http_infer_metrics_export.c.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_metrics.h"


#define NGX_HTTP_INFER_METRICS_ZONE_SIZE   (16 * 1024 * 1024)
#define NGX_HTTP_INFER_METRICS_MAX_SERIES  10000


/* what the LOG handler read of a finished request, to record it */

typedef struct {
    u_char                       labels[NGX_HTTP_INFER_METRICS_LABELS_MAX];
    size_t                       labels_len;
    ngx_uint_t                   status;
    uint64_t                     duration;        /* microseconds */
    uint64_t                     request_bytes;
    uint64_t                     response_bytes;
    ngx_http_upstream_state_t   *tries;
    ngx_uint_t                   ntries;
    ngx_http_variable_value_t   *endpoint;        /* infer_balance's pick */
    ngx_http_variable_value_t   *reason;
    uint64_t                     tokens[4];
    ngx_uint_t                   has_tokens[4];
    uint64_t                     ttft;            /* microseconds */
    ngx_uint_t                   has_ttft;        /* a stream's */
    uint64_t                    *counters;        /* infer_metrics_counter */
    ngx_str_t                    auth_outcome;
    ngx_str_t                    ratelimit_decision;
} ngx_http_infer_metrics_seen_t;


static ngx_int_t ngx_http_infer_metrics_log_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_metrics_read(ngx_http_request_t *r,
    ngx_http_infer_metrics_main_conf_t *mcf,
    ngx_http_infer_metrics_loc_conf_t *lcf,
    ngx_http_infer_metrics_seen_t *seen);
static void ngx_http_infer_metrics_record(
    ngx_http_infer_metrics_main_conf_t *mcf,
    ngx_http_infer_metrics_seen_t *seen);
static ngx_int_t ngx_http_infer_metrics_inflight_handler(
    ngx_http_request_t *r);
static void ngx_http_infer_metrics_inflight_done(void *data);
static ngx_int_t ngx_http_infer_metrics_variable_int(ngx_http_request_t *r,
    ngx_int_t index, uint64_t *n);
static ngx_int_t ngx_http_infer_metrics_parse_seconds(u_char *p, size_t len,
    uint64_t *usec);

static void *ngx_http_infer_metrics_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_infer_metrics_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_infer_metrics_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static char *ngx_http_infer_metrics_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_infer_metrics_add_label(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_metrics_set_buckets(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_metrics_add_counter(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_metrics_set_status(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_metrics_set_handler(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_infer_metrics_default_buckets(ngx_conf_t *cf,
    ngx_http_infer_metrics_main_conf_t *mcf);
static ngx_int_t ngx_http_infer_metrics_buckets(ngx_conf_t *cf,
    ngx_http_infer_metrics_buckets_t *b, ngx_str_t *values, ngx_uint_t n);
static ngx_int_t ngx_http_infer_metrics_compile(ngx_conf_t *cf,
    ngx_http_complex_value_t *cv, ngx_str_t *value);
static ngx_int_t ngx_http_infer_metrics_init(ngx_conf_t *cf);


static ngx_command_t  ngx_http_infer_metrics_commands[] = {

    { ngx_string("infer_metrics"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_metrics_loc_conf_t, enable),
      NULL },

    { ngx_string("infer_metrics_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE23,
      ngx_http_infer_metrics_zone,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_metrics_label"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE2,
      ngx_http_infer_metrics_add_label,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_metrics_loc_conf_t, labels),
      NULL },

    { ngx_string("infer_metrics_buckets"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_infer_metrics_set_buckets,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_metrics_counter"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE2,
      ngx_http_infer_metrics_add_counter,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_metrics_auth_status"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_infer_metrics_set_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_metrics_loc_conf_t, auth_status),
      NULL },

    { ngx_string("infer_metrics_ratelimit_status"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_infer_metrics_set_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_metrics_loc_conf_t, ratelimit_status),
      NULL },

    { ngx_string("infer_metrics_export"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_infer_metrics_set_handler,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      ngx_http_infer_metrics_export_handler },

    { ngx_string("infer_metrics_health"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_infer_metrics_set_handler,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      ngx_http_infer_metrics_health_handler },

    { ngx_string("infer_metrics_ready"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_infer_metrics_set_handler,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      ngx_http_infer_metrics_ready_handler },

    { ngx_string("infer_metrics_ready_condition"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE2,
      ngx_http_infer_metrics_add_label,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_metrics_loc_conf_t, ready),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_infer_metrics_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_infer_metrics_init,           /* postconfiguration */

    ngx_http_infer_metrics_create_main_conf, /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_infer_metrics_create_loc_conf, /* create location configuration */
    ngx_http_infer_metrics_merge_loc_conf  /* merge location configuration */
};


ngx_module_t  ngx_http_infer_metrics_module = {
    NGX_MODULE_V1,
    &ngx_http_infer_metrics_module_ctx,    /* module context */
    ngx_http_infer_metrics_commands,       /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_str_t  ngx_http_infer_metrics_token_types[] = {
    ngx_string("prompt"),
    ngx_string("completion"),
    ngx_string("cached"),
    ngx_string("reasoning")
};


static ngx_str_t  ngx_http_infer_metrics_token_vars[] = {
    ngx_string("infer_usage_prompt_tokens"),
    ngx_string("infer_usage_completion_tokens"),
    ngx_string("infer_usage_cached_tokens"),
    ngx_string("infer_usage_reasoning_tokens")
};


/*
 * Runs in LOG, once the answer is complete, so latency, status and token
 * usage are known.  What the request says is read first, then recorded:
 * each family's series is found by its label text and updated with atomic
 * adds; nothing here waits for another worker but the creation of a
 * series never seen before.
 */

static ngx_int_t
ngx_http_infer_metrics_log_handler(ngx_http_request_t *r)
{
    ngx_http_infer_metrics_seen_t        seen;
    ngx_http_infer_metrics_loc_conf_t   *lcf;
    ngx_http_infer_metrics_main_conf_t  *mcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_metrics_module);

    if (!lcf->enable || r != r->main) {
        return NGX_DECLINED;
    }

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer metrics log handler");

    mcf = ngx_http_get_module_main_conf(r, ngx_http_infer_metrics_module);

    if (mcf->shm_zone == NULL) {
        return NGX_DECLINED;
    }

    if (ngx_http_infer_metrics_read(r, mcf, lcf, &seen) != NGX_OK) {
        return NGX_DECLINED;
    }

    ngx_http_infer_metrics_record(mcf, &seen);

    return NGX_DECLINED;
}


/* what a finished request says, from nginx and the other modules */

static ngx_int_t
ngx_http_infer_metrics_read(ngx_http_request_t *r,
    ngx_http_infer_metrics_main_conf_t *mcf,
    ngx_http_infer_metrics_loc_conf_t *lcf,
    ngx_http_infer_metrics_seen_t *seen)
{
    off_t                              n;
    ngx_str_t                          s;
    ngx_int_t                          ms;
    ngx_uint_t                         i;
    ngx_time_t                        *tp;
    ngx_http_variable_value_t         *vv;
    ngx_http_infer_metrics_counter_t  *counter;

    ngx_memzero(seen, sizeof(ngx_http_infer_metrics_seen_t));

    seen->labels_len = ngx_http_infer_metrics_labels(r, lcf->labels,
                                                     seen->labels);

    /* as $status counts */
    seen->status = r->err_status ? r->err_status : r->headers_out.status;

    /* as $request_time counts, in microseconds */

    tp = ngx_timeofday();
    ms = (ngx_msec_int_t) ((tp->sec - r->start_sec) * 1000
                           + (tp->msec - r->start_msec));
    seen->duration = (uint64_t) ngx_max(ms, 0) * 1000;

    seen->request_bytes = (uint64_t) r->request_length;
    seen->response_bytes = (uint64_t) r->connection->sent;

    /* every try of every upstream, as $upstream_response_time lists them */

    if (r->upstream_states && r->upstream_states->nelts) {
        seen->tries = r->upstream_states->elts;
        seen->ntries = r->upstream_states->nelts;
    }

    /* the peer infer_balance picked last, and why */

    vv = ngx_http_infer_variable(r, mcf->var_endpoint);

    if (vv && vv->len) {
        seen->endpoint = vv;
        seen->reason = ngx_http_infer_variable(r, mcf->var_reason);
    }

    for (i = 0; i < 4; i++) {
        seen->has_tokens[i] = (ngx_http_infer_metrics_variable_int(r,
                                   mcf->var_tokens[i], &seen->tokens[i])
                               == NGX_OK);
    }

    /* time to first token and per output token: for streams only */

    vv = ngx_http_infer_variable(r, mcf->var_stream);

    if (vv && vv->len == 1 && vv->data[0] == '1') {
        vv = ngx_http_infer_variable(r, mcf->var_ttft);

        seen->has_ttft = (vv
                          && ngx_http_infer_metrics_parse_seconds(vv->data,
                                 vv->len, &seen->ttft)
                             == NGX_OK);
    }

    if (mcf->counters.nelts) {
        seen->counters = ngx_pcalloc(r->pool,
                                     mcf->counters.nelts * sizeof(uint64_t));
        if (seen->counters == NULL) {
            return NGX_ERROR;
        }
    }

    counter = mcf->counters.elts;

    for (i = 0; i < mcf->counters.nelts; i++) {
        if (ngx_http_complex_value(r, &counter[i].value, &s) != NGX_OK
            || s.len == 0)
        {
            continue;
        }

        n = ngx_atoof(s.data, s.len);
        seen->counters[i] = (n > 0) ? (uint64_t) n : 0;
    }

    if (lcf->auth_status
        && ngx_http_complex_value(r, lcf->auth_status, &s) == NGX_OK)
    {
        seen->auth_outcome = s;
    }

    if (lcf->ratelimit_status
        && ngx_http_complex_value(r, lcf->ratelimit_status, &s) == NGX_OK)
    {
        seen->ratelimit_decision = s;
    }

    return NGX_OK;
}


/* what a finished request says, into the zone's series */

static void
ngx_http_infer_metrics_record(ngx_http_infer_metrics_main_conf_t *mcf,
    ngx_http_infer_metrics_seen_t *seen)
{
    u_char                     *p, *labels;
    size_t                      len, klen;
    uint64_t                    up, us;
    ngx_str_t                   s;
    ngx_uint_t                  i, tries;
    ngx_http_upstream_state_t  *state;

    u_char  key[NGX_HTTP_INFER_METRICS_LABELS_MAX];
    u_char  code[4];

    labels = seen->labels;
    len = seen->labels_len;

    ngx_http_infer_metrics_class(code, seen->status);

    klen = ngx_http_infer_metrics_label(key, labels, len, "code", code, 3)
           - key;
    ngx_http_infer_metrics_count(mcf, NGX_HTTP_INFER_METRICS_REQUESTS, key,
                                 klen, 1);

    ngx_http_infer_metrics_observe(mcf, NGX_HTTP_INFER_METRICS_DURATION,
                                   labels, len, seen->duration);

    ngx_http_infer_metrics_count(mcf, NGX_HTTP_INFER_METRICS_REQUEST_BYTES,
                                 labels, len, seen->request_bytes);
    ngx_http_infer_metrics_count(mcf, NGX_HTTP_INFER_METRICS_RESPONSE_BYTES,
                                 labels, len, seen->response_bytes);

    up = 0;
    tries = 0;
    state = seen->tries;

    for (i = 0; i < seen->ntries; i++) {

        /*
         * a try without a status (the client gave up before the answer's
         * header came) still took its time: its code is "oth"; no peer
         * marks an internal redirect between tries
         */

        if (state[i].peer == NULL) {
            continue;
        }

        tries++;

        us = (state[i].response_time == (ngx_msec_t) -1
              || (ngx_msec_int_t) state[i].response_time < 0)
             ? 0 : (uint64_t) state[i].response_time * 1000;
        up += us;

        p = ngx_http_infer_metrics_label(key, key, 0, "endpoint",
                                         state[i].peer->data,
                                         state[i].peer->len);
        ngx_http_infer_metrics_observe(mcf,
                                       NGX_HTTP_INFER_METRICS_ENDPOINT_TIME,
                                       key, p - key, us);

        ngx_http_infer_metrics_class(code, state[i].status);

        klen = ngx_http_infer_metrics_label(key, key, p - key, "code",
                                            code, 3) - key;
        ngx_http_infer_metrics_count(mcf,
                                     NGX_HTTP_INFER_METRICS_ENDPOINT_REQUESTS,
                                     key, klen, 1);
    }

    if (tries) {
        ngx_http_infer_metrics_observe(mcf,
                                       NGX_HTTP_INFER_METRICS_UPSTREAM_TIME,
                                       labels, len, up);

        ngx_http_infer_metrics_observe(mcf, NGX_HTTP_INFER_METRICS_OVERHEAD,
                                       labels, len,
                                       seen->duration > up
                                       ? seen->duration - up : 0);
    }

    if (seen->endpoint && seen->reason) {
        p = ngx_http_infer_metrics_label(key, key, 0, "endpoint",
                                         seen->endpoint->data,
                                         seen->endpoint->len);
        klen = ngx_http_infer_metrics_label(key, key, p - key, "reason",
                                            seen->reason->data,
                                            seen->reason->len) - key;
        ngx_http_infer_metrics_count(mcf,
                                     NGX_HTTP_INFER_METRICS_ENDPOINT_PICKS,
                                     key, klen, 1);
    }

    for (i = 0; i < 4; i++) {
        if (!seen->has_tokens[i]) {
            continue;
        }

        s = ngx_http_infer_metrics_token_types[i];
        klen = ngx_http_infer_metrics_label(key, labels, len, "type", s.data,
                                            s.len) - key;
        ngx_http_infer_metrics_count(mcf, NGX_HTTP_INFER_METRICS_TOKENS, key,
                                     klen, seen->tokens[i]);
    }

    if (seen->has_ttft) {
        ngx_http_infer_metrics_observe(mcf, NGX_HTTP_INFER_METRICS_TTFT,
                                       labels, len, seen->ttft);

        if (seen->has_tokens[1] && seen->tokens[1] >= 2
            && seen->duration >= seen->ttft)
        {
            ngx_http_infer_metrics_observe(mcf, NGX_HTTP_INFER_METRICS_TPOT,
                                           labels, len,
                                           (seen->duration - seen->ttft)
                                           / (seen->tokens[1] - 1));
        }
    }

    for (i = 0; i < mcf->counters.nelts; i++) {
        if (seen->counters[i]) {
            ngx_http_infer_metrics_count(mcf,
                                         NGX_HTTP_INFER_METRICS_NFAMILIES + i,
                                         labels, len, seen->counters[i]);
        }
    }

    if (seen->auth_outcome.len) {
        klen = ngx_http_infer_metrics_label(key, labels, len, "outcome",
                                            seen->auth_outcome.data,
                                            seen->auth_outcome.len) - key;
        ngx_http_infer_metrics_count(mcf, NGX_HTTP_INFER_METRICS_AUTH,
                                     key, klen, 1);
    }

    if (seen->ratelimit_decision.len) {
        klen = ngx_http_infer_metrics_label(key, labels, len, "decision",
                                            seen->ratelimit_decision.data,
                                            seen->ratelimit_decision.len)
               - key;
        ngx_http_infer_metrics_count(mcf, NGX_HTTP_INFER_METRICS_RATELIMIT,
                                     key, klen, 1);
    }
}


/*
 * Runs in PRECONTENT: the model (PREACCESS) and the tenant (ACCESS) are
 * known, and the request has not yet gone upstream.  The gauge is taken
 * back by a cleanup of the request's pool, which runs however the request
 * ends (after LOG, on a client's abort, on a worker's shutdown).  The
 * cleanup also marks the request as counted: an internal redirect runs
 * this phase again with the module's ctx cleared, but the pool is the same.
 */

static ngx_int_t
ngx_http_infer_metrics_inflight_handler(ngx_http_request_t *r)
{
    size_t                               len;
    ngx_pool_cleanup_t                  *cln;
    ngx_http_infer_metrics_node_t       *node;
    ngx_http_infer_metrics_loc_conf_t   *lcf;
    ngx_http_infer_metrics_main_conf_t  *mcf;

    u_char  labels[NGX_HTTP_INFER_METRICS_LABELS_MAX];

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_metrics_module);
    mcf = ngx_http_get_module_main_conf(r, ngx_http_infer_metrics_module);

    if (!lcf->enable || r != r->main || mcf->shm_zone == NULL) {
        return NGX_DECLINED;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_infer_metrics_inflight_done) {
            return NGX_DECLINED;
        }
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_DECLINED;
    }

    len = ngx_http_infer_metrics_labels(r, lcf->labels, labels);

    node = ngx_http_infer_metrics_series(mcf, NGX_HTTP_INFER_METRICS_IN_FLIGHT,
                                         labels, len);
    if (node == NULL) {
        return NGX_DECLINED;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer metrics in flight: %*s", (size_t) node->len,
                   (u_char *) &node->values[node->nvalues]);

    (void) ngx_atomic_fetch_add(&node->values[0], 1);

    cln->handler = ngx_http_infer_metrics_inflight_done;
    cln->data = node;

    return NGX_DECLINED;
}


static void
ngx_http_infer_metrics_inflight_done(void *data)
{
    ngx_http_infer_metrics_node_t  *node = data;

    (void) ngx_atomic_fetch_add(&node->values[0], (ngx_atomic_int_t) -1);
}


static ngx_int_t
ngx_http_infer_metrics_variable_int(ngx_http_request_t *r, ngx_int_t index,
    uint64_t *n)
{
    ngx_int_t  v;

    v = ngx_http_infer_variable_number(r, index);

    if (v == NGX_ERROR) {
        return NGX_DECLINED;
    }

    *n = (uint64_t) v;

    return NGX_OK;
}


/* "1.234" (seconds, up to 6 decimals, as $infer_ttft) in microseconds */

static ngx_int_t
ngx_http_infer_metrics_parse_seconds(u_char *p, size_t len, uint64_t *usec)
{
    u_char      *last;
    uint64_t     sec, frac;
    ngx_uint_t   digits, dot;

    last = p + len;
    sec = 0;
    frac = 0;
    digits = 0;
    dot = 0;

    if (len == 0 || len > 20) {
        return NGX_ERROR;
    }

    for ( /* void */ ; p < last; p++) {
        if (*p == '.' && !dot) {
            dot = 1;
            continue;
        }

        if (*p < '0' || *p > '9') {
            return NGX_ERROR;
        }

        if (!dot) {
            if (sec > 1000000000) {
                /* more than thirty years: no duration, and no overflow */
                return NGX_ERROR;
            }

            sec = sec * 10 + (*p - '0');

        } else if (digits < 6) {
            frac = frac * 10 + (*p - '0');
            digits++;
        }
    }

    while (digits < 6) {
        frac *= 10;
        digits++;
    }

    *usec = sec * 1000000 + frac;

    return NGX_OK;
}


static void *
ngx_http_infer_metrics_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_infer_metrics_main_conf_t  *mcf;

    mcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_metrics_main_conf_t));
    if (mcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     mcf->shm_zone = NULL;
     *     mcf->buckets[] = NULL;
     */

    if (ngx_array_init(&mcf->counters, cf->pool, 2,
                       sizeof(ngx_http_infer_metrics_counter_t))
        != NGX_OK)
    {
        return NULL;
    }

    mcf->max_series = NGX_CONF_UNSET_UINT;
    mcf->used = NGX_CONF_UNSET;

    return mcf;
}


static void *
ngx_http_infer_metrics_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_infer_metrics_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_metrics_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->enable = NGX_CONF_UNSET;
    conf->labels = NGX_CONF_UNSET_PTR;
    conf->auth_status = NGX_CONF_UNSET_PTR;
    conf->ratelimit_status = NGX_CONF_UNSET_PTR;
    conf->ready = NGX_CONF_UNSET_PTR;

    return conf;
}


/*
 * The defaults depend on the modules loaded: they are settled here, once
 * every module has registered its variables, and stored in the parent too
 * so that sibling locations share them.  A variable that no module defines
 * is left out, rather than make nginx -t fail with "unknown variable".
 */

static char *
ngx_http_infer_metrics_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_infer_metrics_loc_conf_t  *prev = parent;
    ngx_http_infer_metrics_loc_conf_t  *conf = child;

    ngx_uint_t                           i;
    ngx_http_infer_metrics_label_t      *lb;
    ngx_http_infer_metrics_main_conf_t  *mcf;
    ngx_http_complex_value_t           **cv, **pcv;

    static ngx_str_t  names[] = {
        ngx_string("model"), ngx_string("tenant")
    };
    static ngx_str_t  vars[] = {
        ngx_string("infer_model_target"), ngx_string("infer_tenant")
    };
    static ngx_str_t  values[] = {
        ngx_string("$infer_model_target"), ngx_string("$infer_tenant")
    };
    static ngx_str_t  status_vars[] = {
        ngx_string("infer_auth_status"), ngx_string("infer_ratelimit_status")
    };
    static ngx_str_t  status_values[] = {
        ngx_string("$infer_auth_status"), ngx_string("$infer_ratelimit_status")
    };

    ngx_conf_merge_value(conf->enable, prev->enable, 0);
    ngx_conf_merge_ptr_value(conf->ready, prev->ready, NULL);

    if (conf->labels == NGX_CONF_UNSET_PTR) {

        if (prev->labels == NGX_CONF_UNSET_PTR) {
            prev->labels = ngx_array_create(cf->pool, 2,
                                      sizeof(ngx_http_infer_metrics_label_t));
            if (prev->labels == NULL) {
                return NGX_CONF_ERROR;
            }

            for (i = 0; i < 2; i++) {
                if (!ngx_http_infer_variable_exists(cf, &vars[i])) {
                    continue;
                }

                lb = ngx_array_push(prev->labels);
                if (lb == NULL) {
                    return NGX_CONF_ERROR;
                }

                lb->name = names[i];

                if (ngx_http_infer_metrics_compile(cf, &lb->value, &values[i])
                    != NGX_OK)
                {
                    return NGX_CONF_ERROR;
                }
            }
        }

        conf->labels = prev->labels;
    }

    for (i = 0; i < 2; i++) {
        cv = i ? &conf->ratelimit_status : &conf->auth_status;
        pcv = i ? &prev->ratelimit_status : &prev->auth_status;

        if (*cv != NGX_CONF_UNSET_PTR) {
            continue;
        }

        if (*pcv == NGX_CONF_UNSET_PTR) {
            *pcv = NULL;

            if (ngx_http_infer_variable_exists(cf, &status_vars[i])) {
                *pcv = ngx_palloc(cf->pool, sizeof(ngx_http_complex_value_t));
                if (*pcv == NULL) {
                    return NGX_CONF_ERROR;
                }

                if (ngx_http_infer_metrics_compile(cf, *pcv, &status_values[i])
                    != NGX_OK)
                {
                    return NGX_CONF_ERROR;
                }
            }
        }

        *cv = *pcv;
    }

    if (conf->enable) {
        mcf = ngx_http_conf_get_module_main_conf(cf,
                                                 ngx_http_infer_metrics_module);
        mcf->used = 1;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_infer_metrics_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_infer_metrics_main_conf_t  *mcf = conf;

    u_char                         *p;
    ssize_t                         size;
    ngx_int_t                       n;
    ngx_str_t                      *value, s;
    ngx_http_infer_metrics_zone_t  *zone;

    if (mcf->shm_zone) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid zone name \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    size = ngx_parse_size(&value[2]);

    if (size == NGX_ERROR || size < (ssize_t) (8 * ngx_pagesize)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid zone size \"%V\": a size of at least %uz",
                           &value[2], 8 * ngx_pagesize);
        return NGX_CONF_ERROR;
    }

    mcf->max_series = NGX_HTTP_INFER_METRICS_MAX_SERIES;

    if (cf->args->nelts == 4) {
        if (ngx_strncmp(value[3].data, "max_series=", 11) != 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\": "
                               "only max_series=N is known", &value[3]);
            return NGX_CONF_ERROR;
        }

        p = value[3].data + 11;
        s.len = value[3].len - 11;
        s.data = p;

        n = ngx_atoi(s.data, s.len);

        if (n == NGX_ERROR || n < 1 || n > 10000000) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid max_series \"%V\": "
                               "a number from 1 to 10000000", &s);
            return NGX_CONF_ERROR;
        }

        mcf->max_series = n;
    }

    mcf->shm_zone = ngx_shared_memory_add(cf, &value[1], size,
                                          &ngx_http_infer_metrics_module);
    if (mcf->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (mcf->shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_metrics_zone \"%V\" is already declared",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    zone = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_metrics_zone_t));
    if (zone == NULL) {
        return NGX_CONF_ERROR;
    }

    zone->max_series = mcf->max_series;

    mcf->shm_zone->init = ngx_http_infer_metrics_init_zone;
    mcf->shm_zone->data = zone;

    return NGX_CONF_OK;
}


/* infer_metrics_label and infer_metrics_ready_condition: name value */

static char *
ngx_http_infer_metrics_add_label(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    char  *p = conf;

    u_char                            c;
    ngx_str_t                        *value;
    ngx_uint_t                        i;
    ngx_array_t                     **a;
    ngx_http_infer_metrics_label_t   *lb, tmp;

    static char  *reserved[] = {
        "code", "type", "outcome", "decision", "endpoint", "le",
        "infer_overflow", NULL
    };

    a = (ngx_array_t **) (p + cmd->offset);
    value = cf->args->elts;

    if (value[1].len == 0 || value[1].len > 32
        || (value[1].data[0] >= '0' && value[1].data[0] <= '9')
        || (value[1].len > 1 && value[1].data[0] == '_'
            && value[1].data[1] == '_'))
    {
        goto invalid;
    }

    for (i = 0; i < value[1].len; i++) {
        c = value[1].data[i];

        if ((c < 'a' || c > 'z') && (c < 'A' || c > 'Z')
            && (c < '0' || c > '9') && c != '_')
        {
            goto invalid;
        }
    }

    if (*a == NGX_CONF_UNSET_PTR) {
        *a = ngx_array_create(cf->pool, 2,
                              sizeof(ngx_http_infer_metrics_label_t));
        if (*a == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    if (cmd->offset == offsetof(ngx_http_infer_metrics_loc_conf_t, labels)) {

        for (i = 0; reserved[i]; i++) {
            if (value[1].len == ngx_strlen(reserved[i])
                && ngx_strncmp(value[1].data, reserved[i], value[1].len) == 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "label name \"%V\" is reserved: "
                                   "a family uses it", &value[1]);
                return NGX_CONF_ERROR;
            }
        }

        if ((*a)->nelts == NGX_HTTP_INFER_METRICS_MAX_LABELS) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "too many labels: at most %d",
                               NGX_HTTP_INFER_METRICS_MAX_LABELS);
            return NGX_CONF_ERROR;
        }
    }

    lb = (*a)->elts;

    for (i = 0; i < (*a)->nelts; i++) {
        if (lb[i].name.len == value[1].len
            && ngx_strncmp(lb[i].name.data, value[1].data, value[1].len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate name \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    lb = ngx_array_push(*a);
    if (lb == NULL) {
        return NGX_CONF_ERROR;
    }

    lb->name = value[1];

    if (ngx_http_infer_metrics_compile(cf, &lb->value, &value[2]) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    /*
     * Labels are kept sorted by name: two locations that declare the same
     * labels in another order then make the same series, not two series
     * Prometheus would see as one.
     */

    if (cmd->offset != offsetof(ngx_http_infer_metrics_loc_conf_t, labels)) {
        return NGX_CONF_OK;
    }

    lb = (*a)->elts;

    for (i = (*a)->nelts - 1; i > 0; i--) {
        if (ngx_memn2cmp(lb[i - 1].name.data, lb[i].name.data,
                         lb[i - 1].name.len, lb[i].name.len) <= 0)
        {
            break;
        }

        tmp = lb[i - 1];
        lb[i - 1] = lb[i];
        lb[i] = tmp;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid name \"%V\": letters, digits and \"_\", "
                       "not a digit first nor \"__\", up to 32 characters",
                       &value[1]);
    return NGX_CONF_ERROR;
}


static char *
ngx_http_infer_metrics_set_buckets(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_metrics_main_conf_t  *mcf = conf;

    ngx_str_t                         *value;
    ngx_uint_t                         f;
    ngx_http_infer_metrics_family_t   *fam;
    ngx_http_infer_metrics_buckets_t  *b;

    value = cf->args->elts;
    fam = ngx_http_infer_metrics_families;

    for (f = 0; f < NGX_HTTP_INFER_METRICS_NFAMILIES; f++) {
        if (fam[f].buckets
            && ngx_strlen(fam[f].buckets) == value[1].len
            && ngx_strncmp(fam[f].buckets, value[1].data, value[1].len) == 0)
        {
            break;
        }
    }

    if (f == NGX_HTTP_INFER_METRICS_NFAMILIES) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "unknown histogram \"%V\": request_duration, "
                           "upstream_response_time, gateway_overhead, "
                           "time_to_first_token, time_per_output_token or "
                           "endpoint_response_time", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (mcf->buckets[f]) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "buckets of \"%V\" are already set", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (cf->args->nelts - 2 > NGX_HTTP_INFER_METRICS_MAX_BUCKETS) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "too many buckets for \"%V\": at most %d",
                           &value[1], NGX_HTTP_INFER_METRICS_MAX_BUCKETS);
        return NGX_CONF_ERROR;
    }

    b = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_metrics_buckets_t));
    if (b == NULL) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_infer_metrics_buckets(cf, b, &value[2], cf->args->nelts - 2)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    mcf->buckets[f] = b;

    return NGX_CONF_OK;
}


/*
 * infer_metrics_counter name value: a counter of the per-request labels,
 * name_total, that each request recorded adds value to (a whole number;
 * empty, zero or anything else adds nothing).
 */

static char *
ngx_http_infer_metrics_add_counter(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_metrics_main_conf_t  *mcf = conf;

    u_char                            *p, c;
    ngx_str_t                         *value;
    ngx_uint_t                         i;
    ngx_http_infer_metrics_counter_t  *counter;

    value = cf->args->elts;

    if (value[1].len == 0 || value[1].len > 64
        || (value[1].data[0] >= '0' && value[1].data[0] <= '9'))
    {
        goto invalid;
    }

    for (i = 0; i < value[1].len; i++) {
        c = value[1].data[i];

        if ((c < 'a' || c > 'z') && (c < 'A' || c > 'Z')
            && (c < '0' || c > '9') && c != '_' && c != ':')
        {
            goto invalid;
        }
    }

    if ((value[1].len >= 6
         && ngx_strncmp(value[1].data + value[1].len - 6, "_total", 6) == 0)
        || (value[1].len >= 6
            && ngx_strncmp(value[1].data, "infer_", 6) == 0))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid counter name \"%V\": \"_total\" is "
                           "added, and \"infer_\" is the module's own",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    counter = mcf->counters.elts;

    for (i = 0; i < mcf->counters.nelts; i++) {
        if (counter[i].name.len == value[1].len
            && ngx_strncmp(counter[i].name.data, value[1].data,
                           value[1].len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate counter \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    if (NGX_HTTP_INFER_METRICS_NFAMILIES + mcf->counters.nelts
        == NGX_HTTP_INFER_METRICS_MAX_FAMILIES)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "too many counters: at most "
                           "%d", NGX_HTTP_INFER_METRICS_MAX_FAMILIES
                                 - NGX_HTTP_INFER_METRICS_NFAMILIES);
        return NGX_CONF_ERROR;
    }

    counter = ngx_array_push(&mcf->counters);
    if (counter == NULL) {
        return NGX_CONF_ERROR;
    }

    counter->name = value[1];
    counter->layout = ngx_crc32_long(value[1].data, value[1].len);

    /* the value as written, for HELP: the format escapes "\\" and "\n" */

    p = ngx_pnalloc(cf->pool, sizeof("Sum of ") - 1 + value[2].len * 2);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    counter->help.data = p;
    p = ngx_cpymem(p, "Sum of ", sizeof("Sum of ") - 1);

    for (i = 0; i < value[2].len; i++) {
        if (value[2].data[i] == '\\') {
            *p++ = '\\';
            *p++ = '\\';

        } else if (value[2].data[i] == '\n') {
            *p++ = '\\';
            *p++ = 'n';

        } else {
            *p++ = value[2].data[i];
        }
    }

    counter->help.len = p - counter->help.data;

    if (ngx_http_infer_metrics_compile(cf, &counter->value, &value[2])
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid counter name \"%V\": letters, digits, \"_\" "
                       "and \":\", not a digit first, up to 64 characters",
                       &value[1]);
    return NGX_CONF_ERROR;
}


/* infer_metrics_auth_status and infer_metrics_ratelimit_status */

static char *
ngx_http_infer_metrics_set_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    char  *p = conf;

    ngx_str_t                  *value;
    ngx_http_complex_value_t  **cv;

    cv = (ngx_http_complex_value_t **) (p + cmd->offset);

    if (*cv != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 3 && ngx_strncmp(value[1].data, "off", 3) == 0) {
        *cv = NULL;
        return NGX_CONF_OK;
    }

    *cv = ngx_palloc(cf->pool, sizeof(ngx_http_complex_value_t));
    if (*cv == NULL) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_infer_metrics_compile(cf, *cv, &value[1]) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* infer_metrics_export, infer_metrics_health, infer_metrics_ready */

static char *
ngx_http_infer_metrics_set_handler(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_core_loc_conf_t            *clcf;
    ngx_http_infer_metrics_main_conf_t  *mcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\": the location already has a content "
                           "handler", &cmd->name);
        return NGX_CONF_ERROR;
    }

    clcf->handler = (ngx_http_handler_pt) cmd->post;

    if (clcf->handler == ngx_http_infer_metrics_export_handler) {
        mcf = ngx_http_conf_get_module_main_conf(cf,
                                                 ngx_http_infer_metrics_module);
        mcf->used = 1;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_infer_metrics_default_buckets(ngx_conf_t *cf,
    ngx_http_infer_metrics_main_conf_t *mcf)
{
    u_char                            *p, *last;
    ngx_str_t                          v[NGX_HTTP_INFER_METRICS_MAX_BUCKETS];
    ngx_uint_t                         f, n;
    ngx_http_infer_metrics_buckets_t  *b;

    /*
     * LLM latencies: a whole answer takes from tens of milliseconds (an
     * embedding) to minutes (a long generation); a first token, tens of
     * milliseconds to tens of seconds under load; a token, milliseconds.
     */

    static char  *latency = "0.01 0.025 0.05 0.1 0.25 0.5 1 2.5 5 10 20 30 "
                            "60 120 300";
    static char  *ttft = "0.01 0.025 0.05 0.1 0.2 0.3 0.5 0.75 1 2 5 10 20 "
                         "30 60";
    static char  *tpot = "0.001 0.0025 0.005 0.01 0.015 0.02 0.03 0.05 0.075 "
                         "0.1 0.15 0.25 0.5 1";
    static char  *overhead = "0.0005 0.001 0.0025 0.005 0.01 0.025 0.05 0.1 "
                             "0.25 0.5 1";

    for (f = 0; f < NGX_HTTP_INFER_METRICS_NFAMILIES; f++) {

        if (ngx_http_infer_metrics_families[f].type
            != NGX_HTTP_INFER_METRICS_HISTOGRAM
            || mcf->buckets[f])
        {
            continue;
        }

        switch (f) {
        case NGX_HTTP_INFER_METRICS_TTFT:
            p = (u_char *) ttft;
            break;
        case NGX_HTTP_INFER_METRICS_TPOT:
            p = (u_char *) tpot;
            break;
        case NGX_HTTP_INFER_METRICS_OVERHEAD:
            p = (u_char *) overhead;
            break;
        default:
            p = (u_char *) latency;
        }

        last = p + ngx_strlen(p);

        for (n = 0; p < last; n++) {
            v[n].data = p;

            while (p < last && *p != ' ') {
                p++;
            }

            v[n].len = p - v[n].data;
            p++;
        }

        b = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_metrics_buckets_t));
        if (b == NULL) {
            return NGX_ERROR;
        }

        if (ngx_http_infer_metrics_buckets(cf, b, v, n) != NGX_OK) {
            return NGX_ERROR;
        }

        mcf->buckets[f] = b;
    }

    return NGX_OK;
}


/*
 * Bounds are seconds ("0.25") or nginx times ("250ms", "2m"), strictly
 * increasing.  Each is kept in microseconds, and as the text of its "le"
 * label, in seconds.
 */

static ngx_int_t
ngx_http_infer_metrics_buckets(ngx_conf_t *cf,
    ngx_http_infer_metrics_buckets_t *b, ngx_str_t *values, ngx_uint_t n)
{
    u_char      *p;
    uint64_t     us;
    ngx_int_t    ms;
    ngx_uint_t   i, j, seconds;

    for (i = 0; i < n; i++) {
        seconds = 1;

        for (j = 0; j < values[i].len; j++) {
            if (values[i].data[j] != '.'
                && (values[i].data[j] < '0' || values[i].data[j] > '9'))
            {
                seconds = 0;
            }
        }

        if (seconds) {
            if (ngx_http_infer_metrics_parse_seconds(values[i].data,
                                                     values[i].len, &us)
                != NGX_OK)
            {
                goto invalid;
            }

        } else {
            ms = ngx_parse_time(&values[i], 0);
            if (ms == NGX_ERROR) {
                goto invalid;
            }

            us = (uint64_t) ms * 1000;
        }

        if (us == 0 || us > (uint64_t) 86400 * 1000000
            || (i && us <= b->usec[i - 1]))
        {
            goto invalid;
        }

        b->usec[i] = us;

        p = ngx_pnalloc(cf->pool, NGX_INT64_LEN + 8);
        if (p == NULL) {
            return NGX_ERROR;
        }

        b->text[i].data = p;

        if (us % 1000000 == 0) {
            p = ngx_sprintf(p, "%uL", us / 1000000);

        } else {
            p = ngx_sprintf(p, "%uL.%06uL", us / 1000000, us % 1000000);

            while (p[-1] == '0') {
                p--;
            }
        }

        b->text[i].len = p - b->text[i].data;
    }

    b->n = n;
    b->layout = ngx_crc32_short((u_char *) b->usec, n * sizeof(uint64_t));

    return NGX_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid bucket \"%V\": seconds (\"0.25\") or a "
                       "time (\"250ms\"), above 0, at most 1d, each larger "
                       "than the one before", &values[i]);
    return NGX_ERROR;
}


/*
 * Whether a module defined the variable.  Asking for its index would
 * define it as unknown, and nginx -t would then fail.
 */

static ngx_int_t
ngx_http_infer_metrics_compile(ngx_conf_t *cf, ngx_http_complex_value_t *cv,
    ngx_str_t *value)
{
    ngx_http_compile_complex_value_t  ccv;

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = value;
    ccv.complex_value = cv;

    return ngx_http_compile_complex_value(&ccv);
}


/*
 * The LOG handler records; the PRECONTENT one counts requests in flight.
 * The pipeline gives each ngx_infer module a phase of its own; the
 * in-flight count shares PRECONTENT with the rate-limit module, where
 * their order changes only whether a request refused with 429 is briefly
 * counted.  With no infer_metrics_zone, a location that records or
 * exports gets a zone of the default size.
 */

static ngx_int_t
ngx_http_infer_metrics_init(ngx_conf_t *cf)
{
    ngx_uint_t                           i;
    ngx_http_handler_pt                 *h;
    ngx_http_core_main_conf_t           *cmcf;
    ngx_http_infer_metrics_zone_t       *zone;
    ngx_http_infer_metrics_main_conf_t  *mcf;

    static ngx_str_t  name = ngx_string("infer_metrics");
    static ngx_str_t  stream = ngx_string("infer_stream");
    static ngx_str_t  ttft = ngx_string("infer_ttft");
    static ngx_str_t  endpoint = ngx_string("infer_endpoint");
    static ngx_str_t  reason = ngx_string("infer_endpoint_reason");

    mcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_infer_metrics_module);

    if (ngx_http_infer_metrics_default_buckets(cf, mcf) != NGX_OK) {
        return NGX_ERROR;
    }

    /* the other modules' variables, of those that are loaded */

    mcf->var_stream = ngx_http_infer_variable_index(cf, &stream);
    mcf->var_ttft = ngx_http_infer_variable_index(cf, &ttft);
    mcf->var_endpoint = ngx_http_infer_variable_index(cf, &endpoint);
    mcf->var_reason = ngx_http_infer_variable_index(cf, &reason);

    if (mcf->var_stream == NGX_ERROR || mcf->var_ttft == NGX_ERROR
        || mcf->var_endpoint == NGX_ERROR || mcf->var_reason == NGX_ERROR)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < 4; i++) {
        mcf->var_tokens[i] = ngx_http_infer_variable_index(cf,
                                       &ngx_http_infer_metrics_token_vars[i]);

        if (mcf->var_tokens[i] == NGX_ERROR) {
            return NGX_ERROR;
        }
    }

    if (mcf->used == 1 && mcf->shm_zone == NULL) {
        mcf->max_series = NGX_HTTP_INFER_METRICS_MAX_SERIES;

        mcf->shm_zone = ngx_shared_memory_add(cf, &name,
                                              NGX_HTTP_INFER_METRICS_ZONE_SIZE,
                                              &ngx_http_infer_metrics_module);
        if (mcf->shm_zone == NULL) {
            return NGX_ERROR;
        }

        zone = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_metrics_zone_t));
        if (zone == NULL) {
            return NGX_ERROR;
        }

        zone->max_series = mcf->max_series;

        mcf->shm_zone->init = ngx_http_infer_metrics_init_zone;
        mcf->shm_zone->data = zone;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_infer_metrics_log_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_infer_metrics_inflight_handler;

    return NGX_OK;
}

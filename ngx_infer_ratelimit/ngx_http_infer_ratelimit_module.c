
/*
 * Copyright (C) ngx_infer authors
 *
 * ngx_http_infer_ratelimit_module: request and token limits, counted in
 * Redis so that every gateway replica enforces one budget, or in a
 * shared-memory zone (the local mode, and the fallback when Redis is
 * gone).  Admits in PRECONTENT, reconciles reserved tokens in LOG.
 *
 * Every limit is a GCRA (generic cell rate algorithm): a bucket of
 * "limit" units that refills continuously at limit/window, kept as one
 * "theoretical arrival time" per key.  A request costs 1 unit of a
 * requests limit and its token estimate of a tokens limit.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_ratelimit.h"


#define NGX_HTTP_INFER_RL_PASSED     1
#define NGX_HTTP_INFER_RL_LIMITED    2
#define NGX_HTTP_INFER_RL_DEGRADED   3
#define NGX_HTTP_INFER_RL_SHADOW     4

/* the other modules' variables that the limits read */
#define NGX_HTTP_INFER_RL_IN_MODEL             0
#define NGX_HTTP_INFER_RL_IN_PROMPT            1
#define NGX_HTTP_INFER_RL_IN_MAX               2
#define NGX_HTTP_INFER_RL_IN_TOTAL             3
#define NGX_HTTP_INFER_RL_IN_USAGE_PROMPT      4
#define NGX_HTTP_INFER_RL_IN_USAGE_COMPLETION  5
#define NGX_HTTP_INFER_RL_IN_PRICE_INPUT       6
#define NGX_HTTP_INFER_RL_IN_PRICE_OUTPUT      7
#define NGX_HTTP_INFER_RL_IN_COST              8


static ngx_int_t ngx_http_infer_ratelimit_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_ratelimit_items(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_ctx_t *ctx,
    ngx_http_infer_ratelimit_loc_conf_t *lcf);
static uint64_t ngx_http_infer_ratelimit_price(ngx_http_request_t *r,
    ngx_uint_t input);
static ngx_int_t ngx_http_infer_ratelimit_calendar(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_item_t *item);
static ngx_int_t ngx_http_infer_ratelimit_days(ngx_int_t year,
    ngx_int_t month);
static void ngx_http_infer_ratelimit_redis_done(ngx_http_request_t *r,
    ngx_int_t rc);
static void ngx_http_infer_ratelimit_degrade(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_ctx_t *ctx);
static void ngx_http_infer_ratelimit_decide(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_ctx_t *ctx);
static ngx_int_t ngx_http_infer_ratelimit_result(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_ctx_t *ctx);
static ngx_int_t ngx_http_infer_ratelimit_refuse(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_ctx_t *ctx);
static ngx_uint_t ngx_http_infer_ratelimit_too_large(
    ngx_http_infer_ratelimit_item_t *item);
static void ngx_http_infer_ratelimit_period(
    ngx_http_infer_ratelimit_limit_t *limit, ngx_str_t *period);
static u_char *ngx_http_infer_ratelimit_usd(u_char *buf, uint64_t nano);
static void ngx_http_infer_ratelimit_cleanup(void *data);
static uint64_t ngx_http_infer_ratelimit_number(ngx_http_request_t *r,
    ngx_uint_t input, ngx_uint_t *found);
static ngx_int_t ngx_http_infer_ratelimit_log_handler(ngx_http_request_t *r);


static ngx_int_t ngx_http_infer_ratelimit_init_stats(
    ngx_shm_zone_t *shm_zone, void *data);
static ngx_int_t ngx_http_infer_ratelimit_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static char *ngx_http_infer_ratelimit_zone(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_ratelimit_limit(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_infer_ratelimit_add_variables(ngx_conf_t *cf);
static void *ngx_http_infer_ratelimit_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_infer_ratelimit_create_conf(ngx_conf_t *cf);
static char *ngx_http_infer_ratelimit_merge_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_infer_ratelimit_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_infer_ratelimit_init_process(ngx_cycle_t *cycle);
static void ngx_http_infer_ratelimit_exit_process(ngx_cycle_t *cycle);


static ngx_conf_num_bounds_t  ngx_http_infer_ratelimit_status_bounds = {
    ngx_conf_check_num_bounds, 400, 599
};


static ngx_command_t  ngx_http_infer_ratelimit_commands[] = {

    { ngx_string("infer_ratelimit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_ratelimit_loc_conf_t, enable),
      NULL },

    { ngx_string("infer_ratelimit_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_infer_ratelimit_zone,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_ratelimit_limit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_2MORE,
      ngx_http_infer_ratelimit_limit,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_ratelimit_redis"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_infer_ratelimit_redis,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_infer_ratelimit_main_conf_t, redis),
      NULL },

    { ngx_string("infer_ratelimit_shadow"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_ratelimit_loc_conf_t, shadow),
      NULL },

    { ngx_string("infer_ratelimit_headers"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_ratelimit_loc_conf_t, headers),
      NULL },

    { ngx_string("infer_ratelimit_status"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_ratelimit_loc_conf_t, status_code),
      &ngx_http_infer_ratelimit_status_bounds },

    { ngx_string("infer_ratelimit_default_max_tokens"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_ratelimit_loc_conf_t, default_max_tokens),
      NULL },

    { ngx_string("infer_ratelimit_charge_cache_hits"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_ratelimit_loc_conf_t, charge_cache_hits),
      NULL },

    { ngx_string("infer_usage_events_stream"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_infer_ratelimit_events_stream,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_usage_events"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_ratelimit_loc_conf_t, events),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_infer_ratelimit_module_ctx = {
    ngx_http_infer_ratelimit_add_variables, /* preconfiguration */
    ngx_http_infer_ratelimit_init,         /* postconfiguration */

    ngx_http_infer_ratelimit_create_main_conf, /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_infer_ratelimit_create_conf,  /* create location configuration */
    ngx_http_infer_ratelimit_merge_conf    /* merge location configuration */
};


ngx_module_t  ngx_http_infer_ratelimit_module = {
    NGX_MODULE_V1,
    &ngx_http_infer_ratelimit_module_ctx,  /* module context */
    ngx_http_infer_ratelimit_commands,     /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_infer_ratelimit_init_process, /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_infer_ratelimit_exit_process, /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


#define NGX_HTTP_INFER_RL_VAR_STATUS      0
#define NGX_HTTP_INFER_RL_VAR_REQUESTS    1
#define NGX_HTTP_INFER_RL_VAR_TOKENS      2
#define NGX_HTTP_INFER_RL_VAR_LIMITED_BY  3
#define NGX_HTTP_INFER_RL_VAR_DEGRADED    4
#define NGX_HTTP_INFER_RL_VAR_REDIS_UP    5

static ngx_http_variable_t  ngx_http_infer_ratelimit_vars[] = {

    { ngx_string("infer_ratelimit_status"), NULL,
      ngx_http_infer_ratelimit_variable, NGX_HTTP_INFER_RL_VAR_STATUS,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_ratelimit_remaining_requests"), NULL,
      ngx_http_infer_ratelimit_variable, NGX_HTTP_INFER_RL_VAR_REQUESTS,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_ratelimit_remaining_tokens"), NULL,
      ngx_http_infer_ratelimit_variable, NGX_HTTP_INFER_RL_VAR_TOKENS,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_ratelimit_limited_by"), NULL,
      ngx_http_infer_ratelimit_variable, NGX_HTTP_INFER_RL_VAR_LIMITED_BY,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_ratelimit_degraded_total"), NULL,
      ngx_http_infer_ratelimit_variable, NGX_HTTP_INFER_RL_VAR_DEGRADED,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_ratelimit_redis_up"), NULL,
      ngx_http_infer_ratelimit_variable, NGX_HTTP_INFER_RL_VAR_REDIS_UP,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


/* the route module's variables, by NGX_HTTP_INFER_RL_IN_*: it may not be
   loaded */

static ngx_str_t  ngx_http_infer_ratelimit_inputs[] = {
    ngx_string("infer_model"),
    ngx_string("infer_prompt_tokens_estimate"),
    ngx_string("infer_max_tokens"),
    ngx_string("infer_usage_total_tokens"),
    ngx_string("infer_usage_prompt_tokens"),
    ngx_string("infer_usage_completion_tokens"),
    ngx_string("infer_price_input"),
    ngx_string("infer_price_output"),
    ngx_string("infer_cost")
};


/*
 * The PRECONTENT handler, which "satisfy any" does not skip, so a request
 * let in by an allow rule is still counted.  A decision is made once per
 * request and kept: the phase runs again after an internal redirect (a
 * route failover, an error_page) and when a Redis reply this request
 * waited for comes.
 */

static ngx_int_t
ngx_http_infer_ratelimit_handler(ngx_http_request_t *r)
{
    ngx_int_t                               rc;
    ngx_http_infer_ratelimit_ctx_t         *ctx;
    ngx_http_infer_ratelimit_loc_conf_t    *lcf;
    ngx_http_infer_ratelimit_main_conf_t   *rmcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_ratelimit_module);

    if (!lcf->enable || r != r->main) {
        return NGX_DECLINED;
    }

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer ratelimit precontent handler");

    ctx = ngx_http_infer_ratelimit_get_ctx(r);

    if (ctx) {
        if (ctx->waiting) {
            return NGX_AGAIN;
        }

        if (ctx->decided) {
            return ngx_http_infer_ratelimit_result(r, ctx);
        }
    }

    if (lcf->limits == NULL) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_infer_ctx_create(r, &ngx_http_infer_ratelimit_module,
                                    sizeof(ngx_http_infer_ratelimit_ctx_t),
                                    ngx_http_infer_ratelimit_cleanup);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ngx_http_infer_ratelimit_items(r, ctx, lcf) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ctx->nitems == 0) {
        ctx->decided = 1;
        ctx->status = NGX_HTTP_INFER_RL_PASSED;
        return NGX_DECLINED;
    }

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_ratelimit_module);

    if (rmcf->redis) {
        /* the approximate limits, from what this worker knows */

        /* in shadow mode they are charged, and the exact ones asked */

        rc = ngx_http_infer_ratelimit_approx_admit(ctx->items + ctx->nexact,
                                                   ctx->nitems - ctx->nexact,
                                                   lcf->shadow);

        if ((rc != NGX_OK && !lcf->shadow) || ctx->nexact == 0) {
            ctx->status = NGX_HTTP_INFER_RL_PASSED;
            ngx_http_infer_ratelimit_decide(r, ctx);
            return ngx_http_infer_ratelimit_result(r, ctx);
        }

        /* what this gateway used itself: the least Redis may hold */
        ngx_http_infer_ratelimit_zone_floor(rmcf->shm_zone, ctx->items,
                                            ctx->nexact,
                                            rmcf->redis->replicas,
                                            rmcf->redis->timeout);

        ngx_http_infer_ratelimit_coalesce_admit(ctx->items, ctx->nexact);

        rc = ngx_http_infer_ratelimit_redis_eval(r, rmcf->redis,
                                         NGX_HTTP_INFER_RL_ADMIT,
                                         ctx->items, ctx->nexact,
                                         ngx_http_infer_ratelimit_redis_done);
        if (rc == NGX_AGAIN) {
            ctx->waiting = 1;

            /* a client that goes away ends the request; no more phases */
            r->read_event_handler = ngx_http_test_reading;
            r->write_event_handler = ngx_http_request_empty_handler;

            return NGX_AGAIN;
        }

        ngx_http_infer_ratelimit_coalesce_restore(ctx->items, ctx->nexact);
        ngx_http_infer_ratelimit_degrade(r, ctx);

    } else {
        (void) ngx_http_infer_ratelimit_zone_eval(rmcf->shm_zone, ctx->items,
                                                  ctx->nitems, 0, 1);
        ctx->status = NGX_HTTP_INFER_RL_PASSED;
    }

    ngx_http_infer_ratelimit_decide(r, ctx);

    return ngx_http_infer_ratelimit_result(r, ctx);
}


/*
 * The limits in force here, with their keys and costs.  A limit whose key
 * is empty does not apply (as with limit_req), which is how "map" chooses
 * limits per plan.
 */

static ngx_int_t
ngx_http_infer_ratelimit_items(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_ctx_t *ctx,
    ngx_http_infer_ratelimit_loc_conf_t *lcf)
{
    u_char                                *p;
    uint64_t                               estimate, prompt, max, spend;
    ngx_str_t                              key;
    ngx_uint_t                             i, k, n, found, tokens, approx,
                                           priced;
    ngx_http_infer_ratelimit_item_t       *sorted;
    ngx_http_variable_value_t             *model;
    ngx_http_infer_ratelimit_item_t       *item;
    ngx_http_infer_ratelimit_limit_t      *limit;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    limit = lcf->limits->elts;
    n = lcf->limits->nelts;

    ctx->items = ngx_pcalloc(r->pool,
                             n * sizeof(ngx_http_infer_ratelimit_item_t));
    if (ctx->items == NULL) {
        return NGX_ERROR;
    }

    estimate = 0;
    tokens = 1;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_ratelimit_module);

    if (rmcf->input[NGX_HTTP_INFER_RL_IN_MODEL] != NGX_DECLINED) {
        /* GET /v1/models, say: no model, no tokens to spend or charge */
        model = ngx_http_infer_variable(r,
                                    rmcf->input[NGX_HTTP_INFER_RL_IN_MODEL]);

        tokens = (model && model->len);
    }

    prompt = 0;
    max = 0;
    spend = 0;
    priced = 0;

    for (i = 0; tokens && i < n; i++) {
        if (limit[i].kind != NGX_HTTP_INFER_RL_TOKENS
            && limit[i].kind != NGX_HTTP_INFER_RL_BUDGET)
        {
            continue;
        }

        if (estimate == 0) {
            /* the estimate: prompt tokens as the route module counts
             * them, plus the answer's max_tokens or our default */

            prompt = ngx_http_infer_ratelimit_number(r,
                                  NGX_HTTP_INFER_RL_IN_PROMPT, &found);
            max = ngx_http_infer_ratelimit_number(r,
                                  NGX_HTTP_INFER_RL_IN_MAX, &found);
            max = found ? max : lcf->default_max_tokens;
            estimate = prompt + max;
        }

        if (limit[i].kind == NGX_HTTP_INFER_RL_BUDGET && !priced) {
            /* the most it may cost: those tokens at the model's prices,
             * read only where a budget applies */

            spend = ngx_http_infer_decimal_cost(ngx_min(prompt, 0x7fffffff),
                        ngx_http_infer_ratelimit_price(r,
                                          NGX_HTTP_INFER_RL_IN_PRICE_INPUT))
                    + ngx_http_infer_decimal_cost(ngx_min(max, 0x7fffffff),
                        ngx_http_infer_ratelimit_price(r,
                                          NGX_HTTP_INFER_RL_IN_PRICE_OUTPUT));
            priced = 1;
        }
    }

    for (i = 0; i < n; i++) {

        if (ngx_http_complex_value(r, &limit[i].key, &key) != NGX_OK) {
            return NGX_ERROR;
        }

        /* a model without prices spends no budget */

        if (key.len == 0
            || (limit[i].kind == NGX_HTTP_INFER_RL_TOKENS && !tokens)
            || (limit[i].kind == NGX_HTTP_INFER_RL_BUDGET && spend == 0))
        {
            continue;
        }

        if (key.len > 256) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "infer ratelimit: the key of \"%V\" is %uz bytes "
                          "long, more than 256: the limit is not applied",
                          &limit[i].name, key.len);
            continue;
        }

        item = &ctx->items[ctx->nitems++];

        item->limit = &limit[i];
        item->key = key;
        item->limit_n = limit[i].limit;
        item->cost = (limit[i].kind == NGX_HTTP_INFER_RL_TOKENS) ? estimate
                     : (limit[i].kind == NGX_HTTP_INFER_RL_BUDGET) ? spend
                     : 1;

        if (limit[i].calendar
            && ngx_http_infer_ratelimit_calendar(r, item) != NGX_OK)
        {
            return NGX_ERROR;
        }

        /* "name:key", and ":window" for a calendar one */

        item->id.len = limit[i].name.len + 1 + key.len
                       + (item->window.len ? item->window.len + 1 : 0);
        item->id.data = ngx_pnalloc(r->pool, item->id.len);
        if (item->id.data == NULL) {
            return NGX_ERROR;
        }

        p = ngx_cpymem(item->id.data, limit[i].name.data, limit[i].name.len);
        *p++ = ':';
        p = ngx_cpymem(p, key.data, key.len);

        if (item->window.len) {
            *p++ = ':';
            ngx_memcpy(p, item->window.data, item->window.len);
        }

        item->hash = ngx_crc32_short(item->id.data, item->id.len);
    }

    /* the exact limits first, then the approximate ones, in order */

    ctx->nexact = ctx->nitems;

    for (i = 0; i < ctx->nitems; i++) {
        if (ctx->items[i].limit->approximate) {
            break;
        }
    }

    if (i < ctx->nitems) {
        sorted = ngx_palloc(r->pool,
                        ctx->nitems * sizeof(ngx_http_infer_ratelimit_item_t));
        if (sorted == NULL) {
            return NGX_ERROR;
        }

        k = 0;

        for (approx = 0; approx < 2; approx++) {
            for (i = 0; i < ctx->nitems; i++) {
                if ((ctx->items[i].limit->approximate != 0) == approx) {
                    sorted[k++] = ctx->items[i];
                }
            }

            if (approx == 0) {
                ctx->nexact = k;
            }
        }

        ctx->items = sorted;
    }

    return NGX_OK;
}


/* a price of the route module's, micro-dollars per million tokens; 0 */

static uint64_t
ngx_http_infer_ratelimit_price(ngx_http_request_t *r, ngx_uint_t input)
{
    int64_t                                price;
    ngx_http_variable_value_t             *vv;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_ratelimit_module);

    vv = ngx_http_infer_variable(r, rmcf->input[input]);

    if (vv == NULL) {
        return 0;
    }

    price = ngx_http_infer_decimal_parse(vv->data, vv->len, 6);

    return (price > 0) ? (uint64_t) price : 0;
}


/*
 * A calendar window, in UTC by this gateway's clock: its name ("20261206"
 * for a day, "202612" for a month), which names its counter, and its end.
 */

static ngx_int_t
ngx_http_infer_ratelimit_calendar(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_item_t *item)
{
    time_t     now;
    ngx_tm_t   tm;
    ngx_int_t  year, month;

    now = ngx_time();
    ngx_gmtime(now, &tm);

    item->window.data = ngx_pnalloc(r->pool, sizeof("20261206") - 1);
    if (item->window.data == NULL) {
        return NGX_ERROR;
    }

    if (item->limit->calendar == NGX_HTTP_INFER_RL_DAY) {
        item->end = (uint64_t) (now / 86400 + 1) * 86400 * 1000;
        item->window.len = ngx_sprintf(item->window.data, "%04d%02d%02d",
                                       tm.ngx_tm_year, tm.ngx_tm_mon,
                                       tm.ngx_tm_mday)
                           - item->window.data;
        return NGX_OK;
    }

    year = tm.ngx_tm_year;
    month = tm.ngx_tm_mon + 1;      /* the next one, 1-12 */

    if (month > 12) {
        month = 1;
        year++;
    }

    item->end = (uint64_t) ngx_http_infer_ratelimit_days(year, month)
                * 86400 * 1000;
    item->window.len = ngx_sprintf(item->window.data, "%04d%02d",
                                   tm.ngx_tm_year, tm.ngx_tm_mon)
                       - item->window.data;

    return NGX_OK;
}


/*
 * Days from 1970-01-01 to the first of a month (the proleptic Gregorian
 * calendar's days-from-civil, for years 1970 and later).
 */

static ngx_int_t
ngx_http_infer_ratelimit_days(ngx_int_t year, ngx_int_t month)
{
    ngx_int_t  era, yoe, doy, doe;

    if (month <= 2) {
        year--;
    }

    era = year / 400;
    yoe = year - era * 400;
    doy = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;

    return era * 146097 + doe - 719468;
}


/* the Redis reply came, or will not */

static void
ngx_http_infer_ratelimit_redis_done(ngx_http_request_t *r, ngx_int_t rc)
{
    ngx_connection_t                      *c;
    ngx_http_infer_ratelimit_ctx_t        *ctx;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    c = r->connection;

    ctx = ngx_http_infer_ratelimit_get_ctx(r);

    if (ctx == NULL || !ctx->waiting) {
        return;
    }

    ctx->waiting = 0;

    if (rc == NGX_OK) {
        ctx->status = NGX_HTTP_INFER_RL_PASSED;

        /* an outage, or a Redis that loses its keys, goes on from here */

        rmcf = ngx_http_get_module_main_conf(r,
                                             ngx_http_infer_ratelimit_module);

        ngx_http_infer_ratelimit_zone_mirror(rmcf->shm_zone, ctx->items,
                                             ctx->nexact,
                                             rmcf->redis->replicas);

    } else {
        ngx_http_infer_ratelimit_degrade(r, ctx);
    }

    /* the handler acts on the decision when the phases run again */

    ngx_http_infer_ratelimit_decide(r, ctx);

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);
    ngx_http_run_posted_requests(c);
}


/*
 * Redis could not decide: each limit's outage policy does.  fail_closed
 * refuses; local counts in the zone, the limit divided by the number of
 * replicas; fail_open lets the request through uncounted.
 */

static void
ngx_http_infer_ratelimit_degrade(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_ctx_t *ctx)
{
    ngx_uint_t                             i, replicas;
    ngx_http_infer_ratelimit_item_t       *item;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_ratelimit_module);

    ctx->status = NGX_HTTP_INFER_RL_DEGRADED;

    if (rmcf->stats_zone && rmcf->stats_zone->data) {
        (void) ngx_atomic_fetch_add((ngx_atomic_t *) rmcf->stats_zone->data,
                                    1);
    }

    /* the approximate limits were decided here already */

    for (i = 0; i < ctx->nexact; i++) {
        item = &ctx->items[i];

        item->known = 0;
        item->refused = 0;
        item->where = NGX_HTTP_INFER_RL_NOWHERE;

        if (item->limit->on_error == NGX_HTTP_INFER_RL_FAIL_CLOSED) {
            item->refused = 1;
            item->retry = 1000;
            return;
        }
    }

    replicas = rmcf->redis ? rmcf->redis->replicas : 1;

    (void) ngx_http_infer_ratelimit_zone_eval(rmcf->shm_zone, ctx->items,
                                              ctx->nexact, 1, replicas);
}


/*
 * Turns the items' results into the request's fate: through, or the
 * refusal in the OpenAI envelope.  Shadow mode reports and lets through.
 */

static void
ngx_http_infer_ratelimit_decide(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_ctx_t *ctx)
{
    ngx_uint_t                            i;
    ngx_http_infer_ratelimit_item_t      *item;
    ngx_http_infer_ratelimit_loc_conf_t  *lcf;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_ratelimit_module);

    ctx->decided = 1;

    for (i = 0; i < ctx->nitems; i++) {
        item = &ctx->items[i];

        if (!item->refused) {
            continue;
        }

        /* one that can never fit is said first: waiting cannot help it */

        if (ctx->refused == NULL
            || (ngx_http_infer_ratelimit_too_large(item)
                && !ngx_http_infer_ratelimit_too_large(ctx->refused))
            || (item->retry > ctx->refused->retry
                && !ngx_http_infer_ratelimit_too_large(ctx->refused)))
        {
            ctx->refused = item;
        }
    }

    if (ctx->refused == NULL) {
        return;
    }

    /* a degraded decision stays "degraded", refused or not */

    if (lcf->shadow) {
        if (ctx->status != NGX_HTTP_INFER_RL_DEGRADED) {
            ctx->status = NGX_HTTP_INFER_RL_SHADOW;
        }

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "infer ratelimit: shadow: limit \"%V\" would refuse",
                      &ctx->refused->limit->name);
        return;
    }

    ctx->limited = 1;

    /* refused by an exact limit: the approximate ones charged nothing */
    ngx_http_infer_ratelimit_approx_move(ctx->items + ctx->nexact,
                                         ctx->nitems - ctx->nexact, 1);

    if (ctx->status != NGX_HTTP_INFER_RL_DEGRADED) {
        ctx->status = NGX_HTTP_INFER_RL_LIMITED;
    }

    /* not the key: it may be an address, or whatever a map made of it */

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "infer ratelimit: limit \"%V\" refused",
                  &ctx->refused->limit->name);
}


/* what the phase handler returns for a decision made */

static ngx_int_t
ngx_http_infer_ratelimit_result(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_ctx_t *ctx)
{
    if (!ctx->limited) {
        return NGX_DECLINED;
    }

    if (ctx->sent) {
        /*
         * back after the refusal itself failed and error_page sent the
         * request elsewhere: that location answers
         */
        return NGX_DECLINED;
    }

    ctx->sent = 1;
    ngx_http_finalize_request(r, ngx_http_infer_ratelimit_refuse(r, ctx));

    return NGX_DONE;
}


static ngx_int_t
ngx_http_infer_ratelimit_refuse(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_ctx_t *ctx)
{
    u_char                                *p;
    time_t                                 sec;
    ngx_str_t                              msg, period;
    ngx_http_infer_ratelimit_item_t       *item;
    ngx_http_infer_ratelimit_loc_conf_t   *lcf;
    u_char                                 buf[512];
    u_char                                 usd[3][NGX_HTTP_INFER_DECIMAL_LEN
                                                  + 1];
    ngx_table_elt_t                       *h;

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_ratelimit_module);

    item = ctx->refused;

    ngx_http_infer_ratelimit_period(item->limit, &period);

    if (ngx_http_infer_ratelimit_too_large(item)
        && item->limit->kind == NGX_HTTP_INFER_RL_BUDGET)
    {
        p = ngx_snprintf(buf, sizeof(buf),
                         "Request too large for budget \"%V\": it may "
                         "cost up to %s USD (the prompt's estimate plus "
                         "max_tokens at the model's prices), more than the "
                         "whole budget of %s USD per %V. Reduce max_tokens "
                         "or the prompt.",
                         &item->limit->name,
                         ngx_http_infer_ratelimit_usd(usd[0], item->cost),
                         ngx_http_infer_ratelimit_usd(usd[1], item->limit_n),
                         &period);

        msg.data = buf;
        msg.len = p - buf;

        return ngx_http_infer_send_error(r, NGX_HTTP_BAD_REQUEST,
                                         "invalid_request_error",
                                         "request_too_large", &msg);
    }

    if (ngx_http_infer_ratelimit_too_large(item)) {
        /*
         * not a rate: the request is refused however long it waits, so
         * no Retry-After, and a 400 that clients do not retry
         */

        p = ngx_snprintf(buf, sizeof(buf),
                         "Request too large for limit \"%V\": it needs "
                         "%uL tokens (the prompt's estimate plus "
                         "max_tokens), more than the %uL tokens per %V "
                         "the limit allows. Reduce max_tokens or the "
                         "prompt.",
                         &item->limit->name, item->cost, item->limit_n,
                         &period);

        msg.data = buf;
        msg.len = p - buf;

        return ngx_http_infer_send_error(r, NGX_HTTP_BAD_REQUEST,
                                         "invalid_request_error",
                                         "request_too_large", &msg);
    }

    sec = (item->retry + 999) / 1000;
    if (sec < 1) {
        sec = 1;
    }

    if (ngx_http_infer_retry_after(r, sec) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* the key is not said: it may be an address or a key id */

    if (item->known && item->limit->kind == NGX_HTTP_INFER_RL_BUDGET) {
        /*
         * OpenAI's answer when the money is spent; the SDKs retry a 429
         * unless told not to, and waiting is no use before the reset
         */

        p = ngx_snprintf(buf, sizeof(buf),
                         "You exceeded your current quota (budget \"%V\": "
                         "%s USD per %V, %s USD left, this request may cost "
                         "up to %s USD). It renews in %Ts.",
                         &item->limit->name,
                         ngx_http_infer_ratelimit_usd(usd[0], item->limit_n),
                         &period,
                         ngx_http_infer_ratelimit_usd(usd[1],
                                                      item->remaining),
                         ngx_http_infer_ratelimit_usd(usd[2], item->cost),
                         sec);

        msg.data = buf;
        msg.len = p - buf;

        h = ngx_http_infer_header_add(r, (u_char *) "x-should-retry",
                                      sizeof("x-should-retry") - 1);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ngx_str_set(&h->value, "false");

        return ngx_http_infer_send_error(r, lcf->status_code,
                                         "insufficient_quota",
                                         "insufficient_quota", &msg);
    }

    if (item->known
        && item->limit->kind == NGX_HTTP_INFER_RL_CONCURRENCY)
    {
        p = ngx_snprintf(buf, sizeof(buf),
                         "Too many requests in flight (limit \"%V\"): "
                         "limit %uL. Please try again in %Ts.",
                         &item->limit->name, item->limit_n, sec);

    } else if (item->known) {
        p = ngx_snprintf(buf, sizeof(buf),
                         "Rate limit reached for %s per %V (limit \"%V\"): "
                         "limit %uL, remaining %uL, requested %uL. "
                         "Please try again in %Ts.",
                         item->limit->kind == NGX_HTTP_INFER_RL_TOKENS
                         ? "tokens" : "requests",
                         &period, &item->limit->name,
                         item->limit_n, item->remaining, item->cost, sec);
    } else {
        p = ngx_snprintf(buf, sizeof(buf),
                         "The rate limiter is unavailable (limit \"%V\"). "
                         "Please try again in %Ts.",
                         &item->limit->name, sec);
    }

    msg.data = buf;
    msg.len = p - buf;

    return ngx_http_infer_send_error(r, lcf->status_code,
                   item->limit->kind == NGX_HTTP_INFER_RL_TOKENS
                   ? "tokens" : "requests",
                   "rate_limit_exceeded", &msg);
}


/*
 * A token estimate larger than the whole limit in force: no wait makes
 * it fit.  The local outage policy charges such a request its share
 * instead (its cost is cut to it), so it is never said there.
 */

static ngx_uint_t
ngx_http_infer_ratelimit_too_large(ngx_http_infer_ratelimit_item_t *item)
{
    return item->known
           && (item->limit->kind == NGX_HTTP_INFER_RL_TOKENS
               || item->limit->kind == NGX_HTTP_INFER_RL_BUDGET)
           && item->cost > item->limit_n;
}


/* nano-dollars as a NUL-terminated "0.25", for a message's %s */

static u_char *
ngx_http_infer_ratelimit_usd(u_char *buf, uint64_t nano)
{
    *ngx_http_infer_decimal_print(buf, nano, 9) = '\0';

    return buf;
}


/* "minute" for "m" or "1m", as a message reads; other periods as written */

static void
ngx_http_infer_ratelimit_period(ngx_http_infer_ratelimit_limit_t *limit,
    ngx_str_t *period)
{
    if (limit->calendar) {
        /* "day", "month" */
        *period = limit->window_text;
        return;
    }

    switch (limit->window) {

    case 1000:
        ngx_str_set(period, "second");
        return;

    case 60 * 1000:
        ngx_str_set(period, "minute");
        return;

    case 3600 * 1000:
        ngx_str_set(period, "hour");
        return;

    case 86400 * 1000:
        ngx_str_set(period, "day");
        return;
    }

    *period = limit->window_text;
}


/* the request's context, after an internal redirect too */

ngx_http_infer_ratelimit_ctx_t *
ngx_http_infer_ratelimit_get_ctx(ngx_http_request_t *r)
{
    return ngx_http_infer_ctx_get(r->main, &ngx_http_infer_ratelimit_module,
                                  ngx_http_infer_ratelimit_cleanup);
}


static void
ngx_http_infer_ratelimit_cleanup(void *data)
{
    ngx_http_infer_ratelimit_ctx_t  *ctx = data;

    /*
     * A marker, and: a request gone while its exact limits waited for
     * Redis was not served, so its approximate charges are taken back
     * (the Redis waiter has a cleanup of its own, for the exact ones).
     */

    if (ctx->waiting && !ctx->decided) {
        ngx_http_infer_ratelimit_approx_move(ctx->items + ctx->nexact,
                                             ctx->nitems - ctx->nexact, 1);
    }
}


/* a number from the route module's variable input, or 0 and not found */

static uint64_t
ngx_http_infer_ratelimit_number(ngx_http_request_t *r, ngx_uint_t input,
    ngx_uint_t *found)
{
    ngx_int_t                              n;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_ratelimit_module);

    n = ngx_http_infer_variable_number(r, rmcf->input[input]);

    *found = (n != NGX_ERROR);

    return *found ? (uint64_t) n : 0;
}


/*
 * LOG: a request leaves the in-flight counts, and a token reservation
 * becomes the real usage.  Without a usage (an
 * answer that carried none), a successful answer keeps its reservation
 * and a failed one gives it back.
 */

static ngx_int_t
ngx_http_infer_ratelimit_log_handler(ngx_http_request_t *r)
{
    int64_t                                real, cost;
    uint64_t                               prompt, completion, used;
    ngx_uint_t                             i, found, found2, zone, redis;
    ngx_http_variable_value_t             *vv;
    ngx_http_infer_ratelimit_ctx_t        *ctx;
    ngx_http_infer_ratelimit_item_t       *item;
    ngx_http_infer_ratelimit_loc_conf_t   *lcf;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_infer_ratelimit_get_ctx(r);

    if (ctx == NULL || ctx->reconciled || !ctx->decided) {
        return NGX_DECLINED;
    }

    ctx->reconciled = 1;

    real = (int64_t) ngx_http_infer_ratelimit_number(r,
                              NGX_HTTP_INFER_RL_IN_TOTAL, &found);

    if (!found) {
        prompt = ngx_http_infer_ratelimit_number(r,
                              NGX_HTTP_INFER_RL_IN_USAGE_PROMPT, &found);
        completion = ngx_http_infer_ratelimit_number(r,
                              NGX_HTTP_INFER_RL_IN_USAGE_COMPLETION,
                              &found2);
        found = found || found2;
        real = (int64_t) (prompt + completion);
    }

    /* an answer from nginx's cache cost the backends nothing */

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_ratelimit_module);
    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_ratelimit_module);

    /* the cost at the model's prices, in nano-dollars */

    vv = ngx_http_infer_variable(r, rmcf->input[NGX_HTTP_INFER_RL_IN_COST]);
    cost = vv ? ngx_http_infer_decimal_parse(vv->data, vv->len, 9) : -1;

    if (r->cached && !lcf->charge_cache_hits) {
        real = 0;
        found = 1;
        cost = 0;
    }

    zone = 0;
    redis = 0;

    for (i = 0; i < ctx->nitems; i++) {
        item = &ctx->items[i];
        item->delta = 0;

        if (item->where == NGX_HTTP_INFER_RL_NOWHERE
            || item->limit->kind == NGX_HTTP_INFER_RL_REQUESTS)
        {
            continue;
        }

        if (item->limit->kind == NGX_HTTP_INFER_RL_CONCURRENCY) {
            /* no longer in flight */
            item->delta = -1;

        } else if (item->limit->kind == NGX_HTTP_INFER_RL_BUDGET
                   && cost >= 0)
        {
            used = ngx_min((uint64_t) cost, item->limit_n);

            item->delta = (int64_t) used - (int64_t) item->cost;

        } else if (found && item->limit->kind == NGX_HTTP_INFER_RL_TOKENS) {
            /*
             * One answer is charged at most the whole limit, the most a
             * request could have reserved: a runaway figure (4e9 tokens)
             * empties the bucket, it does not lock the key out for days.
             */
            used = ngx_min((uint64_t) real, item->limit_n);

            item->delta = (int64_t) used - (int64_t) item->cost;

        } else if (r->headers_out.status >= NGX_HTTP_BAD_REQUEST
                   || r->headers_out.status == 0)
        {
            item->delta = - (int64_t) item->cost;
        }

        if (item->delta == 0) {
            continue;
        }

        ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "infer ratelimit reconcile \"%V\" %uL %L",
                       &item->limit->name, item->cost, item->delta);

        if (item->where == NGX_HTTP_INFER_RL_IN_ZONE || item->mirrored) {
            zone = 1;
        }

        if (item->where == NGX_HTTP_INFER_RL_IN_REDIS) {
            redis = 1;
        }
    }

    if (zone && rmcf->shm_zone) {
        ngx_http_infer_ratelimit_zone_reconcile(rmcf->shm_zone, ctx->items,
                                                ctx->nitems,
                                                rmcf->redis
                                                ? rmcf->redis->replicas : 1);
    }

    if (redis && rmcf->redis
        && ngx_http_infer_ratelimit_coalesce_add(ctx->items, ctx->nexact)
           != NGX_OK)
    {
        (void) ngx_http_infer_ratelimit_redis_eval(r, rmcf->redis,
                                                   NGX_HTTP_INFER_RL_RECONCILE,
                                                   ctx->items, ctx->nexact,
                                                   NULL);
    }

    ngx_http_infer_ratelimit_approx_move(ctx->items + ctx->nexact,
                                         ctx->nitems - ctx->nexact, 0);

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_infer_ratelimit_init_stats(ngx_shm_zone_t *shm_zone, void *data)
{
    return ngx_http_infer_shm_struct(shm_zone, data, sizeof(ngx_atomic_t));
}


static ngx_int_t
ngx_http_infer_ratelimit_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                                *p;
    ngx_uint_t                             i, kind;
    ngx_http_infer_ratelimit_ctx_t        *ctx;
    ngx_http_infer_ratelimit_item_t       *item, *best;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    static ngx_str_t  status[] = {
        ngx_null_string,
        ngx_string("passed"),
        ngx_string("limited"),
        ngx_string("degraded"),
        ngx_string("shadow")
    };

    if (data == NGX_HTTP_INFER_RL_VAR_REDIS_UP) {
        v->valid = 1;
        v->no_cacheable = 1;
        v->not_found = 0;
        v->len = 1;
        v->data = (u_char *) (ngx_http_infer_ratelimit_redis_up() ? "1" : "0");
        return NGX_OK;
    }

    if (data == NGX_HTTP_INFER_RL_VAR_DEGRADED) {
        rmcf = ngx_http_get_module_main_conf(r,
                                             ngx_http_infer_ratelimit_module);

        if (rmcf->stats_zone == NULL || rmcf->stats_zone->data == NULL) {
            v->not_found = 1;
            return NGX_OK;
        }

        p = ngx_pnalloc(r->pool, NGX_ATOMIC_T_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->valid = 1;
        v->no_cacheable = 1;
        v->not_found = 0;
        v->data = p;
        v->len = ngx_sprintf(p, "%uA",
                             *(ngx_atomic_t *) rmcf->stats_zone->data) - p;
        return NGX_OK;
    }

    ctx = ngx_http_infer_ratelimit_get_ctx(r);

    if (ctx == NULL || !ctx->decided) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    switch (data) {

    case NGX_HTTP_INFER_RL_VAR_STATUS:
        v->len = status[ctx->status].len;
        v->data = status[ctx->status].data;
        return NGX_OK;

    case NGX_HTTP_INFER_RL_VAR_LIMITED_BY:
        if (ctx->refused == NULL) {
            v->not_found = 1;
            return NGX_OK;
        }

        v->len = ctx->refused->limit->name.len;
        v->data = ctx->refused->limit->name.data;
        return NGX_OK;
    }

    kind = (data == NGX_HTTP_INFER_RL_VAR_TOKENS) ? NGX_HTTP_INFER_RL_TOKENS
                                                  : NGX_HTTP_INFER_RL_REQUESTS;
    best = NULL;

    for (i = 0; i < ctx->nitems; i++) {
        item = &ctx->items[i];

        if (item->known && item->limit->kind == kind
            && (best == NULL || item->remaining < best->remaining))
        {
            best = item;
        }
    }

    if (best == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->data = p;
    v->len = ngx_sprintf(p, "%uL", best->remaining) - p;

    return NGX_OK;
}


/* infer_ratelimit_zone name:size */

static char *
ngx_http_infer_ratelimit_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_infer_ratelimit_main_conf_t  *rmcf = conf;

    u_char     *p;
    ssize_t     size;
    ngx_str_t  *value, name, s;

    if (rmcf->shm_zone) {
        return "is duplicate";
    }

    value = cf->args->elts;

    p = (u_char *) ngx_strchr(value[1].data, ':');

    if (p == NULL || p == value[1].data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid zone \"%V\": name:size expected",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    name.data = value[1].data;
    name.len = p - value[1].data;

    s.data = p + 1;
    s.len = value[1].data + value[1].len - s.data;

    size = ngx_parse_size(&s);

    if (size == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid zone size \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (size < (ssize_t) (8 * ngx_pagesize)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "zone \"%V\" is too small", &value[1]);
        return NGX_CONF_ERROR;
    }

    rmcf->shm_zone = ngx_http_infer_ratelimit_zone_add(cf, &name,
                                                       (size_t) size);
    if (rmcf->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * infer_ratelimit_limit name key requests=N/period | tokens=N/period
 *                       [on_error=fail_open|fail_closed|local];
 */

static char *
ngx_http_infer_ratelimit_limit(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_infer_ratelimit_loc_conf_t  *lcf = conf;

    u_char                                *p, *last;
    ngx_int_t                              n;
    ngx_str_t                             *value, s, period;
    ngx_uint_t                             i, j, have_rate;
    ngx_http_infer_ratelimit_limit_t      *limit, **named;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;
    ngx_http_compile_complex_value_t       ccv;

    value = cf->args->elts;

    if (lcf->limits == NULL || lcf->limits == NGX_CONF_UNSET_PTR) {
        lcf->limits = ngx_array_create(cf->pool, 4,
                                     sizeof(ngx_http_infer_ratelimit_limit_t));
        if (lcf->limits == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    limit = ngx_array_push(lcf->limits);
    if (limit == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(limit, sizeof(ngx_http_infer_ratelimit_limit_t));

    for (p = value[1].data; p < value[1].data + value[1].len; p++) {
        if (!(*p >= 'a' && *p <= 'z') && !(*p >= 'A' && *p <= 'Z')
            && !(*p >= '0' && *p <= '9') && *p != '_' && *p != '-'
            && *p != '.')
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid limit name \"%V\": letters, digits, "
                               "\"_\", \"-\" and \".\" only", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    if (value[1].len == 0 || value[1].len > 64) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid limit name \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    limit->name = value[1];

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &value[2];
    ccv.complex_value = &limit->key;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    limit->on_error = NGX_HTTP_INFER_RL_FAIL_OPEN;
    have_rate = 0;

    for (i = 3; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "requests=", 9) == 0
            || ngx_strncmp(value[i].data, "tokens=", 7) == 0
            || ngx_strncmp(value[i].data, "budget=", 7) == 0)
        {
            if (have_rate) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "limit \"%V\" has two rates: one limit "
                                   "counts requests or tokens",
                                   &value[1]);
                return NGX_CONF_ERROR;
            }

            have_rate = 1;

            if (value[i].data[0] == 'r') {
                limit->kind = NGX_HTTP_INFER_RL_REQUESTS;
                s.data = value[i].data + 9;
                s.len = value[i].len - 9;

            } else {
                limit->kind = (value[i].data[0] == 't')
                              ? NGX_HTTP_INFER_RL_TOKENS
                              : NGX_HTTP_INFER_RL_BUDGET;
                s.data = value[i].data + 7;
                s.len = value[i].len - 7;
            }

            last = s.data + s.len;
            p = ngx_strlchr(s.data, last, '/');

            if (p == NULL || p == s.data || p + 1 == last) {
                goto invalid_rate;
            }

            if (limit->kind == NGX_HTTP_INFER_RL_BUDGET) {
                /* US dollars, counted in nano-dollars */
                n = (ngx_int_t) ngx_http_infer_decimal_parse(s.data,
                                                             p - s.data, 9);

            } else {
                n = ngx_atoi(s.data, p - s.data);
            }

            if (n == NGX_ERROR || n == 0) {
                goto invalid_rate;
            }

            limit->limit = (uint64_t) n;

            period.data = p + 1;
            period.len = last - period.data;
            limit->window_text = period;

            if (period.len == 3 && ngx_strncmp(period.data, "day", 3) == 0)
            {
                limit->calendar = NGX_HTTP_INFER_RL_DAY;
                limit->window = 86400 * 1000;
                continue;
            }

            if (period.len == 5 && ngx_strncmp(period.data, "month", 5) == 0)
            {
                limit->calendar = NGX_HTTP_INFER_RL_MONTH;
                limit->window = (ngx_msec_t) 31 * 86400 * 1000;
                continue;
            }

            if (period.data[0] >= '0' && period.data[0] <= '9') {
                limit->window = ngx_parse_time(&period, 0);

            } else {
                /* "m" is "1m" */
                s.len = period.len + 1;
                s.data = ngx_pnalloc(cf->pool, s.len);
                if (s.data == NULL) {
                    return NGX_CONF_ERROR;
                }

                s.data[0] = '1';
                ngx_memcpy(s.data + 1, period.data, period.len);
                limit->window = ngx_parse_time(&s, 0);
            }

            if (limit->window == (ngx_msec_t) NGX_ERROR
                || limit->window == 0
                || limit->window > (ngx_msec_t) 31 * 86400 * 1000)
            {
                goto invalid_rate;
            }

            /* a budget counts nano-dollars: many per ns, in 128 bits */

            if (limit->kind != NGX_HTTP_INFER_RL_BUDGET
                && limit->limit > (uint64_t) limit->window * 1000000)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "rate \"%V\" is more than one per "
                                   "nanosecond", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "concurrency=", 12) == 0) {
            if (have_rate) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "limit \"%V\" has two rates: one limit "
                                   "counts requests or tokens",
                                   &value[1]);
                return NGX_CONF_ERROR;
            }

            have_rate = 1;

            n = ngx_atoi(value[i].data + 12, value[i].len - 12);
            if (n == NGX_ERROR || n == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid concurrency \"%V\": a number "
                                   "of requests in flight expected",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            limit->kind = NGX_HTTP_INFER_RL_CONCURRENCY;
            limit->limit = (uint64_t) n;
            limit->window = 0;
            ngx_str_null(&limit->window_text);

            continue;
        }

        if (ngx_strncmp(value[i].data, "approximate", 11) == 0
            && (value[i].len == 11 || value[i].data[11] == '='))
        {
            limit->approximate = 100;

            if (value[i].len > 11) {
                limit->approximate = ngx_http_infer_param_msec(&value[i], 12);

                if (limit->approximate == (ngx_msec_t) NGX_ERROR
                    || limit->approximate < 10
                    || limit->approximate > 10000)
                {
                    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                       "invalid \"%V\": a sync interval "
                                       "of 10ms to 10s expected",
                                       &value[i]);
                    return NGX_CONF_ERROR;
                }
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "on_error=", 9) == 0) {
            s.data = value[i].data + 9;
            s.len = value[i].len - 9;

            if (s.len == 9 && ngx_strncmp(s.data, "fail_open", 9) == 0) {
                limit->on_error = NGX_HTTP_INFER_RL_FAIL_OPEN;

            } else if (s.len == 11
                       && ngx_strncmp(s.data, "fail_closed", 11) == 0)
            {
                limit->on_error = NGX_HTTP_INFER_RL_FAIL_CLOSED;

            } else if (s.len == 5 && ngx_strncmp(s.data, "local", 5) == 0) {
                limit->on_error = NGX_HTTP_INFER_RL_LOCAL;

            } else {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid on_error \"%V\": fail_open, "
                                   "fail_closed or local", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (limit->approximate && limit->kind == NGX_HTTP_INFER_RL_CONCURRENCY)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "limit \"%V\": a concurrency limit cannot be "
                           "approximate", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (!have_rate) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "limit \"%V\" has no rate: requests=N/period, "
                           "budget=USD/period, "
                           "tokens=N/period or concurrency=N", &value[1]);
        return NGX_CONF_ERROR;
    }

    /* one name, one bucket: limits that share a name share counters */

    rmcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_infer_ratelimit_module);

    named = rmcf->names.elts;

    for (j = 0; j < rmcf->names.nelts; j++) {
        if (named[j]->name.len != limit->name.len
            || ngx_strncmp(named[j]->name.data, limit->name.data,
                           limit->name.len) != 0)
        {
            continue;
        }

        if (named[j]->kind != limit->kind
            || named[j]->limit != limit->limit
            || named[j]->window != limit->window
            || named[j]->calendar != limit->calendar
            || named[j]->approximate != limit->approximate)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "limit \"%V\" is declared with another rate "
                               "before: limits of one name share counters "
                               "and must have one rate", &value[1]);
            return NGX_CONF_ERROR;
        }

        return NGX_CONF_OK;
    }

    named = ngx_array_push(&rmcf->names);
    if (named == NULL) {
        return NGX_CONF_ERROR;
    }

    *named = limit;

    return NGX_CONF_OK;

invalid_rate:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid rate \"%V\": N/period expected, e.g. "
                       "requests=60/m, tokens=100000/1m, requests=10/s, "
                       "tokens=1000000/day, budget=50.00/month",
                       &value[i]);
    return NGX_CONF_ERROR;
}


static ngx_int_t
ngx_http_infer_ratelimit_add_variables(ngx_conf_t *cf)
{
    return ngx_http_infer_add_variables(cf, ngx_http_infer_ratelimit_vars);
}


static void *
ngx_http_infer_ratelimit_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    rmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_ratelimit_main_conf_t));
    if (rmcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&rmcf->names, cf->pool, 4,
                       sizeof(ngx_http_infer_ratelimit_limit_t *))
        != NGX_OK)
    {
        return NULL;
    }

    return rmcf;
}


static void *
ngx_http_infer_ratelimit_create_conf(ngx_conf_t *cf)
{
    ngx_http_infer_ratelimit_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_ratelimit_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->enable = NGX_CONF_UNSET;
    conf->limits = NGX_CONF_UNSET_PTR;
    conf->shadow = NGX_CONF_UNSET;
    conf->headers = NGX_CONF_UNSET;
    conf->status_code = NGX_CONF_UNSET_UINT;
    conf->default_max_tokens = NGX_CONF_UNSET_UINT;
    conf->charge_cache_hits = NGX_CONF_UNSET;
    conf->events = NGX_CONF_UNSET;

    return conf;
}


static char *
ngx_http_infer_ratelimit_merge_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_infer_ratelimit_loc_conf_t  *prev = parent;
    ngx_http_infer_ratelimit_loc_conf_t  *conf = child;

    ngx_uint_t                             i, local;
    ngx_http_infer_ratelimit_limit_t      *limit;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    ngx_conf_merge_value(conf->enable, prev->enable, 0);
    ngx_conf_merge_ptr_value(conf->limits, prev->limits, NULL);
    ngx_conf_merge_value(conf->shadow, prev->shadow, 0);
    ngx_conf_merge_value(conf->headers, prev->headers, 1);
    ngx_conf_merge_uint_value(conf->status_code, prev->status_code,
                              NGX_HTTP_TOO_MANY_REQUESTS);
    ngx_conf_merge_uint_value(conf->default_max_tokens,
                              prev->default_max_tokens, 1024);
    ngx_conf_merge_value(conf->charge_cache_hits, prev->charge_cache_hits,
                         0);
    ngx_conf_merge_value(conf->events, prev->events, 0);

    rmcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_infer_ratelimit_module);

    if (conf->events && rmcf->events == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_usage_events needs "
                           "infer_usage_events_stream: where to send them");
        return NGX_CONF_ERROR;
    }

    if (conf->limits == NULL) {
        return NGX_CONF_OK;
    }

    limit = conf->limits->elts;

    for (i = 0; i < conf->limits->nelts; i++) {
        if (!limit[i].approximate) {
            continue;
        }

        if (rmcf->redis == NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "infer_ratelimit_limit \"%V\" is "
                               "approximate: it needs infer_ratelimit_redis "
                               "(the zone is exact already)",
                               &limit[i].name);
            return NGX_CONF_ERROR;
        }

        if (rmcf->approx == 0 || limit[i].approximate < rmcf->approx) {
            rmcf->approx = limit[i].approximate;
        }
    }

    if (rmcf->shm_zone) {
        return NGX_CONF_OK;
    }

    local = (rmcf->redis == NULL);
    limit = conf->limits->elts;

    for (i = 0; i < conf->limits->nelts; i++) {
        if (limit[i].on_error == NGX_HTTP_INFER_RL_LOCAL) {
            local = 1;
        }
    }

    if (local) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_ratelimit_limit \"%V\" needs an "
                           "infer_ratelimit_zone to count in (or "
                           "infer_ratelimit_redis without on_error=local)",
                           &limit[0].name);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * The pipeline gives each ngx_infer module a phase of its own, so the
 * order of load_module lines never changes what runs first.  The LOG
 * handler only reconciles: metrics, also in LOG, does not depend on it.
 */

static ngx_int_t
ngx_http_infer_ratelimit_init(ngx_conf_t *cf)
{
    ngx_uint_t                             i;
    ngx_http_handler_pt                   *h;
    ngx_http_core_main_conf_t             *cmcf;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    static ngx_str_t  stats = ngx_string("infer_ratelimit_redis_stats");

    rmcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_infer_ratelimit_module);

    /* the id of the error envelopes, one per request */

    if (ngx_http_infer_request_id_init(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    if (rmcf->redis) {
        /* the count of degraded decisions, for all workers, across reloads */

        rmcf->stats_zone = ngx_shared_memory_add(cf, &stats,
                                                 8 * ngx_pagesize,
                                         &ngx_http_infer_ratelimit_module);
        if (rmcf->stats_zone == NULL) {
            return NGX_ERROR;
        }

        rmcf->stats_zone->init = ngx_http_infer_ratelimit_init_stats;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    for (i = 0; i < NGX_HTTP_INFER_RL_INPUTS; i++) {
        rmcf->input[i] = ngx_http_infer_variable_index(cf,
                                         &ngx_http_infer_ratelimit_inputs[i]);
        if (rmcf->input[i] == NGX_ERROR) {
            return NGX_ERROR;
        }
    }

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_infer_ratelimit_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_infer_ratelimit_log_handler;

    ngx_http_infer_ratelimit_headers_init(cf);

    return ngx_http_infer_ratelimit_events_init(cf, rmcf);
}


static ngx_int_t
ngx_http_infer_ratelimit_init_process(ngx_cycle_t *cycle)
{
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    rmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_infer_ratelimit_module);

    if (rmcf == NULL || rmcf->redis == NULL) {
        return NGX_OK;
    }

    if (rmcf->events
        && ngx_http_infer_ratelimit_events_init_process(cycle, rmcf->events)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_infer_ratelimit_coalesce_init_process(cycle, rmcf->redis)
        != NGX_OK
        || ngx_http_infer_ratelimit_approx_init_process(cycle, rmcf->redis,
                                                        rmcf->approx)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_infer_ratelimit_redis_init_process(cycle, rmcf->redis);
}


static void
ngx_http_infer_ratelimit_exit_process(ngx_cycle_t *cycle)
{
    /* the events first: what hiredis fails then is counted as dropped */
    ngx_http_infer_ratelimit_events_exit_process(cycle);
    ngx_http_infer_ratelimit_coalesce_exit_process(cycle);
    ngx_http_infer_ratelimit_approx_exit_process(cycle);
    ngx_http_infer_ratelimit_redis_exit_process(cycle);
}

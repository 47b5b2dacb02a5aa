/*
 * Copyright (C) ngx_infer authors
 *
 * ngx_http_infer_route_module: model-aware routing.  Reads the request
 * body, finds the model it names and picks the backend pool; extracts
 * token usage from JSON and SSE answers.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_route.h"
#include "ngx_http_infer_route_json.h"
#include "ngx_http_infer_route_usage.h"
#include "ngx_http_infer_balance.h"


#define NGX_HTTP_INFER_SOURCE_BODY    0
#define NGX_HTTP_INFER_SOURCE_PATH    1
#define NGX_HTTP_INFER_SOURCE_HEADER  2

/* a request still waiting for its body */
#define NGX_HTTP_INFER_ROUTE_READING  NGX_AGAIN

/* a bound on fallbacks, whatever the configuration */
#define NGX_HTTP_INFER_ROUTE_FALLBACKS_MAX  8

/* room for an error message with a model name in it */
#define NGX_HTTP_INFER_ROUTE_ERROR_MAX  (160 + NGX_HTTP_INFER_MODEL_MAX)

/* infer_route_models: the value's bytes and names at most */
#define NGX_HTTP_INFER_ROUTE_MODELS_MAX    4096
#define NGX_HTTP_INFER_ROUTE_MODELS_NAMES  64
/* seconds between two error-log lines on a misconfigured location */
#define NGX_HTTP_INFER_ROUTE_MISCONF_LOG   10


typedef struct {
    ngx_uint_t                     type;
    ngx_str_t                      header;      /* lowercased */
} ngx_http_infer_route_source_t;


typedef enum {
    ngx_http_infer_route_var_model = 0,
    ngx_http_infer_route_var_model_target,
    ngx_http_infer_route_var_upstream,
    ngx_http_infer_route_var_stream,
    ngx_http_infer_route_var_max_tokens,
    ngx_http_infer_route_var_prompt_tokens,
    ngx_http_infer_route_var_prefix_hash,
    ngx_http_infer_route_var_usage_prompt,
    ngx_http_infer_route_var_usage_completion,
    ngx_http_infer_route_var_usage_total,
    ngx_http_infer_route_var_usage_cached,
    ngx_http_infer_route_var_usage_reasoning,
    ngx_http_infer_route_var_usage_estimated,
    ngx_http_infer_route_var_ttft,
    ngx_http_infer_route_var_cost,
    ngx_http_infer_route_var_price_input,
    ngx_http_infer_route_var_price_output
} ngx_http_infer_route_var_e;


static ngx_int_t ngx_http_infer_route_rewrite_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_route_preaccess_handler(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_route_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_route_cost(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_str_t *s);
static ngx_int_t ngx_http_infer_route_fallback(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static void ngx_http_infer_route_cleanup(void *data);
static void ngx_http_infer_route_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_route_next(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static ngx_int_t ngx_http_infer_route_scan_body(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static ngx_int_t ngx_http_infer_route_from_path(ngx_http_request_t *r,
    ngx_str_t *model);
static ngx_int_t ngx_http_infer_route_agree(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_uint_t found);
static ngx_int_t ngx_http_infer_route_rewrite_path(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static ngx_int_t ngx_http_infer_route_mismatch(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, u_char *other, size_t len);
static ngx_uint_t ngx_http_infer_route_verify(ngx_http_request_t *r,
    ngx_http_infer_route_loc_conf_t *rlcf);
static ngx_uint_t ngx_http_infer_route_has_source(
    ngx_http_infer_route_loc_conf_t *rlcf, ngx_uint_t type);
static ngx_int_t ngx_http_infer_route_from_header(ngx_http_request_t *r,
    ngx_http_infer_route_source_t *src, ngx_str_t *model);
static ngx_int_t ngx_http_infer_route_resolve(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static ngx_int_t ngx_http_infer_route_allowed(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static ngx_int_t ngx_http_infer_route_scope(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_http_infer_route_model_t *entry);
static ngx_int_t ngx_http_infer_route_list_scope(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static ngx_uint_t ngx_http_infer_route_lists(ngx_http_request_t *r,
    ngx_http_infer_route_loc_conf_t *rlcf);
static ngx_int_t ngx_http_infer_route_misconfigured(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_http_infer_route_loc_conf_t *rlcf,
    ngx_http_complex_value_t *cv, const char *what);
static ngx_int_t ngx_http_infer_route_pick(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static ngx_int_t ngx_http_infer_route_deprecated(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static ngx_int_t ngx_http_infer_route_done(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static ngx_int_t ngx_http_infer_route_error_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_route_content_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_route_fail(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_uint_t status, const char *code,
    const char *fmt, ...);

static ngx_int_t ngx_http_infer_route_usage(ngx_http_infer_route_ctx_t *ctx,
    ngx_uint_t which);

static ngx_int_t ngx_http_infer_route_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_infer_route_registry_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);


static char *ngx_http_infer_route_sources(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_infer_route_event_buffer_check(ngx_conf_t *cf,
    void *post, void *data);
static ngx_int_t ngx_http_infer_route_add_variables(ngx_conf_t *cf);
static void *ngx_http_infer_route_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_infer_route_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_infer_route_create_conf(ngx_conf_t *cf);
static char *ngx_http_infer_route_merge_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_infer_route_init(ngx_conf_t *cf);


static ngx_conf_post_handler_pt  ngx_http_infer_route_event_buffer_bounds =
    ngx_http_infer_route_event_buffer_check;


static ngx_conf_enum_t  ngx_http_infer_route_phases[] = {
    { ngx_string("preaccess"), NGX_HTTP_INFER_ROUTE_PREACCESS },
    { ngx_string("rewrite"), NGX_HTTP_INFER_ROUTE_REWRITE },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_infer_route_commands[] = {

    { ngx_string("infer_route"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_route_loc_conf_t, enable),
      NULL },

    { ngx_string("infer_route_phase"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_route_loc_conf_t, phase),
      &ngx_http_infer_route_phases },

    { ngx_string("infer_route_models"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_route_loc_conf_t, models),
      NULL },

    { ngx_string("infer_route_namespace"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_route_loc_conf_t, namespace),
      NULL },

    { ngx_string("infer_cache_scope"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_route_loc_conf_t, cache_scope),
      NULL },

    { ngx_string("infer_cache_uncacheable"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_infer_route_cache_uncacheable,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_model_upstream_check"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_infer_route_main_conf_t, upstream_check),
      NULL },

    { ngx_string("infer_model"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_infer_route_registry_model,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_model_target"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_infer_route_registry_target,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_model_registry"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE12,
      ngx_http_infer_route_file_conf,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_model_list"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS|NGX_CONF_TAKE1,
      ngx_http_infer_route_list,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_model_source"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_infer_route_sources,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_stream_include_usage"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_route_loc_conf_t, include_usage),
      NULL },

    { ngx_string("infer_stream_event_buffer_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_route_loc_conf_t, event_buffer_size),
      &ngx_http_infer_route_event_buffer_bounds },

    { ngx_string("infer_prefix_hash_length"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_route_loc_conf_t, prefix_max),
      NULL },

    { ngx_string("infer_trace"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_route_loc_conf_t, trace),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_infer_route_module_ctx = {
    ngx_http_infer_route_add_variables,    /* preconfiguration */
    ngx_http_infer_route_init,             /* postconfiguration */

    ngx_http_infer_route_create_main_conf, /* create main configuration */
    ngx_http_infer_route_init_main_conf,   /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_infer_route_create_conf,      /* create location configuration */
    ngx_http_infer_route_merge_conf        /* merge location configuration */
};


ngx_module_t  ngx_http_infer_route_module = {
    NGX_MODULE_V1,
    &ngx_http_infer_route_module_ctx,      /* module context */
    ngx_http_infer_route_commands,         /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_infer_route_file_init_process, /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_infer_route_file_exit_process, /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_variable_t  ngx_http_infer_route_vars[] = {

    { ngx_string("infer_model"), NULL, ngx_http_infer_route_variable,
      ngx_http_infer_route_var_model, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_model_target"), NULL, ngx_http_infer_route_variable,
      ngx_http_infer_route_var_model_target, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_upstream"), NULL, ngx_http_infer_route_variable,
      ngx_http_infer_route_var_upstream, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_stream"), NULL, ngx_http_infer_route_variable,
      ngx_http_infer_route_var_stream, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_max_tokens"), NULL, ngx_http_infer_route_variable,
      ngx_http_infer_route_var_max_tokens, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_prompt_tokens_estimate"), NULL,
      ngx_http_infer_route_variable,
      ngx_http_infer_route_var_prompt_tokens, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_prefix_hash"), NULL, ngx_http_infer_route_variable,
      ngx_http_infer_route_var_prefix_hash, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_usage_prompt_tokens"), NULL,
      ngx_http_infer_route_variable,
      ngx_http_infer_route_var_usage_prompt, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_usage_completion_tokens"), NULL,
      ngx_http_infer_route_variable,
      ngx_http_infer_route_var_usage_completion, NGX_HTTP_VAR_NOCACHEABLE,
      0 },

    { ngx_string("infer_usage_total_tokens"), NULL,
      ngx_http_infer_route_variable,
      ngx_http_infer_route_var_usage_total, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_usage_cached_tokens"), NULL,
      ngx_http_infer_route_variable,
      ngx_http_infer_route_var_usage_cached, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_usage_reasoning_tokens"), NULL,
      ngx_http_infer_route_variable,
      ngx_http_infer_route_var_usage_reasoning, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_usage_estimated"), NULL,
      ngx_http_infer_route_variable,
      ngx_http_infer_route_var_usage_estimated, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_ttft"), NULL, ngx_http_infer_route_variable,
      ngx_http_infer_route_var_ttft, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_cost"), NULL, ngx_http_infer_route_variable,
      ngx_http_infer_route_var_cost, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_price_input"), NULL, ngx_http_infer_route_variable,
      ngx_http_infer_route_var_price_input, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_price_output"), NULL, ngx_http_infer_route_variable,
      ngx_http_infer_route_var_price_output, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_registry_models"), NULL,
      ngx_http_infer_route_registry_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    /* ngx_http_infer_route_cache.c */

    { ngx_string("infer_cache_key"), NULL,
      ngx_http_infer_route_cache_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_cacheable"), NULL,
      ngx_http_infer_route_cache_variable, 1, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_cache_bypass"), NULL,
      ngx_http_infer_route_cache_variable, 2, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_cache_no_store"), NULL,
      ngx_http_infer_route_cache_variable, 3, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    /* ngx_http_infer_route_trace.c: kept for the request, once computed */

    { ngx_string("infer_request_id"), NULL,
      ngx_http_infer_route_trace_variable,
      ngx_http_infer_trace_var_request_id, 0, 0 },

    { ngx_string("infer_trace_id"), NULL,
      ngx_http_infer_route_trace_variable,
      ngx_http_infer_trace_var_trace_id, 0, 0 },

    { ngx_string("infer_span_id"), NULL,
      ngx_http_infer_route_trace_variable,
      ngx_http_infer_trace_var_span_id, 0, 0 },

    { ngx_string("infer_parent_span_id"), NULL,
      ngx_http_infer_route_trace_variable,
      ngx_http_infer_trace_var_parent_span_id, 0, 0 },

    { ngx_string("infer_trace_flags"), NULL,
      ngx_http_infer_route_trace_variable,
      ngx_http_infer_trace_var_flags, 0, 0 },

    { ngx_string("infer_traceparent"), NULL,
      ngx_http_infer_route_trace_variable,
      ngx_http_infer_trace_var_traceparent, 0, 0 },

      ngx_http_null_variable
};


/*
 * The handler runs in the phase the location names: PREACCESS by default,
 * or REWRITE, for a balancer that takes its pool from a variable set in
 * that phase (ingress-nginx's, from $proxy_upstream_name).  In REWRITE,
 * NGX_OK would end the request: the phase's checker knows only DECLINED
 * and DONE as "go on" and "wait".
 */

static ngx_int_t
ngx_http_infer_route_rewrite_handler(ngx_http_request_t *r)
{
    ngx_int_t                         rc;
    ngx_http_infer_route_loc_conf_t  *rlcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);

    if (rlcf->phase != NGX_HTTP_INFER_ROUTE_REWRITE) {
        return NGX_DECLINED;
    }

    rc = ngx_http_infer_route_handler(r);

    return (rc == NGX_OK) ? NGX_DECLINED : rc;
}


static ngx_int_t
ngx_http_infer_route_preaccess_handler(ngx_http_request_t *r)
{
    ngx_http_infer_route_loc_conf_t  *rlcf;
    ngx_http_infer_route_ctx_t       *ctx;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);
    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_route_module);

    if (rlcf->trace && r == r->main
        && ngx_http_infer_route_trace_request(r) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ctx == NULL || rlcf->phase != NGX_HTTP_INFER_ROUTE_REWRITE) {
        return ngx_http_infer_route_handler(r);
    }

    /*
     * Found in REWRITE: what this location may serve is checked here, once
     * the location's own set lines (ingress-nginx's $namespace, say) have
     * run.  The pool a balancer took in REWRITE is not used: a refusal
     * replaces the location's content handler.
     */

    if (ctx->status == NGX_OK && !ctx->scoped) {
        ctx->status = ctx->listing ? ngx_http_infer_route_list_scope(r, ctx)
                                   : ngx_http_infer_route_allowed(r, ctx);
        return ngx_http_infer_route_done(r, ctx);
    }

    return NGX_DECLINED;
}


/*
 * Runs before authentication, so that the model is known to
 * the access check.  The sources are tried in their configured order; the
 * body, when it is one, is read first (the mirror module's pattern) and
 * stays intact for proxy_pass.
 */

static ngx_int_t
ngx_http_infer_route_handler(ngx_http_request_t *r)
{
    ngx_int_t                         rc;
    ngx_http_infer_route_ctx_t       *ctx;
    ngx_http_infer_route_loc_conf_t  *rlcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);

    /* a location that lists the models names none */

    if (!rlcf->enable || rlcf->list) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_route_module);

    if (ctx) {
        /* back after the body was read asynchronously */
        return ngx_http_infer_route_done(r, ctx);
    }

    ctx = ngx_http_infer_ctx_find(r, ngx_http_infer_route_cleanup);

    if (ctx) {
        /* an internal redirect reset the module contexts */
        ngx_http_set_ctx(r, ctx, ngx_http_infer_route_module);
        return ngx_http_infer_route_fallback(r, ctx);
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer route %s handler",
                   rlcf->phase == NGX_HTTP_INFER_ROUTE_REWRITE
                   ? "rewrite" : "preaccess");

    ctx = ngx_http_infer_ctx_create(r, &ngx_http_infer_route_module,
                                    sizeof(ngx_http_infer_route_ctx_t),
                                    ngx_http_infer_route_cleanup);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->ttft = -1;
    ctx->body_size = -1;

    if (ngx_http_infer_route_lists(r, rlcf)) {
        ctx->listing = 1;
        ctx->status = (rlcf->phase == NGX_HTTP_INFER_ROUTE_PREACCESS)
                      ? ngx_http_infer_route_list_scope(r, ctx) : NGX_OK;
        return ngx_http_infer_route_done(r, ctx);
    }

    rc = ngx_http_infer_route_next(r, ctx);

    if (rc != NGX_HTTP_INFER_ROUTE_READING) {
        ctx->status = rc;
        return ngx_http_infer_route_done(r, ctx);
    }

    ctx->status = NGX_HTTP_INFER_ROUTE_READING;

    /*
     * one buffer (what came with the headers included) when the body fits
     * in client_body_buffer_size, so the scan needs no copy
     */
    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r,
                                         ngx_http_infer_route_body_handler);
    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    /* balances the reference read_client_request_body() took */
    ngx_http_finalize_request(r, NGX_DONE);

    if (ctx->status == NGX_HTTP_INFER_ROUTE_READING) {
        ctx->waiting = 1;
        return NGX_DONE;
    }

    return ngx_http_infer_route_done(r, ctx);
}


/*
 * Back in this phase after an internal redirect.  When the request was
 * proxied and failed, and error_page sent it to a location with
 * infer_route on (see docs/route.md: failover), it goes on with the model's
 * fallback; nothing has reached the client yet, or error_page would not
 * have run.
 */

static ngx_int_t
ngx_http_infer_route_fallback(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    ngx_uint_t                     status;
    ngx_http_upstream_state_t     *state;
    ngx_http_infer_route_model_t  *next;

    if (ctx->status != NGX_OK || ctx->target == NULL) {
        /* redirected before anything was proxied */
        return ngx_http_infer_route_done(r, ctx);
    }

    status = NGX_HTTP_BAD_GATEWAY;

    if (r->upstream_states && r->upstream_states->nelts) {
        state = r->upstream_states->elts;
        state = &state[r->upstream_states->nelts - 1];

        if (state->status >= NGX_HTTP_BAD_REQUEST) {
            status = state->status;

        } else if (state->status) {
            /*
             * the pool answered (X-Accel-Redirect, say): this redirect is
             * not a failure, and no reason to change models
             */
            return ngx_http_infer_route_done(r, ctx);
        }
    }

    next = ctx->entry->fallback;

    if (next && ctx->scoped && ngx_http_infer_route_in_scope(ctx, next)
                                 != NGX_OK)
    {
        /*
         * a fallback is served only if the limits the model asked was
         * checked against (an Ingress's models and namespace) let it be
         */

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "infer route: fallback \"%V\" of model \"%V\" is "
                      "not served here", &next->name, &ctx->entry->name);
        next = NULL;
    }

    if (next == NULL || ctx->fallbacks == NGX_HTTP_INFER_ROUTE_FALLBACKS_MAX)
    {
        ctx->status = ngx_http_infer_route_fail(r, ctx, status,
                          "model_unavailable",
                          "The model `%V` is unavailable: its backends "
                          "failed (last status %ui) and no fallback is left.",
                          &ctx->model, status);
        return ngx_http_infer_route_done(r, ctx);
    }

    ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                  "infer route: model \"%V\" on upstream \"%V\" failed "
                  "with %ui, falling back to model \"%V\"",
                  &ctx->entry->name, &ctx->target->upstream, status,
                  &next->name);

    ctx->entry = next;
    ctx->target = NULL;
    ctx->by_pattern = 0;
    ctx->fallbacks++;

    return NGX_DECLINED;
}


static void
ngx_http_infer_route_cleanup(void *data)
{
    /* nothing to free: the handler marks where the context is */
}


static void
ngx_http_infer_route_body_handler(ngx_http_request_t *r)
{
    ngx_int_t                    rc;
    ngx_http_infer_route_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_route_module);

    rc = ngx_http_infer_route_scan_body(r, ctx);

    if (rc == NGX_DECLINED) {
        /* no model in the body: the sources after it */
        rc = ngx_http_infer_route_next(r, ctx);
    }

    ctx->status = rc;

    /* proxy_pass and any later reader get the body as it came */
    r->preserve_body = 1;

    if (ctx->waiting) {
        r->write_event_handler = ngx_http_core_run_phases;
        ngx_http_core_run_phases(r);
    }
}


/*
 * Tries the sources from ctx->next_source on.  Returns NGX_OK when a model
 * was found and resolved, NGX_HTTP_INFER_ROUTE_READING when the body must
 * be read first, or an error status (ctx->error set).
 */

static ngx_int_t
ngx_http_infer_route_next(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    ngx_int_t                         rc;
    ngx_http_infer_route_source_t    *src;
    ngx_http_infer_route_loc_conf_t  *rlcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);
    src = rlcf->sources->elts;

    while (ctx->next_source < rlcf->sources->nelts) {

        switch (src[ctx->next_source++].type) {

        case NGX_HTTP_INFER_SOURCE_BODY:

            if (ctx->body != NULL
                || (r->headers_in.content_length_n <= 0
                    && !r->headers_in.chunked))
            {
                continue;
            }

            return NGX_HTTP_INFER_ROUTE_READING;

        case NGX_HTTP_INFER_SOURCE_PATH:
            rc = ngx_http_infer_route_from_path(r, &ctx->model);
            break;

        default: /* NGX_HTTP_INFER_SOURCE_HEADER */
            rc = ngx_http_infer_route_from_header(r,
                                                  &src[ctx->next_source - 1],
                                                  &ctx->model);
            break;
        }

        if (rc != NGX_OK) {
            continue;
        }

        rc = ngx_http_infer_route_agree(r, ctx, ctx->next_source - 1);
        if (rc != NGX_OK) {
            return rc;
        }

        if (ctx->body == NULL && ngx_http_infer_route_verify(r, rlcf)) {
            /* the body may name a model too: read it, then resolve */
            ctx->verify = 1;
            return NGX_HTTP_INFER_ROUTE_READING;
        }

        return ngx_http_infer_route_resolve(r, ctx);
    }

    return ngx_http_infer_route_fail(r, ctx, NGX_HTTP_BAD_REQUEST,
                                     "missing_model",
                                     "you must provide a model parameter");
}


static ngx_int_t
ngx_http_infer_route_scan_body(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    ngx_int_t                         rc;
    ngx_str_t                         body;
    ngx_http_infer_route_body_t      *b;
    ngx_http_infer_route_loc_conf_t  *rlcf;

    if (ngx_http_infer_route_body_bytes(r, &body, 1) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b = ngx_palloc(r->pool, sizeof(ngx_http_infer_route_body_t));
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);

    b->prefix_max = rlcf->prefix_max;
    ctx->body = b;
    ctx->body_size = body.len;

    rc = ngx_http_infer_route_json_scan(body.data, body.len, b);

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer route scanned %uz body bytes: %i, model:%d",
                   body.len, rc, b->has_model);

    if (rc != NGX_OK && ctx->verify
        && !ngx_http_infer_route_has_source(rlcf, NGX_HTTP_INFER_SOURCE_BODY))
    {
        /* not a body routed by: forwarded as it is, never rewritten */
        ctx->body = NULL;
        return ngx_http_infer_route_resolve(r, ctx);
    }

    if (rc == NGX_ERROR) {
        return ngx_http_infer_route_fail(r, ctx, NGX_HTTP_BAD_REQUEST,
                   "invalid_json",
                   "could not parse the JSON body of your request: "
                   "%s at byte %uz", b->error, b->error_offset);
    }

    if (rc == NGX_DECLINED) {
        return ngx_http_infer_route_fail(r, ctx, NGX_HTTP_BAD_REQUEST,
                   "invalid_json",
                   "the body of your request must be a JSON object");
    }

    /*
     * A stream whose client did not ask for usage: the backend is asked to
     * send it (the usage chunk is then removed from the client's stream).
     * An explicit "include_usage": false, or "stream_options": null, is
     * left alone.
     */

    ctx->inject = rlcf->include_usage && b->stream == 1
                  && b->include_usage == -1
                  && (!b->has_stream_options || b->stream_options_end);

    if (ctx->verify) {
        /* the model came from the path or a header */

        if (b->has_model
            && (b->model_len != ctx->model.len
                || ngx_memcmp(b->model, ctx->model.data, b->model_len) != 0))
        {
            return ngx_http_infer_route_mismatch(r, ctx, b->model,
                                                 b->model_len);
        }

        return ngx_http_infer_route_resolve(r, ctx);
    }

    if (!b->has_model) {
        return NGX_DECLINED;
    }

    ctx->model.data = b->model;
    ctx->model.len = b->model_len;

    rc = ngx_http_infer_route_agree(r, ctx, ctx->next_source - 1);
    if (rc != NGX_OK) {
        return rc;
    }

    return ngx_http_infer_route_resolve(r, ctx);
}


/*
 * The model found in source "found" must be the one every other source
 * present names: the path of a KServe request and a header are what the
 * backend may route by, and the body is what it reads.  A request that
 * names two models is refused rather than checked as one and run as the
 * other.  The body, when it is not the source, is checked once it is read
 * (ctx->verify).
 */

static ngx_int_t
ngx_http_infer_route_agree(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_uint_t found)
{
    ngx_int_t                         rc;
    ngx_str_t                         other;
    ngx_uint_t                        i;
    ngx_http_infer_route_source_t    *src;
    ngx_http_infer_route_loc_conf_t  *rlcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);
    src = rlcf->sources->elts;

    for (i = 0; i < rlcf->sources->nelts; i++) {

        if (i == found) {
            continue;
        }

        switch (src[i].type) {

        case NGX_HTTP_INFER_SOURCE_BODY:
            continue;

        case NGX_HTTP_INFER_SOURCE_PATH:
            rc = ngx_http_infer_route_from_path(r, &other);
            break;

        default: /* NGX_HTTP_INFER_SOURCE_HEADER */
            rc = ngx_http_infer_route_from_header(r, &src[i], &other);
            break;
        }

        if (rc == NGX_OK
            && (other.len != ctx->model.len
                || ngx_memcmp(other.data, ctx->model.data, other.len) != 0))
        {
            return ngx_http_infer_route_mismatch(r, ctx, other.data,
                                                 other.len);
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_route_mismatch(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, u_char *other, size_t len)
{
    ngx_str_t  s;

    s.data = other;
    s.len = len;

    return ngx_http_infer_route_fail(r, ctx, NGX_HTTP_BAD_REQUEST,
               "model_mismatch",
               "The request names the model `%V` and also the model `%V` "
               "(in its path, a header or its body): name one model.",
               &ctx->model, &s);
}


/*
 * Whether a request routed by its path or a header has a body to check
 * too: one the body source would read, one in JSON (the backend may
 * read a "model" in it), and one of unknown length (max_body_size= is
 * held to the bytes read).
 */

static ngx_uint_t
ngx_http_infer_route_verify(ngx_http_request_t *r,
    ngx_http_infer_route_loc_conf_t *rlcf)
{
    ngx_str_t  *ct;

    if (r->headers_in.content_length_n <= 0 && !r->headers_in.chunked) {
        return 0;
    }

    if (r->headers_in.chunked
        || ngx_http_infer_route_has_source(rlcf, NGX_HTTP_INFER_SOURCE_BODY))
    {
        return 1;
    }

    if (r->headers_in.content_type == NULL) {
        return 0;
    }

    ct = &r->headers_in.content_type->value;

    return ngx_strlcasestrn(ct->data, ct->data + ct->len,
                            (u_char *) "json", sizeof("json") - 2)
           != NULL;
}


static ngx_uint_t
ngx_http_infer_route_has_source(ngx_http_infer_route_loc_conf_t *rlcf,
    ngx_uint_t type)
{
    ngx_uint_t                      i;
    ngx_http_infer_route_source_t  *src;

    src = rlcf->sources->elts;

    for (i = 0; i < rlcf->sources->nelts; i++) {
        if (src[i].type == type) {
            return 1;
        }
    }

    return 0;
}


static ngx_int_t
ngx_http_infer_route_from_path(ngx_http_request_t *r, ngx_str_t *model)
{
    u_char  *p, *last, *name;

    static u_char  prefix[] = "/v2/models/";

    if (r->uri.len <= sizeof(prefix) - 1
        || ngx_strncmp(r->uri.data, prefix, sizeof(prefix) - 1) != 0)
    {
        return NGX_DECLINED;
    }

    name = r->uri.data + sizeof(prefix) - 1;
    last = r->uri.data + r->uri.len;

    for (p = name; p < last && *p != '/'; p++) { /* void */ }

    if (p == name || p - name > NGX_HTTP_INFER_MODEL_MAX) {
        return NGX_DECLINED;
    }

    model->data = name;
    model->len = p - name;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_route_from_header(ngx_http_request_t *r,
    ngx_http_infer_route_source_t *src, ngx_str_t *model)
{
    ngx_table_elt_t  *h;

    h = ngx_http_infer_header_find(&r->headers_in.headers, src->header.data,
                                   src->header.len);

    if (h == NULL || h->value.len == 0
        || h->value.len > NGX_HTTP_INFER_MODEL_MAX)
    {
        return NGX_DECLINED;
    }

    *model = h->value;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_route_resolve(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    off_t                              size;
    u_char                            *p, *last;
    ngx_int_t                          rc;
    ngx_uint_t                         by_pattern;
    ngx_http_infer_route_registry_t   *reg;
    ngx_http_infer_route_loc_conf_t   *rlcf;
    ngx_http_infer_route_main_conf_t  *rmcf;

    /*
     * A decoded JSON string may hold CR, LF or NUL: a name that ends up in
     * a header (add_header, proxy_set_header) must not carry them.
     */

    last = ctx->model.data + ctx->model.len;

    for (p = ctx->model.data; p < last; p++) {
        if (*p < 0x20 || *p == 0x7f) {
            return ngx_http_infer_route_fail(r, ctx, NGX_HTTP_BAD_REQUEST,
                       "invalid_model",
                       "the model name must not contain control characters");
        }
    }

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_route_module);
    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);

    if (rmcf->current) {

        /*
         * The registry may be replaced (infer_model_registry) while the
         * request lasts: the one it resolved in is held until it is freed.
         */

        reg = ngx_http_infer_route_registry_acquire(r);
        if (reg == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ctx->entry = ngx_http_infer_route_registry_find(reg, &ctx->model,
                                                        &by_pattern);
        ctx->by_pattern = by_pattern;

        if (ctx->entry == NULL) {
            return ngx_http_infer_route_fail(r, ctx, NGX_HTTP_NOT_FOUND,
                       "model_not_found",
                       "The model `%V` does not exist or you do not have "
                       "access to it.", &ctx->model);
        }
    }

    /* found in REWRITE, it is checked in PREACCESS */

    if (rlcf->phase == NGX_HTTP_INFER_ROUTE_PREACCESS) {
        rc = ngx_http_infer_route_allowed(r, ctx);
        if (rc != NGX_OK) {
            return rc;
        }
    }

    if (rmcf->current == NULL) {
        /* no registry: the model is only reported, in $infer_model */

        if (ctx->inject
            && ngx_http_infer_route_rewrite_body(r, ctx) != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return NGX_OK;
    }

    if (ctx->entry->state == NGX_HTTP_INFER_MODEL_DISABLED) {
        return ngx_http_infer_route_fail(r, ctx, NGX_HTTP_NOT_FOUND,
                   "model_disabled",
                   "The model `%V` has been disabled.", &ctx->model);
    }

    /* a chunked body is held to the bytes read */

    size = (r->headers_in.content_length_n >= 0)
           ? r->headers_in.content_length_n : ctx->body_size;

    if (ctx->entry->max_body_size >= 0 && size > ctx->entry->max_body_size) {
        return ngx_http_infer_route_fail(r, ctx,
                   NGX_HTTP_REQUEST_ENTITY_TOO_LARGE, "request_too_large",
                   "The request body (%O bytes) is larger than the %O bytes "
                   "allowed for the model `%V`.",
                   size, ctx->entry->max_body_size, &ctx->model);
    }

    if (ctx->entry->state == NGX_HTTP_INFER_MODEL_DEPRECATED
        && ngx_http_infer_route_deprecated(r, ctx) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer route: model \"%V\" -> \"%V\"",
                   &ctx->model, &ctx->entry->name);

    return NGX_OK;
}


/*
 * What this location may serve, from values an ingress controller writes
 * from its users' annotations (docs/kubernetes.md): infer_route_models, the
 * models it serves (empty: all), and infer_route_namespace, whose value a
 * model's namespaces= must list.  Either refusal is 404 model_not_found,
 * as the OpenAI API answers a model one may not see.  A value that is not
 * a list of names is the configuration's fault: 500, never a client's 4xx.
 */

static ngx_int_t
ngx_http_infer_route_allowed(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    ngx_int_t  rc;

    rc = ngx_http_infer_route_scope(r, ctx, ctx->entry);

    if (rc != NGX_DECLINED) {
        return rc;
    }

    ctx->entry = NULL;

    return ngx_http_infer_route_fail(r, ctx, NGX_HTTP_NOT_FOUND,
               "model_not_found",
               "The model `%V` does not exist or you do not have "
               "access to it.", &ctx->model);
}


/*
 * GET .../v1/models and .../v1/models/{id} (OpenAI's, not KServe's
 * /v2/models/{id}, which is routed) on a location limited by
 * infer_route_models or infer_route_namespace (an annotated Ingress's):
 * the list of what it may serve, not a request without a model.
 */

static ngx_uint_t
ngx_http_infer_route_lists(ngx_http_request_t *r,
    ngx_http_infer_route_loc_conf_t *rlcf)
{
    u_char  *p, *start;

    if ((rlcf->models == NULL && rlcf->namespace == NULL)
        || !(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD)))
    {
        return 0;
    }

    start = r->uri.data;
    p = start + r->uri.len;

    if (p - start >= 10 && ngx_strncmp(p - 10, "/v1/models", 10) == 0) {
        return 1;
    }

    /* the last segment is a model id */

    while (p > start && p[-1] != '/') {
        p--;
    }

    return (p - start >= 11 && ngx_strncmp(p - 11, "/v1/models/", 11) == 0);
}


/*
 * The values are checked once (a bad one is the location's 500); the list
 * handler then shows the models they let this location serve.
 */

static ngx_int_t
ngx_http_infer_route_list_scope(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    ngx_int_t  rc;

    rc = ngx_http_infer_route_scope(r, ctx, NULL);

    if (rc != NGX_OK && rc != NGX_DECLINED) {
        return rc;
    }

    r->content_handler = ngx_http_infer_route_list_handler;

    return NGX_OK;
}


/*
 * The request is held to this location's limits from now on (its
 * fallbacks and its model list too): their values, read once and checked,
 * are kept in ctx; then whether they let it serve entry, as
 * ngx_http_infer_route_in_scope(), or the status of a value that is not
 * valid.
 */

static ngx_int_t
ngx_http_infer_route_scope(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_http_infer_route_model_t *entry)
{
    u_char                           *p, *last;
    ngx_uint_t                        n;
    ngx_str_t                        *value;
    ngx_http_infer_route_loc_conf_t  *rlcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);

    ctx->scoped = 1;

    if (rlcf->models) {
        value = &ctx->limit_models;

        if (ngx_http_complex_value(r, rlcf->models, value) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (value->len > NGX_HTTP_INFER_ROUTE_MODELS_MAX) {
            return ngx_http_infer_route_misconfigured(r, ctx, rlcf,
                                                      rlcf->models,
                                                      "is over 4096 bytes");
        }

        /* names: their bytes, and how many */

        n = 0;
        last = value->data + value->len;

        for (p = value->data; p < last; p++) {

            if (*p == ',' || *p == ' ') {
                continue;
            }

            /* strchr() finds the string's own NUL: refused first */

            if (*p == '\0'
                || !((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
                     || (*p >= '0' && *p <= '9')
                     || ngx_strchr("._:/@+-", *p) != NULL))
            {
                return ngx_http_infer_route_misconfigured(r, ctx, rlcf,
                           rlcf->models, "is not a list of model names");
            }

            if ((p == value->data || p[-1] == ',' || p[-1] == ' ')
                && ++n > NGX_HTTP_INFER_ROUTE_MODELS_NAMES)
            {
                return ngx_http_infer_route_misconfigured(r, ctx, rlcf,
                                                          rlcf->models,
                                                          "names over 64 "
                                                          "models");
            }
        }
    }

    if (rlcf->namespace) {
        value = &ctx->limit_namespace;

        if (ngx_http_complex_value(r, rlcf->namespace, value) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (value->len
            && ngx_http_infer_route_namespace_ok(value->data, value->len)
               != NGX_OK)
        {
            return ngx_http_infer_route_misconfigured(r, ctx, rlcf,
                       rlcf->namespace, "is not a namespace name");
        }
    }

    return ngx_http_infer_route_in_scope(ctx, entry);
}


/*
 * Whether the limits kept in ctx let the request be served entry (NULL
 * without a registry: the model asked): NGX_OK or NGX_DECLINED.
 */

ngx_int_t
ngx_http_infer_route_in_scope(ngx_http_infer_route_ctx_t *ctx,
    ngx_http_infer_route_model_t *entry)
{
    u_char      *p, *last, *start;
    ngx_str_t   *ns, *name, *value;
    ngx_uint_t   i, n, found;

    value = &ctx->limit_models;

    if (value->len) {
        n = 0;
        found = 0;
        name = entry ? &entry->name : &ctx->model;
        last = value->data + value->len;

        for (p = value->data; p < last; /* void */) {
            if (*p == ',' || *p == ' ') {
                p++;
                continue;
            }

            start = p;

            while (p < last && *p != ',' && *p != ' ') {
                p++;
            }

            n++;

            if ((size_t) (p - start) == name->len
                && ngx_strncmp(start, name->data, name->len) == 0)
            {
                found = 1;
                break;
            }
        }

        if (n && !found) {
            return NGX_DECLINED;
        }
    }

    value = &ctx->limit_namespace;

    if (value->len == 0) {
        return NGX_OK;
    }

    if (entry == NULL) {
        return NGX_DECLINED;
    }

    ns = entry->namespaces.elts;

    for (i = 0; i < entry->namespaces.nelts; i++) {
        if ((ns[i].len == 1 && ns[i].data[0] == '*')
            || (ns[i].len == value->len
                && ngx_strncmp(ns[i].data, value->data, value->len) == 0))
        {
            return NGX_OK;
        }
    }

    return NGX_DECLINED;
}


/*
 * One error-log line per location, worker and
 * NGX_HTTP_INFER_ROUTE_MISCONF_LOG seconds, naming the directive's own
 * text, never the request's value.  That text may be an annotation's
 * value written as the argument (docs/kubernetes.md): its control
 * characters are escaped, so that it cannot start a log line of its own.
 */

static ngx_int_t
ngx_http_infer_route_misconfigured(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_http_infer_route_loc_conf_t *rlcf,
    ngx_http_complex_value_t *cv, const char *what)
{
    ngx_int_t  rc;
    ngx_str_t  text;

    if (ngx_time() - rlcf->misconf_logged >= NGX_HTTP_INFER_ROUTE_MISCONF_LOG
        && ngx_http_infer_escape_control(r->pool, &cv->value, &text)
           == NGX_OK)
    {
        rlcf->misconf_logged = ngx_time();
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "infer route: the value of \"%V\" %s: this "
                      "location answers 500 gateway_misconfigured (logged "
                      "at most once in %d s)", &text, what,
                      NGX_HTTP_INFER_ROUTE_MISCONF_LOG);
    }

    ctx->entry = NULL;

    rc = ngx_http_infer_route_fail(r, ctx, NGX_HTTP_INTERNAL_SERVER_ERROR,
             "gateway_misconfigured", NGX_HTTP_INFER_MISCONFIGURED_MSG);
    ctx->error_type = "server_error";

    return rc;
}


/*
 * The target of a split is picked when $infer_upstream (or
 * $infer_model_target) is first used, usually by proxy_pass in the
 * content phase: a sticky key may then use variables that later phases
 * set, such as the tenant from the auth module's access phase.
 */

static ngx_int_t
ngx_http_infer_route_pick(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    if (ctx->target) {
        return NGX_OK;
    }

    if (ctx->rewritten) {
        /* a fallback: start again from the body as the client sent it */
        r->request_body->bufs = ctx->bufs;
        r->headers_in.content_length_n = ctx->length;
        ctx->rewritten = 0;
    }

    ctx->target = ngx_http_infer_route_registry_pick(r, ctx->entry);
    if (ctx->target == NULL) {
        return NGX_ERROR;
    }

    if (ctx->target->model.len) {
        ctx->forward = ctx->target->model;

    } else if (ctx->by_pattern) {
        ctx->forward = ctx->model;

    } else {
        ctx->forward = ctx->entry->name;
    }

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer route: model \"%V\" -> upstream \"%V\", "
                   "model id \"%V\"",
                   &ctx->model, &ctx->target->upstream, &ctx->forward);

    if (ngx_http_infer_route_rewrite_path(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ctx->body) {
        return ngx_http_infer_route_rewrite_body(r, ctx);
    }

    return NGX_OK;
}


/*
 * A KServe path names the model id the backend serves, as the body does
 * (a Triton server routes by the path): /v2/models/ALIAS/infer goes up as
 * /v2/models/ID/infer.  An id that is not one plain path segment is left
 * out of the path, which then keeps the name the client gave.
 */

static ngx_int_t
ngx_http_infer_route_rewrite_path(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    u_char                           *p, *last;
    ngx_str_t                         name, uri;
    ngx_http_infer_route_loc_conf_t  *rlcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);

    if (!ngx_http_infer_route_has_source(rlcf, NGX_HTTP_INFER_SOURCE_PATH)
        || ngx_http_infer_route_from_path(r, &name) != NGX_OK
        || (name.len == ctx->forward.len
            && ngx_memcmp(name.data, ctx->forward.data, name.len) == 0))
    {
        return NGX_OK;
    }

    last = ctx->forward.data + ctx->forward.len;

    for (p = ctx->forward.data; p < last; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
              || (*p >= '0' && *p <= '9')
              || *p == '-' || *p == '_' || *p == '.' || *p == '~'))
        {
            return NGX_OK;
        }
    }

    for (p = ctx->forward.data; p < last && *p == '.'; p++) { /* void */ }

    if (p == last) {
        /* "." or "..": a path segment of its own meaning */
        return NGX_OK;
    }

    uri.len = r->uri.len - name.len + ctx->forward.len;
    uri.data = ngx_pnalloc(r->pool, uri.len);
    if (uri.data == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(uri.data, r->uri.data, name.data - r->uri.data);
    p = ngx_cpymem(p, ctx->forward.data, ctx->forward.len);
    ngx_memcpy(p, name.data + name.len,
               r->uri.data + r->uri.len - (name.data + name.len));

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer route: path \"%V\" -> \"%V\"", &r->uri, &uri);

    /* proxy_pass without a URI sends r->uri and the arguments */
    r->uri = uri;
    r->valid_unparsed_uri = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_route_deprecated(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    u_char           *p;
    size_t            len;
    ngx_table_elt_t  *h;

    h = ngx_http_infer_header_add(r, (u_char *) "Deprecation",
                                  sizeof("Deprecation") - 1);
    if (h == NULL) {
        return NGX_ERROR;
    }

    ngx_str_set(&h->value, "true");

    h = ngx_http_infer_header_add(r, (u_char *) "Warning",
                                  sizeof("Warning") - 1);
    if (h == NULL) {
        return NGX_ERROR;
    }

    len = sizeof("299 - \"The model `` is deprecated.\"") - 1
          + ctx->entry->name.len;

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    h->value.data = p;
    h->value.len = ngx_sprintf(p, "299 - \"The model `%V` is deprecated.\"",
                               &ctx->entry->name) - p;

    return NGX_OK;
}


/*
 * What the phase handler returns once the model is known: the next phase.
 * An error in the request (a broken body, an unknown model) is sent in the
 * content phase instead of the location's handler, after the access
 * checks: a client without credentials gets its 401 first, and learns
 * nothing of the registry.
 */

static ngx_int_t
ngx_http_infer_route_done(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    ngx_http_infer_balance_main_conf_t  *bmcf;

    if (ctx->status == NGX_OK) {

        /*
         * a pool may shed the request: checked before the location's
         * handler, once authentication and rate limits are done
         */

        bmcf = ngx_http_get_module_main_conf(r,
                                             ngx_http_infer_balance_module);

        if (bmcf->shedding
            && r->content_handler
            && r->content_handler != ngx_http_infer_route_content_handler)
        {
            ctx->content = r->content_handler;
            r->content_handler = ngx_http_infer_route_content_handler;
        }

        return NGX_DECLINED;
    }

    if (ctx->error_code == NULL) {
        return ctx->status;
    }

    r->content_handler = ngx_http_infer_route_error_handler;

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_infer_route_content_handler(ngx_http_request_t *r)
{
    ngx_int_t                    rc;
    ngx_http_infer_route_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_route_module);

    if (ctx == NULL || ctx->content == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ctx->entry && ngx_http_infer_route_pick(r, ctx) == NGX_OK) {
        rc = ngx_http_infer_balance_shed(r, &ctx->target->upstream);

        if (rc != NGX_DECLINED) {
            return rc;
        }
    }

    return ctx->content(r);
}


static ngx_int_t
ngx_http_infer_route_error_handler(ngx_http_request_t *r)
{
    ngx_http_infer_route_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_route_module);

    if (ctx == NULL || ctx->error_code == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_infer_send_error(r, ctx->status,
                                     ctx->error_type ? ctx->error_type
                                                     : "invalid_request_error",
                                     ctx->error_code, &ctx->error);
}


static ngx_int_t
ngx_http_infer_route_fail(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_uint_t status, const char *code,
    const char *fmt, ...)
{
    u_char     *p;
    va_list     args;
    ngx_str_t   logged;

    p = ngx_pnalloc(r->pool, NGX_HTTP_INFER_ROUTE_ERROR_MAX);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    va_start(args, fmt);
    ctx->error.data = p;
    ctx->error.len = ngx_vslprintf(p, p + NGX_HTTP_INFER_ROUTE_ERROR_MAX,
                                   fmt, args) - p;
    va_end(args);

    ctx->error_code = code;

    /* the message may quote the client's model name */

    if (ngx_http_infer_escape_control(r->pool, &ctx->error, &logged)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "infer route: %uD %s: %V", (uint32_t) status, code,
                  &logged);

    return status;
}


/*
 * What the answer reported; a stream without usage gets estimates: one
 * completion token per content event, the prompt estimate from the body.
 */

static ngx_int_t
ngx_http_infer_route_usage(ngx_http_infer_route_ctx_t *ctx, ngx_uint_t which)
{
    ngx_int_t                prompt, completion;
    ngx_http_infer_usage_t  *u;

    u = ctx->usage;

    if (u == NULL) {
        return -1;
    }

    if (u->found) {
        prompt = u->prompt_tokens;
        completion = u->completion_tokens;

    } else if (u->mode == NGX_HTTP_INFER_USAGE_SSE && u->content_events) {
        prompt = ctx->body ? (ngx_int_t) ((ctx->body->prompt_bytes + 3) / 4
                                          + 4 * ctx->body->messages)
                           : -1;
        completion = u->content_events;

    } else {
        return -1;
    }

    switch (which) {

    case ngx_http_infer_route_var_usage_prompt:
        return prompt;

    case ngx_http_infer_route_var_usage_completion:
        return completion;

    case ngx_http_infer_route_var_usage_total:
        if (u->found && u->total_tokens >= 0) {
            return u->total_tokens;
        }

        return (prompt >= 0 && completion >= 0) ? prompt + completion : -1;

    case ngx_http_infer_route_var_usage_cached:
        return u->found ? u->cached_tokens : -1;

    case ngx_http_infer_route_var_usage_reasoning:
        return u->found ? u->reasoning_tokens : -1;

    default: /* ngx_http_infer_route_var_usage_estimated */
        return u->found ? 0 : 1;
    }
}


/*
 * $infer_cost: the usage (or its estimate) at the model's prices, in US
 * dollars: prompt tokens not cached at input_price, cached ones at
 * cached_input_price (else input_price), completion tokens (reasoning
 * included, as OpenAI counts them) at output_price.  Empty when the model
 * has no price or the answer no usage.  A figure is taken up to 2^31
 * tokens, however large the backend says it was.
 */

static ngx_int_t
ngx_http_infer_route_cost(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_str_t *s)
{
    int64_t                        *price;
    uint64_t                        cost;
    ngx_int_t                       prompt, completion, cached;

    if (ctx->entry == NULL) {
        return NGX_OK;
    }

    price = ctx->entry->price;

    if (price[NGX_HTTP_INFER_PRICE_INPUT] < 0
        && price[NGX_HTTP_INFER_PRICE_OUTPUT] < 0)
    {
        return NGX_OK;
    }

    prompt = ngx_http_infer_route_usage(ctx,
                                     ngx_http_infer_route_var_usage_prompt);
    completion = ngx_http_infer_route_usage(ctx,
                                     ngx_http_infer_route_var_usage_completion);

    if (prompt < 0 && completion < 0) {
        return NGX_OK;
    }

    cached = ngx_http_infer_route_usage(ctx,
                                     ngx_http_infer_route_var_usage_cached);

    prompt = ngx_min(ngx_max(prompt, 0), 0x7fffffff);
    completion = ngx_min(ngx_max(completion, 0), 0x7fffffff);
    cached = ngx_min(ngx_max(cached, 0), prompt);

    cost = 0;

    if (price[NGX_HTTP_INFER_PRICE_INPUT] >= 0) {
        cost += ngx_http_infer_decimal_cost(prompt - cached,
                                        price[NGX_HTTP_INFER_PRICE_INPUT]);
    }

    if (price[NGX_HTTP_INFER_PRICE_CACHED] >= 0) {
        cost += ngx_http_infer_decimal_cost(cached,
                                        price[NGX_HTTP_INFER_PRICE_CACHED]);

    } else if (price[NGX_HTTP_INFER_PRICE_INPUT] >= 0) {
        cost += ngx_http_infer_decimal_cost(cached,
                                        price[NGX_HTTP_INFER_PRICE_INPUT]);
    }

    if (price[NGX_HTTP_INFER_PRICE_OUTPUT] >= 0) {
        cost += ngx_http_infer_decimal_cost(completion,
                                        price[NGX_HTTP_INFER_PRICE_OUTPUT]);
    }

    s->data = ngx_pnalloc(r->pool, NGX_HTTP_INFER_DECIMAL_LEN);
    if (s->data == NULL) {
        return NGX_ERROR;
    }

    s->len = ngx_http_infer_decimal_print(s->data, cost, 9) - s->data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_route_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                       *p;
    ngx_int_t                     n;
    ngx_str_t                     s;
    ngx_uint_t                    k;
    ngx_http_infer_route_ctx_t   *ctx;
    ngx_http_infer_route_body_t  *b;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_infer_route_module);

    if (ctx == NULL) {
        ctx = ngx_http_infer_ctx_find(r->main, ngx_http_infer_route_cleanup);
    }

    if (ctx == NULL || ctx->status != NGX_OK) {
        v->not_found = 1;
        return NGX_OK;
    }

    b = ctx->body;
    n = -1;
    ngx_str_null(&s);

    switch (data) {

    case ngx_http_infer_route_var_model:
        s = ctx->model;
        break;

    case ngx_http_infer_route_var_model_target:
    case ngx_http_infer_route_var_upstream:
        if (ctx->entry == NULL) {
            s = (data == ngx_http_infer_route_var_upstream) ? s : ctx->model;
            break;
        }

        if (ngx_http_infer_route_pick(r->main, ctx) != NGX_OK) {
            return NGX_ERROR;
        }

        s = (data == ngx_http_infer_route_var_upstream)
            ? ctx->target->upstream : ctx->forward;
        break;

    case ngx_http_infer_route_var_stream:
        n = (b && b->stream == 1) ? 1 : 0;
        break;

    case ngx_http_infer_route_var_max_tokens:
        n = b ? b->max_tokens : -1;
        break;

    case ngx_http_infer_route_var_prompt_tokens:
        /* one token per 4 bytes of prompt text, 4 per chat message */
        n = b ? (ngx_int_t) ((b->prompt_bytes + 3) / 4 + 4 * b->messages)
              : 0;
        break;

    case ngx_http_infer_route_var_usage_prompt:
    case ngx_http_infer_route_var_usage_completion:
    case ngx_http_infer_route_var_usage_total:
    case ngx_http_infer_route_var_usage_cached:
    case ngx_http_infer_route_var_usage_reasoning:
    case ngx_http_infer_route_var_usage_estimated:
        n = ngx_http_infer_route_usage(ctx, data);
        break;

    case ngx_http_infer_route_var_ttft:
        if (ctx->ttft < 0) {
            break;
        }

        p = ngx_pnalloc(r->pool, NGX_TIME_T_LEN + 4);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_sprintf(p, "%T.%03M", (time_t) ctx->ttft / 1000,
                            (ngx_msec_t) (ctx->ttft % 1000)) - p;
        break;

    case ngx_http_infer_route_var_cost:
        if (ngx_http_infer_route_cost(r, ctx, &s) != NGX_OK) {
            return NGX_ERROR;
        }

        break;

    case ngx_http_infer_route_var_price_input:
    case ngx_http_infer_route_var_price_output:
        k = (data == ngx_http_infer_route_var_price_input)
            ? NGX_HTTP_INFER_PRICE_INPUT : NGX_HTTP_INFER_PRICE_OUTPUT;

        if (ctx->entry == NULL || ctx->entry->price[k] < 0) {
            break;
        }

        p = ngx_pnalloc(r->pool, NGX_HTTP_INFER_DECIMAL_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_http_infer_decimal_print(p, ctx->entry->price[k], 6) - p;
        break;

    default: /* ngx_http_infer_route_var_prefix_hash */
        if (b == NULL || b->prefix_len == 0) {
            break;
        }

        p = ngx_pnalloc(r->pool, 16);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_sprintf(p, "%016uxL", b->prefix_hash) - p;
        break;
    }

    if (n >= 0) {
        p = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        s.data = p;
        s.len = ngx_sprintf(p, "%i", n) - p;
    }

    if (s.len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->data = s.data;
    v->len = s.len;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


/*
 * infer_stream_event_buffer_size: room for one event of a stream whose
 * usage chunk is removed; a usage event is a few hundred bytes.
 */

static char *
ngx_http_infer_route_event_buffer_check(ngx_conf_t *cf, void *post,
    void *data)
{
    size_t  *sp = data;

    if (*sp < 512) {
        return "must be at least 512";
    }

    return NGX_CONF_OK;
}


/*
 * infer_model_source body | path | header=NAME ...;
 */

static char *
ngx_http_infer_route_sources(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_infer_route_loc_conf_t *rlcf = conf;

    ngx_str_t                      *value;
    ngx_uint_t                      i, j;
    ngx_http_infer_route_source_t  *src, *s;

    if (rlcf->sources != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    rlcf->sources = ngx_array_create(cf->pool, cf->args->nelts - 1,
                                     sizeof(ngx_http_infer_route_source_t));
    if (rlcf->sources == NULL) {
        return NGX_CONF_ERROR;
    }

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {

        src = ngx_array_push(rlcf->sources);
        if (src == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memzero(src, sizeof(ngx_http_infer_route_source_t));

        if (ngx_strcmp(value[i].data, "body") == 0) {
            src->type = NGX_HTTP_INFER_SOURCE_BODY;

        } else if (ngx_strcmp(value[i].data, "path") == 0) {
            src->type = NGX_HTTP_INFER_SOURCE_PATH;

        } else if (value[i].len > 7
                   && ngx_strncmp(value[i].data, "header=", 7) == 0)
        {
            src->type = NGX_HTTP_INFER_SOURCE_HEADER;
            src->header.len = value[i].len - 7;
            src->header.data = ngx_pnalloc(cf->pool, src->header.len);
            if (src->header.data == NULL) {
                return NGX_CONF_ERROR;
            }

            ngx_strlow(src->header.data, value[i].data + 7,
                       src->header.len);

        } else {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid model source \"%V\": use body, path "
                               "or header=NAME", &value[i]);
            return NGX_CONF_ERROR;
        }

        s = rlcf->sources->elts;

        for (j = 0; j < rlcf->sources->nelts - 1; j++) {
            if (s[j].type == src->type
                && s[j].header.len == src->header.len
                && ngx_strncmp(s[j].header.data, src->header.data,
                               src->header.len) == 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "model source \"%V\" is listed twice",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }
        }
    }

    return NGX_CONF_OK;
}


/*
 * $infer_registry_models: how many models the registry this worker uses
 * holds, for a readiness probe (infer_metrics_ready_condition).
 */

static ngx_int_t
ngx_http_infer_route_registry_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                            *p;
    ngx_http_infer_route_main_conf_t  *rmcf;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_route_module);

    p = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->len = ngx_sprintf(p, "%ui",
                         rmcf->current ? rmcf->current->models.nelts : 0)
             - p;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = p;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_route_add_variables(ngx_conf_t *cf)
{
    return ngx_http_infer_add_variables(cf, ngx_http_infer_route_vars);
}


static void *
ngx_http_infer_route_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_infer_route_main_conf_t  *rmcf;

    rmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_route_main_conf_t));
    if (rmcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&rmcf->models, cf->pool, 8,
                       sizeof(ngx_http_infer_route_model_t *))
        != NGX_OK)
    {
        return NULL;
    }

    rmcf->upstream_check = NGX_CONF_UNSET;

    /*
     * set by ngx_pcalloc():
     *
     *     rmcf->keys = NULL;
     *     rmcf->file = NULL;
     *     rmcf->current = NULL;
     */

    return rmcf;
}


static char *
ngx_http_infer_route_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_infer_route_main_conf_t  *rmcf = conf;

    ngx_conf_init_value(rmcf->upstream_check, 1);

    return ngx_http_infer_route_registry_init(cf, conf);
}


static void *
ngx_http_infer_route_create_conf(ngx_conf_t *cf)
{
    ngx_http_infer_route_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_route_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->enable = NGX_CONF_UNSET;
    conf->sources = NGX_CONF_UNSET_PTR;
    conf->prefix_max = NGX_CONF_UNSET_SIZE;
    conf->include_usage = NGX_CONF_UNSET;
    conf->trace = NGX_CONF_UNSET;
    conf->event_buffer_size = NGX_CONF_UNSET_SIZE;
    conf->phase = NGX_CONF_UNSET_UINT;
    conf->models = NGX_CONF_UNSET_PTR;
    conf->namespace = NGX_CONF_UNSET_PTR;
    conf->cache_scope = NGX_CONF_UNSET_PTR;
    conf->cache_uncacheable = NGX_CONF_UNSET_PTR;

    /*
     * set by ngx_pcalloc():
     *
     *     conf->list_filter = NULL;
     *     conf->list = 0;
     */

    return conf;
}


static char *
ngx_http_infer_route_merge_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_infer_route_loc_conf_t  *prev = parent;
    ngx_http_infer_route_loc_conf_t  *conf = child;

    ngx_http_infer_route_source_t  *src;

    ngx_conf_merge_value(conf->enable, prev->enable, 0);
    ngx_conf_merge_size_value(conf->prefix_max, prev->prefix_max, 1024);
    ngx_conf_merge_value(conf->include_usage, prev->include_usage, 0);
    ngx_conf_merge_value(conf->trace, prev->trace, 0);
    ngx_conf_merge_size_value(conf->event_buffer_size,
                              prev->event_buffer_size, 16384);

    ngx_conf_merge_ptr_value(conf->sources, prev->sources, NULL);
    ngx_conf_merge_uint_value(conf->phase, prev->phase,
                              NGX_HTTP_INFER_ROUTE_PREACCESS);
    ngx_conf_merge_ptr_value(conf->models, prev->models, NULL);
    ngx_conf_merge_ptr_value(conf->namespace, prev->namespace, NULL);
    ngx_conf_merge_ptr_value(conf->cache_scope, prev->cache_scope, NULL);
    ngx_conf_merge_ptr_value(conf->cache_uncacheable,
                             prev->cache_uncacheable, NULL);

    if (conf->sources == NULL) {
        /* the default: body, then path */
        conf->sources = ngx_array_create(cf->pool, 2,
                                       sizeof(ngx_http_infer_route_source_t));
        if (conf->sources == NULL) {
            return NGX_CONF_ERROR;
        }

        src = ngx_array_push_n(conf->sources, 2);
        if (src == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memzero(src, 2 * sizeof(ngx_http_infer_route_source_t));
        src[0].type = NGX_HTTP_INFER_SOURCE_BODY;
        src[1].type = NGX_HTTP_INFER_SOURCE_PATH;

        if (prev->sources == NULL) {
            prev->sources = conf->sources;
        }
    }

    return NGX_CONF_OK;
}


/*
 * The pipeline gives each ngx_infer module a phase of its own, so the
 * order of load_module lines never changes what runs first.
 */

static ngx_int_t
ngx_http_infer_route_init(ngx_conf_t *cf)
{
    ngx_str_t                          name;
    ngx_http_handler_pt               *h;
    ngx_http_core_main_conf_t         *cmcf;
    ngx_http_infer_route_main_conf_t  *rmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);
    rmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_infer_route_module);

    /* the id of the error envelopes, one per request */

    if (ngx_http_infer_request_id_init(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    /* what the cache key reads, see ngx_http_infer_route_cache.c */

    ngx_str_set(&name, "infer_model_target");
    rmcf->target_index = ngx_http_get_variable_index(cf, &name);

    ngx_str_set(&name, "infer_upstream");
    rmcf->upstream_index = ngx_http_get_variable_index(cf, &name);

    if (rmcf->target_index == NGX_ERROR || rmcf->upstream_index == NGX_ERROR)
    {
        return NGX_ERROR;
    }

    /*
     * what $infer_traceparent and infer_trace read: indexed, so that each
     * is computed once per request, a random id included
     */

    ngx_str_set(&name, "infer_trace_id");
    rmcf->trace_index[0] = ngx_http_get_variable_index(cf, &name);

    ngx_str_set(&name, "infer_span_id");
    rmcf->trace_index[1] = ngx_http_get_variable_index(cf, &name);

    ngx_str_set(&name, "infer_trace_flags");
    rmcf->trace_index[2] = ngx_http_get_variable_index(cf, &name);

    ngx_str_set(&name, "infer_parent_span_id");
    rmcf->trace_index[3] = ngx_http_get_variable_index(cf, &name);

    ngx_str_set(&name, "infer_traceparent");
    rmcf->traceparent_index = ngx_http_get_variable_index(cf, &name);

    if (rmcf->trace_index[0] == NGX_ERROR
        || rmcf->trace_index[1] == NGX_ERROR
        || rmcf->trace_index[2] == NGX_ERROR
        || rmcf->trace_index[3] == NGX_ERROR
        || rmcf->traceparent_index == NGX_ERROR)
    {
        return NGX_ERROR;
    }

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PREACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_infer_route_preaccess_handler;

    /*
     * infer_route_phase rewrite: pushed after the rewrite module's own
     * handler, and so run before it (a phase runs its handlers last pushed
     * first), ahead of the location's set and of any rewrite_by_lua
     */

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_REWRITE_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_infer_route_rewrite_handler;

    ngx_http_infer_route_filter_init(cf);

    return NGX_OK;
}

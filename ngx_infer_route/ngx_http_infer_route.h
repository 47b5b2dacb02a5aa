/*
 * Copyright (C) ngx_infer authors
 *
 * What the files of ngx_http_infer_route_module share: the model registry,
 * the location's configuration and the request's context.
 */


#ifndef _NGX_HTTP_INFER_ROUTE_H_INCLUDED_
#define _NGX_HTTP_INFER_ROUTE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer_decimal.h"
#include "ngx_http_infer_route_json.h"
#include "ngx_http_infer_route_usage.h"
#include "ngx_http_infer_route_traceparent.h"


#define NGX_HTTP_INFER_MODEL_ACTIVE      0
#define NGX_HTTP_INFER_MODEL_DEPRECATED  1
#define NGX_HTTP_INFER_MODEL_DISABLED    2

/* infer_route_phase */
#define NGX_HTTP_INFER_ROUTE_PREACCESS   0
#define NGX_HTTP_INFER_ROUTE_REWRITE     1

/* room for a registry error: two model names, a key, jansson's text */
#define NGX_HTTP_INFER_ROUTE_ERRSTR      1024
#define NGX_HTTP_INFER_ROUTE_WEIGHT_MAX  1000000

/* input_price=, output_price=, cached_input_price=: a model's price[] */
#define NGX_HTTP_INFER_PRICE_INPUT       0
#define NGX_HTTP_INFER_PRICE_OUTPUT      1
#define NGX_HTTP_INFER_PRICE_CACHED      2
/* the most a price may be: 1,000,000 dollars per million tokens */
#define NGX_HTTP_INFER_PRICE_MAX         1000000000000LL


typedef struct {
    ngx_str_t                      upstream;
    ngx_str_t                      model;       /* the id sent upstream;
                                                   empty: the model's */
    ngx_int_t                      weight;
    ngx_int_t                      current;     /* smooth weighted round
                                                   robin, per worker */
} ngx_http_infer_route_target_t;


typedef struct {
    ngx_str_t                      name;
    ngx_str_t                      model;       /* model=: default id sent
                                                   upstream */
    ngx_array_t                    aliases;     /* of ngx_str_t */
    ngx_array_t                    targets;     /* of *_target_t */
    ngx_int_t                      total_weight;
    ngx_str_t                      upstream;    /* upstream=, until the
                                                   targets are built */
    ngx_http_complex_value_t      *sticky;
    ngx_uint_t                     state;
    off_t                          max_body_size;   /* -1: no limit */
    int64_t                        price[3];    /* input, output, cached
                                                   input: micro-dollars per
                                                   million tokens; -1: none */
#if (NGX_PCRE)
    ngx_regex_t                   *regex;
#endif
    ngx_str_t                      pattern;
    ngx_str_t                      fallback_name;
    void                          *fallback;    /* *_model_t, in the same
                                                   registry */
    ngx_uint_t                     number;      /* n: the n-th model of the
                                                   registry file; 0: an
                                                   infer_model */
    ngx_array_t                    namespaces;  /* of ngx_str_t: those whose
                                                   locations may use it
                                                   (infer_route_namespace);
                                                   "*": any */
} ngx_http_infer_route_model_t;


/*
 * The registry a request resolves its model in.  A request keeps pointers
 * into it (its model, the model's targets, their names in variables) for
 * its whole life, so a registry replaced by a newer registry file lives
 * on until the last request that acquired it is freed.
 */

typedef struct {
    ngx_pool_t                    *pool;        /* NULL: in the cycle's pool,
                                                   never freed */
    ngx_array_t                    models;      /* of *_model_t: those of
                                                   infer_model, then those
                                                   of the file */
    ngx_array_t                    patterns;    /* of *_model_t */
    ngx_hash_t                     names;       /* names, aliases -> model */
    ngx_uint_t                     refs;        /* requests, and 1 while
                                                   current */
    time_t                         loaded;
} ngx_http_infer_route_registry_t;


typedef struct ngx_http_infer_route_file_s  ngx_http_infer_route_file_t;


typedef struct {
    ngx_array_t                       models;   /* of *_model_t, as declared
                                                   by infer_model */
    ngx_hash_keys_arrays_t           *keys;     /* only while configuring */
    ngx_http_infer_route_file_t      *file;     /* infer_model_registry */
    ngx_http_infer_route_registry_t  *current;  /* NULL: no registry at all,
                                                   the model is only
                                                   reported */
    ngx_flag_t                        upstream_check;
    ngx_int_t                         target_index;   /* variables, for */
    ngx_int_t                         upstream_index; /* the cache key */
    ngx_int_t                         trace_index[4]; /* trace, span,
                                                         flags, parent */
    ngx_int_t                         traceparent_index;
} ngx_http_infer_route_main_conf_t;


typedef struct {
    ngx_flag_t                     enable;
    ngx_array_t                   *sources;     /* of *_source_t */
    size_t                         prefix_max;
    ngx_flag_t                     include_usage;
    size_t                         event_buffer_size;
    ngx_http_complex_value_t      *list_filter; /* infer_model_list */
    ngx_uint_t                     phase;       /* infer_route_phase */
    ngx_http_complex_value_t      *models;      /* infer_route_models */
    ngx_http_complex_value_t      *namespace;   /* infer_route_namespace */
    ngx_http_complex_value_t      *cache_scope; /* infer_cache_scope */
    ngx_array_t                   *cache_uncacheable; /* of ngx_str_t,
                                                   NUL-terminated */
    ngx_flag_t                     trace;       /* infer_trace */
    time_t                         misconf_logged;  /* per worker: when a
                                                   bad value of either was
                                                   last logged */
    unsigned                       list:1;      /* this location lists the
                                                   models: not inherited */
} ngx_http_infer_route_loc_conf_t;


/*
 * A stream whose usage chunk is removed, in a fixed amount of memory: the
 * event not yet complete is held in one buffer, what is passed on goes
 * out through a few output buffers, reused once sent.  When they are all
 * in flight the input waits (and so does the upstream).
 */

typedef struct {
    ngx_chain_t                   *in;          /* input not yet read */
    ngx_chain_t                   *out;
    ngx_chain_t                  **last_out;
    ngx_chain_t                   *free;
    ngx_chain_t                   *busy;
    ngx_buf_t                     *buf;         /* output being filled */
    ngx_uint_t                     bufs;        /* output buffers made */
    u_char                        *hold;        /* the event held back */
    size_t                         hold_len;
    size_t                         hold_size;
    off_t                          hold_off;    /* stream offset of
                                                   hold[0] */
    size_t                         send;        /* hold bytes passed on
                                                   and not yet copied out */
    size_t                         sent;
    unsigned                       passing:1;   /* an event longer than
                                                   hold, passed on as it
                                                   comes */
    unsigned                       flush:1;
    unsigned                       last:1;      /* last_buf read */
    unsigned                       done:1;      /* last_buf passed on */
    unsigned                       nomem:1;     /* no output buffer free */
} ngx_http_infer_route_strip_t;


typedef struct {
    ngx_int_t                      status;      /* what the phase handler
                                                   returns once it knows */
    ngx_str_t                      error;       /* message, when status is
                                                   an error */
    const char                    *error_code;
    const char                    *error_type;  /* NULL: the client's
                                                   error */
    ngx_http_handler_pt            content;     /* the location's, when
                                                   shedding comes first */
    ngx_uint_t                     next_source;
    ngx_str_t                      model;       /* as the request names it */
    ngx_http_infer_route_model_t  *entry;       /* NULL: not in registry */
    ngx_http_infer_route_target_t *target;      /* NULL: not picked yet */
    ngx_str_t                      forward;     /* model id sent upstream */
    ngx_http_infer_route_body_t   *body;        /* NULL: body not scanned */
    off_t                          body_size;   /* bytes read, -1: not */
    ngx_chain_t                   *bufs;        /* the body as received,
                                                   once rewritten */
    off_t                          length;      /* and its length */
    ngx_uint_t                     fallbacks;   /* fallbacks taken */
    ngx_http_infer_usage_t        *usage;       /* NULL: answer not parsed */
    ngx_msec_int_t                 ttft;        /* ms to the first answer
                                                   byte; -1: none yet */
    unsigned                       waiting:1;   /* body read asynchronously */
    unsigned                       by_pattern:1;
    unsigned                       rewritten:1;
    unsigned                       usage_partial:1;
    unsigned                       inject:1;    /* include_usage added */
    unsigned                       listing:1;   /* GET .../models of a
                                                   limited location */
    unsigned                       scoped:1;    /* infer_route_models and
                                                   _namespace checked */
    unsigned                       verify:1;    /* the body is read to
                                                   check its model against
                                                   the one found first */
    unsigned                       cache_done:1;    /* the cache key and */
    unsigned                       cacheable:1;     /* verdict are known */

    ngx_http_infer_route_strip_t  *strip;       /* NULL: the usage chunk
                                                   is left in */
    ngx_str_t                      limit_models;    /* the values of the
                                                       infer_route_models */
    ngx_str_t                      limit_namespace; /* and _namespace the
                                                       request is held to */
    u_char                        *cache_key;   /* 64 hex digits, NULL */
} ngx_http_infer_route_ctx_t;


extern ngx_module_t  ngx_http_infer_route_module;


/* ngx_http_infer_route_registry.c */

char *ngx_http_infer_route_registry_model(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_infer_route_registry_target(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
char *ngx_http_infer_route_registry_init(ngx_conf_t *cf,
    ngx_http_infer_route_main_conf_t *rmcf);

ngx_http_infer_route_registry_t *ngx_http_infer_route_registry_acquire(
    ngx_http_request_t *r);
ngx_http_infer_route_model_t *ngx_http_infer_route_registry_find(
    ngx_http_infer_route_registry_t *reg, ngx_str_t *name,
    ngx_uint_t *by_pattern);
ngx_http_infer_route_target_t *ngx_http_infer_route_registry_pick(
    ngx_http_request_t *r, ngx_http_infer_route_model_t *m);

ngx_http_infer_route_registry_t *ngx_http_infer_route_registry_build(
    ngx_http_infer_route_main_conf_t *rmcf, ngx_array_t *more,
    ngx_pool_t *pool, ngx_log_t *log, u_char *err);
void ngx_http_infer_route_registry_replace(
    ngx_http_infer_route_main_conf_t *rmcf,
    ngx_http_infer_route_registry_t *reg);
/* ngx_http_infer_route_body.c */
ngx_int_t ngx_http_infer_route_body_bytes(ngx_http_request_t *r,
    ngx_str_t *body, ngx_uint_t scratch);
ngx_int_t ngx_http_infer_route_rewrite_body(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);

ngx_int_t ngx_http_infer_route_registry_name_ok(ngx_str_t *name);
ngx_int_t ngx_http_infer_route_namespace_ok(u_char *p, size_t len);
ngx_http_infer_route_model_t *ngx_http_infer_route_model_create(
    ngx_pool_t *pool, ngx_uint_t number);
ngx_int_t ngx_http_infer_route_model_param(ngx_http_infer_route_model_t *m,
    ngx_str_t *name, ngx_str_t *v, ngx_pool_t *pool, u_char *err);
ngx_int_t ngx_http_infer_route_model_check(ngx_http_infer_route_model_t *m,
    ngx_http_upstream_main_conf_t *umcf, u_char *err);
ngx_http_infer_route_target_t *ngx_http_infer_route_target_add(
    ngx_http_infer_route_model_t *m);
ngx_int_t ngx_http_infer_route_target_param(ngx_http_infer_route_model_t *m,
    ngx_http_infer_route_target_t *t, ngx_str_t *name, ngx_str_t *v,
    u_char *err);
void ngx_http_infer_route_registry_error(u_char *err,
    ngx_http_infer_route_model_t *m, const char *fmt, ...);

/* ngx_http_infer_route_filter.c */

void ngx_http_infer_route_filter_init(ngx_conf_t *cf);

/* ngx_http_infer_route_list.c */

char *ngx_http_infer_route_list(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_infer_route_list_handler(ngx_http_request_t *r);
/* whether the limits kept in ctx let it serve entry: NGX_OK, NGX_DECLINED */
ngx_int_t ngx_http_infer_route_in_scope(ngx_http_infer_route_ctx_t *ctx,
    ngx_http_infer_route_model_t *entry);

/* ngx_http_infer_route_cache.c */
ngx_int_t ngx_http_infer_route_cache_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
char *ngx_http_infer_route_cache_uncacheable(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);

/* ngx_http_infer_route_file.c */

char *ngx_http_infer_route_file_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_infer_route_file_init_conf(ngx_conf_t *cf,
    ngx_http_infer_route_main_conf_t *rmcf);
ngx_int_t ngx_http_infer_route_file_init_process(ngx_cycle_t *cycle);
ngx_http_infer_route_registry_t *ngx_http_infer_route_file_registry(
    ngx_http_infer_route_main_conf_t *rmcf,
    ngx_http_upstream_main_conf_t *umcf, u_char *data, size_t len,
    ngx_pool_t *pool, ngx_log_t *log, u_char *err);
void ngx_http_infer_route_file_exit_process(ngx_cycle_t *cycle);


/* the variables of ngx_http_infer_route_trace.c, their data */

typedef enum {
    ngx_http_infer_trace_var_request_id = 0,
    ngx_http_infer_trace_var_trace_id,
    ngx_http_infer_trace_var_span_id,
    ngx_http_infer_trace_var_parent_span_id,
    ngx_http_infer_trace_var_flags,
    ngx_http_infer_trace_var_traceparent
} ngx_http_infer_trace_var_e;


ngx_int_t ngx_http_infer_route_trace_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
ngx_int_t ngx_http_infer_route_trace_request(ngx_http_request_t *r);
ngx_int_t ngx_http_infer_route_trace_response(ngx_http_request_t *r);


#endif /* _NGX_HTTP_INFER_ROUTE_H_INCLUDED_ */

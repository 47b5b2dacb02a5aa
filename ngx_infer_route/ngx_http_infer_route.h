/*
 * Copyright (C) ngx_infer authors
 *
 * What the files of ngx_http_infer_route_module share: the model registry.
 */


#ifndef _NGX_HTTP_INFER_ROUTE_H_INCLUDED_
#define _NGX_HTTP_INFER_ROUTE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


#define NGX_HTTP_INFER_MODEL_ACTIVE      0
#define NGX_HTTP_INFER_MODEL_DEPRECATED  1
#define NGX_HTTP_INFER_MODEL_DISABLED    2


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
#if (NGX_PCRE)
    ngx_regex_t                   *regex;
#endif
    ngx_str_t                      pattern;
    ngx_str_t                      fallback_name;
    void                          *fallback;    /* *_model_t */
} ngx_http_infer_route_model_t;


typedef struct {
    ngx_array_t                    models;      /* of *_model_t, in the
                                                   order declared */
    ngx_array_t                    patterns;    /* of *_model_t */
    ngx_hash_t                     names;       /* names, aliases -> model */
    ngx_hash_keys_arrays_t        *keys;        /* only while configuring */
    time_t                         created;     /* for /v1/models */
} ngx_http_infer_route_main_conf_t;


char *ngx_http_infer_route_registry_model(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_infer_route_registry_target(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
char *ngx_http_infer_route_registry_init(ngx_conf_t *cf,
    ngx_http_infer_route_main_conf_t *rmcf);

ngx_http_infer_route_model_t *ngx_http_infer_route_registry_find(
    ngx_http_infer_route_main_conf_t *rmcf, ngx_str_t *name,
    ngx_uint_t *by_pattern);
ngx_http_infer_route_target_t *ngx_http_infer_route_registry_pick(
    ngx_http_request_t *r, ngx_http_infer_route_model_t *m);


#endif /* _NGX_HTTP_INFER_ROUTE_H_INCLUDED_ */

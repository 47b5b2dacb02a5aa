
/*
 * Copyright (C) ngx_infer authors
 *
 * infer_model_list: GET /v1/models and /v1/models/{id} answered from the
 * registry in use, in OpenAI's list shape, with an optional filter of
 * names and patterns ($infer_allowed_models shows each tenant its own).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_route.h"


static ngx_uint_t ngx_http_infer_route_listed(ngx_http_request_t *r,
    ngx_http_infer_route_model_t *m, ngx_str_t *filter, ngx_str_t *want);
static ngx_int_t ngx_http_infer_route_list_allows(ngx_str_t *filter,
    ngx_http_infer_route_model_t *m);


/*
 * GET /v1/models and /v1/models/{id}: the registry in OpenAI's shapes.
 * Disabled models are not listed; with a filter, only the models it names
 * (or all, for "*") are.
 */

ngx_int_t
ngx_http_infer_route_list_handler(ngx_http_request_t *r)
{
    u_char                             *p, *end;
    size_t                              len;
    time_t                              created;
    ngx_int_t                           rc;
    ngx_str_t                           filter, want, msg;
    ngx_buf_t                          *b;
    ngx_uint_t                          i, n, nm, one, single;
    ngx_http_infer_route_model_t      **m;
    ngx_http_infer_route_loc_conf_t    *rlcf;
    ngx_http_infer_route_main_conf_t   *rmcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);
    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_route_module);

    ngx_str_set(&filter, "*");

    if (rlcf->list_filter
        && ngx_http_complex_value(r, rlcf->list_filter, &filter) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* /.../models/{id} asks for one model */

    single = 0;
    ngx_str_null(&want);
    end = r->uri.data + r->uri.len;

    for (p = end; p > r->uri.data && p[-1] != '/'; p--) { /* void */ }

    if (p - r->uri.data >= 8 && ngx_strncmp(p - 8, "/models/", 8) == 0) {
        single = 1;
        want.data = p;
        want.len = end - p;
    }

    /* the list is written at once: no need to hold the registry */

    if (rmcf->current) {
        m = rmcf->current->models.elts;
        nm = rmcf->current->models.nelts;
        created = rmcf->current->loaded;

    } else {
        m = NULL;
        nm = 0;
        created = 0;
    }

    len = 0;
    n = 0;

    for (i = 0; i < nm; i++) {

        if (!ngx_http_infer_route_listed(r, m[i], &filter,
                                         single ? &want : NULL))
        {
            continue;
        }

        len += sizeof("{\"id\": \"\", \"object\": \"model\", "
                      "\"created\": , \"owned_by\": \"ngx_infer\"}, ") - 1
               + m[i]->name.len
               + ngx_escape_json(NULL, m[i]->name.data, m[i]->name.len)
               + NGX_TIME_T_LEN;
        n++;
    }

    if (single && n == 0) {
        ngx_str_set(&msg, "The model does not exist or you do not have "
                          "access to it.");
        return ngx_http_infer_send_error(r, NGX_HTTP_NOT_FOUND,
                                         "invalid_request_error",
                                         "model_not_found", &msg);
    }

    len += sizeof("{\"object\": \"list\", \"data\": []}\n") - 1;

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (!single) {
        b->last = ngx_cpymem(b->last, "{\"object\": \"list\", \"data\": [",
                             sizeof("{\"object\": \"list\", \"data\": [")
                             - 1);
    }

    one = 0;

    for (i = 0; i < nm; i++) {

        if (!ngx_http_infer_route_listed(r, m[i], &filter,
                                         single ? &want : NULL))
        {
            continue;
        }

        if (one++) {
            *b->last++ = ',';
            *b->last++ = ' ';
        }

        b->last = ngx_cpymem(b->last, "{\"id\": \"", sizeof("{\"id\": \"") - 1);
        b->last = (u_char *) ngx_escape_json(b->last, m[i]->name.data,
                                             m[i]->name.len);
        b->last = ngx_sprintf(b->last, "\", \"object\": \"model\", "
                              "\"created\": %T, \"owned_by\": \"ngx_infer\"}",
                              created);
    }

    if (!single) {
        *b->last++ = ']';
        *b->last++ = '}';
    }

    *b->last++ = LF;

    return ngx_http_infer_send_json(r, NGX_HTTP_OK, b);
}


/*
 * Whether the list shows m: not disabled, allowed by the filter and by
 * the limits of the location it was asked on (already checked to be valid
 * values), and the one asked for by /models/{id} (want, when not NULL).
 */

static ngx_uint_t
ngx_http_infer_route_listed(ngx_http_request_t *r,
    ngx_http_infer_route_model_t *m, ngx_str_t *filter, ngx_str_t *want)
{
    ngx_http_infer_route_ctx_t  *ctx;

    if (m->state == NGX_HTTP_INFER_MODEL_DISABLED
        || !ngx_http_infer_route_list_allows(filter, m))
    {
        return 0;
    }

    /* a location limited by infer_route_models or _namespace: its own */

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_route_module);

    if (ctx && ctx->listing
        && ngx_http_infer_route_in_scope(ctx, m) != NGX_OK)
    {
        return 0;
    }

    return want == NULL
           || (want->len == m->name.len
               && ngx_strncmp(want->data, m->name.data, want->len) == 0);
}


/*
 * The filter lists model names or patterns ("llama-*"; "*" allows every
 * model) separated by spaces or commas: $infer_allowed_models, say.  A
 * model is allowed when its name or one of its aliases matches.
 */

static ngx_int_t
ngx_http_infer_route_list_allows(ngx_str_t *filter,
    ngx_http_infer_route_model_t *m)
{
    ngx_str_t   *alias;
    ngx_uint_t   i;

    if (ngx_http_infer_list_match(filter, m->name.data, m->name.len)) {
        return 1;
    }

    alias = m->aliases.elts;

    for (i = 0; i < m->aliases.nelts; i++) {
        if (ngx_http_infer_list_match(filter, alias[i].data, alias[i].len)) {
            return 1;
        }
    }

    return 0;
}


/*
 * infer_model_list [filter];
 */

char *
ngx_http_infer_route_list(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_infer_route_loc_conf_t *rlcf = conf;

    ngx_str_t                         *value;
    ngx_http_core_loc_conf_t          *clcf;
    ngx_http_compile_complex_value_t   ccv;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler == ngx_http_infer_route_list_handler) {
        return "is duplicate";
    }

    clcf->handler = ngx_http_infer_route_list_handler;
    rlcf->list = 1;

    if (cf->args->nelts == 1) {
        return NGX_CONF_OK;
    }

    value = cf->args->elts;

    rlcf->list_filter = ngx_palloc(cf->pool,
                                   sizeof(ngx_http_complex_value_t));
    if (rlcf->list_filter == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &value[1];
    ccv.complex_value = rlcf->list_filter;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}

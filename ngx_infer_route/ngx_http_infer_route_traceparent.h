/*
 * Copyright (C) ngx_infer authors
 *
 * The traceparent parser: pure, for the route module and its fuzzer.
 */


#ifndef _NGX_HTTP_INFER_ROUTE_TRACEPARENT_H_INCLUDED_
#define _NGX_HTTP_INFER_ROUTE_TRACEPARENT_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


#define NGX_HTTP_INFER_ROUTE_TRACEPARENT_LEN  55


/* a valid traceparent's fields, pointing into the header's value */

typedef struct {
    u_char                        *trace_id;    /* 32 hex digits */
    u_char                        *parent_id;   /* 16 */
    u_char                        *flags;       /* 2 */
} ngx_http_infer_route_traceparent_t;


ngx_int_t ngx_http_infer_route_traceparent_parse(u_char *p, size_t len,
    ngx_http_infer_route_traceparent_t *tp);


#endif /* _NGX_HTTP_INFER_ROUTE_TRACEPARENT_H_INCLUDED_ */

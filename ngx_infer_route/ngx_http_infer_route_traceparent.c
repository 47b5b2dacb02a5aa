/*
 * Copyright (C) ngx_infer authors
 *
 * W3C Trace Context's traceparent header, read: no nginx request, no
 * allocation, for ngx_http_infer_route_trace.c and the fuzzer
 * (t/unit/route_traceparent_fuzz.c).
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include "ngx_http_infer_route_traceparent.h"


/*
 * A traceparent header, version 00 as W3C Trace Context defines it:
 * "00-" 32 lowercase hex digits (the trace, not all zero) "-" 16 (the
 * parent span, not all zero) "-" 2 (the flags).  A later version is read
 * the same way when its first 55 bytes have that shape and what follows
 * starts with "-"; version ff is invalid.  A pure parser, for the fuzzer.
 */

ngx_int_t
ngx_http_infer_route_traceparent_parse(u_char *p, size_t len,
    ngx_http_infer_route_traceparent_t *tp)
{
    size_t       i;
    ngx_uint_t   zero;

    if (len < NGX_HTTP_INFER_ROUTE_TRACEPARENT_LEN) {
        return NGX_DECLINED;
    }

    for (i = 0; i < NGX_HTTP_INFER_ROUTE_TRACEPARENT_LEN; i++) {
        if (i == 2 || i == 35 || i == 52) {
            if (p[i] != '-') {
                return NGX_DECLINED;
            }

            continue;
        }

        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f')))
        {
            return NGX_DECLINED;
        }
    }

    if (p[0] == 'f' && p[1] == 'f') {
        return NGX_DECLINED;
    }

    if ((p[0] == '0' && p[1] == '0')
        ? len != NGX_HTTP_INFER_ROUTE_TRACEPARENT_LEN
        : len > NGX_HTTP_INFER_ROUTE_TRACEPARENT_LEN
          && p[NGX_HTTP_INFER_ROUTE_TRACEPARENT_LEN] != '-')
    {
        return NGX_DECLINED;
    }

    tp->trace_id = p + 3;
    tp->parent_id = p + 36;
    tp->flags = p + 53;

    /* neither id may be all zero */

    for (zero = 1, i = 0; i < 32; i++) {
        zero &= (tp->trace_id[i] == '0');
    }

    if (zero) {
        return NGX_DECLINED;
    }

    for (zero = 1, i = 0; i < 16; i++) {
        zero &= (tp->parent_id[i] == '0');
    }

    return zero ? NGX_DECLINED : NGX_OK;
}


/*
 * Copyright (C) ngx_infer authors
 *
 * The Redis client of the rate-limit module (not yet: local mode only).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer_ratelimit.h"


char *
ngx_http_infer_ratelimit_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    return "is not supported yet";
}


ngx_int_t
ngx_http_infer_ratelimit_redis_eval(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_redis_conf_t *rcf, u_char mode,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n,
    ngx_http_infer_ratelimit_done_pt done)
{
    return NGX_DECLINED;
}


ngx_int_t
ngx_http_infer_ratelimit_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_redis_conf_t *rcf)
{
    return NGX_OK;
}


void
ngx_http_infer_ratelimit_redis_exit_process(ngx_cycle_t *cycle)
{
}

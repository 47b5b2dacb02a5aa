
/*
 * Copyright (C) ngx_infer authors
 *
 * Usage events: one record per finished request, appended to a Redis
 * Stream (XADD key MAXLEN ~ n * field value ...) over the rate-limit
 * module's connection, for billing and analytics.
 *
 * Off the request's path: the LOG phase writes the record, already in
 * Redis's protocol, into a buffer of the worker's; the buffer goes to
 * hiredis as a pipeline when it holds "batch" events or its oldest has
 * waited "flush".  Nothing waits for Redis: an event that finds the
 * buffer full (Redis down, or slower than the traffic) is dropped and
 * counted.  The memory is bounded by "queue": the buffer's bytes, and as
 * many again of events sent and not yet answered.
 *
 * The record's fields are the schema's, version 1 (docs/ratelimit.md):
 * each is a variable of ours (or nginx's), read by index, or a figure of
 * the request's; a field whose module is not loaded is empty.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_ratelimit.h"


#define NGX_HTTP_INFER_EV_VERSION     "1"

/* the longest value a field carries; a longer one is cut */
#define NGX_HTTP_INFER_EV_VALUE_MAX   256

#define NGX_HTTP_INFER_EV_VAR         0   /* the first variable found */
#define NGX_HTTP_INFER_EV_MS          1   /* a variable in seconds, in ms */
#define NGX_HTTP_INFER_EV_VERSION_F   2
#define NGX_HTTP_INFER_EV_TIME        3
#define NGX_HTTP_INFER_EV_DURATION    4
#define NGX_HTTP_INFER_EV_IN_BYTES    5
#define NGX_HTTP_INFER_EV_OUT_BYTES   6
#define NGX_HTTP_INFER_EV_GATEWAY     7

#define NGX_HTTP_INFER_EV_WRITTEN     0
#define NGX_HTTP_INFER_EV_DROPPED     1
#define NGX_HTTP_INFER_EV_FAILED      2
#define NGX_HTTP_INFER_EV_OUTCOMES    3


typedef struct {
    const char                 *name;
    ngx_uint_t                  type;
    const char                 *var[2];
} ngx_http_infer_ratelimit_events_def_t;


typedef struct {
    ngx_str_t                   head;       /* "$4\r\ntime\r\n" */
    ngx_uint_t                  type;
    ngx_int_t                   index[2];   /* or NGX_DECLINED */
} ngx_http_infer_ratelimit_events_field_t;


/* the counts, for all workers, across reloads */

typedef struct {
    ngx_atomic_t                outcome[NGX_HTTP_INFER_EV_OUTCOMES];
} ngx_http_infer_ratelimit_events_sh_t;


typedef struct {
    ngx_http_infer_ratelimit_events_conf_t  *ecf;
    ngx_http_infer_ratelimit_events_sh_t    *sh;
    ngx_event_t                 timer;
    u_char                     *buf;        /* [4-byte length, event]... */
    size_t                      len;
    ngx_uint_t                  n;
    size_t                      inflight;   /* bytes hiredis holds */
    ngx_uint_t                  pending;    /* events not yet answered */
    ngx_msec_t                  waited;     /* since the last answer */
    ngx_msec_t                  timeout;    /* Redis's */
    ngx_uint_t                  slot;       /* the stream's, in a cluster */
    ngx_str_t                   gateway;
} ngx_http_infer_ratelimit_events_t;


static ngx_int_t ngx_http_infer_ratelimit_events_log(ngx_http_request_t *r);
static u_char *ngx_http_infer_ratelimit_events_value(ngx_http_request_t *r,
    u_char *p, ngx_http_infer_ratelimit_events_field_t *f);
static void ngx_http_infer_ratelimit_events_flush(
    ngx_http_infer_ratelimit_events_t *ev);
static void ngx_http_infer_ratelimit_events_timer(ngx_event_t *e);
static void ngx_http_infer_ratelimit_events_reply(redisAsyncContext *ac,
    void *reply, void *data);
static void ngx_http_infer_ratelimit_events_count(ngx_uint_t outcome,
    ngx_uint_t n);
static ngx_int_t ngx_http_infer_ratelimit_events_init_zone(
    ngx_shm_zone_t *shm_zone, void *data);
static size_t ngx_http_infer_ratelimit_events_size(void *conf);
static u_char *ngx_http_infer_ratelimit_events_write(void *conf, u_char *p,
    ngx_http_infer_export_meta_pt meta, ngx_uint_t om);


static ngx_http_infer_ratelimit_events_def_t
    ngx_http_infer_ratelimit_events_schema[] = {

    { "v", NGX_HTTP_INFER_EV_VERSION_F, { NULL, NULL } },
    { "time", NGX_HTTP_INFER_EV_TIME, { NULL, NULL } },
    { "request_id", NGX_HTTP_INFER_EV_VAR,
      { "infer_request_id", "request_id" } },
    { "trace_id", NGX_HTTP_INFER_EV_VAR, { "infer_trace_id", NULL } },
    { "gateway", NGX_HTTP_INFER_EV_GATEWAY, { NULL, NULL } },
    { "tenant", NGX_HTTP_INFER_EV_VAR, { "infer_tenant", NULL } },
    { "key_id", NGX_HTTP_INFER_EV_VAR, { "infer_key_id", NULL } },
    { "subject", NGX_HTTP_INFER_EV_VAR, { "infer_subject", NULL } },
    { "model", NGX_HTTP_INFER_EV_VAR, { "infer_model", NULL } },
    { "model_served", NGX_HTTP_INFER_EV_VAR, { "infer_model_target", NULL } },
    { "pool", NGX_HTTP_INFER_EV_VAR, { "infer_upstream", NULL } },
    { "endpoint", NGX_HTTP_INFER_EV_VAR,
      { "infer_endpoint", "upstream_addr" } },
    { "status", NGX_HTTP_INFER_EV_VAR, { "status", NULL } },
    { "stream", NGX_HTTP_INFER_EV_VAR, { "infer_stream", NULL } },
    { "prompt_tokens", NGX_HTTP_INFER_EV_VAR,
      { "infer_usage_prompt_tokens", NULL } },
    { "completion_tokens", NGX_HTTP_INFER_EV_VAR,
      { "infer_usage_completion_tokens", NULL } },
    { "cached_tokens", NGX_HTTP_INFER_EV_VAR,
      { "infer_usage_cached_tokens", NULL } },
    { "reasoning_tokens", NGX_HTTP_INFER_EV_VAR,
      { "infer_usage_reasoning_tokens", NULL } },
    { "estimated", NGX_HTTP_INFER_EV_VAR, { "infer_usage_estimated", NULL } },
    { "ttft_ms", NGX_HTTP_INFER_EV_MS, { "infer_ttft", NULL } },
    { "duration_ms", NGX_HTTP_INFER_EV_DURATION, { NULL, NULL } },
    { "request_bytes", NGX_HTTP_INFER_EV_IN_BYTES, { NULL, NULL } },
    { "response_bytes", NGX_HTTP_INFER_EV_OUT_BYTES, { NULL, NULL } },
    { "cost", NGX_HTTP_INFER_EV_VAR, { "infer_cost", NULL } },
    { NULL, 0, { NULL, NULL } }
};


static ngx_http_infer_ratelimit_events_t  ngx_http_infer_ratelimit_events;


/*
 * infer_usage_events_stream key [maxlen=N] [queue=size] [batch=N]
 *     [flush=time];
 */

char *
ngx_http_infer_ratelimit_events_stream(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_ratelimit_main_conf_t  *rmcf = conf;

    ssize_t                                  size;
    ngx_int_t                                n;
    ngx_str_t                               *value, s;
    ngx_uint_t                               i;
    ngx_msec_t                               ms;
    ngx_http_infer_ratelimit_events_conf_t  *ecf;

    if (rmcf->events) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 0 || value[1].len > 512) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_usage_events_stream: the stream's key "
                           "must be 1 to 512 bytes");
        return NGX_CONF_ERROR;
    }

    ecf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_ratelimit_events_conf_t));
    if (ecf == NULL) {
        return NGX_CONF_ERROR;
    }

    ecf->key = value[1];
    ecf->maxlen = 1000000;
    ecf->queue = 256 * 1024;
    ecf->batch = 64;
    ecf->flush = 100;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "maxlen=", 7) == 0) {
            n = ngx_atoi(value[i].data + 7, value[i].len - 7);
            if (n == NGX_ERROR) {
                goto invalid;
            }

            ecf->maxlen = (ngx_uint_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "queue=", 6) == 0) {
            s.data = value[i].data + 6;
            s.len = value[i].len - 6;

            size = ngx_parse_size(&s);
            if (size < 16 * 1024 || size > 256 * 1024 * 1024) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "infer_usage_events_stream: \"%V\": the "
                                   "queue must be 16k to 256m", &value[i]);
                return NGX_CONF_ERROR;
            }

            ecf->queue = (size_t) size;
            continue;
        }

        if (ngx_strncmp(value[i].data, "batch=", 6) == 0) {
            n = ngx_atoi(value[i].data + 6, value[i].len - 6);
            if (n < 1 || n > 10000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "infer_usage_events_stream: \"%V\": a "
                                   "batch is 1 to 10000 events", &value[i]);
                return NGX_CONF_ERROR;
            }

            ecf->batch = (ngx_uint_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "flush=", 6) == 0) {
            ms = ngx_http_infer_param_msec(&value[i], 6);
            if (ms == (ngx_msec_t) NGX_ERROR || ms == 0 || ms > 60000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "infer_usage_events_stream: \"%V\": "
                                   "flush is 1ms to 60s", &value[i]);
                return NGX_CONF_ERROR;
            }

            ecf->flush = ms;
            continue;
        }

        goto invalid;
    }

    rmcf->events = ecf;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "infer_usage_events_stream: invalid parameter \"%V\"",
                       &value[i]);
    return NGX_CONF_ERROR;
}


/*
 * Postconfiguration: the fields' variables by index, the command's
 * fixed head, the counts' zone, the LOG handler.
 */

ngx_int_t
ngx_http_infer_ratelimit_events_init(ngx_conf_t *cf,
    ngx_http_infer_ratelimit_main_conf_t *rmcf)
{
    u_char                                   *p, num[NGX_INT_T_LEN];
    size_t                                    len;
    ngx_str_t                                 name;
    ngx_uint_t                                k, nargs;
    ngx_http_handler_pt                      *h;
    ngx_http_core_main_conf_t                *cmcf;
    ngx_http_infer_ratelimit_events_def_t    *def;
    ngx_http_infer_ratelimit_events_conf_t   *ecf;
    ngx_http_infer_ratelimit_events_field_t  *f;

    static ngx_str_t  zone = ngx_string("infer_usage_events");

    ecf = rmcf->events;

    if (ecf == NULL) {
        return NGX_OK;
    }

    if (rmcf->redis == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "infer_usage_events_stream needs "
                      "infer_ratelimit_redis: the events go over its "
                      "connection");
        return NGX_ERROR;
    }

    if (ngx_array_init(&ecf->fields, cf->pool, 32,
                       sizeof(ngx_http_infer_ratelimit_events_field_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* "$<len>\r\n<value>\r\n" at most, per field */
    ecf->max = 0;

    for (def = ngx_http_infer_ratelimit_events_schema; def->name; def++) {
        f = ngx_array_push(&ecf->fields);
        if (f == NULL) {
            return NGX_ERROR;
        }

        len = ngx_strlen(def->name);

        f->head.data = ngx_pnalloc(cf->pool, len + 2 * NGX_INT_T_LEN);
        if (f->head.data == NULL) {
            return NGX_ERROR;
        }

        f->head.len = ngx_sprintf(f->head.data, "$%uz\r\n%s\r\n", len,
                                  def->name)
                      - f->head.data;
        f->type = def->type;

        for (k = 0; k < 2; k++) {
            f->index[k] = NGX_DECLINED;

            if (def->var[k] == NULL) {
                continue;
            }

            name.data = (u_char *) def->var[k];
            name.len = ngx_strlen(def->var[k]);

            f->index[k] = ngx_http_infer_variable_index(cf, &name);
            if (f->index[k] == NGX_ERROR) {
                return NGX_ERROR;
            }
        }

        ecf->max += f->head.len + sizeof("$256\r\n\r\n") - 1
                    + NGX_HTTP_INFER_EV_VALUE_MAX;
    }

    /* *<n>\r\n$4\r\nXADD\r\n$<len>\r\n<key>\r\n[MAXLEN ~ <n>] $1\r\n*\r\n */

    nargs = 3 + 2 * ecf->fields.nelts + (ecf->maxlen ? 3 : 0);

    ecf->head.data = ngx_pnalloc(cf->pool, ecf->key.len + 128);
    if (ecf->head.data == NULL) {
        return NGX_ERROR;
    }

    p = ngx_sprintf(ecf->head.data, "*%ui\r\n$4\r\nXADD\r\n$%uz\r\n%V\r\n",
                    nargs, ecf->key.len, &ecf->key);

    if (ecf->maxlen) {
        len = ngx_sprintf(num, "%ui", ecf->maxlen) - num;
        p = ngx_sprintf(p, "$6\r\nMAXLEN\r\n$1\r\n~\r\n$%uz\r\n%*s\r\n",
                        len, len, num);
    }

    p = ngx_cpymem(p, "$1\r\n*\r\n", 7);
    ecf->head.len = p - ecf->head.data;

    /* and its length ahead of it, aligned to 4 */
    ecf->max += ecf->head.len + 4 + 3;

    ecf->stats = ngx_shared_memory_add(cf, &zone, 8 * ngx_pagesize,
                                       &ngx_http_infer_ratelimit_module);
    if (ecf->stats == NULL) {
        return NGX_ERROR;
    }

    ecf->stats->init = ngx_http_infer_ratelimit_events_init_zone;

    rmcf->export.size = ngx_http_infer_ratelimit_events_size;
    rmcf->export.write = ngx_http_infer_ratelimit_events_write;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_infer_ratelimit_events_log;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_ratelimit_events_init_zone(ngx_shm_zone_t *shm_zone,
    void *data)
{
    return ngx_http_infer_shm_struct(shm_zone, data,
                               sizeof(ngx_http_infer_ratelimit_events_sh_t));
}


ngx_int_t
ngx_http_infer_ratelimit_events_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_events_conf_t *ecf)
{
    ngx_http_infer_ratelimit_events_t     *ev;
    ngx_http_infer_ratelimit_main_conf_t  *rmcf;

    ev = &ngx_http_infer_ratelimit_events;

    ngx_memzero(ev, sizeof(ngx_http_infer_ratelimit_events_t));

    ev->buf = ngx_alloc(ecf->queue, cycle->log);
    if (ev->buf == NULL) {
        return NGX_ERROR;
    }

    rmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                           ngx_http_infer_ratelimit_module);

    ev->ecf = ecf;
    ev->timeout = rmcf->redis->timeout;
    ev->sh = ecf->stats->data;
    ev->gateway = cycle->hostname;
    ev->slot = ngx_http_infer_ratelimit_slot(ecf->key.data, ecf->key.len);

    ev->timer.handler = ngx_http_infer_ratelimit_events_timer;
    ev->timer.data = ev;
    ev->timer.log = cycle->log;

    /* a worker told to quit does not wait for a flush (see quit below) */
    ev->timer.cancelable = 1;

    return NGX_OK;
}


/*
 * The worker is told to quit, and its Redis connection is open: what is
 * queued is sent now, and the worker waits for the answers, at most the
 * Redis timeout (the timer is no longer cancelable).
 */

void
ngx_http_infer_ratelimit_events_quit(void)
{
    ngx_http_infer_ratelimit_events_t  *ev;

    ev = &ngx_http_infer_ratelimit_events;

    if (ev->ecf == NULL) {
        return;
    }

    ngx_http_infer_ratelimit_events_flush(ev);

    if (ev->pending) {
        if (ev->timer.timer_set) {
            ngx_del_timer(&ev->timer);
        }

        ev->timer.cancelable = 0;
        ngx_add_timer(&ev->timer, ngx_min(ev->timeout, ev->ecf->flush));
    }
}


/* what is still queued is lost: counted; hiredis fails what it holds */

void
ngx_http_infer_ratelimit_events_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_infer_ratelimit_events_t  *ev;

    ev = &ngx_http_infer_ratelimit_events;

    if (ev->ecf == NULL) {
        return;
    }

    ngx_http_infer_ratelimit_events_count(NGX_HTTP_INFER_EV_DROPPED, ev->n);

    if (ev->timer.timer_set) {
        ngx_del_timer(&ev->timer);
    }

    ngx_free(ev->buf);

    ev->buf = NULL;
    ev->n = 0;
    ev->len = 0;
    ev->ecf = NULL;
}


static ngx_int_t
ngx_http_infer_ratelimit_events_log(ngx_http_request_t *r)
{
    u_char                                   *p, *start;
    ngx_uint_t                                i;
    ngx_http_infer_ratelimit_events_t        *ev;
    ngx_http_infer_ratelimit_loc_conf_t      *lcf;
    ngx_http_infer_ratelimit_events_conf_t   *ecf;
    ngx_http_infer_ratelimit_events_field_t  *f;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_ratelimit_module);

    if (!lcf->events) {
        return NGX_DECLINED;
    }

    ev = &ngx_http_infer_ratelimit_events;
    ecf = ev->ecf;

    if (ecf == NULL) {
        return NGX_DECLINED;
    }

    if (ev->len + ecf->max > ecf->queue) {
        ngx_http_infer_ratelimit_events_flush(ev);

        if (ev->len + ecf->max > ecf->queue) {
            ngx_http_infer_ratelimit_events_count(NGX_HTTP_INFER_EV_DROPPED,
                                                  1);
            return NGX_DECLINED;
        }
    }

    start = ev->buf + ev->len;
    p = ngx_cpymem(start + 4, ecf->head.data, ecf->head.len);

    f = ecf->fields.elts;

    for (i = 0; i < ecf->fields.nelts; i++) {
        p = ngx_cpymem(p, f[i].head.data, f[i].head.len);
        p = ngx_http_infer_ratelimit_events_value(r, p, &f[i]);
    }

    /* the length ahead of the event, in the host's order */
    *(uint32_t *) start = (uint32_t) (p - start - 4);

    ev->len = ngx_align(p - ev->buf, 4);
    ev->n++;

    if (ev->n >= ecf->batch || ngx_exiting || ngx_quit) {
        ngx_http_infer_ratelimit_events_flush(ev);

    } else {
        /* connected ahead of the flush, and told if the worker quits */
        (void) ngx_http_infer_ratelimit_redis_open();
    }

    if (!ev->timer.timer_set && (ev->n || ev->pending)) {
        ngx_add_timer(&ev->timer, ecf->flush);
    }

    return NGX_DECLINED;
}


/* one field's "$<len>\r\n<value>\r\n" */

static u_char *
ngx_http_infer_ratelimit_events_value(ngx_http_request_t *r, u_char *p,
    ngx_http_infer_ratelimit_events_field_t *f)
{
    u_char                     *s, *last, num[NGX_TIME_T_LEN + 8];
    size_t                      len;
    uint64_t                    ms;
    ngx_uint_t                  k, digits;
    ngx_time_t                 *tp;
    ngx_msec_int_t              d;
    ngx_http_variable_value_t  *vv;

    s = num;
    len = 0;

    switch (f->type) {

    case NGX_HTTP_INFER_EV_VERSION_F:
        s = (u_char *) NGX_HTTP_INFER_EV_VERSION;
        len = sizeof(NGX_HTTP_INFER_EV_VERSION) - 1;
        break;

    case NGX_HTTP_INFER_EV_TIME:
        tp = ngx_timeofday();
        len = ngx_sprintf(num, "%T%03M", tp->sec, tp->msec) - num;
        break;

    case NGX_HTTP_INFER_EV_DURATION:
        tp = ngx_timeofday();
        d = (ngx_msec_int_t) ((tp->sec - r->start_sec) * 1000
                              + (tp->msec - r->start_msec));
        len = ngx_sprintf(num, "%M", (ngx_msec_t) ngx_max(d, 0)) - num;
        break;

    case NGX_HTTP_INFER_EV_IN_BYTES:
        len = ngx_sprintf(num, "%O", r->request_length) - num;
        break;

    case NGX_HTTP_INFER_EV_OUT_BYTES:
        len = ngx_sprintf(num, "%O", r->connection->sent) - num;
        break;

    case NGX_HTTP_INFER_EV_GATEWAY:
        s = ngx_http_infer_ratelimit_events.gateway.data;
        len = ngx_http_infer_ratelimit_events.gateway.len;
        break;

    default: /* a variable */

        for (k = 0; k < 2; k++) {
            vv = ngx_http_infer_variable(r, f->index[k]);

            if (vv && vv->len) {
                s = vv->data;
                len = vv->len;
                break;
            }
        }

        if (len == 0 || f->type != NGX_HTTP_INFER_EV_MS) {
            break;
        }

        /* "0.123" seconds: 123 ms; anything else: empty */

        last = s + len;
        ms = 0;

        while (s < last && *s >= '0' && *s <= '9' && ms < 1000000000) {
            ms = ms * 10 + (*s++ - '0');
        }

        digits = 0;

        if (s < last && *s == '.') {
            for (s++; s < last && digits < 3 && *s >= '0' && *s <= '9'; s++)
            {
                ms = ms * 10 + (*s - '0');
                digits++;
            }
        }

        for ( /* void */ ; digits < 3; digits++) {
            ms *= 10;
        }

        if (s != last) {
            len = 0;
            break;
        }

        s = num;
        len = ngx_sprintf(num, "%uL", ms) - num;
        break;
    }

    len = ngx_min(len, NGX_HTTP_INFER_EV_VALUE_MAX);

    p = ngx_sprintf(p, "$%uz\r\n", len);
    p = ngx_cpymem(p, s, len);
    *p++ = '\r';
    *p++ = '\n';

    return p;
}


/*
 * Hands hiredis every event queued, in one pipeline (one write), unless
 * as many bytes as the queue holds are already sent and unanswered: then
 * they wait, and new ones find the buffer full.
 */

static void
ngx_http_infer_ratelimit_events_flush(ngx_http_infer_ratelimit_events_t *ev)
{
    u_char      *p, *last;
    size_t       len;
    uint32_t     n;
    ngx_uint_t   sent;

    if (ev->n == 0 || ev->inflight + ev->len > ev->ecf->queue) {
        return;
    }

    p = ev->buf;
    last = ev->buf + ev->len;
    sent = 0;
    len = 0;

    while (p < last) {
        n = *(uint32_t *) p;

        if (ngx_http_infer_ratelimit_redis_send(ev->slot, p + 4, n,
                                   ngx_http_infer_ratelimit_events_reply,
                                   (void *) (uintptr_t) n)
            != NGX_OK)
        {
            break;
        }

        if (ev->pending == 0) {
            ev->waited = ngx_current_msec;
        }

        ev->inflight += n;
        ev->pending++;
        sent++;

        p += ngx_align(n + 4, 4);
    }

    if (sent == 0) {
        return;
    }

    len = last - p;

    if (len) {
        ngx_memmove(ev->buf, p, len);
    }

    ev->len = len;
    ev->n -= sent;
}


/*
 * The flush timer: sends what waited, drops the connection when Redis
 * left events unanswered longer than its timeout, and, in a worker told
 * to quit, gives up what cannot be sent.
 */

static void
ngx_http_infer_ratelimit_events_timer(ngx_event_t *e)
{
    ngx_http_infer_ratelimit_events_t  *ev = e->data;

    ngx_msec_t  timeout;

    timeout = ev->timeout;

    if (ev->pending
        && ngx_current_msec - ev->waited > timeout)
    {
        /* the reset fails them: the replies come as NULL, and count */
        ngx_http_infer_ratelimit_redis_reset(ev->slot,
                                             "usage events unanswered");
    }

    ngx_http_infer_ratelimit_events_flush(ev);

    if ((ngx_exiting || ngx_quit) && ev->n) {
        /* it cannot wait for a Redis that is not there */
        ngx_http_infer_ratelimit_events_count(NGX_HTTP_INFER_EV_DROPPED,
                                              ev->n);
        ev->n = 0;
        ev->len = 0;
    }

    if (ev->n || ev->pending) {
        ngx_add_timer(&ev->timer, ev->n ? ev->ecf->flush
                                        : ngx_min(timeout, ev->ecf->flush));
    }
}


static void
ngx_http_infer_ratelimit_events_reply(redisAsyncContext *ac, void *reply,
    void *data)
{
    redisReply                         *rr = reply;
    ngx_http_infer_ratelimit_events_t  *ev;

    ev = &ngx_http_infer_ratelimit_events;

    if (ev->ecf == NULL) {
        /* the worker's exit, after ours */
        ngx_http_infer_ratelimit_events_count(NGX_HTTP_INFER_EV_DROPPED, 1);
        return;
    }

    ev->inflight -= (uintptr_t) data;
    ev->pending--;
    ev->waited = ngx_current_msec;

    if (rr == NULL) {
        ngx_http_infer_ratelimit_events_count(NGX_HTTP_INFER_EV_DROPPED, 1);

    } else if (rr->type == REDIS_REPLY_ERROR) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "infer usage events: XADD to \"%V\" failed: %*s",
                      &ev->ecf->key, (size_t) ngx_min(rr->len, 256),
                      (u_char *) rr->str);
        ngx_http_infer_ratelimit_events_count(NGX_HTTP_INFER_EV_FAILED, 1);

        /* in a cluster, the stream's slot moved: the next go there */
        ngx_http_infer_ratelimit_redis_moved(rr);

    } else {
        ngx_http_infer_ratelimit_events_count(NGX_HTTP_INFER_EV_WRITTEN, 1);
    }

    if ((ngx_exiting || ngx_quit) && ev->pending == 0 && ev->n == 0
        && ev->timer.timer_set)
    {
        /* all answered: the worker need not wait */
        ngx_del_timer(&ev->timer);
    }
}


static void
ngx_http_infer_ratelimit_events_count(ngx_uint_t outcome, ngx_uint_t n)
{
    ngx_http_infer_ratelimit_events_sh_t  *sh;

    /* the zone stays mapped until the worker exits, after its exit hook */

    sh = ngx_http_infer_ratelimit_events.sh;

    if (n == 0 || sh == NULL) {
        return;
    }

    (void) ngx_atomic_fetch_add(&sh->outcome[outcome], n);
}


/* the metrics page's families */

static size_t
ngx_http_infer_ratelimit_events_size(void *conf)
{
    return 1024;
}


static u_char *
ngx_http_infer_ratelimit_events_write(void *conf, u_char *p,
    ngx_http_infer_export_meta_pt meta, ngx_uint_t om)
{
    ngx_http_infer_ratelimit_main_conf_t  *rmcf = conf;

    ngx_str_t                              name, help;
    ngx_http_infer_ratelimit_events_sh_t  *sh;

    if (rmcf->events == NULL || rmcf->events->stats->data == NULL) {
        return p;
    }

    sh = rmcf->events->stats->data;

    ngx_str_set(&name, "infer_usage_events");
    ngx_str_set(&help, "Usage events by outcome: written to the stream, "
                       "dropped (the queue full, Redis down or slow), "
                       "failed (Redis refused the XADD).");

    p = meta(p, &name, NGX_HTTP_INFER_EXPORT_COUNTER, &help, om);

    p = ngx_sprintf(p, "infer_usage_events_total{outcome=\"written\"} %uA\n"
                    "infer_usage_events_total{outcome=\"dropped\"} %uA\n"
                    "infer_usage_events_total{outcome=\"failed\"} %uA\n",
                    sh->outcome[NGX_HTTP_INFER_EV_WRITTEN],
                    sh->outcome[NGX_HTTP_INFER_EV_DROPPED],
                    sh->outcome[NGX_HTTP_INFER_EV_FAILED]);

    return p;
}

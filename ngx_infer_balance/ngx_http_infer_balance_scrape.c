/*
 * Copyright (C) ngx_infer authors
 *
 * The backends' own view of their load: every peer's Prometheus page
 * (vLLM, SGLang, TGI), read from nginx timers over non-blocking
 * connections, parsed as it arrives (ngx_http_infer_balance_signals.c) and
 * kept in the pool's shared zone for every worker's picks.  One worker
 * scrapes a pool per interval: the first whose timer claims the round.
 * A failed scrape changes nothing but a counter; the values it would
 * have replaced become stale with time, and the balancer then leaves
 * them out.  No peer is ever marked down from here.  Also here: the
 * directives that configure it, infer_balance_scrape and
 * infer_balance_signal.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_event_connect.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_balance.h"


#define NGX_HTTP_INFER_SCRAPE_BUF       16384
#define NGX_HTTP_INFER_SCRAPE_HEAD_MAX  8192
#define NGX_HTTP_INFER_SCRAPE_LINE      128
#define NGX_HTTP_INFER_SCRAPE_LOG_EVERY 10000

/* no signal value beyond this (thousandths): keeps the costs in 64 bits */
#define NGX_HTTP_INFER_SCRAPE_VALUE_MAX 1000000000


typedef enum {
    ngx_http_infer_scrape_status = 0,
    ngx_http_infer_scrape_header,
    ngx_http_infer_scrape_body
} ngx_http_infer_scrape_state_e;


typedef struct {
    ngx_http_infer_balance_srv_conf_t  *conf;
    ngx_http_infer_balance_node_t      *node;
    ngx_str_t                           name;       /* addr + uri, logs */

    ngx_peer_connection_t               pc;
    ngx_str_t                           request;
    size_t                              sent;

    ngx_http_infer_scrape_state_e       state;
    ngx_uint_t                          status;
    size_t                              head;       /* bytes of the head */
    size_t                              size;       /* bytes of the page */
    size_t                              line_len;
    u_char                              line[NGX_HTTP_INFER_SCRAPE_LINE];

    ngx_msec_t                          warned;     /* a failure was
                                                       logged, 0 */
    unsigned                            failing:1;  /* warned since the
                                                       last good scrape */

    ngx_http_infer_signals_t            signals;
    u_char                              buf[NGX_HTTP_INFER_SCRAPE_BUF];
} ngx_http_infer_scrape_peer_t;


typedef struct {
    ngx_event_t                         timer;
    ngx_log_t                           log;        /* for connections */
    ngx_http_infer_balance_srv_conf_t  *conf;
    ngx_uint_t                          number;
    ngx_http_infer_scrape_peer_t       *peer;
} ngx_http_infer_scrape_pool_t;


static void ngx_http_infer_scrape_timer(ngx_event_t *ev);
static void ngx_http_infer_scrape_start(ngx_http_infer_scrape_peer_t *sp);
static void ngx_http_infer_scrape_write(ngx_event_t *wev);
static void ngx_http_infer_scrape_read(ngx_event_t *rev);
static ngx_int_t ngx_http_infer_scrape_head(ngx_http_infer_scrape_peer_t *sp,
    u_char **pos, u_char *last);
static ngx_int_t ngx_http_infer_scrape_head_line(
    ngx_http_infer_scrape_peer_t *sp);
static void ngx_http_infer_scrape_done(ngx_http_infer_scrape_peer_t *sp);
static void ngx_http_infer_scrape_fail(ngx_http_infer_scrape_peer_t *sp,
    const char *why);
static void ngx_http_infer_scrape_close(ngx_http_infer_scrape_peer_t *sp);
static void ngx_http_infer_scrape_dummy(ngx_event_t *ev);


ngx_int_t
ngx_http_infer_balance_scrape_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_balance_srv_conf_t *bcf)
{
    u_char                            *p;
    size_t                             len;
    ngx_uint_t                         n;
    struct sockaddr                   *sa;
    ngx_http_upstream_rr_peer_t       *peer;
    ngx_http_upstream_rr_peers_t      *peers, *list;
    ngx_http_infer_scrape_peer_t      *sp;
    ngx_http_infer_scrape_pool_t      *sc;
    ngx_http_infer_balance_scrape_t   *scf;

    scf = bcf->scrape;
    peers = bcf->upstream->peer.data;

    sc = ngx_pcalloc(cycle->pool, sizeof(ngx_http_infer_scrape_pool_t));
    if (sc == NULL) {
        return NGX_ERROR;
    }

    /*
     * nginx logs a refused connect() at "error" level, on every try: the
     * scrapes report their failures themselves, once in a while
     */

    sc->log = *cycle->log;

    if (!(sc->log.log_level & NGX_LOG_DEBUG_ALL)) {
        sc->log.log_level = ngx_min(sc->log.log_level, NGX_LOG_CRIT);
    }

    sc->conf = bcf;
    sc->number = bcf->number;
    sc->peer = ngx_pcalloc(cycle->pool,
                           bcf->number * sizeof(ngx_http_infer_scrape_peer_t));
    if (sc->peer == NULL) {
        return NGX_ERROR;
    }

    n = 0;

    for (list = peers; list; list = list->next) {
        for (peer = list->peer; peer; peer = peer->next) {
            sp = &sc->peer[n];

            sp->conf = bcf;
            sp->pc.log = &sc->log;
            sp->node = &bcf->sh->node[n++];

            sa = ngx_palloc(cycle->pool, peer->socklen);
            if (sa == NULL) {
                return NGX_ERROR;
            }

            ngx_memcpy(sa, peer->sockaddr, peer->socklen);

            if (scf->port) {
                ngx_inet_set_port(sa, scf->port);
            }

            sp->pc.sockaddr = sa;
            sp->pc.socklen = peer->socklen;

            len = NGX_SOCKADDR_STRLEN + scf->uri.len;

            sp->name.data = ngx_pnalloc(cycle->pool, len);
            if (sp->name.data == NULL) {
                return NGX_ERROR;
            }

            sp->name.len = ngx_sock_ntop(sa, peer->socklen, sp->name.data,
                                         NGX_SOCKADDR_STRLEN, 1);
            sp->name.len = ngx_cpymem(sp->name.data + sp->name.len,
                                      scf->uri.data, scf->uri.len)
                           - sp->name.data;

            len = sizeof("GET  HTTP/1.0" CRLF "Host: " CRLF
                         "Accept: text/plain;version=0.0.4" CRLF
                         "User-Agent: nginx-infer-balance" CRLF
                         "Connection: close" CRLF CRLF)
                  + scf->uri.len + peer->name.len;

            p = ngx_pnalloc(cycle->pool, len);
            if (p == NULL) {
                return NGX_ERROR;
            }

            sp->request.data = p;

            p = ngx_sprintf(p, "GET %V HTTP/1.0" CRLF "Host: %V" CRLF
                            "Accept: text/plain;version=0.0.4" CRLF
                            "User-Agent: nginx-infer-balance" CRLF
                            "Connection: close" CRLF CRLF,
                            &scf->uri, &peer->name);

            sp->request.len = p - sp->request.data;
        }
    }

    sc->timer.handler = ngx_http_infer_scrape_timer;
    sc->timer.data = sc;
    sc->timer.log = cycle->log;
    sc->timer.cancelable = 1;

    /* the workers' first rounds spread over one interval */

    ngx_add_timer(&sc->timer, 1 + ngx_random() % scf->interval);

    return NGX_OK;
}


static void
ngx_http_infer_scrape_timer(ngx_event_t *ev)
{
    ngx_http_infer_scrape_pool_t  *sc = ev->data;

    ngx_uint_t                          i;
    ngx_msec_t                          now, next, interval;
    ngx_msec_int_t                      delay;
    ngx_http_infer_balance_shctx_t     *sh;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    sh = sc->conf->sh;
    interval = sc->conf->scrape->interval;
    now = ngx_current_msec;
    next = sh->scrape_next;

    /*
     * A round is due at "next"; one further away than an interval was
     * set before a reload that shortened the interval.
     */

    if (((ngx_msec_int_t) (now - next) >= 0
         || (ngx_msec_int_t) (next - now) > (ngx_msec_int_t) interval)
        && ngx_atomic_cmp_set(&sh->scrape_next, next, now + interval))
    {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ev->log, 0,
                       "infer balance scrape round, %ui peers", sc->number);

        for (i = 0; i < sc->number; i++) {
            ngx_http_infer_scrape_start(&sc->peer[i]);
        }
    }

    delay = (ngx_msec_int_t) (sh->scrape_next - now);

    if (delay <= 0 || (ngx_msec_t) delay > interval) {
        delay = interval;
    }

    ngx_add_timer(ev, (ngx_msec_t) delay + 1);
}


static void
ngx_http_infer_scrape_start(ngx_http_infer_scrape_peer_t *sp)
{
    ngx_int_t          rc;
    ngx_connection_t  *c;

    if (sp->pc.connection) {
        /* the previous round's scrape of this peer is still running */
        return;
    }

    sp->sent = 0;
    sp->state = ngx_http_infer_scrape_status;
    sp->status = 0;
    sp->head = 0;
    sp->size = 0;
    sp->line_len = 0;

    ngx_http_infer_signals_init(&sp->signals, &sp->conf->names);

    sp->pc.name = &sp->name;
    sp->pc.get = ngx_event_get_peer;
    sp->pc.log_error = NGX_ERROR_ERR;
    sp->pc.tries = 1;

    rc = ngx_event_connect_peer(&sp->pc);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        /* the connection, if any, is closed already */
        sp->pc.connection = NULL;
        ngx_http_infer_scrape_fail(sp, "connect() failed");
        return;
    }

    c = sp->pc.connection;
    c->data = sp;
    c->read->handler = ngx_http_infer_scrape_read;
    c->write->handler = ngx_http_infer_scrape_write;

    /*
     * a worker that quits closes it (ngx_close_idle_connections() sets
     * c->close and calls the read handler) rather than wait for the page
     */

    c->idle = 1;

    /* one deadline for the whole scrape */

    ngx_add_timer(c->read, sp->conf->scrape->timeout);

    if (rc == NGX_OK) {
        ngx_http_infer_scrape_write(c->write);
    }
}


static void
ngx_http_infer_scrape_write(ngx_event_t *wev)
{
    ssize_t                        n;
    ngx_connection_t              *c;
    ngx_http_infer_scrape_peer_t  *sp;

    c = wev->data;
    sp = c->data;

    while (sp->sent < sp->request.len) {
        n = c->send(c, sp->request.data + sp->sent,
                    sp->request.len - sp->sent);

        if (n == NGX_ERROR) {
            ngx_http_infer_scrape_fail(sp, "send() failed");
            return;
        }

        if (n == NGX_AGAIN || n == 0) {
            if (ngx_handle_write_event(wev, 0) != NGX_OK) {
                ngx_http_infer_scrape_fail(sp, "send() failed");
            }

            return;
        }

        sp->sent += n;
    }

    wev->handler = ngx_http_infer_scrape_dummy;

    /* no more write events (select and poll would report them forever) */

    if (ngx_handle_write_event(wev, 0) != NGX_OK) {
        ngx_http_infer_scrape_fail(sp, "send() failed");
    }
}


static void
ngx_http_infer_scrape_read(ngx_event_t *rev)
{
    u_char                        *pos;
    ssize_t                        n;
    ngx_connection_t              *c;
    ngx_http_infer_scrape_peer_t  *sp;

    c = rev->data;
    sp = c->data;

    if (c->close) {
        ngx_http_infer_scrape_close(sp);
        return;
    }

    if (rev->timedout) {
        ngx_http_infer_scrape_fail(sp, "timed out");
        return;
    }

    for ( ;; ) {
        n = c->recv(c, sp->buf, NGX_HTTP_INFER_SCRAPE_BUF);

        if (n == NGX_AGAIN) {
            if (ngx_handle_read_event(rev, 0) != NGX_OK) {
                ngx_http_infer_scrape_fail(sp, "recv() failed");
            }

            return;
        }

        if (n == NGX_ERROR) {
            ngx_http_infer_scrape_fail(sp, "recv() failed");
            return;
        }

        if (n == 0) {
            ngx_http_infer_scrape_done(sp);
            return;
        }

        pos = sp->buf;

        if (sp->state != ngx_http_infer_scrape_body
            && ngx_http_infer_scrape_head(sp, &pos, sp->buf + n) != NGX_OK)
        {
            return;
        }

        if (pos == sp->buf + n) {
            continue;
        }

        sp->size += sp->buf + n - pos;

        if (sp->size > NGX_HTTP_INFER_SCRAPE_PAGE_MAX) {
            ngx_http_infer_scrape_fail(sp, "page larger than 4 MB");
            return;
        }

        ngx_http_infer_signals_feed(&sp->signals, pos, sp->buf + n - pos);
    }
}


/*
 * The status line and the headers, line by line (the start of each line
 * kept, enough to read what matters).  NGX_ERROR when the scrape failed.
 */

static ngx_int_t
ngx_http_infer_scrape_head(ngx_http_infer_scrape_peer_t *sp, u_char **pos,
    u_char *last)
{
    u_char  *p, ch;

    for (p = *pos; p < last; p++) {
        ch = *p;

        if (++sp->head > NGX_HTTP_INFER_SCRAPE_HEAD_MAX) {
            ngx_http_infer_scrape_fail(sp, "header too long");
            return NGX_ERROR;
        }

        if (ch != LF) {
            if (ch != CR && sp->line_len < NGX_HTTP_INFER_SCRAPE_LINE) {
                sp->line[sp->line_len++] = ch;
            }

            continue;
        }

        if (ngx_http_infer_scrape_head_line(sp) != NGX_OK) {
            return NGX_ERROR;
        }

        sp->line_len = 0;

        if (sp->state == ngx_http_infer_scrape_body) {
            *pos = p + 1;
            return NGX_OK;
        }
    }

    *pos = last;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_scrape_head_line(ngx_http_infer_scrape_peer_t *sp)
{
    u_char     *line;
    size_t      len;
    ngx_uint_t  i;

    line = sp->line;
    len = sp->line_len;

    if (sp->state == ngx_http_infer_scrape_status) {

        /* "HTTP/1.x 200 ..." */

        if (len < 12 || ngx_strncmp(line, "HTTP/1.", 7) != 0
            || line[8] != ' ')
        {
            ngx_http_infer_scrape_fail(sp, "not an HTTP answer");
            return NGX_ERROR;
        }

        sp->status = ngx_atoi(&line[9], 3);

        if (sp->status != NGX_HTTP_OK) {
            ngx_http_infer_scrape_fail(sp, "status is not 200");
            return NGX_ERROR;
        }

        sp->state = ngx_http_infer_scrape_header;
        return NGX_OK;
    }

    if (len == 0) {
        sp->state = ngx_http_infer_scrape_body;
        return NGX_OK;
    }

    /* the page must come as it is: no chunks, no compression */

    if (len > sizeof("transfer-encoding:") - 1
        && ngx_strncasecmp(line, (u_char *) "transfer-encoding:",
                           sizeof("transfer-encoding:") - 1) == 0)
    {
        ngx_http_infer_scrape_fail(sp, "chunked answer");
        return NGX_ERROR;
    }

    if (len > sizeof("content-encoding:") - 1
        && ngx_strncasecmp(line, (u_char *) "content-encoding:",
                           sizeof("content-encoding:") - 1) == 0)
    {
        for (i = sizeof("content-encoding:") - 1; i < len; i++) {
            if (line[i] != ' ' && line[i] != '\t') {
                break;
            }
        }

        if (len - i != sizeof("identity") - 1
            || ngx_strncasecmp(&line[i], (u_char *) "identity",
                               sizeof("identity") - 1) != 0)
        {
            ngx_http_infer_scrape_fail(sp, "compressed answer");
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static void
ngx_http_infer_scrape_done(ngx_http_infer_scrape_peer_t *sp)
{
    int64_t                         v;
    ngx_uint_t                      i, n;
    ngx_msec_t                      now;
    ngx_http_infer_signals_t       *s;
    ngx_http_infer_balance_node_t  *node;

    if (sp->state != ngx_http_infer_scrape_body) {
        ngx_http_infer_scrape_fail(sp, "answer ended in its header");
        return;
    }

    s = &sp->signals;

    ngx_http_infer_signals_finish(s);

    if ((s->found & ((1 << NGX_HTTP_INFER_SIGNAL_QUEUE)
                     | (1 << NGX_HTTP_INFER_SIGNAL_RUNNING)
                     | (1 << NGX_HTTP_INFER_SIGNAL_KV))) == 0)
    {
        ngx_http_infer_scrape_fail(sp, "no queue, running or KV figure "
                                       "on the page");
        return;
    }

    node = sp->node;

    for (i = 0; i < 3; i++) {
        v = s->value[i];

        if (v < 0) {
            v = 0;

        } else if (v > NGX_HTTP_INFER_SCRAPE_VALUE_MAX) {
            v = NGX_HTTP_INFER_SCRAPE_VALUE_MAX;
        }

        if (i == NGX_HTTP_INFER_SIGNAL_KV && v > 1000) {
            /* a fraction: a server that reports a percentage is full */
            v = 1000;
        }

        node->value[i] = (ngx_atomic_uint_t) v;
    }

    if (s->found & (1 << NGX_HTTP_INFER_SIGNAL_LORA)) {
        n = ngx_min(s->nrunning, NGX_HTTP_INFER_SIGNALS_LORA_MAX);

        for (i = 0; i < n; i++) {
            node->lora[i] = s->running[i];
        }

        n = ngx_min(s->nwaiting, NGX_HTTP_INFER_SIGNALS_LORA_MAX);

        for (i = 0; i < n; i++) {
            node->lora[NGX_HTTP_INFER_SIGNALS_LORA_MAX + i] = s->waiting[i];
        }

        node->max_lora = s->max_lora;
        node->nrunning = s->nrunning;
        node->nwaiting = s->nwaiting;

    } else {
        /* a page without adapters: none held */
        node->nrunning = 0;
        node->nwaiting = 0;
        node->max_lora = 0;
    }

    node->found = s->found;

    now = ngx_current_msec;
    node->updated = now ? now : 1;

    (void) ngx_atomic_fetch_add(&node->scrapes, 1);

    ngx_http_infer_balance_scraped(sp->conf, node - sp->conf->sh->node, 0);

    if (sp->failing) {
        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "infer balance: scrape of \"%V\" works again",
                      &sp->name);
        sp->failing = 0;
    }

    ngx_log_debug4(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "infer balance scrape \"%V\": queue %L, running %L, "
                   "kv %L", &sp->name, s->value[0], s->value[1],
                   s->value[2]);

    ngx_http_infer_scrape_close(sp);
}


static void
ngx_http_infer_scrape_fail(ngx_http_infer_scrape_peer_t *sp,
    const char *why)
{
    ngx_msec_t  now;

    (void) ngx_atomic_fetch_add(&sp->node->failures, 1);

    ngx_http_infer_balance_scraped(sp->conf, sp->node - sp->conf->sh->node,
                                   1);

    now = ngx_current_msec;

    /* at most once per 10 s, however often the peer recovers */

    if (sp->warned == 0
        || now - sp->warned >= NGX_HTTP_INFER_SCRAPE_LOG_EVERY)
    {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "infer balance: scrape of \"%V\" failed: %s",
                      &sp->name, why);
        sp->warned = now ? now : 1;
        sp->failing = 1;
    }

    ngx_http_infer_scrape_close(sp);
}


static void
ngx_http_infer_scrape_close(ngx_http_infer_scrape_peer_t *sp)
{
    if (sp->pc.connection) {
        ngx_close_connection(sp->pc.connection);
        sp->pc.connection = NULL;
    }
}


static void
ngx_http_infer_scrape_dummy(ngx_event_t *ev)
{
}


char *
ngx_http_infer_balance_scrape(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_infer_balance_srv_conf_t  *bcf = conf;

    ngx_int_t                         n;
    ngx_str_t                        *value;
    ngx_uint_t                        i;
    ngx_msec_t                        ms, stale;
    ngx_http_infer_balance_scrape_t  *scf;

    if (bcf->scrape) {
        return "is duplicate";
    }

    scf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_balance_scrape_t));
    if (scf == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_str_set(&scf->uri, "/metrics");
    scf->interval = 200;
    scf->timeout = 1000;
    stale = NGX_CONF_UNSET_MSEC;

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {

        if (value[i].data[0] == '/') {
            if (i != 1) {
                goto invalid;
            }

            for (n = 0; n < (ngx_int_t) value[i].len; n++) {
                if (value[i].data[n] <= ' ' || value[i].data[n] == 0x7f) {
                    goto invalid;
                }
            }

            scf->uri = value[i];
            continue;
        }

        if (ngx_strncmp(value[i].data, "port=", 5) == 0) {
            n = ngx_atoi(value[i].data + 5, value[i].len - 5);

            if (n < 1 || n > 65535) {
                goto invalid;
            }

            scf->port = (in_port_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "interval=", 9) == 0) {
            ms = ngx_http_infer_param_msec(&value[i], 9);

            if (ms == (ngx_msec_t) NGX_ERROR || ms < 10 || ms > 60000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid interval \"%V\": from 10ms "
                                   "to 60s", &value[i]);
                return NGX_CONF_ERROR;
            }

            scf->interval = ms;
            continue;
        }

        if (ngx_strncmp(value[i].data, "timeout=", 8) == 0) {
            ms = ngx_http_infer_param_msec(&value[i], 8);

            if (ms == (ngx_msec_t) NGX_ERROR || ms < 1 || ms > 600000) {
                goto invalid;
            }

            scf->timeout = ms;
            continue;
        }

        if (ngx_strncmp(value[i].data, "stale=", 6) == 0) {
            stale = ngx_http_infer_param_msec(&value[i], 6);

            if (stale == (ngx_msec_t) NGX_ERROR || stale > 3600000) {
                goto invalid;
            }

            continue;
        }

        goto invalid;
    }

    if (stale == NGX_CONF_UNSET_MSEC) {
        stale = ngx_max(2000, 3 * scf->interval);
    }

    if (stale < scf->interval) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "stale=%M is shorter than interval=%M",
                           stale, scf->interval);
        return NGX_CONF_ERROR;
    }

    scf->stale = stale;
    bcf->scrape = scf;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);
    return NGX_CONF_ERROR;
}


char *
ngx_http_infer_balance_signal(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_infer_balance_srv_conf_t  *bcf = conf;

    u_char       c;
    ngx_str_t   *value;
    ngx_uint_t   i, k, j;

    value = cf->args->elts;

    for (k = 0; k < NGX_HTTP_INFER_SIGNALS; k++) {
        if (value[1].len == ngx_http_infer_balance_signals[k].len
            && ngx_strncmp(value[1].data,
                           ngx_http_infer_balance_signals[k].data,
                           value[1].len) == 0)
        {
            break;
        }
    }

    if (k == NGX_HTTP_INFER_SIGNALS) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "unknown signal \"%V\": queue, running, kv "
                           "or lora", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (bcf->names_set & (1 << k)) {
        return "is duplicate";
    }

    if (cf->args->nelts - 2 > NGX_HTTP_INFER_SIGNALS_NAMES) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "at most %d names for one signal",
                           NGX_HTTP_INFER_SIGNALS_NAMES);
        return NGX_CONF_ERROR;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        /* a metric name: [a-zA-Z_:][a-zA-Z0-9_:]* */

        if (value[i].len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "empty metric name");
            return NGX_CONF_ERROR;
        }

        for (j = 0; j < value[i].len; j++) {
            c = ngx_tolower(value[i].data[j]);

            if (!((c >= 'a' && c <= 'z') || c == '_' || c == ':'
                  || (j && c >= '0' && c <= '9')))
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid metric name \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }
        }

        bcf->names.names[k][i - 2] = value[i];
    }

    bcf->names.nnames[k] = cf->args->nelts - 2;
    bcf->names_set |= 1 << k;

    return NGX_CONF_OK;
}

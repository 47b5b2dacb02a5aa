
/*
 * Copyright (C) ngx_infer authors
 *
 * Redis Sentinel: which Redis is the master now.  Before the worker
 * connects (first, and after every connection it lost), it asks the
 * sentinels in turn "SENTINEL get-master-addr-by-name NAME" on a
 * connection of nginx's own (ngx_event_connect_peer(), non-blocking,
 * with the connect and call timeouts), reads the answer with hiredis's
 * reader, and hands the address to the Redis client, which connects and
 * checks with INFO replication that it is the master indeed.  A failover
 * is followed so: the old master's connection breaks, or it says it is a
 * replica, or answers READONLY, and the sentinels are asked again.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_ratelimit.h"


typedef struct {
    ngx_http_infer_ratelimit_redis_conf_t  *rcf;
    ngx_peer_connection_t               pc;
    redisReader                        *reader;
    ngx_uint_t                          next;       /* the one to ask */
    ngx_uint_t                          tried;
    u_char                              out[640];
    size_t                              len;
    size_t                              sent;
    ngx_log_t                          *log;
    unsigned                            busy:1;
} ngx_http_infer_ratelimit_sentinel_t;


static void ngx_http_infer_ratelimit_sentinel_ask(
    ngx_http_infer_ratelimit_sentinel_t *st);
static void ngx_http_infer_ratelimit_sentinel_write(ngx_event_t *wev);
static void ngx_http_infer_ratelimit_sentinel_read(ngx_event_t *rev);
static void ngx_http_infer_ratelimit_sentinel_next(
    ngx_http_infer_ratelimit_sentinel_t *st, const char *why);
static void ngx_http_infer_ratelimit_sentinel_close(
    ngx_http_infer_ratelimit_sentinel_t *st);


static ngx_http_infer_ratelimit_sentinel_t  ngx_http_infer_ratelimit_sentinel;


/*
 * Starts asking, unless an answer is awaited already.  The Redis client
 * is told the outcome by ngx_http_infer_ratelimit_redis_master().
 */

void
ngx_http_infer_ratelimit_sentinel_discover(
    ngx_http_infer_ratelimit_redis_conf_t *rcf, ngx_log_t *log)
{
    u_char                               *p;
    ngx_http_infer_ratelimit_sentinel_t  *st;

    st = &ngx_http_infer_ratelimit_sentinel;

    if (st->busy) {
        return;
    }

    st->rcf = rcf;
    st->log = log;
    st->busy = 1;
    st->tried = 0;

    p = ngx_sprintf(st->out, "*3\r\n$8\r\nSENTINEL\r\n"
                    "$23\r\nget-master-addr-by-name\r\n$%uz\r\n%V\r\n",
                    rcf->master.len, &rcf->master);
    st->len = p - st->out;

    ngx_http_infer_ratelimit_sentinel_ask(st);
}


void
ngx_http_infer_ratelimit_sentinel_exit(void)
{
    ngx_http_infer_ratelimit_sentinel_t  *st;

    st = &ngx_http_infer_ratelimit_sentinel;

    ngx_http_infer_ratelimit_sentinel_close(st);
    st->busy = 0;
}


static void
ngx_http_infer_ratelimit_sentinel_ask(ngx_http_infer_ratelimit_sentinel_t *st)
{
    ngx_int_t          rc;
    ngx_addr_t        *addr;
    ngx_connection_t  *c;

    addr = st->rcf->sentinels->elts;
    addr = &addr[st->next % st->rcf->sentinels->nelts];

    ngx_memzero(&st->pc, sizeof(ngx_peer_connection_t));

    st->pc.sockaddr = addr->sockaddr;
    st->pc.socklen = addr->socklen;
    st->pc.name = &addr->name;
    st->pc.get = ngx_event_get_peer;
    st->pc.log = st->log;
    st->pc.log_error = NGX_ERROR_ERR;

    st->reader = redisReaderCreate();
    if (st->reader == NULL) {
        ngx_http_infer_ratelimit_sentinel_next(st, "no memory");
        return;
    }

    ngx_http_infer_ratelimit_redis_bound(st->reader);

    rc = ngx_event_connect_peer(&st->pc);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        ngx_http_infer_ratelimit_sentinel_next(st, "connect failed");
        return;
    }

    c = st->pc.connection;
    c->data = st;
    c->log = st->log;
    c->read->log = st->log;
    c->write->log = st->log;
    c->read->handler = ngx_http_infer_ratelimit_sentinel_read;
    c->write->handler = ngx_http_infer_ratelimit_sentinel_write;

    st->sent = 0;

    if (rc == NGX_AGAIN) {
        ngx_add_timer(c->write, st->rcf->connect_timeout);
        return;
    }

    ngx_http_infer_ratelimit_sentinel_write(c->write);
}


static void
ngx_http_infer_ratelimit_sentinel_write(ngx_event_t *wev)
{
    ssize_t                               n;
    ngx_connection_t                     *c;
    ngx_http_infer_ratelimit_sentinel_t  *st;

    c = wev->data;
    st = c->data;

    if (wev->timedout) {
        ngx_http_infer_ratelimit_sentinel_next(st, "connect timed out");
        return;
    }

    while (st->sent < st->len) {
        n = c->send(c, st->out + st->sent, st->len - st->sent);

        if (n == NGX_AGAIN) {
            if (!wev->timer_set) {
                ngx_add_timer(wev, st->rcf->timeout);
            }

            if (ngx_handle_write_event(wev, 0) != NGX_OK) {
                ngx_http_infer_ratelimit_sentinel_next(st, "write failed");
            }

            return;
        }

        if (n <= 0) {
            ngx_http_infer_ratelimit_sentinel_next(st, "write failed");
            return;
        }

        st->sent += n;
    }

    if (wev->timer_set) {
        ngx_del_timer(wev);
    }

    if (!c->read->timer_set) {
        ngx_add_timer(c->read, st->rcf->timeout);
    }

    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        ngx_http_infer_ratelimit_sentinel_next(st, "read failed");
    }
}


static void
ngx_http_infer_ratelimit_sentinel_read(ngx_event_t *rev)
{
    u_char                                buf[512];
    ssize_t                               n;
    ngx_int_t                             port;
    redisReply                           *rr, *ip, *pt;
    ngx_connection_t                     *c;
    ngx_http_infer_ratelimit_sentinel_t  *st;

    c = rev->data;
    st = c->data;

    if (rev->timedout) {
        ngx_http_infer_ratelimit_sentinel_next(st, "no answer in time");
        return;
    }

    for ( ;; ) {
        n = c->recv(c, buf, sizeof(buf));

        if (n == NGX_AGAIN) {
            if (ngx_handle_read_event(rev, 0) != NGX_OK) {
                ngx_http_infer_ratelimit_sentinel_next(st, "read failed");
            }

            return;
        }

        if (n <= 0) {
            ngx_http_infer_ratelimit_sentinel_next(st, "connection closed");
            return;
        }

        rr = NULL;

        if (redisReaderFeed(st->reader, (char *) buf, n) != REDIS_OK
            || redisReaderGetReply(st->reader, (void **) &rr) != REDIS_OK)
        {
            ngx_http_infer_ratelimit_sentinel_next(st, "a broken answer");
            return;
        }

        if (rr) {
            break;
        }

        if (st->reader->len - st->reader->pos > 4096) {
            ngx_http_infer_ratelimit_sentinel_next(st, "an answer too long");
            return;
        }
    }

    /* ["10.0.0.7", "6379"]; nil: it does not know the name */

    if (rr->type != REDIS_REPLY_ARRAY || rr->elements != 2
        || rr->element[0]->type != REDIS_REPLY_STRING
        || rr->element[1]->type != REDIS_REPLY_STRING
        || rr->element[0]->len == 0 || rr->element[0]->len > 15)
    {
        freeReplyObject(rr);
        ngx_http_infer_ratelimit_sentinel_next(st, "no master of that name "
                                               "(or not an IPv4 address)");
        return;
    }

    ip = rr->element[0];
    pt = rr->element[1];

    port = ngx_atoi((u_char *) pt->str, pt->len);

    if (port < 1 || port > 65535
        || ngx_inet_addr((u_char *) ip->str, ip->len) == INADDR_NONE)
    {
        freeReplyObject(rr);
        ngx_http_infer_ratelimit_sentinel_next(st, "not an IPv4 address");
        return;
    }

    ngx_http_infer_ratelimit_sentinel_close(st);
    st->busy = 0;

    ngx_http_infer_ratelimit_redis_master((u_char *) ip->str, ip->len, port);

    freeReplyObject(rr);
}


/* this sentinel failed: the next one, or, all tried, a backoff */

static void
ngx_http_infer_ratelimit_sentinel_next(ngx_http_infer_ratelimit_sentinel_t *st,
    const char *why)
{
    ngx_addr_t  *addr;

    addr = st->rcf->sentinels->elts;
    addr = &addr[st->next % st->rcf->sentinels->nelts];

    ngx_log_error(NGX_LOG_WARN, st->log, 0,
                  "infer ratelimit: sentinel %V: %s", &addr->name, why);

    ngx_http_infer_ratelimit_sentinel_close(st);

    st->next++;

    if (++st->tried < st->rcf->sentinels->nelts) {
        ngx_http_infer_ratelimit_sentinel_ask(st);
        return;
    }

    st->busy = 0;

    ngx_http_infer_ratelimit_redis_master(NULL, 0, 0);
}


static void
ngx_http_infer_ratelimit_sentinel_close(ngx_http_infer_ratelimit_sentinel_t *st)
{
    if (st->pc.connection) {
        ngx_close_connection(st->pc.connection);
        st->pc.connection = NULL;
    }

    if (st->reader) {
        redisReaderFree(st->reader);
        st->reader = NULL;
    }
}


/*
 * Copyright (C) ngx_infer authors
 *
 * The rate-limit module's Redis connections: hiredis's async API on
 * nginx's event loop, one pipelined connection per worker (or, with a
 * Redis Cluster, per master: ngx_http_infer_ratelimit_cluster.c), made
 * when first needed; and the directive that says where Redis is.  The
 * calls made on them are in ngx_http_infer_ratelimit_redis_call.c.
 *
 * Who owns what:
 *
 *   - hiredis owns the socket.  Our ngx_connection_t only lends it to
 *     epoll; the adapter's cleanup takes it out of epoll and frees the
 *     ngx_connection_t without closing the fd, which hiredis then closes:
 *     the fd is closed once, by hiredis.
 *   - A connection that fails (refused, timed out, a reply too long)
 *     fails every call pending on it at once; the next connection is
 *     tried after a backoff.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_ratelimit.h"


#define NGX_HTTP_INFER_RL_DOWN        0
#define NGX_HTTP_INFER_RL_CONNECTING  1
#define NGX_HTTP_INFER_RL_READY       2

#define NGX_HTTP_INFER_RL_BACKOFF_MIN 100

/* see NGX_HTTP_INFER_RL_LIMITS_MAX */
#define NGX_HTTP_INFER_RL_REPLY_MAX   (1 + 3 * NGX_HTTP_INFER_RL_LIMITS_MAX)

/* bytes hiredis may hold of a reply not yet whole: one is a few kB */
#define NGX_HTTP_INFER_RL_READER_MAX  (1024 * 1024)


static ngx_int_t ngx_http_infer_ratelimit_redis_addrs(ngx_conf_t *cf,
    ngx_array_t **list, u_char *p, u_char *last, const char *what);
static ngx_http_infer_ratelimit_redis_t *ngx_http_infer_ratelimit_redis_node(
    ngx_uint_t slot);
static ngx_int_t ngx_http_infer_ratelimit_redis_connect(
    ngx_http_infer_ratelimit_redis_t *rd);
static void ngx_http_infer_ratelimit_redis_add_read(void *data);
static void ngx_http_infer_ratelimit_redis_del_read(void *data);
static void ngx_http_infer_ratelimit_redis_add_write(void *data);
static void ngx_http_infer_ratelimit_redis_del_write(void *data);
static void ngx_http_infer_ratelimit_redis_cleanup(void *data);
static void ngx_http_infer_ratelimit_redis_read(ngx_event_t *ev);
static void ngx_http_infer_ratelimit_redis_write(ngx_event_t *ev);
static void ngx_http_infer_ratelimit_redis_connected(
    const redisAsyncContext *ac, int status);
static void ngx_http_infer_ratelimit_redis_disconnected(
    const redisAsyncContext *ac, int status);
static void ngx_http_infer_ratelimit_redis_connect_timeout(ngx_event_t *ev);
static void ngx_http_infer_ratelimit_redis_handshake(redisAsyncContext *ac,
    void *reply, void *privdata);
static void *ngx_http_infer_ratelimit_redis_array(const redisReadTask *task,
    int elements);


static ngx_http_infer_ratelimit_redis_t  ngx_http_infer_ratelimit_redis_worker;

/* hiredis's functions to make replies, ours for arrays */
static redisReplyObjectFunctions  ngx_http_infer_ratelimit_redis_fn;
static void *(*ngx_http_infer_ratelimit_redis_create_array)(
    const redisReadTask *task, int elements);
static ngx_uint_t  ngx_http_infer_ratelimit_redis_refused;


/* the one connection (a cluster's nodes have theirs) */

ngx_http_infer_ratelimit_redis_t *
ngx_http_infer_ratelimit_redis_main(void)
{
    return &ngx_http_infer_ratelimit_redis_worker;
}


/*
 * A connection, made now if there is none (within the backoff): NGX_OK
 * when there is one, connected or connecting.  In a cluster, any node's:
 * for the callers that only want a connection to be told that the
 * worker quits (see the read handler).
 */

ngx_int_t
ngx_http_infer_ratelimit_redis_open(void)
{
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = &ngx_http_infer_ratelimit_redis_worker;

    if (rd->rcf == NULL) {
        return NGX_DECLINED;
    }

    if (rd->rcf->seeds) {
        return ngx_http_infer_ratelimit_cluster_any() ? NGX_OK
                                                       : NGX_DECLINED;
    }

    return ngx_http_infer_ratelimit_redis_open_node(rd);
}


ngx_int_t
ngx_http_infer_ratelimit_redis_open_node(ngx_http_infer_ratelimit_redis_t *rd)
{
    if (rd->rcf == NULL) {
        return NGX_DECLINED;
    }

    if (rd->ac) {
        return NGX_OK;
    }

    if ((ngx_msec_int_t) (rd->next_try - ngx_current_msec) > 0) {
        return NGX_DECLINED;
    }

    if (rd->rcf->master.len && !rd->known) {
        /* the sentinels are asked first; requests go on without Redis */
        ngx_http_infer_ratelimit_sentinel_discover(rd->rcf, rd->log);
        return NGX_DECLINED;
    }

    return ngx_http_infer_ratelimit_redis_connect(rd);
}


/* connected, and its handshake done */

ngx_uint_t
ngx_http_infer_ratelimit_redis_ready(ngx_http_infer_ratelimit_redis_t *rd)
{
    return rd->ac && rd->state == NGX_HTTP_INFER_RL_READY && rd->handshaken;
}


void
ngx_http_infer_ratelimit_redis_node_init(ngx_http_infer_ratelimit_redis_t *rd,
    ngx_http_infer_ratelimit_redis_conf_t *rcf, ngx_log_t *log)
{
    rd->rcf = rcf;
    rd->log = log;
    rd->name = rcf->address;
    rd->backoff = NGX_HTTP_INFER_RL_BACKOFF_MIN;
    rd->next_try = ngx_current_msec;

    rd->connect_timer.handler = ngx_http_infer_ratelimit_redis_connect_timeout;
    rd->connect_timer.data = rd;
    rd->connect_timer.log = log;
    rd->connect_timer.cancelable = 1;
}


/*
 * The sentinels' answer: the master's address, which is connected to
 * now, or none (host NULL: none of them answered), and a backoff.
 */

void
ngx_http_infer_ratelimit_redis_master(u_char *host, size_t len,
    ngx_int_t port)
{
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = &ngx_http_infer_ratelimit_redis_worker;

    if (rd->rcf == NULL) {
        return;
    }

    if (host == NULL) {
        ngx_http_infer_ratelimit_redis_error(rd, "no sentinel told the "
                                             "master's address");
        rd->next_try = ngx_current_msec + rd->backoff;
        rd->backoff = ngx_min(rd->backoff * 2, rd->rcf->backoff);
        return;
    }

    if (rd->port != port || ngx_strncmp(rd->host, host, len) != 0
        || rd->host[len] != '\0')
    {
        ngx_log_error(NGX_LOG_NOTICE, rd->log, 0,
                      "infer ratelimit: redis %V: the master is %*s:%i",
                      &rd->rcf->address, len, host, port);
    }

    *ngx_cpymem(rd->host, host, len) = '\0';
    rd->port = port;
    rd->known = 1;

    if (rd->ac == NULL) {
        (void) ngx_http_infer_ratelimit_redis_connect(rd);
    }
}


/*
 * Sends a command a caller made in Redis's protocol, for no request (the
 * usage events), on the connection of the slot of its key: hiredis
 * copies it, and calls fn with the reply, or with NULL when the
 * connection goes first.  NGX_DECLINED: Redis is unavailable now (a
 * connection is tried, within the backoff).
 */

ngx_int_t
ngx_http_infer_ratelimit_redis_send(ngx_uint_t slot, u_char *cmd, size_t len,
    redisCallbackFn *fn, void *data)
{
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = ngx_http_infer_ratelimit_redis_node(slot);

    if (rd == NULL) {
        return NGX_DECLINED;
    }

    if (redisAsyncFormattedCommand(rd->ac, fn, data, (char *) cmd, len)
        != REDIS_OK)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/*
 * Drops the connection of a slot, failing every pending call on it: for
 * a caller whose calls went unanswered longer than the timeout.
 */

void
ngx_http_infer_ratelimit_redis_reset(ngx_uint_t slot, const char *why)
{
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = &ngx_http_infer_ratelimit_redis_worker;

    if (rd->rcf && rd->rcf->seeds) {
        rd = ngx_http_infer_ratelimit_cluster_slot(slot);
    }

    if (rd == NULL || rd->ac == NULL) {
        return;
    }

    ngx_http_infer_ratelimit_redis_error(rd, "%s: reconnecting", why);
    ngx_http_infer_ratelimit_redis_drop(rd);
}


/* the connection of a slot, opened if need be; NULL: none now */

static ngx_http_infer_ratelimit_redis_t *
ngx_http_infer_ratelimit_redis_node(ngx_uint_t slot)
{
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = &ngx_http_infer_ratelimit_redis_worker;

    if (rd->rcf == NULL) {
        return NULL;
    }

    if (rd->rcf->seeds) {
        return ngx_http_infer_ratelimit_cluster_slot(slot);
    }

    return (ngx_http_infer_ratelimit_redis_open_node(rd) == NGX_OK) ? rd
                                                                    : NULL;
}


/*
 * A MOVED answered to a command sent for no request (a usage event's):
 * the slot's master is noted, so that the next ones go there.
 */

void
ngx_http_infer_ratelimit_redis_moved(redisReply *rr)
{
    ngx_uint_t                            slot;
    ngx_http_infer_ratelimit_redis_t     *rd;
    ngx_http_infer_ratelimit_node_addr_t  addr;

    if (rr == NULL || rr->type != REDIS_REPLY_ERROR
        || ngx_http_infer_ratelimit_nodes_redirect((u_char *) rr->str,
                                                   rr->len, &slot, &addr)
           != NGX_HTTP_INFER_RL_MOVED)
    {
        return;
    }

    /* not a cluster's (a standalone Redis that is a cluster node): none */
    rd = ngx_http_infer_ratelimit_cluster_node(addr.addr, addr.port);

    if (rd) {
        ngx_http_infer_ratelimit_cluster_moved(slot, rd);
    }
}


static ngx_int_t
ngx_http_infer_ratelimit_redis_connect(ngx_http_infer_ratelimit_redis_t *rd)
{
    const char                             *argv[3];
    size_t                                  argvlen[3];
    ngx_str_t                              *script;
    ngx_uint_t                              argc;
    ngx_connection_t                       *c;
    redisAsyncContext                      *ac;
    ngx_http_infer_ratelimit_redis_conf_t  *rcf;
    u_char                                  db[NGX_INT_T_LEN];

    rcf = rd->rcf;

    /* an address, never a name: no DNS at request time */

    if (rcf->path.len) {
        ac = redisAsyncConnectUnix((char *) rcf->path.data);

    } else if (rcf->master.len || rd->node) {
        /* the master the sentinels told, or a cluster node */
        ac = redisAsyncConnect((char *) rd->host, (int) rd->port);

    } else {
        ac = redisAsyncConnect((char *) rcf->host.data, (int) rcf->port);
    }

    rd->next_try = ngx_current_msec + rd->backoff;
    rd->backoff = ngx_min(rd->backoff * 2, rcf->backoff);

    if (ac == NULL) {
        return NGX_ERROR;
    }

    if (ac->err) {
        ngx_http_infer_ratelimit_redis_error(rd, "connect failed: %s",
                                             ac->errstr);
        redisAsyncFree(ac);
        return NGX_ERROR;
    }

    ngx_http_infer_ratelimit_redis_bound(ac->c.reader);

    c = ngx_get_connection(ac->c.fd, rd->log);
    if (c == NULL) {
        redisAsyncFree(ac);
        return NGX_ERROR;
    }

    c->data = rd;
    c->log = rd->log;
    c->read->log = rd->log;
    c->write->log = rd->log;
    c->read->handler = ngx_http_infer_ratelimit_redis_read;
    c->write->handler = ngx_http_infer_ratelimit_redis_write;

    /* told when the worker is to quit: see the read handler */
    c->idle = 1;

    rd->ac = ac;
    rd->c = c;
    rd->state = NGX_HTTP_INFER_RL_CONNECTING;

    ac->ev.data = rd;
    ac->ev.addRead = ngx_http_infer_ratelimit_redis_add_read;
    ac->ev.delRead = ngx_http_infer_ratelimit_redis_del_read;
    ac->ev.addWrite = ngx_http_infer_ratelimit_redis_add_write;
    ac->ev.delWrite = ngx_http_infer_ratelimit_redis_del_write;
    ac->ev.cleanup = ngx_http_infer_ratelimit_redis_cleanup;

    redisAsyncSetConnectCallback(ac,
                                 ngx_http_infer_ratelimit_redis_connected);
    redisAsyncSetDisconnectCallback(ac,
                                 ngx_http_infer_ratelimit_redis_disconnected);

    ngx_add_timer(&rd->connect_timer, rcf->connect_timeout);

    /* the handshake goes ahead of the first call, in the same pipeline */

    if (rcf->password.len) {
        argc = 0;
        argv[argc] = "AUTH";
        argvlen[argc++] = 4;

        if (rcf->user.len) {
            argv[argc] = (char *) rcf->user.data;
            argvlen[argc++] = rcf->user.len;
        }

        argv[argc] = (char *) rcf->password.data;
        argvlen[argc++] = rcf->password.len;

        (void) redisAsyncCommandArgv(ac,
                                     ngx_http_infer_ratelimit_redis_handshake,
                                     "AUTH", argc, argv, argvlen);
    }

    if (rcf->db) {
        argv[0] = "SELECT";
        argvlen[0] = 6;
        argv[1] = (char *) db;
        argvlen[1] = ngx_sprintf(db, "%i", rcf->db) - db;

        (void) redisAsyncCommandArgv(ac,
                                     ngx_http_infer_ratelimit_redis_handshake,
                                     "SELECT", 2, argv, argvlen);
    }

    if (rcf->master.len) {
        /*
         * a master that a failover made a replica says so (INFO, a
         * string: ROLE answers nested arrays, which the reader refuses)
         */
        argv[0] = "INFO";
        argvlen[0] = 4;
        argv[1] = "replication";
        argvlen[1] = 11;

        (void) redisAsyncCommandArgv(ac,
                                     ngx_http_infer_ratelimit_redis_handshake,
                                     "INFO", 2, argv, argvlen);
    }

    argv[0] = "SCRIPT";
    argvlen[0] = 6;
    argv[1] = "LOAD";
    argvlen[1] = 4;
    script = ngx_http_infer_ratelimit_redis_script();
    argv[2] = (char *) script->data;
    argvlen[2] = script->len;

    (void) redisAsyncCommandArgv(ac, ngx_http_infer_ratelimit_redis_handshake,
                                 "SCRIPT LOAD", 3, argv, argvlen);

    return NGX_OK;
}


/* fails every pending call at once; the cleanup below follows */

void
ngx_http_infer_ratelimit_redis_drop(ngx_http_infer_ratelimit_redis_t *rd)
{
    if (rd->ac) {
        redisAsyncFree(rd->ac);
    }
}


/*
 * The adapter.  Level-triggered: hiredis reads at most one buffer per
 * call, and a reply left in the socket must wake us again.
 */

static void
ngx_http_infer_ratelimit_redis_add_read(void *data)
{
    ngx_http_infer_ratelimit_redis_t  *rd = data;

    ngx_event_t  *ev;

    ev = rd->c->read;

    if (!ev->active
        && ngx_add_event(ev, NGX_READ_EVENT, NGX_LEVEL_EVENT) != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ALERT, rd->log, 0,
                      "infer ratelimit: redis: adding a read event failed");
    }
}


static void
ngx_http_infer_ratelimit_redis_del_read(void *data)
{
    ngx_http_infer_ratelimit_redis_t  *rd = data;

    ngx_event_t  *ev;

    ev = rd->c->read;

    if (ev->active) {
        (void) ngx_del_event(ev, NGX_READ_EVENT, 0);
    }
}


static void
ngx_http_infer_ratelimit_redis_add_write(void *data)
{
    ngx_http_infer_ratelimit_redis_t  *rd = data;

    ngx_event_t  *ev;

    ev = rd->c->write;

    if (!ev->active
        && ngx_add_event(ev, NGX_WRITE_EVENT, NGX_LEVEL_EVENT) != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ALERT, rd->log, 0,
                      "infer ratelimit: redis: adding a write event failed");
    }
}


static void
ngx_http_infer_ratelimit_redis_del_write(void *data)
{
    ngx_http_infer_ratelimit_redis_t  *rd = data;

    ngx_event_t  *ev;

    ev = rd->c->write;

    if (ev->active) {
        (void) ngx_del_event(ev, NGX_WRITE_EVENT, 0);
    }
}


/*
 * hiredis calls this when it frees its context, just before it closes
 * the socket: our events leave epoll and the ngx_connection_t goes back
 * to the free list, its fd untouched.
 */

static void
ngx_http_infer_ratelimit_redis_cleanup(void *data)
{
    ngx_http_infer_ratelimit_redis_t  *rd = data;

    ngx_connection_t  *c;

    c = rd->c;

    if (c) {
        if (c->read->active) {
            (void) ngx_del_event(c->read, NGX_READ_EVENT, 0);
        }

        if (c->write->active) {
            (void) ngx_del_event(c->write, NGX_WRITE_EVENT, 0);
        }

        if (c->read->posted) {
            ngx_delete_posted_event(c->read);
        }

        if (c->write->posted) {
            ngx_delete_posted_event(c->write);
        }

        c->read->closed = 1;
        c->write->closed = 1;

        ngx_free_connection(c);
        c->fd = (ngx_socket_t) -1;
    }

    if (rd->connect_timer.timer_set) {
        ngx_del_timer(&rd->connect_timer);
    }

    if (rd->state == NGX_HTTP_INFER_RL_READY && rd->handshaken) {
        /* it worked until now: try again soon */
        rd->backoff = NGX_HTTP_INFER_RL_BACKOFF_MIN;
        rd->next_try = ngx_current_msec + rd->backoff;
    }

    rd->c = NULL;
    rd->ac = NULL;
    rd->state = NGX_HTTP_INFER_RL_DOWN;
    rd->handshaken = 0;

    if (rd->node) {
        /* the slots it served may be another node's now */
        ngx_http_infer_ratelimit_cluster_lost();

    } else {
        /* with Sentinel, a lost connection asks again who the master is */
        rd->known = 0;
    }
}


static void
ngx_http_infer_ratelimit_redis_read(ngx_event_t *ev)
{
    ngx_connection_t                  *c;
    ngx_http_infer_ratelimit_redis_t  *rd;

    c = ev->data;
    rd = c->data;

    if (c->close) {
        /*
         * The worker is told to quit (ngx_close_idle_connections()).  The
         * connection stays for the calls pending, and the corrections and
         * usage events held back are sent on it first.
         */
        c->close = 0;
        c->idle = 0;

        ngx_http_infer_ratelimit_coalesce_flush();
        ngx_http_infer_ratelimit_approx_sync();
        ngx_http_infer_ratelimit_events_quit();
    }

    if (rd->ac) {
        redisAsyncHandleRead(rd->ac);
    }

    /* what is left in the reader is a reply not yet whole */

    if (rd->ac
        && rd->ac->c.reader->len - rd->ac->c.reader->pos
           > NGX_HTTP_INFER_RL_READER_MAX)
    {
        ngx_http_infer_ratelimit_redis_error(rd, "a reply longer than %d "
                                             "bytes: reconnecting",
                                             NGX_HTTP_INFER_RL_READER_MAX);
        ngx_http_infer_ratelimit_redis_drop(rd);
    }
}


static void
ngx_http_infer_ratelimit_redis_write(ngx_event_t *ev)
{
    ngx_connection_t                  *c;
    ngx_http_infer_ratelimit_redis_t  *rd;

    c = ev->data;
    rd = c->data;

    if (rd->ac) {
        redisAsyncHandleWrite(rd->ac);
    }
}


static void
ngx_http_infer_ratelimit_redis_connected(const redisAsyncContext *ac,
    int status)
{
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = ac->ev.data;

    if (status != REDIS_OK) {
        /* hiredis frees the context next */
        ngx_http_infer_ratelimit_redis_error(rd, "connect failed: %s",
                                             ac->errstr);
        return;
    }

    if (rd->connect_timer.timer_set) {
        ngx_del_timer(&rd->connect_timer);
    }

    rd->state = NGX_HTTP_INFER_RL_READY;

    ngx_log_debug0(NGX_LOG_DEBUG_EVENT, rd->log, 0,
                   "infer ratelimit: redis connected");
}


static void
ngx_http_infer_ratelimit_redis_disconnected(const redisAsyncContext *ac,
    int status)
{
    if (status != REDIS_OK) {
        /* a refused array: hiredis says "Out of memory" */
        ngx_http_infer_ratelimit_redis_error(ac->ev.data,
            "connection lost: %s",
            ngx_http_infer_ratelimit_redis_refused
            ? "an array nested or longer than our scripts answer"
            : ac->errstr);
    }

    ngx_http_infer_ratelimit_redis_refused = 0;
}


/*
 * A reader's functions made ours: hiredis's own, but an array longer
 * than our scripts answer, or one inside another, is refused, and the
 * connection with it.
 */

void
ngx_http_infer_ratelimit_redis_bound(redisReader *reader)
{
    if (reader->fn == NULL || reader->fn == &ngx_http_infer_ratelimit_redis_fn)
    {
        /* no reply objects at all, or bound already */
        return;
    }

    if (ngx_http_infer_ratelimit_redis_create_array == NULL) {
        ngx_http_infer_ratelimit_redis_fn = *reader->fn;
        ngx_http_infer_ratelimit_redis_create_array = reader->fn->createArray;
        ngx_http_infer_ratelimit_redis_fn.createArray =
                                         ngx_http_infer_ratelimit_redis_array;
    }

    reader->fn = &ngx_http_infer_ratelimit_redis_fn;
}


static void *
ngx_http_infer_ratelimit_redis_array(const redisReadTask *task,
    int elements)
{
    if (elements > NGX_HTTP_INFER_RL_REPLY_MAX || task->parent != NULL) {
        /* hiredis takes NULL for no memory and fails the reader */
        ngx_http_infer_ratelimit_redis_refused = 1;
        return NULL;
    }

    return ngx_http_infer_ratelimit_redis_create_array(task, elements);
}


static void
ngx_http_infer_ratelimit_redis_connect_timeout(ngx_event_t *ev)
{
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = ev->data;

    ngx_http_infer_ratelimit_redis_error(rd, "connect timed out");

    ngx_http_infer_ratelimit_redis_drop(rd);
}


static void
ngx_http_infer_ratelimit_redis_handshake(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    redisReply                        *rr = reply;
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = ac->ev.data;

    if (rr == NULL) {
        return;
    }

    if (rr->type == REDIS_REPLY_ERROR) {
        ngx_http_infer_ratelimit_redis_error(rd, "%s failed: %*s",
                                             (char *) privdata,
                                             (size_t) ngx_min(rr->len, 256),
                                             (u_char *) rr->str);
        /* deferred by hiredis until this callback returns */
        redisAsyncFree(ac);
        return;
    }

    if (ngx_strcmp((char *) privdata, "INFO") == 0
        && (rr->type != REDIS_REPLY_STRING
            || ngx_strlcasestrn((u_char *) rr->str,
                                (u_char *) rr->str + rr->len,
                                (u_char *) "role:master\r", 12 - 1)
               == NULL))
    {
        ngx_http_infer_ratelimit_redis_error(rd, "%s:%i is not the master "
                                             "(a failover?): asking the "
                                             "sentinels again",
                                             rd->host, rd->port);
        redisAsyncFree(ac);
        return;
    }

    if (ngx_strcmp((char *) privdata, "SCRIPT LOAD") == 0) {
        /*
         * the connection works (a Redis that accepts and never answers,
         * or refuses AUTH, does not get here): the next failure may be
         * retried soon
         */
        rd->handshaken = 1;
        rd->backoff = NGX_HTTP_INFER_RL_BACKOFF_MIN;
    }
}


/*
 * An outage logs once a second per worker, with the count of what was
 * left out, not once per request.
 */

void
ngx_http_infer_ratelimit_redis_error(ngx_http_infer_ratelimit_redis_t *rd,
    const char *fmt, ...)
{
    u_char   *p;
    va_list   args;
    u_char    buf[512];

    if (rd->logged == ngx_time()) {
        rd->suppressed++;
        return;
    }

    va_start(args, fmt);
    p = ngx_vslprintf(buf, buf + sizeof(buf), fmt, args);
    va_end(args);

    ngx_log_error(NGX_LOG_ERR, rd->log, 0,
                  "infer ratelimit: redis %V: %*s (%ui similar errors not "
                  "logged)",
                  &rd->name, (size_t) (p - buf), buf,
                  rd->suppressed);

    rd->logged = ngx_time();
    rd->suppressed = 0;
}


ngx_int_t
ngx_http_infer_ratelimit_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_redis_conf_t *rcf)
{
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = &ngx_http_infer_ratelimit_redis_worker;

    ngx_memzero(rd, sizeof(ngx_http_infer_ratelimit_redis_t));

    ngx_http_infer_ratelimit_redis_node_init(rd, rcf, cycle->log);

    ngx_http_infer_ratelimit_redis_sha1();

    if (rcf->seeds) {
        /* the one connection is not used: the nodes have theirs */
        return ngx_http_infer_ratelimit_cluster_init_process(cycle, rcf);
    }

    return NGX_OK;
}


void
ngx_http_infer_ratelimit_redis_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = &ngx_http_infer_ratelimit_redis_worker;

    ngx_http_infer_ratelimit_sentinel_exit();
    ngx_http_infer_ratelimit_cluster_exit_process();
    ngx_http_infer_ratelimit_redis_drop(rd);

    rd->rcf = NULL;
}


/* sentinels=IPv4:port[,IPv4:port...], cluster:IPv4:port[,IPv4:port...] */

static ngx_int_t
ngx_http_infer_ratelimit_redis_addrs(ngx_conf_t *cf, ngx_array_t **list,
    u_char *p, u_char *last, const char *what)
{
    u_char      *comma;
    ngx_int_t    rc;
    ngx_addr_t  *addr;

    if (*list) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%s is duplicate", what);
        return NGX_ERROR;
    }

    *list = ngx_array_create(cf->pool, 3, sizeof(ngx_addr_t));
    if (*list == NULL) {
        return NGX_ERROR;
    }

    for ( ;; ) {
        comma = ngx_strlchr(p, last, ',');
        if (comma == NULL) {
            comma = last;
        }

        if (comma == p) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "%s has an empty address: IPv4:port "
                               "expected", what);
            return NGX_ERROR;
        }

        addr = ngx_array_push(*list);
        if (addr == NULL) {
            return NGX_ERROR;
        }

        rc = ngx_parse_addr_port(cf->pool, addr, p, comma - p);

        if (rc != NGX_OK || addr->sockaddr->sa_family != AF_INET
            || ngx_inet_get_port(addr->sockaddr) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid %s address \"%*s\": IPv4:port "
                               "expected", what, comma - p, p);
            return NGX_ERROR;
        }

        addr->name.len = comma - p;
        addr->name.data = p;

        if (comma == last) {
            break;
        }

        p = comma + 1;
    }

    return NGX_OK;
}


/*
 * infer_ratelimit_redis address [db=N] [user=name] [password=secret]
 *     [timeout=time] [connect_timeout=time] [backoff=time] [replicas=N]
 *     [prefix=string] [coalesce=time|off] [batch=N|off]
 *     [sentinels=IPv4:port,...];
 *
 * address: IPv4[:port], unix:/path, sentinel:NAME (the master's name as
 * the sentinels know it), or cluster:IPv4:port[,IPv4:port...] (a Redis
 * Cluster's seeds; no db=, sentinels= or batch=).
 */

char *
ngx_http_infer_ratelimit_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char  *base = conf;

    u_char                                  *p, *colon;
    ngx_int_t                                n;
    ngx_str_t                               *value;
    ngx_uint_t                               i, batched;
    ngx_msec_t                               ms;
    ngx_http_infer_ratelimit_redis_conf_t  **field, *rcf;

    field = (ngx_http_infer_ratelimit_redis_conf_t **) (base + cmd->offset);
    batched = 0;

    if (*field) {
        return "is duplicate";
    }

    rcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_ratelimit_redis_conf_t));
    if (rcf == NULL) {
        return NGX_CONF_ERROR;
    }

    rcf->timeout = 50;
    rcf->coalesce = 10;
    rcf->batch = 16;
    rcf->connect_timeout = 100;
    rcf->backoff = 2000;
    rcf->replicas = 1;
    ngx_str_set(&rcf->prefix, "infer:rl:");

    value = cf->args->elts;

    rcf->address = value[1];

    if (ngx_strncmp(value[1].data, "cluster:", 8) == 0) {
        /* the seeds: any node tells the others */
        if (ngx_http_infer_ratelimit_redis_addrs(cf, &rcf->seeds,
                                                 value[1].data + 8,
                                                 value[1].data + value[1].len,
                                                 "cluster")
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }

    } else if (ngx_strncmp(value[1].data, "sentinel:", 9) == 0) {
        /* the master's name; sentinels= says whom to ask */
        rcf->master.data = value[1].data + 9;
        rcf->master.len = value[1].len - 9;

        if (rcf->master.len == 0 || rcf->master.len > 256) {
            goto invalid_address;
        }

    } else if (ngx_strncmp(value[1].data, "unix:", 5) == 0) {
        if (value[1].len == 5 || value[1].len > 100) {
            goto invalid_address;
        }

        /* cf->args' strings are NUL-terminated */
        rcf->path.data = value[1].data + 5;
        rcf->path.len = value[1].len - 5;

    } else {
        colon = ngx_strlchr(value[1].data, value[1].data + value[1].len, ':');

        if (colon) {
            n = ngx_atoi(colon + 1, value[1].data + value[1].len - colon - 1);
            if (n < 1 || n > 65535) {
                goto invalid_address;
            }

            rcf->port = n;
            rcf->host.len = colon - value[1].data;

        } else {
            rcf->port = 6379;
            rcf->host.len = value[1].len;
        }

        rcf->host.data = ngx_pnalloc(cf->pool, rcf->host.len + 1);
        if (rcf->host.data == NULL) {
            return NGX_CONF_ERROR;
        }

        p = ngx_cpymem(rcf->host.data, value[1].data, rcf->host.len);
        *p = '\0';

        if (rcf->host.len == 0
            || ngx_inet_addr(rcf->host.data, rcf->host.len) == INADDR_NONE)
        {
            goto invalid_address;
        }
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "db=", 3) == 0) {
            rcf->db = ngx_atoi(value[i].data + 3, value[i].len - 3);
            if (rcf->db == NGX_ERROR) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "user=", 5) == 0) {
            rcf->user.data = value[i].data + 5;
            rcf->user.len = value[i].len - 5;
            continue;
        }

        if (ngx_strncmp(value[i].data, "password=", 9) == 0) {
            rcf->password.data = value[i].data + 9;
            rcf->password.len = value[i].len - 9;
            continue;
        }

        if (ngx_strncmp(value[i].data, "prefix=", 7) == 0) {
            rcf->prefix.data = value[i].data + 7;
            rcf->prefix.len = value[i].len - 7;
            continue;
        }

        if (ngx_strncmp(value[i].data, "replicas=", 9) == 0) {
            n = ngx_atoi(value[i].data + 9, value[i].len - 9);
            if (n < 1) {
                goto invalid;
            }

            rcf->replicas = (ngx_uint_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "timeout=", 8) == 0) {
            ms = ngx_http_infer_param_msec(&value[i], 8);
            if (ms == (ngx_msec_t) NGX_ERROR || ms == 0) {
                goto invalid;
            }

            rcf->timeout = ms;
            continue;
        }

        if (ngx_strncmp(value[i].data, "connect_timeout=", 16) == 0) {
            ms = ngx_http_infer_param_msec(&value[i], 16);
            if (ms == (ngx_msec_t) NGX_ERROR || ms == 0) {
                goto invalid;
            }

            rcf->connect_timeout = ms;
            continue;
        }

        if (ngx_strncmp(value[i].data, "sentinels=", 10) == 0) {
            if (ngx_http_infer_ratelimit_redis_addrs(cf, &rcf->sentinels,
                                                value[i].data + 10,
                                                value[i].data + value[i].len,
                                                "sentinels=")
                != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "coalesce=", 9) == 0) {
            if (value[i].len == 12
                && ngx_strncmp(value[i].data + 9, "off", 3) == 0)
            {
                rcf->coalesce = 0;
                continue;
            }

            ms = ngx_http_infer_param_msec(&value[i], 9);
            if (ms == (ngx_msec_t) NGX_ERROR || ms > 1000) {
                goto invalid;
            }

            rcf->coalesce = ms;
            continue;
        }

        if (ngx_strncmp(value[i].data, "batch=", 6) == 0) {
            if (value[i].len == 9
                && ngx_strncmp(value[i].data + 6, "off", 3) == 0)
            {
                rcf->batch = 0;
                batched = 1;
                continue;
            }

            n = ngx_atoi(value[i].data + 6, value[i].len - 6);
            if (n < 2 || n > NGX_HTTP_INFER_RL_BATCH_MAX) {
                goto invalid;
            }

            rcf->batch = (ngx_uint_t) n;
            batched = 1;
            continue;
        }

        if (ngx_strncmp(value[i].data, "backoff=", 8) == 0) {
            ms = ngx_http_infer_param_msec(&value[i], 8);
            if (ms == (ngx_msec_t) NGX_ERROR
                || ms < NGX_HTTP_INFER_RL_BACKOFF_MIN)
            {
                goto invalid;
            }

            rcf->backoff = ms;
            continue;
        }

        goto invalid;
    }

    if (rcf->user.len && rcf->password.len == 0) {
        return "has user= without password=";
    }

    if (rcf->master.len && rcf->sentinels == NULL) {
        return "has sentinel:NAME without sentinels=";
    }

    if (rcf->sentinels && rcf->seeds) {
        return "has sentinels= with a cluster: the cluster's nodes are "
               "the seeds";
    }

    if (rcf->sentinels && rcf->master.len == 0) {
        return "has sentinels= without sentinel:NAME as its address";
    }

    if (rcf->seeds && rcf->db) {
        return "has db= with a cluster: a cluster has database 0 only";
    }

    if (rcf->seeds && batched) {
        return "has batch= with a cluster: a cluster's calls go each to "
               "its slot's master";
    }

    *field = rcf;

    return NGX_CONF_OK;

invalid_address:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid redis address \"%V\": IPv4:port, "
                       "unix:/path, sentinel:NAME or cluster:IPv4:port,... "
                       "expected (no names: they would need DNS at run "
                       "time)", &value[1]);
    return NGX_CONF_ERROR;

invalid:

    if (ngx_strncmp(value[i].data, "password=", 9) == 0) {
        ngx_str_set(&value[i], "password=...");
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);
    return NGX_CONF_ERROR;
}


/*
 * Whether this worker's connection is up (its handshake done), for a
 * readiness probe ($infer_ratelimit_redis_up).  A worker with no
 * connection starts one, without waiting: a probe asks again.
 */

ngx_uint_t
ngx_http_infer_ratelimit_redis_up(void)
{
    ngx_http_infer_ratelimit_redis_t  *rd;

    rd = &ngx_http_infer_ratelimit_redis_worker;

    if (rd->rcf == NULL) {
        return 0;
    }

    if (rd->rcf->seeds) {
        return ngx_http_infer_ratelimit_cluster_up();
    }

    if (rd->ac == NULL
        && (ngx_msec_int_t) (rd->next_try - ngx_current_msec) <= 0)
    {
        (void) ngx_http_infer_ratelimit_redis_connect(rd);
    }

    return rd->ac && rd->state == NGX_HTTP_INFER_RL_READY && rd->handshaken;
}

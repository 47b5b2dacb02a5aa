
/*
 * Copyright (C) ngx_infer authors
 *
 * Redis Cluster: which master serves a slot, and a connection to each,
 * per worker.  The map comes from CLUSTER NODES, asked of any node that
 * answers (the seeds of infer_ratelimit_redis cluster:..., or a master
 * learnt since): at the worker's first call, after a MOVED, after a
 * connection to a node was lost, when a slot's master cannot be reached
 * (a failover promotes a replica, which the next map names), and every
 * NGX_HTTP_INFER_RL_REMAP ms (a master added, a slot moved that no call
 * asked for); at most once per NGX_HTTP_INFER_RL_REFRESH ms, one
 * question at a time, of the nodes in turn.  Until it is first known,
 * calls wait for it (at most their timeout; see
 * ngx_http_infer_ratelimit_redis_hold()); when no node can tell it, the
 * outage policy decides: a call never goes to a node the map does not
 * name, so that a seed that is not a cluster node (a standalone Redis)
 * counts nothing.  Connections are made when a call first needs them,
 * each as the Redis client makes its one connection (the handshake, the
 * backoff); nodes are added, never removed, up to
 * NGX_HTTP_INFER_RL_NODES_MAX.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_ratelimit.h"


#define NGX_HTTP_INFER_RL_REFRESH  100
#define NGX_HTTP_INFER_RL_REMAP    2000


typedef struct {
    ngx_http_infer_ratelimit_redis_conf_t  *rcf;
    ngx_http_infer_ratelimit_redis_t      **node;
    ngx_uint_t                              n;
    uint16_t                               *slot;   /* node's index + 1 */
    ngx_http_infer_ratelimit_nodes_t       *parsed;
    ngx_msec_t                              asked;
    ngx_msec_t                              wait;   /* for the answer */
    ngx_http_infer_ratelimit_redis_t       *asking_rd;
    ngx_uint_t                              next;   /* the node to ask */
    ngx_event_t                             timer;  /* asks again */
    ngx_log_t                              *log;
    unsigned                                known:1;
    unsigned                                stale:1;
    unsigned                                asking:1;
} ngx_http_infer_ratelimit_cluster_t;


static void ngx_http_infer_ratelimit_cluster_refresh(
    ngx_http_infer_ratelimit_cluster_t *cl);
static void ngx_http_infer_ratelimit_cluster_nodes(redisAsyncContext *ac,
    void *reply, void *data);
static void ngx_http_infer_ratelimit_cluster_next(
    ngx_http_infer_ratelimit_cluster_t *cl);
static void ngx_http_infer_ratelimit_cluster_timer(ngx_event_t *ev);


static ngx_http_infer_ratelimit_cluster_t  ngx_http_infer_ratelimit_cluster;


ngx_int_t
ngx_http_infer_ratelimit_cluster_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_redis_conf_t *rcf)
{
    ngx_uint_t                           i;
    ngx_addr_t                          *seed;
    struct sockaddr_in                  *sin;
    ngx_http_infer_ratelimit_cluster_t  *cl;

    cl = &ngx_http_infer_ratelimit_cluster;

    ngx_memzero(cl, sizeof(ngx_http_infer_ratelimit_cluster_t));

    cl->log = cycle->log;

    cl->node = ngx_calloc(NGX_HTTP_INFER_RL_NODES_MAX
                          * sizeof(ngx_http_infer_ratelimit_redis_t *),
                          cycle->log);
    cl->slot = ngx_calloc(NGX_HTTP_INFER_RL_SLOTS * sizeof(uint16_t),
                          cycle->log);
    cl->parsed = ngx_alloc(sizeof(ngx_http_infer_ratelimit_nodes_t),
                           cycle->log);

    if (cl->node == NULL || cl->slot == NULL || cl->parsed == NULL) {
        return NGX_ERROR;
    }

    cl->rcf = rcf;

    cl->timer.handler = ngx_http_infer_ratelimit_cluster_timer;
    cl->timer.data = cl;
    cl->timer.log = cycle->log;
    cl->timer.cancelable = 1;

    seed = rcf->seeds->elts;

    for (i = 0; i < rcf->seeds->nelts; i++) {
        sin = (struct sockaddr_in *) seed[i].sockaddr;

        if (ngx_http_infer_ratelimit_cluster_node(sin->sin_addr.s_addr,
                                                  ntohs(sin->sin_port))
            == NULL)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


void
ngx_http_infer_ratelimit_cluster_exit_process(void)
{
    ngx_uint_t                           i;
    ngx_http_infer_ratelimit_cluster_t  *cl;

    cl = &ngx_http_infer_ratelimit_cluster;

    if (cl->rcf == NULL) {
        return;
    }

    cl->rcf = NULL;

    if (cl->timer.timer_set) {
        ngx_del_timer(&cl->timer);
    }

    for (i = 0; i < cl->n; i++) {
        ngx_http_infer_ratelimit_redis_drop(cl->node[i]);
        cl->node[i]->rcf = NULL;
    }

    /* the nodes stay: a reply still to come may name its connection */
}


/*
 * The connection for a slot: its master's.  NULL: none now (the map is
 * not known, or does not name one, or the master cannot be reached).
 */

ngx_http_infer_ratelimit_redis_t *
ngx_http_infer_ratelimit_cluster_slot(ngx_uint_t slot)
{
    ngx_http_infer_ratelimit_redis_t    *rd;
    ngx_http_infer_ratelimit_cluster_t  *cl;

    cl = &ngx_http_infer_ratelimit_cluster;

    if (cl->rcf == NULL) {
        return NULL;
    }

    if (!cl->known || cl->stale) {
        ngx_http_infer_ratelimit_cluster_refresh(cl);
    }

    if (cl->slot[slot] == 0) {
        return NULL;
    }

    rd = cl->node[cl->slot[slot] - 1];

    if (ngx_http_infer_ratelimit_redis_open_node(rd) != NGX_OK) {
        /* down, or waiting out its backoff: has a replica taken over? */
        cl->stale = 1;
        ngx_http_infer_ratelimit_cluster_refresh(cl);
        return NULL;
    }

    return rd;
}


/* a node with a connection, or the next seed's made now */

ngx_http_infer_ratelimit_redis_t *
ngx_http_infer_ratelimit_cluster_any(void)
{
    ngx_uint_t                           i;
    ngx_http_infer_ratelimit_redis_t    *rd;
    ngx_http_infer_ratelimit_cluster_t  *cl;

    cl = &ngx_http_infer_ratelimit_cluster;

    if (cl->rcf == NULL) {
        return NULL;
    }

    for (i = 0; i < cl->n; i++) {
        if (ngx_http_infer_ratelimit_redis_ready(cl->node[i])) {
            return cl->node[i];
        }
    }

    for (i = 0; i < cl->n; i++) {
        rd = cl->node[cl->next++ % cl->n];

        if (ngx_http_infer_ratelimit_redis_open_node(rd) == NGX_OK) {
            return rd;
        }
    }

    return NULL;
}


/* the node at an address, added if new; NULL when the table is full */

ngx_http_infer_ratelimit_redis_t *
ngx_http_infer_ratelimit_cluster_node(in_addr_t addr, in_port_t port)
{
    u_char                              *p;
    size_t                               len;
    ngx_uint_t                           i;
    ngx_http_infer_ratelimit_redis_t    *rd;
    ngx_http_infer_ratelimit_cluster_t  *cl;

    cl = &ngx_http_infer_ratelimit_cluster;

    if (cl->rcf == NULL) {
        /* not a cluster, or the worker's exit */
        return NULL;
    }

    for (i = 0; i < cl->n; i++) {
        rd = cl->node[i];

        if (rd->port == port && rd->addr == addr) {
            return rd;
        }
    }

    if (cl->n == NGX_HTTP_INFER_RL_NODES_MAX) {
        ngx_log_error(NGX_LOG_ERR, cl->log, 0,
                      "infer ratelimit: redis cluster: more than %d nodes",
                      NGX_HTTP_INFER_RL_NODES_MAX);
        return NULL;
    }

    rd = ngx_calloc(sizeof(ngx_http_infer_ratelimit_redis_t), cl->log);
    if (rd == NULL) {
        return NULL;
    }

    ngx_http_infer_ratelimit_redis_node_init(rd, cl->rcf, cl->log);

    len = ngx_inet_ntop(AF_INET, &addr, rd->host, NGX_INET_ADDRSTRLEN);
    rd->host[len] = '\0';
    rd->addr = addr;
    rd->port = port;
    rd->known = 1;
    rd->node = cl->n + 1;

    p = ngx_snprintf(rd->text, sizeof(rd->text), "cluster node %s:%i",
                     rd->host, rd->port);
    rd->name.data = rd->text;
    rd->name.len = p - rd->text;

    cl->node[cl->n++] = rd;

    return rd;
}


/* a MOVED: the slot is this node's now, and more may have moved */

void
ngx_http_infer_ratelimit_cluster_moved(ngx_uint_t slot,
    ngx_http_infer_ratelimit_redis_t *rd)
{
    ngx_http_infer_ratelimit_cluster_t  *cl;

    cl = &ngx_http_infer_ratelimit_cluster;

    if (cl->rcf == NULL || rd->node == 0) {
        return;
    }

    cl->slot[slot] = (uint16_t) rd->node;
    cl->stale = 1;

    ngx_http_infer_ratelimit_cluster_refresh(cl);
}


/*
 * Whether calls can be sent: NGX_OK, the map is known; NGX_AGAIN, it is
 * being asked for (calls wait); NGX_DECLINED, no node can tell it now.
 */

ngx_int_t
ngx_http_infer_ratelimit_cluster_known(void)
{
    ngx_http_infer_ratelimit_cluster_t  *cl;

    cl = &ngx_http_infer_ratelimit_cluster;

    if (cl->rcf == NULL) {
        return NGX_DECLINED;
    }

    if (cl->known) {
        return NGX_OK;
    }

    ngx_http_infer_ratelimit_cluster_refresh(cl);

    return cl->asking ? NGX_AGAIN : NGX_DECLINED;
}


/* a node's connection was lost: the map is asked for again */

void
ngx_http_infer_ratelimit_cluster_lost(void)
{
    ngx_http_infer_ratelimit_cluster.stale = 1;
}


/*
 * For a readiness probe: the map is known, and every master in it has
 * a connection that finished its handshake (one is started for those
 * that have none).
 */

ngx_uint_t
ngx_http_infer_ratelimit_cluster_up(void)
{
    ngx_uint_t                           i, up;
    ngx_http_infer_ratelimit_redis_t    *rd;
    ngx_http_infer_ratelimit_cluster_t  *cl;
    u_char                               used[NGX_HTTP_INFER_RL_NODES_MAX];

    cl = &ngx_http_infer_ratelimit_cluster;

    if (cl->rcf == NULL) {
        return 0;
    }

    if (!cl->known || cl->stale) {
        ngx_http_infer_ratelimit_cluster_refresh(cl);
    }

    if (!cl->known) {
        return 0;
    }

    ngx_memzero(used, sizeof(used));

    for (i = 0; i < NGX_HTTP_INFER_RL_SLOTS; i++) {
        if (cl->slot[i]) {
            used[cl->slot[i] - 1] = 1;
        }
    }

    up = 1;

    for (i = 0; i < cl->n; i++) {
        if (!used[i]) {
            continue;
        }

        rd = cl->node[i];

        if (!ngx_http_infer_ratelimit_redis_ready(rd)) {
            (void) ngx_http_infer_ratelimit_redis_open_node(rd);
            up = 0;
        }
    }

    return up;
}


static void
ngx_http_infer_ratelimit_cluster_refresh(
    ngx_http_infer_ratelimit_cluster_t *cl)
{
    ngx_uint_t                         i;
    ngx_http_infer_ratelimit_redis_t  *rd;

    if (cl->asking) {
        if (ngx_current_msec - cl->asked < cl->wait) {
            return;
        }

        /*
         * Unanswered for as long as a call may wait: that node is left
         * (its NULL answer ends the question, failing the calls that
         * waited for it), and the next one asked.
         */

        rd = cl->asking_rd;
        ngx_http_infer_ratelimit_redis_error(rd, "CLUSTER NODES unanswered "
                                             "after %Mms: reconnecting",
                                             cl->wait);
        ngx_http_infer_ratelimit_redis_drop(rd);

        if (cl->asking) {
            /* in its own callback: hiredis frees it after */
            return;
        }

    } else if (cl->asked
               && ngx_current_msec - cl->asked < NGX_HTTP_INFER_RL_REFRESH)
    {
        return;
    }

    /* the nodes in turn, from one that answered last time */

    for (i = 0; i < cl->n; i++) {
        rd = cl->node[(cl->next + i) % cl->n];

        /* a connection still to be made has its connect time on top */

        cl->wait = cl->rcf->timeout;

        if (!ngx_http_infer_ratelimit_redis_ready(rd)) {
            cl->wait += cl->rcf->connect_timeout;
        }

        if (ngx_http_infer_ratelimit_redis_open_node(rd) == NGX_OK
            && redisAsyncCommand(rd->ac,
                                 ngx_http_infer_ratelimit_cluster_nodes, rd,
                                 "CLUSTER NODES")
               == REDIS_OK)
        {
            break;
        }
    }

    if (i == cl->n) {
        return;
    }

    cl->next += i;
    cl->asking_rd = rd;

    cl->asking = 1;
    cl->stale = 0;
    cl->asked = ngx_current_msec;
    if (cl->asked == 0) {
        cl->asked = 1;
    }
}


static void
ngx_http_infer_ratelimit_cluster_nodes(redisAsyncContext *ac, void *reply,
    void *data)
{
    ngx_http_infer_ratelimit_redis_t *from = data;

    ngx_uint_t                             i, k;
    redisReply                            *rr = reply;
    ngx_http_infer_ratelimit_redis_t      *rd;
    ngx_http_infer_ratelimit_cluster_t    *cl;
    ngx_http_infer_ratelimit_node_addr_t  *addr;
    uint16_t                               index[NGX_HTTP_INFER_RL_NODES_MAX];

    cl = &ngx_http_infer_ratelimit_cluster;

    cl->asking = 0;

    if (cl->rcf == NULL) {
        return;
    }

    if (rr == NULL) {
        ngx_http_infer_ratelimit_cluster_next(cl);
        return;
    }

    if (rr->type != REDIS_REPLY_STRING
        || ngx_http_infer_ratelimit_nodes_parse((u_char *) rr->str, rr->len,
                                                cl->parsed)
           != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, cl->log, 0,
                      "infer ratelimit: redis %V answered CLUSTER NODES "
                      "with no slot map%s%*s",
                      &from->name,
                      rr->type == REDIS_REPLY_ERROR ? ": " : "",
                      (size_t) (rr->type == REDIS_REPLY_ERROR
                                ? ngx_min(rr->len, 256) : 0),
                      rr->type == REDIS_REPLY_ERROR ? rr->str : "");
        ngx_http_infer_ratelimit_cluster_next(cl);
        return;
    }

    addr = cl->parsed->node;

    for (i = 0; i < cl->parsed->n; i++) {
        if (addr[i].addr == 0) {
            /* the node that answered, which does not know its address */
            addr[i].addr = ngx_inet_addr(from->host,
                                         ngx_strlen(from->host));
        }

        rd = ngx_http_infer_ratelimit_cluster_node(addr[i].addr,
                                                   addr[i].port);
        if (rd == NULL) {
            cl->stale = 1;
            ngx_http_infer_ratelimit_redis_release(NGX_DECLINED);
            return;
        }

        index[i] = (uint16_t) rd->node;
    }

    for (k = 0; k < NGX_HTTP_INFER_RL_SLOTS; k++) {
        i = cl->parsed->slot[k];
        cl->slot[k] = i ? index[i - 1] : 0;
    }

    if (!cl->known) {
        ngx_log_error(NGX_LOG_NOTICE, cl->log, 0,
                      "infer ratelimit: redis cluster: %ui masters, map "
                      "from %V", cl->parsed->n, &from->name);
    }

    cl->known = 1;

    if (!cl->timer.timer_set) {
        ngx_add_timer(&cl->timer, NGX_HTTP_INFER_RL_REMAP);
    }

    /* the calls that waited for the map go now */
    ngx_http_infer_ratelimit_redis_release(NGX_OK);
}


/*
 * A node could not tell the map: the next one is asked at once; the
 * calls that waited fail (the outage policy decides) when none can be.
 */

static void
ngx_http_infer_ratelimit_cluster_next(ngx_http_infer_ratelimit_cluster_t *cl)
{
    cl->stale = 1;
    cl->next++;
    cl->asked = 0;

    ngx_http_infer_ratelimit_cluster_refresh(cl);

    if (!cl->asking) {
        ngx_http_infer_ratelimit_redis_release(NGX_DECLINED);
    }
}


static void
ngx_http_infer_ratelimit_cluster_timer(ngx_event_t *ev)
{
    ngx_http_infer_ratelimit_cluster_t  *cl = ev->data;

    if (cl->rcf == NULL || ngx_exiting) {
        return;
    }

    cl->stale = 1;
    ngx_http_infer_ratelimit_cluster_refresh(cl);

    ngx_add_timer(&cl->timer, NGX_HTTP_INFER_RL_REMAP);
}

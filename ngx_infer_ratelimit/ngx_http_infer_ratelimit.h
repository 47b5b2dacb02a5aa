
/*
 * Copyright (C) ngx_infer authors
 *
 * What the rate-limit module's files share: a limit as declared, a limit
 * as evaluated for one request, and the Redis client's interface.
 */


#ifndef _NGX_HTTP_INFER_RATELIMIT_H_INCLUDED_
#define _NGX_HTTP_INFER_RATELIMIT_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_decimal.h"


extern ngx_module_t  ngx_http_infer_ratelimit_module;


#define NGX_HTTP_INFER_RL_REQUESTS     0
#define NGX_HTTP_INFER_RL_TOKENS       1
#define NGX_HTTP_INFER_RL_CONCURRENCY  2    /* in flight; no window */
#define NGX_HTTP_INFER_RL_BUDGET       3    /* nano-dollars */

/* calendar windows, in UTC: a count that starts again at each */
#define NGX_HTTP_INFER_RL_ROLLING      0
#define NGX_HTTP_INFER_RL_DAY          1
#define NGX_HTTP_INFER_RL_MONTH        2

/* how long Redis keeps an in-flight count nobody touches */
#define NGX_HTTP_INFER_RL_CONCURRENCY_TTL  3600000

#define NGX_HTTP_INFER_RL_FAIL_OPEN    0
#define NGX_HTTP_INFER_RL_FAIL_CLOSED  1
#define NGX_HTTP_INFER_RL_LOCAL        2

/* where an item's charge was made, so that LOG reconciles it there */
#define NGX_HTTP_INFER_RL_NOWHERE      0
#define NGX_HTTP_INFER_RL_IN_ZONE      1
#define NGX_HTTP_INFER_RL_IN_REDIS     2
#define NGX_HTTP_INFER_RL_IN_APPROX    3    /* this worker's, to sync */

#define NGX_HTTP_INFER_RL_ADMIT        'a'
#define NGX_HTTP_INFER_RL_RECONCILE    'r'
#define NGX_HTTP_INFER_RL_SYNC         's'    /* approximate limits */


typedef struct {
    ngx_str_t                   name;
    ngx_http_complex_value_t    key;
    ngx_uint_t                  kind;
    uint64_t                    limit;      /* per window */
    ngx_msec_t                  window;     /* 0: concurrency */
    ngx_str_t                   window_text;
    ngx_uint_t                  calendar;   /* NGX_HTTP_INFER_RL_DAY ... */
    ngx_msec_t                  approximate; /* the sync interval; 0: an
                                                exact limit */
    ngx_uint_t                  on_error;
} ngx_http_infer_ratelimit_limit_t;


/* a limit as evaluated for one request */

typedef struct {
    ngx_http_infer_ratelimit_limit_t  *limit;

    ngx_str_t                   key;        /* the key's value */
    ngx_str_t                   id;         /* "name:value", the zone's */
    uint32_t                    hash;

    uint64_t                    limit_n;    /* the limit in force */
    uint64_t                    cost;       /* reserved at admission */
    int64_t                     delta;      /* reconcile: real - cost */
    int64_t                     pre;        /* a correction pending for
                                               the key, made by the
                                               admission first */

    uint64_t                    remaining;
    ngx_msec_t                  reset;      /* until the budget is full */
    ngx_msec_t                  retry;      /* until it would pass */

    uint64_t                    floor;      /* us: this gateway's own use,
                                               the least Redis may hold */

    uint64_t                    end;        /* a calendar window's end, in
                                               ms since the epoch */
    ngx_str_t                   window;     /* its name: "20261206" */

    unsigned                    refused:1;
    unsigned                    known:1;    /* remaining and reset set */
    unsigned                    where:2;
    unsigned                    mirrored:1; /* in Redis, and in the zone */
    unsigned                    unsent:1;   /* a sync's part that could
                                               not be sent */
} ngx_http_infer_ratelimit_item_t;


typedef struct {
    ngx_str_t                   address;    /* as configured, for logs */
    ngx_str_t                   host;       /* NUL-terminated */
    ngx_int_t                   port;
    ngx_str_t                   path;       /* unix socket, NUL-terminated */
    ngx_str_t                   user;
    ngx_str_t                   password;
    ngx_int_t                   db;
    ngx_msec_t                  timeout;
    ngx_msec_t                  connect_timeout;
    ngx_msec_t                  backoff;    /* the longest wait */
    ngx_uint_t                  replicas;
    ngx_str_t                   prefix;
    ngx_msec_t                  coalesce;   /* reconciliations summed for
                                               so long; 0: sent at once */
    ngx_str_t                   master;     /* Sentinel: the master's name */
    ngx_array_t                *sentinels;  /* ngx_addr_t */
    ngx_array_t                *seeds;      /* Cluster: ngx_addr_t */
    ngx_uint_t                  batch;      /* admissions per call at most;
                                               0: one each */
} ngx_http_infer_ratelimit_redis_conf_t;


/* Redis Cluster (ngx_http_infer_ratelimit_nodes.c, _cluster.c) */

#define NGX_HTTP_INFER_RL_SLOTS      16384
#define NGX_HTTP_INFER_RL_NODES_MAX  256

typedef struct {
    in_addr_t                   addr;       /* 0: the node that answered */
    in_port_t                   port;
} ngx_http_infer_ratelimit_node_addr_t;


typedef struct {
    ngx_http_infer_ratelimit_node_addr_t  node[NGX_HTTP_INFER_RL_NODES_MAX];
    ngx_uint_t                  n;
    uint16_t                    slot[NGX_HTTP_INFER_RL_SLOTS];
                                            /* node's index + 1; 0: none */
} ngx_http_infer_ratelimit_nodes_t;


/*
 * Our scripts answer an array of 1 + 3 integers per limit, never one
 * nested: hiredis 0.14 sets no bound on an array (it has no maxelements),
 * and "*2147483647\r\n" would have it allocate 2^31 pointers at once,
 * and as many again for each "*N" inside, for a few bytes sent.  So no
 * call carries more limits than this.
 */
#define NGX_HTTP_INFER_RL_LIMITS_MAX  1024


/* a connection to Redis: the one, or one per cluster node */

typedef struct {
    struct redisAsyncContext   *ac;
    ngx_connection_t           *c;
    ngx_event_t                 connect_timer;
    ngx_uint_t                  state;
    ngx_uint_t                  handshaken; /* SCRIPT LOAD done */
    ngx_msec_t                  next_try;
    ngx_msec_t                  backoff;
    ngx_http_infer_ratelimit_redis_conf_t  *rcf;
    ngx_log_t                  *log;
    time_t                      logged;
    ngx_uint_t                  suppressed;
    ngx_str_t                   name;       /* for logs */
    u_char                      host[NGX_INET_ADDRSTRLEN + 1];
    ngx_int_t                   port;       /* Sentinel's master, or a
                                               cluster node */
    in_addr_t                   addr;       /* a cluster node's */
    ngx_uint_t                  known;      /* host, port are */
    ngx_uint_t                  node;       /* a cluster node's index + 1 */
    u_char                      text[NGX_INET_ADDRSTRLEN + 24];
} ngx_http_infer_ratelimit_redis_t;


/*
 * Called when an admission's reply came (NGX_OK, items filled) or could
 * not come (NGX_DECLINED: Redis down, slow or wrong, the outage policy
 * decides).
 */
typedef void (*ngx_http_infer_ratelimit_done_pt)(ngx_http_request_t *r,
    ngx_int_t rc);


ngx_int_t ngx_http_infer_ratelimit_redis_eval(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_redis_conf_t *rcf, u_char mode,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n,
    ngx_http_infer_ratelimit_done_pt done);
ngx_int_t ngx_http_infer_ratelimit_redis_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_redis_conf_t *rcf);
void ngx_http_infer_ratelimit_redis_exit_process(ngx_cycle_t *cycle);
ngx_uint_t ngx_http_infer_ratelimit_redis_up(void);
ngx_int_t ngx_http_infer_ratelimit_redis_open(void);
ngx_int_t ngx_http_infer_ratelimit_redis_open_node(
    ngx_http_infer_ratelimit_redis_t *rd);
ngx_uint_t ngx_http_infer_ratelimit_redis_ready(
    ngx_http_infer_ratelimit_redis_t *rd);
void ngx_http_infer_ratelimit_redis_node_init(
    ngx_http_infer_ratelimit_redis_t *rd,
    ngx_http_infer_ratelimit_redis_conf_t *rcf, ngx_log_t *log);
void ngx_http_infer_ratelimit_redis_drop(ngx_http_infer_ratelimit_redis_t *rd);
ngx_http_infer_ratelimit_redis_t *ngx_http_infer_ratelimit_redis_main(void);
void ngx_http_infer_ratelimit_redis_error(ngx_http_infer_ratelimit_redis_t *rd,
    const char *fmt, ...);
void ngx_http_infer_ratelimit_redis_sha1(void);
ngx_str_t *ngx_http_infer_ratelimit_redis_script(void);
struct redisAsyncContext;
struct redisReply;
ngx_int_t ngx_http_infer_ratelimit_redis_send(ngx_uint_t slot, u_char *cmd,
    size_t len,
    void (*fn)(struct redisAsyncContext *ac, void *reply, void *data),
    void *data);
void ngx_http_infer_ratelimit_redis_reset(ngx_uint_t slot, const char *why);
void ngx_http_infer_ratelimit_redis_moved(struct redisReply *rr);
void ngx_http_infer_ratelimit_redis_master(u_char *host, size_t len,
    ngx_int_t port);
void ngx_http_infer_ratelimit_sentinel_discover(
    ngx_http_infer_ratelimit_redis_conf_t *rcf, ngx_log_t *log);
void ngx_http_infer_ratelimit_sentinel_exit(void);

#define NGX_HTTP_INFER_RL_MOVED  1
#define NGX_HTTP_INFER_RL_ASK    2

ngx_uint_t ngx_http_infer_ratelimit_slot(u_char *key, size_t len);
ngx_int_t ngx_http_infer_ratelimit_nodes_redirect(u_char *p, size_t len,
    ngx_uint_t *slot, ngx_http_infer_ratelimit_node_addr_t *addr);
ngx_int_t ngx_http_infer_ratelimit_nodes_parse(u_char *p, size_t len,
    ngx_http_infer_ratelimit_nodes_t *nodes);
ngx_int_t ngx_http_infer_ratelimit_cluster_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_redis_conf_t *rcf);
void ngx_http_infer_ratelimit_cluster_exit_process(void);
ngx_http_infer_ratelimit_redis_t *ngx_http_infer_ratelimit_cluster_slot(
    ngx_uint_t slot);
ngx_http_infer_ratelimit_redis_t *ngx_http_infer_ratelimit_cluster_node(
    in_addr_t addr, in_port_t port);
ngx_http_infer_ratelimit_redis_t *ngx_http_infer_ratelimit_cluster_any(void);
void ngx_http_infer_ratelimit_cluster_moved(ngx_uint_t slot,
    ngx_http_infer_ratelimit_redis_t *rd);
void ngx_http_infer_ratelimit_cluster_lost(void);
ngx_int_t ngx_http_infer_ratelimit_cluster_known(void);
ngx_uint_t ngx_http_infer_ratelimit_cluster_up(void);

/* the parts of the Redis client a fuzzer drives: hiredis's types */
struct redisReader;
void ngx_http_infer_ratelimit_redis_bound(struct redisReader *reader);
ngx_int_t ngx_http_infer_ratelimit_redis_answer(struct redisReply *rr,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n);
ngx_shm_zone_t *ngx_http_infer_ratelimit_zone_add(ngx_conf_t *cf,
    ngx_str_t *name, size_t size);
ngx_int_t ngx_http_infer_ratelimit_zone_eval(ngx_shm_zone_t *zone,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n, ngx_uint_t local,
    ngx_uint_t divisor);
void ngx_http_infer_ratelimit_zone_reconcile(ngx_shm_zone_t *zone,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n,
    ngx_uint_t divisor);
void ngx_http_infer_ratelimit_zone_floor(ngx_shm_zone_t *zone,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n,
    ngx_uint_t divisor, ngx_msec_t slack);
void ngx_http_infer_ratelimit_zone_mirror(ngx_shm_zone_t *zone,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n,
    ngx_uint_t divisor);

char *ngx_http_infer_ratelimit_redis(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);


/* a call to Redis (ngx_http_infer_ratelimit_redis_call.c) */

typedef struct ngx_http_infer_ratelimit_call_s
    ngx_http_infer_ratelimit_call_t;


typedef struct {
    ngx_event_t                         ev;      /* timeout; resumption */
    ngx_http_request_t                 *r;
    ngx_http_infer_ratelimit_done_pt    done;
    ngx_http_infer_ratelimit_item_t    *items;
    ngx_uint_t                          nitems;
    ngx_int_t                           rc;

    int                                 argc;
    const char                        **argv;
    size_t                             *argvlen;

    ngx_http_infer_ratelimit_redis_t   *rd;      /* where it was sent */
    ngx_http_infer_ratelimit_call_t    *call;    /* a part's */
    ngx_uint_t                         *index;   /* a part's items' places
                                                    in the call's */
    ngx_uint_t                          slot;
    ngx_uint_t                          redirects;

    ngx_queue_t                         hold;    /* held: in the list */

    u_char                              mode;
    unsigned                            pending:1;  /* hiredis holds it */
    unsigned                            answered:1;
    unsigned                            admitted:1;
    unsigned                            retried:1;
    unsigned                            queued:1;   /* waits for a batch */
    unsigned                            held:1;     /* waits for the
                                                       cluster's map */
    unsigned                            gated:1;    /* an admission sent
                                                       alone, counted */
} ngx_http_infer_ratelimit_waiter_t;


ngx_int_t ngx_http_infer_ratelimit_redis_call(
    ngx_http_infer_ratelimit_waiter_t *w,
    ngx_http_infer_ratelimit_redis_t *rd);
void ngx_http_infer_ratelimit_redis_reply(struct redisAsyncContext *ac,
    void *reply, void *privdata);
void ngx_http_infer_ratelimit_redis_answered(struct redisAsyncContext *ac,
    ngx_http_infer_ratelimit_waiter_t *w, struct redisReply *rr);
void ngx_http_infer_ratelimit_redis_waiter_free(
    ngx_http_infer_ratelimit_waiter_t *w);
u_char *ngx_http_infer_ratelimit_redis_evalsha(void);
void ngx_http_infer_ratelimit_redis_release(ngx_int_t rc);

/* admissions batched (ngx_http_infer_ratelimit_batch.c) */

#define NGX_HTTP_INFER_RL_BATCH_MAX   64
#define NGX_HTTP_INFER_RL_BATCH_KEYS  256

void ngx_http_infer_ratelimit_batch_add(ngx_http_infer_ratelimit_waiter_t *w,
    ngx_http_infer_ratelimit_redis_t *rd);
void ngx_http_infer_ratelimit_batch_remove(
    ngx_http_infer_ratelimit_waiter_t *w);
void ngx_http_infer_ratelimit_batch_answered(void);


/* what the module's files share */

typedef struct {
    ngx_flag_t                  enable;
    ngx_array_t                *limits;     /* limit_t */
    ngx_flag_t                  shadow;
    ngx_flag_t                  headers;
    ngx_uint_t                  status_code;
    ngx_uint_t                  default_max_tokens;
    ngx_flag_t                  charge_cache_hits;
    ngx_flag_t                  events;     /* infer_usage_events */
} ngx_http_infer_ratelimit_loc_conf_t;


typedef struct {
    ngx_http_infer_ratelimit_item_t  *items;
    ngx_uint_t                  nitems;
    ngx_uint_t                  nexact;     /* the first ones; then the
                                               approximate ones */
    ngx_uint_t                  status;     /* PASSED ... SHADOW */
    ngx_http_infer_ratelimit_item_t  *refused;

    unsigned                    decided:1;
    unsigned                    limited:1;
    unsigned                    sent:1;
    unsigned                    waiting:1;
    unsigned                    reconciled:1;
} ngx_http_infer_ratelimit_ctx_t;


#define NGX_HTTP_INFER_RL_INPUTS               9


/* the usage events' stream (ngx_http_infer_ratelimit_events.c) */

typedef struct {
    ngx_str_t                   key;        /* the stream */
    ngx_uint_t                  maxlen;     /* MAXLEN ~ */
    size_t                      queue;      /* bytes queued, and in flight */
    ngx_uint_t                  batch;      /* events per flush */
    ngx_msec_t                  flush;      /* the longest an event waits */
    ngx_shm_zone_t             *stats;      /* written, dropped, failed */
    ngx_array_t                 fields;     /* events_field_t */
    size_t                      max;        /* the longest event */
    ngx_str_t                   head;       /* XADD key MAXLEN ~ n * */
} ngx_http_infer_ratelimit_events_conf_t;


typedef struct {
    ngx_http_infer_export_t     export;     /* first: the metrics page's */
    ngx_shm_zone_t             *shm_zone;
    ngx_shm_zone_t             *stats_zone; /* degraded decisions, shared */
    ngx_array_t                 names;      /* limit_t *, one per name */
    ngx_http_infer_ratelimit_redis_conf_t  *redis;
    ngx_http_infer_ratelimit_events_conf_t *events;
    ngx_msec_t                  approx;     /* the shortest sync interval
                                               of approximate limits */
    ngx_int_t                   input[NGX_HTTP_INFER_RL_INPUTS];
                                            /* variable indexes, or
                                               NGX_DECLINED */
} ngx_http_infer_ratelimit_main_conf_t;


char *ngx_http_infer_ratelimit_events_stream(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
ngx_int_t ngx_http_infer_ratelimit_events_init(ngx_conf_t *cf,
    ngx_http_infer_ratelimit_main_conf_t *rmcf);
ngx_int_t ngx_http_infer_ratelimit_events_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_events_conf_t *ecf);
void ngx_http_infer_ratelimit_events_exit_process(ngx_cycle_t *cycle);
void ngx_http_infer_ratelimit_events_quit(void);

ngx_int_t ngx_http_infer_ratelimit_coalesce_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_redis_conf_t *rcf);
void ngx_http_infer_ratelimit_coalesce_exit_process(ngx_cycle_t *cycle);
ngx_int_t ngx_http_infer_ratelimit_coalesce_add(
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n);
void ngx_http_infer_ratelimit_coalesce_flush(void);
ngx_int_t ngx_http_infer_ratelimit_approx_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_ratelimit_redis_conf_t *rcf, ngx_msec_t interval);
void ngx_http_infer_ratelimit_approx_exit_process(ngx_cycle_t *cycle);
ngx_int_t ngx_http_infer_ratelimit_approx_admit(
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n, ngx_uint_t shadow);
void ngx_http_infer_ratelimit_approx_move(
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n, ngx_uint_t undo);
void ngx_http_infer_ratelimit_approx_sync(void);
void ngx_http_infer_ratelimit_approx_synced(ngx_int_t rc, ngx_uint_t sent);
ngx_http_infer_ratelimit_item_t *ngx_http_infer_ratelimit_approx_items(
    ngx_uint_t *n);
void ngx_http_infer_ratelimit_coalesce_admit(
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n);
ngx_rbtree_node_t *ngx_http_infer_ratelimit_key_find(ngx_rbtree_t *tree,
    ngx_http_infer_ratelimit_item_t *item, uint32_t *hash);
void ngx_http_infer_ratelimit_key_copy(ngx_http_infer_ratelimit_item_t *dst,
    ngx_http_infer_ratelimit_item_t *src, u_char *p);
void ngx_http_infer_ratelimit_key_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);
void ngx_http_infer_ratelimit_coalesce_restore(
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n);

ngx_http_infer_ratelimit_ctx_t *ngx_http_infer_ratelimit_get_ctx(
    ngx_http_request_t *r);
void ngx_http_infer_ratelimit_headers_init(ngx_conf_t *cf);


#endif /* _NGX_HTTP_INFER_RATELIMIT_H_INCLUDED_ */

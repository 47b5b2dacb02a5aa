/*
 * Copyright (C) ngx_infer authors
 *
 * ngx_infer_balance: what its files share, the pool's configuration and
 * its shared-memory counters.
 *
 *   ngx_http_infer_balance_module.c   the directives, picking a peer
 *   ngx_http_infer_balance_scrape.c   reading the backends' metric pages
 *   ngx_http_infer_balance_signals.c  the page parser (pure, fuzzed)
 *   ngx_http_infer_balance_pool.c     shedding, the status page
 *   ngx_http_infer_balance_eject.c    outlier ejection
 *
 * The balancer is built into the route module's shared object, and the
 * two meet in two places only:
 *
 *   - balance reads route's variables by index ($infer_model_target,
 *     $infer_prefix_hash, $infer_prompt_tokens_estimate,
 *     $infer_max_tokens) when it picks a peer;
 *   - route calls ngx_http_infer_balance_shed() (the one hook): when a
 *     pool of the cycle sheds (main conf's "shedding"), route's PREACCESS
 *     handler wraps the location's content handler, so that the check
 *     runs in the content phase, after authentication ($infer_plan) and
 *     rate limits, and before proxy_pass.
 */


#ifndef _NGX_HTTP_INFER_BALANCE_H_INCLUDED_
#define _NGX_HTTP_INFER_BALANCE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_balance_signals.h"


/* no single request counts for more: a client's max_tokens is its own */
#define NGX_HTTP_INFER_BALANCE_TOKENS_MAX  1000000

#define NGX_HTTP_INFER_BALANCE_LEAST     0
#define NGX_HTTP_INFER_BALANCE_AFFINITY  1
#define NGX_HTTP_INFER_BALANCE_SPILL     2
#define NGX_HTTP_INFER_BALANCE_EXTERNAL  3
#define NGX_HTTP_INFER_BALANCE_SHED      4

/*
 * Averages kept in the zone as exponentially weighted moving averages in
 * fixed point: each new value weighs 1/scale, and the sum is kept times
 * the scale (see ngx_http_infer_balance_ewma()).
 */
#define NGX_HTTP_INFER_BALANCE_AVERAGE_SCALE  16    /* the pool's request */
#define NGX_HTTP_INFER_BALANCE_PACE_SCALE      8    /* a peer's time per
                                                       token */

/* the status page's room per endpoint (a line takes about 700 bytes) */
#define NGX_HTTP_INFER_BALANCE_STATUS_PEER   1024

/* a peer's time to first byte is judged after this many answers */
#define NGX_HTTP_INFER_BALANCE_SLOW_SAMPLES  8

/* and is slow only above this, whatever its peers' */
#define NGX_HTTP_INFER_BALANCE_SLOW_MIN      100

/*
 * The prompt prefixes a pool remembers having seen: sets of two entries
 * (a power of 2 of them), one set per prefix hash's low bits.
 * prefix_affinity keeps a prefix on its peer only once it has been seen,
 * so that a prompt nobody shares is placed by load alone.  A prefix seen
 * once takes a set's second entry; seen again, it moves to the first:
 * prompts seen once replace one another, never a prefix seen twice.
 */
#define NGX_HTTP_INFER_BALANCE_SEEN          2048

/* a metric page larger than this fails the scrape */
#define NGX_HTTP_INFER_SCRAPE_PAGE_MAX     (4 * 1024 * 1024)


/*
 * One peer, shared by all workers.  The signals are written by the worker
 * that scraped them, field by field: a reader may see a page's queue with
 * the previous page's KV use, which is as good a picture as either.
 */

typedef struct {
    ngx_atomic_t                        tokens;     /* in flight */
    ngx_atomic_t                        picks;
    ngx_atomic_t                        pace;       /* microseconds per
                                                       token, x PACE_SCALE */

    ngx_atomic_t                        updated;    /* msec of the last
                                                       good scrape, 0 */
    ngx_atomic_t                        found;      /* signals on it */
    ngx_atomic_t                        value[3];   /* queue, running, kv:
                                                       thousandths */
    ngx_atomic_t                        max_lora;
    ngx_atomic_t                        nrunning;
    ngx_atomic_t                        nwaiting;
    uint32_t                            lora[2
                                            * NGX_HTTP_INFER_SIGNALS_LORA_MAX];
                                                    /* running, waiting */

    ngx_atomic_t                        scrapes;
    ngx_atomic_t                        failures;

    /* outlier ejection, see ngx_http_infer_balance_eject.c */
    ngx_atomic_t                        errors;     /* answers failed in a
                                                       row */
    ngx_atomic_t                        scrape_errors; /* scrapes, same */
    ngx_atomic_t                        ttfb;       /* msec to the first
                                                       byte, x PACE_SCALE */
    ngx_atomic_t                        samples;    /* of ttfb, since the
                                                       peer came back */
    ngx_atomic_t                        ejected;    /* msec: out until,
                                                       0: in */
    ngx_atomic_t                        returned;   /* msec: came back */
    ngx_atomic_t                        multiplier; /* of the ejection
                                                       time */
    ngx_atomic_t                        ejections;
    ngx_atomic_t                        why;        /* the last ejection's
                                                       reason */
} ngx_http_infer_balance_node_t;


/*
 * The pool's zone: this context, a node per peer, then a row per process
 * slot of what that process has in flight on each peer (NGX_MAX_PROCESSES
 * rows), so that a worker that replaces one that died can release what
 * the dead one left counted.
 */

typedef struct {
    ngx_uint_t                          number;     /* primary + backup */
    ngx_atomic_t                        seen[2
                                             * NGX_HTTP_INFER_BALANCE_SEEN];
                                                    /* prefixes, by hash */
    ngx_atomic_t                        average;    /* of the requests'
                                                       estimates, x
                                                       AVERAGE_SCALE */
    ngx_atomic_t                        scrape_next; /* msec: the next
                                                       round, claimed by
                                                       one worker */
    ngx_http_infer_balance_node_t       node[1];
} ngx_http_infer_balance_shctx_t;


#define NGX_HTTP_INFER_BALANCE_SHCTX_SIZE(n)                                 \
    (sizeof(ngx_http_infer_balance_shctx_t)                                  \
     + (n) * sizeof(ngx_http_infer_balance_node_t)                           \
     + NGX_MAX_PROCESSES * (n) * sizeof(ngx_atomic_t))


/* this process's row */

#define ngx_http_infer_balance_mine(sh)                                      \
    ((ngx_atomic_t *) &(sh)->node[(sh)->number]                              \
     + (ngx_uint_t) ngx_process_slot * (sh)->number)


typedef struct {
    ngx_str_t                           uri;
    ngx_msec_t                          interval;
    ngx_msec_t                          timeout;
    ngx_msec_t                          stale;
    in_port_t                           port;       /* 0: the peer's */
} ngx_http_infer_balance_scrape_t;


typedef struct {
    ngx_uint_t                          queue;      /* thousandths */
    ngx_uint_t                          kv;         /* thousandths */
    ngx_uint_t                          admit;
    ngx_msec_t                          wait;
    ngx_http_complex_value_t           *priority;
} ngx_http_infer_balance_shed_t;


#define NGX_HTTP_INFER_EJECT_ERRORS   0
#define NGX_HTTP_INFER_EJECT_SCRAPES  1
#define NGX_HTTP_INFER_EJECT_SLOW     2

typedef struct {
    ngx_uint_t                          errors;     /* in a row, 0: off */
    ngx_uint_t                          scrapes;    /* in a row, 0: off */
    ngx_uint_t                          slow;       /* x 100, 0: off */
    ngx_msec_t                          time;
    ngx_msec_t                          max_time;
    ngx_uint_t                          max_share;  /* percent */
} ngx_http_infer_balance_eject_t;


typedef struct {
    ngx_flag_t                          enable;
    ngx_flag_t                          affinity;
    ngx_flag_t                          pace;
    ngx_uint_t                          bound;      /* x 100 */
    ngx_uint_t                          default_tokens;
    ngx_uint_t                          default_max_tokens;

    /* token equivalents of the signals, per unit (kv: at 100%) */
    ngx_uint_t                          cost[4];
    ngx_uint_t                          score_set;
    ngx_uint_t                          names_set;  /* bit per signal */
    ngx_http_infer_signals_conf_t       names;

    ngx_http_infer_balance_scrape_t    *scrape;
    ngx_http_infer_balance_shed_t      *shed;
    ngx_http_infer_balance_eject_t     *eject;
    ngx_http_complex_value_t           *external;

    ngx_int_t                           prompt_index;
    ngx_int_t                           max_tokens_index;
    ngx_int_t                           prefix_index;
    ngx_int_t                           target_index;

    ngx_http_upstream_srv_conf_t       *upstream;
    ngx_uint_t                          number;     /* primary + backup */
    uint32_t                           *hash;       /* of each peer's name */
    ngx_str_t                          *name;       /* each peer's */
    ngx_shm_zone_t                     *shm_zone;
    ngx_http_infer_balance_shctx_t     *sh;
} ngx_http_infer_balance_srv_conf_t;


typedef struct {
    ngx_http_infer_export_t             export;     /* first: the metrics
                                                       module's page */
    ngx_array_t                         pools;      /* of srv conf * */
    ngx_uint_t                          shedding;   /* a pool sheds: the
                                                       route module checks
                                                       its requests */
    ngx_uint_t                          timing;     /* a pool ejects slow
                                                       peers: the first
                                                       byte is timed */
} ngx_http_infer_balance_main_conf_t;


/* the last pick of a request, for the variables */

typedef struct {
    ngx_str_t                           endpoint;
    ngx_uint_t                          score;
    ngx_uint_t                          reason;
    ngx_msec_t                          first;      /* the answer's first
                                                       byte, 0 */
} ngx_http_infer_balance_ctx_t;


ngx_http_infer_balance_ctx_t *ngx_http_infer_balance_get_ctx(
    ngx_http_request_t *r);

/* ngx_http_infer_balance_scrape.c */
char *ngx_http_infer_balance_scrape(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_infer_balance_signal(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_infer_balance_scrape_init_process(ngx_cycle_t *cycle,
    ngx_http_infer_balance_srv_conf_t *bcf);

/*
 * ngx_http_infer_balance_pool.c; shed() is the route module's hook, called
 * in the content phase: NGX_DECLINED to go on, else what a content
 * handler returns.
 */
ngx_int_t ngx_http_infer_balance_shed(ngx_http_request_t *r,
    ngx_str_t *upstream);
char *ngx_http_infer_balance_shed_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_infer_balance_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
size_t ngx_http_infer_balance_export_size(void *conf);
u_char *ngx_http_infer_balance_export_write(void *conf, u_char *p,
    ngx_http_infer_export_meta_pt meta, ngx_uint_t om);

/*
 * ngx_http_infer_balance_eject.c: n is the peer's node, primary peers
 * first; ejected() is called on every pick, and brings a peer back in
 * once its time is up.
 */
char *ngx_http_infer_balance_eject_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_uint_t ngx_http_infer_balance_ejected(
    ngx_http_infer_balance_srv_conf_t *bcf, ngx_uint_t n, ngx_msec_t now);
void ngx_http_infer_balance_answered(ngx_http_infer_balance_srv_conf_t *bcf,
    ngx_uint_t n, ngx_uint_t failed, ngx_msec_t ttfb, ngx_log_t *log);
void ngx_http_infer_balance_scraped(ngx_http_infer_balance_srv_conf_t *bcf,
    ngx_uint_t n, ngx_uint_t failed);
ngx_int_t ngx_http_infer_balance_eject_init(ngx_conf_t *cf);
extern ngx_str_t  ngx_http_infer_balance_eject_reasons[];

extern ngx_module_t  ngx_http_infer_balance_module;

/* "queue", "running", "kv", "lora": the signals' names in directives */
extern ngx_str_t  ngx_http_infer_balance_signals[];


/* an average kept times scale, with value weighing 1/scale */

static ngx_inline ngx_atomic_uint_t
ngx_http_infer_balance_ewma(ngx_atomic_uint_t avg, ngx_atomic_uint_t value,
    ngx_uint_t scale)
{
    return avg ? avg + value - avg / scale : scale * value;
}


/* the peer's figures are fresh: from a good scrape within stale */

static ngx_inline ngx_uint_t
ngx_http_infer_balance_fresh(ngx_http_infer_balance_srv_conf_t *bcf,
    ngx_http_infer_balance_node_t *node, ngx_msec_t now)
{
    ngx_msec_t  updated;

    if (bcf->scrape == NULL) {
        return 0;
    }

    updated = node->updated;

    /* another worker's clock may be a little ahead of this one's */

    return updated
           && (ngx_msec_int_t) (now - updated)
              <= (ngx_msec_int_t) bcf->scrape->stale;
}



#endif /* _NGX_HTTP_INFER_BALANCE_H_INCLUDED_ */

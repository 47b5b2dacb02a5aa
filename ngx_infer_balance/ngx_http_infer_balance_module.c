/*
 * Copyright (C) ngx_infer authors
 *
 * ngx_http_infer_balance_module: a load-aware balancer for model pools,
 * built into the route module's shared object.  It picks the peer with
 * the least cost per unit of weight: the estimated tokens in flight,
 * counted across all workers in shared memory, plus, when the pool's
 * metric pages are scraped (ngx_http_infer_balance_scrape.c), the
 * backends' queue, running requests and KV-cache use in token
 * equivalents.  With prefix_affinity, requests with the same prompt
 * prefix go to the same peer (rendezvous hashing), a prefix seen before
 * while its cost stays within a bound of the pool's average, one seen for
 * the first time only while it is about the cheapest.  It runs over the
 * round-robin peer data, as least_conn does, so weight=, max_fails=,
 * fail_timeout=, max_conns=, down and backup keep working.  It also sheds
 * requests of low priority when every peer is saturated, follows an
 * external picker's choice, takes failing peers out of the pool
 * (ngx_http_infer_balance_eject.c), and shows its state on a status page.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_balance.h"


/* the costs of the signals, per unit */
#define NGX_HTTP_INFER_BALANCE_COST_QUEUE    0
#define NGX_HTTP_INFER_BALANCE_COST_RUNNING  1
#define NGX_HTTP_INFER_BALANCE_COST_KV       2
#define NGX_HTTP_INFER_BALANCE_COST_LORA     3

/* costs: a peer not usable, one whose signals are stale, the largest */
#define NGX_HTTP_INFER_BALANCE_UNUSABLE      ((uint64_t) -1)
#define NGX_HTTP_INFER_BALANCE_STALE         ((uint64_t) -2)
#define NGX_HTTP_INFER_BALANCE_CAP           ((uint64_t) 1 << 32)

/* the slowest pace counted, microseconds per token */
#define NGX_HTTP_INFER_BALANCE_PACE_MAX      1000000


typedef struct {
    /* the first member: the round-robin code takes it as its own data */
    ngx_http_upstream_rr_peer_data_t    rrp;

    ngx_http_infer_balance_srv_conf_t  *conf;
    ngx_http_request_t                 *request;
    ngx_uint_t                          base;       /* node of rrp.peers'
                                                       first peer */
    ngx_uint_t                          tokens;     /* this request's
                                                       estimate */
    uint32_t                            prefix;
    uint32_t                            target;     /* hash of the model
                                                       id, for LoRA */
    unsigned                            has_prefix:1;
    unsigned                            seen:1;     /* the prefix, before */
    unsigned                            has_target:1;
    unsigned                            external:1; /* asked already */
    unsigned                            picked:1;
    ngx_msec_t                          start;      /* of this attempt */
    ngx_str_t                           destination; /* the external
                                                       picker's choice */
    uint64_t                           *cost;       /* per peer, scratch */
    ngx_http_infer_balance_node_t      *node;       /* counted at, until
                                                       freed */
    ngx_atomic_t                       *mine;       /* the same, on this
                                                       process's account */
} ngx_http_infer_balance_peer_data_t;


static ngx_int_t ngx_http_infer_balance_init_upstream(ngx_conf_t *cf,
    ngx_http_upstream_srv_conf_t *us);
static ngx_int_t ngx_http_infer_balance_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static ngx_int_t ngx_http_infer_balance_init_peer(ngx_http_request_t *r,
    ngx_http_upstream_srv_conf_t *us);
static ngx_uint_t ngx_http_infer_balance_usable(
    ngx_http_upstream_rr_peer_data_t *rrp, ngx_http_upstream_rr_peer_t *peer,
    ngx_uint_t i, time_t now);
static ngx_int_t ngx_http_infer_balance_get_peer(ngx_peer_connection_t *pc,
    void *data);
static ngx_http_upstream_rr_peer_t *ngx_http_infer_balance_external(
    ngx_http_infer_balance_peer_data_t *bp, time_t now, ngx_uint_t *index);
static void ngx_http_infer_balance_costs(
    ngx_http_infer_balance_peer_data_t *bp, time_t now);
static void ngx_http_infer_balance_free_peer(ngx_peer_connection_t *pc,
    void *data, ngx_uint_t state);
static ngx_uint_t ngx_http_infer_balance_estimate(ngx_http_request_t *r,
    ngx_http_infer_balance_srv_conf_t *bcf);
static ngx_uint_t ngx_http_infer_balance_seen(
    ngx_http_infer_balance_shctx_t *sh, uint32_t prefix);
static ngx_inline uint64_t ngx_http_infer_balance_rank(uint32_t prefix,
    uint32_t peer);
static ngx_uint_t ngx_http_infer_balance_has_adapter(
    ngx_http_infer_balance_node_t *node, uint32_t target);

static ngx_int_t ngx_http_infer_balance_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_infer_balance_add_variables(ngx_conf_t *cf);
static ngx_int_t ngx_http_infer_balance_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_infer_balance_init_process(ngx_cycle_t *cycle);
static void *ngx_http_infer_balance_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_infer_balance_create_conf(ngx_conf_t *cf);
static char *ngx_http_infer_balance(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_infer_balance_score(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_infer_balance_external_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);


static ngx_command_t  ngx_http_infer_balance_commands[] = {

    { ngx_string("infer_balance"),
      NGX_HTTP_UPS_CONF|NGX_CONF_ANY,
      ngx_http_infer_balance,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_balance_scrape"),
      NGX_HTTP_UPS_CONF|NGX_CONF_ANY,
      ngx_http_infer_balance_scrape,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_balance_signal"),
      NGX_HTTP_UPS_CONF|NGX_CONF_2MORE,
      ngx_http_infer_balance_signal,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_balance_score"),
      NGX_HTTP_UPS_CONF|NGX_CONF_1MORE,
      ngx_http_infer_balance_score,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_balance_shed"),
      NGX_HTTP_UPS_CONF|NGX_CONF_1MORE,
      ngx_http_infer_balance_shed_conf,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_balance_eject"),
      NGX_HTTP_UPS_CONF|NGX_CONF_ANY,
      ngx_http_infer_balance_eject_conf,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_balance_external"),
      NGX_HTTP_UPS_CONF|NGX_CONF_TAKE1,
      ngx_http_infer_balance_external_conf,
      NGX_HTTP_SRV_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_balance_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_infer_balance_status,
      0,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_infer_balance_module_ctx = {
    ngx_http_infer_balance_add_variables,  /* preconfiguration */
    ngx_http_infer_balance_postconfiguration, /* postconfiguration */

    ngx_http_infer_balance_create_main_conf, /* create main configuration */
    NULL,                                  /* init main configuration */

    ngx_http_infer_balance_create_conf,    /* create server configuration */
    NULL,                                  /* merge server configuration */

    NULL,                                  /* create location configuration */
    NULL                                   /* merge location configuration */
};


ngx_module_t  ngx_http_infer_balance_module = {
    NGX_MODULE_V1,
    &ngx_http_infer_balance_module_ctx,    /* module context */
    ngx_http_infer_balance_commands,       /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_infer_balance_init_process,   /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_variable_t  ngx_http_infer_balance_vars[] = {

    { ngx_string("infer_endpoint"), NULL, ngx_http_infer_balance_variable,
      0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_endpoint_score"), NULL,
      ngx_http_infer_balance_variable, 1, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_endpoint_reason"), NULL,
      ngx_http_infer_balance_variable, 2, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


/* the signals' costs by default, in average requests */

static uint64_t  ngx_http_infer_balance_auto[] = { 1, 0, 2, 2 };


ngx_str_t  ngx_http_infer_balance_signals[] = {
    ngx_string("queue"),
    ngx_string("running"),
    ngx_string("kv"),
    ngx_string("lora")
};


static ngx_str_t  ngx_http_infer_balance_reasons[] = {
    ngx_string("least_tokens"),
    ngx_string("affinity"),
    ngx_string("spill"),
    ngx_string("external"),
    ngx_string("shed")
};


static ngx_int_t
ngx_http_infer_balance_init_upstream(ngx_conf_t *cf,
    ngx_http_upstream_srv_conf_t *us)
{
    size_t                              size;
    u_char                             *p;
    uint32_t                            crc;
    ngx_str_t                           name;
    ngx_uint_t                          n;
    ngx_http_upstream_rr_peer_t        *peer;
    ngx_http_upstream_rr_peers_t       *peers, *list;
    ngx_http_infer_signals_conf_t       names;
    ngx_http_infer_balance_srv_conf_t  *bcf, **pool;
    ngx_http_infer_balance_main_conf_t *bmcf;

    if (ngx_http_upstream_init_round_robin(cf, us) != NGX_OK) {
        return NGX_ERROR;
    }

    us->peer.init = ngx_http_infer_balance_init_peer;

    bcf = ngx_http_conf_upstream_srv_conf(us, ngx_http_infer_balance_module);
    bcf->upstream = us;
    peers = us->peer.data;

    /* the metric names of the signals infer_balance_signal left alone */

    ngx_http_infer_signals_default(&names);

    for (n = 0; n < NGX_HTTP_INFER_SIGNALS; n++) {
        if (!(bcf->names_set & (1 << n))) {
            ngx_memcpy(bcf->names.names[n], names.names[n],
                       sizeof(names.names[n]));
            bcf->names.nnames[n] = names.nnames[n];
        }
    }

    bmcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_infer_balance_module);

    pool = ngx_array_push(&bmcf->pools);
    if (pool == NULL) {
        return NGX_ERROR;
    }

    *pool = bcf;

    bcf->number = peers->number + (peers->next ? peers->next->number : 0);

    bcf->hash = ngx_palloc(cf->pool, bcf->number * sizeof(uint32_t));
    if (bcf->hash == NULL) {
        return NGX_ERROR;
    }

    bcf->name = ngx_palloc(cf->pool, bcf->number * sizeof(ngx_str_t));
    if (bcf->name == NULL) {
        return NGX_ERROR;
    }

    /*
     * The zone is named after the pool and its peers: a reload that keeps
     * them reuses the counters (requests of the old workers still release
     * theirs there), one that changes them starts afresh.
     */

    ngx_crc32_init(crc);
    n = 0;

    for (list = peers; list; list = list->next) {
        for (peer = list->peer; peer; peer = peer->next) {

#if (NGX_HAVE_UNIX_DOMAIN)
            if (bcf->scrape && bcf->scrape->port
                && peer->sockaddr->sa_family == AF_UNIX)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"infer_balance_scrape\" with port= "
                                   "cannot scrape the unix socket \"%V\"",
                                   &peer->name);
                return NGX_ERROR;
            }
#endif

            bcf->name[n] = peer->name;
            bcf->hash[n++] = ngx_murmur_hash2(peer->name.data,
                                              peer->name.len);
            ngx_crc32_update(&crc, peer->name.data, peer->name.len);
            ngx_crc32_update(&crc, (u_char *) "\n", 1);
        }

        ngx_crc32_update(&crc, (u_char *) "|", 1);
    }

    ngx_crc32_final(crc);

    /* and after the layout of its nodes, which another build may change */

    name.len = sizeof("infer_balance:::") - 1 + us->host.len + 8
               + NGX_SIZE_T_LEN;
    name.data = ngx_pnalloc(cf->pool, name.len);
    if (name.data == NULL) {
        return NGX_ERROR;
    }

    p = ngx_sprintf(name.data, "infer_balance:%V:%08xD:%uz", &us->host, crc,
                    NGX_HTTP_INFER_BALANCE_SHCTX_SIZE(1));
    name.len = p - name.data;

    /* the slab pool's own page descriptors come out of the zone too */

    size = ngx_align(NGX_HTTP_INFER_BALANCE_SHCTX_SIZE(bcf->number),
                     ngx_pagesize);
    size += 8 * ngx_pagesize + size / 32;

    bcf->shm_zone = ngx_shared_memory_add(cf, &name, size,
                                          &ngx_http_infer_balance_module);
    if (bcf->shm_zone == NULL) {
        return NGX_ERROR;
    }

    bcf->shm_zone->init = ngx_http_infer_balance_init_zone;
    bcf->shm_zone->data = bcf;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_balance_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_infer_balance_srv_conf_t  *obcf = data;

    size_t                              len;
    ngx_slab_pool_t                    *shpool;
    ngx_http_infer_balance_srv_conf_t  *bcf;

    bcf = shm_zone->data;

    if (obcf && obcf->sh && obcf->sh->number == bcf->number) {
        bcf->sh = obcf->sh;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        bcf->sh = shpool->data;
        return NGX_OK;
    }

    bcf->sh = ngx_slab_calloc(shpool,
                              NGX_HTTP_INFER_BALANCE_SHCTX_SIZE(bcf->number));
    if (bcf->sh == NULL) {
        return NGX_ERROR;
    }

    bcf->sh->number = bcf->number;
    shpool->data = bcf->sh;

    len = sizeof(" in infer_balance zone \"\"") + shm_zone->shm.name.len;

    shpool->log_ctx = ngx_slab_alloc(shpool, len);
    if (shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(shpool->log_ctx, " in infer_balance zone \"%V\"%Z",
                &shm_zone->shm.name);

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_balance_init_peer(ngx_http_request_t *r,
    ngx_http_upstream_srv_conf_t *us)
{
    ngx_http_variable_value_t           *v;
    ngx_http_infer_balance_srv_conf_t   *bcf;
    ngx_http_infer_balance_peer_data_t  *bp;

    bcf = ngx_http_conf_upstream_srv_conf(us, ngx_http_infer_balance_module);

    bp = ngx_pcalloc(r->pool, sizeof(ngx_http_infer_balance_peer_data_t));
    if (bp == NULL) {
        return NGX_ERROR;
    }

    r->upstream->peer.data = &bp->rrp;

    if (ngx_http_upstream_init_round_robin_peer(r, us) != NGX_OK) {
        return NGX_ERROR;
    }

    r->upstream->peer.get = ngx_http_infer_balance_get_peer;
    r->upstream->peer.free = ngx_http_infer_balance_free_peer;

    bp->conf = bcf;
    bp->request = r;
    bp->tokens = ngx_http_infer_balance_estimate(r, bcf);

    bp->cost = ngx_palloc(r->pool, bcf->number * sizeof(uint64_t));
    if (bp->cost == NULL) {
        return NGX_ERROR;
    }

    if (bcf->external
        && ngx_http_complex_value(r, bcf->external, &bp->destination)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (bcf->scrape && bcf->cost[NGX_HTTP_INFER_BALANCE_COST_LORA] != 0) {
        v = ngx_http_infer_variable(r, bcf->target_index);

        if (v && v->len) {
            bp->target = ngx_murmur_hash2(v->data, v->len);
            bp->has_target = 1;
        }
    }

    if (bcf->affinity) {
        v = ngx_http_infer_variable(r, bcf->prefix_index);

        if (v && v->len) {
            bp->prefix = ngx_murmur_hash2(v->data, v->len);
            bp->has_prefix = 1;
            bp->seen = ngx_http_infer_balance_seen(bcf->sh, bp->prefix);
        }
    }

    if (ngx_http_infer_balance_get_ctx(r) == NULL) {
        return NGX_ERROR;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer balance init peer, tokens: %ui, prefix: %uD",
                   bp->tokens, bp->prefix);

    return NGX_OK;
}


/*
 * What a request is expected to cost its peer: the prompt estimate plus
 * the tokens it may generate, or a fixed default when the route module
 * saw no body.
 */

static ngx_uint_t
ngx_http_infer_balance_estimate(ngx_http_request_t *r,
    ngx_http_infer_balance_srv_conf_t *bcf)
{
    ngx_int_t  prompt, max;

    prompt = ngx_http_infer_variable_number(r, bcf->prompt_index);

    if (prompt == NGX_ERROR) {
        return bcf->default_tokens;
    }

    max = ngx_http_infer_variable_number(r, bcf->max_tokens_index);

    if (max == NGX_ERROR) {
        max = bcf->default_max_tokens;
    }

    if (prompt > NGX_HTTP_INFER_BALANCE_TOKENS_MAX
        || max > NGX_HTTP_INFER_BALANCE_TOKENS_MAX - prompt)
    {
        return NGX_HTTP_INFER_BALANCE_TOKENS_MAX;
    }

    return (prompt + max) ? (ngx_uint_t) (prompt + max) : 1;
}


/*
 * Whether the pool has seen this prefix before, and from now on it has.
 * An entry holds the hash with its lowest bit set, never 0: the prefixes
 * of one set share their low bits, the lowest among them.  Workers race
 * here without a lock: a lost write only makes a prefix seen once more.
 */

static ngx_uint_t
ngx_http_infer_balance_seen(ngx_http_infer_balance_shctx_t *sh,
    uint32_t prefix)
{
    ngx_atomic_t       *set;
    ngx_atomic_uint_t   mark;

    set = &sh->seen[2 * (prefix & (NGX_HTTP_INFER_BALANCE_SEEN - 1))];
    mark = (ngx_atomic_uint_t) prefix | 1;

    if (set[0] == mark) {
        return 1;
    }

    if (set[1] == mark) {

        /* seen twice: to the first entry, its prefix to the second */

        set[1] = set[0];
        set[0] = mark;

        return 1;
    }

    set[1] = mark;

    return 0;
}


/* rendezvous hashing: the peer with the highest rank is preferred */

static ngx_inline uint64_t
ngx_http_infer_balance_rank(uint32_t prefix, uint32_t peer)
{
    uint64_t  x;

    /* the splitmix64 finalizer */

    x = ((uint64_t) prefix << 32 | peer) + 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;

    return x ^ (x >> 31);
}


/* a peer this attempt may take, as the round robin balancer decides */

static ngx_uint_t
ngx_http_infer_balance_usable(ngx_http_upstream_rr_peer_data_t *rrp,
    ngx_http_upstream_rr_peer_t *peer, ngx_uint_t i, time_t now)
{
    uintptr_t   m;
    ngx_uint_t  n;

    n = i / (8 * sizeof(uintptr_t));
    m = (uintptr_t) 1 << i % (8 * sizeof(uintptr_t));

    if ((rrp->tried[n] & m) || peer->down) {
        return 0;
    }

    if (peer->max_fails
        && peer->fails >= peer->max_fails
        && now - peer->checked <= peer->fail_timeout)
    {
        return 0;
    }

    return !(peer->max_conns && peer->conns >= peer->max_conns);
}


static ngx_int_t
ngx_http_infer_balance_get_peer(ngx_peer_connection_t *pc, void *data)
{
    ngx_http_infer_balance_peer_data_t  *bp = data;

    time_t                              now;
    uint64_t                            rank, top, total, weights, cost,
                                        best_cost, pref_cost;
    uintptr_t                           m;
    ngx_int_t                           rc, rr;
    ngx_uint_t                          i, n, p, many, pi, reason;
    ngx_http_upstream_rr_peer_t        *peer, *best, *pref;
    ngx_http_upstream_rr_peers_t       *peers;
    ngx_http_infer_balance_ctx_t       *ctx;
    ngx_http_infer_balance_node_t      *node;
    ngx_http_upstream_rr_peer_data_t   *rrp;
    ngx_http_infer_balance_srv_conf_t  *bcf;

    rrp = &bp->rrp;
    bcf = bp->conf;
    node = bcf->sh->node + bp->base;

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, pc->log, 0,
                   "infer balance get peer, try: %ui", pc->tries);

    pc->cached = 0;
    pc->connection = NULL;

    now = ngx_time();

    peers = rrp->peers;

    ngx_http_upstream_rr_peers_wlock(peers);

    best = NULL;
    pref = NULL;
    best_cost = 0;
    pref_cost = 0;
    total = 0;
    weights = 0;
    top = 0;
    rr = 0;
    p = 0;
    reason = NGX_HTTP_INFER_BALANCE_LEAST;

#if (NGX_SUPPRESS_WARN)
    many = 0;
    pi = 0;
#endif

    /* an external picker's choice, on the first pick only */

    if (bp->destination.len && !bp->external) {
        bp->external = 1;

        best = ngx_http_infer_balance_external(bp, now, &p);

        if (best) {
            best_cost = node[p].tokens;
            reason = NGX_HTTP_INFER_BALANCE_EXTERNAL;
            goto chosen;
        }
    }

    ngx_http_infer_balance_costs(bp, now);

    for (peer = peers->peer, i = 0; peer; peer = peer->next, i++) {

        cost = bp->cost[i];

        if (cost == NGX_HTTP_INFER_BALANCE_UNUSABLE) {
            continue;
        }

        total += cost;
        weights += peer->weight;

        /* the least cost per unit of weight */

        if (best == NULL
            || cost * best->weight < best_cost * peer->weight)
        {
            best = peer;
            best_cost = cost;
            many = 0;
            p = i;

        } else if (cost * best->weight == best_cost * peer->weight) {
            many = 1;
        }

        if (bp->has_prefix) {
            rank = ngx_http_infer_balance_rank(bp->prefix,
                                               bcf->hash[bp->base + i]);

            if (pref == NULL || rank > top) {
                pref = peer;
                pref_cost = cost;
                top = rank;
                pi = i;
            }
        }
    }

    if (best == NULL) {
        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, pc->log, 0,
                       "infer balance get peer, no peer found");

        goto failed;
    }

    /*
     * Bounded loads: the preferred peer takes the request while its share
     * of the pool's cost, this request included, stays within bound times
     * its share of the weight.
     */

    if (pref && !bp->seen) {

        /*
         * A prefix seen for the first time is placed by load: its home
         * only when that is as cheap as the cheapest peer give or take
         * this request, so that a prompt nobody shares is not placed by
         * its hash, and a shared one is often home from the start.
         */

        if ((double) pref_cost * best->weight
            <= ((double) best_cost + bp->tokens) * pref->weight)
        {
            best = pref;
            best_cost = pref_cost;
            p = pi;
            reason = NGX_HTTP_INFER_BALANCE_AFFINITY;
            goto chosen;
        }

        pref = NULL;
    }

    if (pref) {

        /* in floating point: weights have no upper limit in nginx */

        if ((double) pref_cost * weights * 100
            <= (double) bcf->bound * (total + bp->tokens) * pref->weight)
        {
            best = pref;
            best_cost = pref_cost;
            p = pi;
            reason = NGX_HTTP_INFER_BALANCE_AFFINITY;
            goto chosen;
        }

        reason = NGX_HTTP_INFER_BALANCE_SPILL;
    }

    if (many) {

        /* ties: smooth weighted round robin among them, as least_conn */

        for (peer = best, i = p; peer; peer = peer->next, i++) {

            cost = bp->cost[i];

            if (cost == NGX_HTTP_INFER_BALANCE_UNUSABLE
                || cost * best->weight != best_cost * peer->weight)
            {
                continue;
            }

            peer->current_weight += peer->effective_weight;
            rr += peer->effective_weight;

            if (peer->effective_weight < peer->weight) {
                peer->effective_weight++;
            }

            if (peer->current_weight > best->current_weight) {
                best = peer;
                best_cost = cost;
                p = i;
            }
        }

        best->current_weight -= rr;
    }

chosen:

    if (now - best->checked > best->fail_timeout) {
        best->checked = now;
    }

    pc->sockaddr = best->sockaddr;
    pc->socklen = best->socklen;
    pc->name = &best->name;

    best->conns++;

    rrp->current = best;

    n = p / (8 * sizeof(uintptr_t));
    m = (uintptr_t) 1 << p % (8 * sizeof(uintptr_t));

    rrp->tried[n] |= m;

    if (!bp->picked) {
        bp->picked = 1;

        /* the pool's average request */

        bcf->sh->average = ngx_http_infer_balance_ewma(bcf->sh->average,
                               bp->tokens,
                               NGX_HTTP_INFER_BALANCE_AVERAGE_SCALE);
    }

    bp->node = &node[p];
    bp->start = ngx_current_msec;
    (void) ngx_atomic_fetch_add(&bp->node->tokens,
                                (ngx_atomic_int_t) bp->tokens);
    (void) ngx_atomic_fetch_add(&bp->node->picks, 1);

    /* and on this process's own account, see init_process */

    bp->mine = ngx_http_infer_balance_mine(bcf->sh) + bp->base + p;
    *bp->mine += bp->tokens;

    ctx = ngx_http_get_module_ctx(bp->request, ngx_http_infer_balance_module);

    if (ctx) {
        ctx->endpoint = best->name;
        ctx->score = (ngx_uint_t) best_cost;
        ctx->reason = reason;
        ctx->first = 0;
    }

    ngx_log_debug4(NGX_LOG_DEBUG_HTTP, pc->log, 0,
                   "infer balance pick \"%V\", cost: %uL, tokens: %ui, %V",
                   &best->name, best_cost, bp->tokens,
                   &ngx_http_infer_balance_reasons[reason]);

    ngx_http_upstream_rr_peers_unlock(peers);

    return NGX_OK;

failed:

    if (peers->next) {
        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, pc->log, 0,
                       "infer balance get peer, backup servers");

        rrp->peers = peers->next;
        bp->base = peers->number;

        n = (rrp->peers->number + (8 * sizeof(uintptr_t) - 1))
                / (8 * sizeof(uintptr_t));

        for (i = 0; i < n; i++) {
            rrp->tried[i] = 0;
        }

        ngx_http_upstream_rr_peers_unlock(peers);

        rc = ngx_http_infer_balance_get_peer(pc, bp);

        if (rc != NGX_BUSY) {
            return rc;
        }

        ngx_http_upstream_rr_peers_wlock(peers);
    }

    /* all peers failed, mark them as live for quick recovery */

    for (peer = peers->peer; peer; peer = peer->next) {
        peer->fails = 0;
    }

    ngx_http_upstream_rr_peers_unlock(peers);

    pc->name = peers->name;

    return NGX_BUSY;
}


/*
 * The peer an external picker (the Gateway API inference extension's
 * endpoint picker) chose: "ip:port", or a list of them in order of
 * preference, of which the first usable peer of this pool is taken.
 */

static ngx_http_upstream_rr_peer_t *
ngx_http_infer_balance_external(ngx_http_infer_balance_peer_data_t *bp,
    time_t now, ngx_uint_t *index)
{
    u_char                       *p, *last, *item;
    size_t                        len;
    ngx_uint_t                    i;
    ngx_http_upstream_rr_peer_t  *peer;

    p = bp->destination.data;
    last = p + bp->destination.len;

    while (p < last) {

        while (p < last && (*p == ' ' || *p == '\t' || *p == ',')) {
            p++;
        }

        item = p;

        while (p < last && *p != ',' && *p != ' ' && *p != '\t') {
            p++;
        }

        len = p - item;

        if (len == 0) {
            continue;
        }

        for (peer = bp->rrp.peers->peer, i = 0; peer; peer = peer->next, i++)
        {
            if (peer->name.len != len
                || ngx_strncmp(peer->name.data, item, len) != 0)
            {
                continue;
            }

            if (ngx_http_infer_balance_usable(&bp->rrp, peer, i, now)
                && !(bp->conf->eject
                     && ngx_http_infer_balance_ejected(bp->conf,
                                                       bp->base + i,
                                                       ngx_current_msec)))
            {
                *index = i;
                return peer;
            }

            break;
        }

        ngx_log_debug3(NGX_LOG_DEBUG_HTTP, bp->request->connection->log, 0,
                       "infer balance: external endpoint \"%*s\" is not a "
                       "usable peer of upstream \"%V\"", len, item,
                       &bp->conf->upstream->host);
    }

    return NULL;
}


/*
 * Each usable peer's cost, in bp->cost (-1: not usable): its tokens in
 * flight, plus its signals in token equivalents when they are fresh.  A
 * peer whose signals are stale is given the average of the fresh ones, so
 * that one failing scrape neither favours nor spares it; with none fresh
 * the tokens in flight decide alone.
 */

static void
ngx_http_infer_balance_costs(ngx_http_infer_balance_peer_data_t *bp,
    time_t now)
{
    uint64_t                            sum, c, avg, pace, unit[4];
    ngx_uint_t                          i, k, n, fresh, known;
    ngx_msec_t                          msec;
    ngx_http_upstream_rr_peer_t        *peer;
    ngx_http_infer_balance_node_t      *node;
    ngx_http_infer_balance_srv_conf_t  *bcf;

    bcf = bp->conf;
    node = bcf->sh->node + bp->base;
    msec = ngx_current_msec;

    /*
     * What a signal's unit costs, in tokens: as configured, or in terms
     * of the pool's average request (a waiting request costs one, a full
     * KV cache or a missing adapter two), which follows the workload.
     */

    avg = ngx_max(bcf->sh->average / NGX_HTTP_INFER_BALANCE_AVERAGE_SCALE,
                  1);

    for (k = 0; k < NGX_HTTP_INFER_SIGNALS; k++) {
        unit[k] = (bcf->cost[k] != NGX_CONF_UNSET_UINT)
                  ? bcf->cost[k]
                  : ngx_http_infer_balance_auto[k] * avg;
    }

    sum = 0;
    fresh = 0;
    known = 0;

    for (peer = bp->rrp.peers->peer, i = 0; peer; peer = peer->next, i++) {

        if (!ngx_http_infer_balance_usable(&bp->rrp, peer, i, now)
            || (bcf->eject
                && ngx_http_infer_balance_ejected(bcf, bp->base + i, msec)))
        {
            bp->cost[i] = NGX_HTTP_INFER_BALANCE_UNUSABLE;
            continue;
        }

        if (!ngx_http_infer_balance_fresh(bcf, &node[i], msec)) {
            bp->cost[i] = NGX_HTTP_INFER_BALANCE_STALE;
            continue;
        }

        c = node[i].value[0] * unit[NGX_HTTP_INFER_BALANCE_COST_QUEUE]
            + node[i].value[1] * unit[NGX_HTTP_INFER_BALANCE_COST_RUNNING]
            + node[i].value[2] * unit[NGX_HTTP_INFER_BALANCE_COST_KV];

        bp->cost[i] = c / 1000;
        sum += c / 1000;
        fresh++;

        /* is the request's model an adapter one of the peers holds? */

        if (bp->has_target && !known) {
            known = ngx_http_infer_balance_has_adapter(&node[i], bp->target);
        }
    }

    avg = fresh ? sum / fresh : 0;

    /* the pool's pace: the average of those of its usable peers */

    pace = 0;

    if (bcf->pace) {
        n = 0;

        for (peer = bp->rrp.peers->peer, i = 0; peer; peer = peer->next, i++)
        {
            if (bp->cost[i] != NGX_HTTP_INFER_BALANCE_UNUSABLE
                && node[i].pace)
            {
                pace += ngx_min(node[i].pace,
                                NGX_HTTP_INFER_BALANCE_PACE_SCALE
                                * NGX_HTTP_INFER_BALANCE_PACE_MAX);
                n++;
            }
        }

        pace = n ? ngx_max(pace / n, 1) : 0;
    }

    for (peer = bp->rrp.peers->peer, i = 0; peer; peer = peer->next, i++) {

        c = bp->cost[i];

        if (c == NGX_HTTP_INFER_BALANCE_UNUSABLE) {
            continue;
        }

        if (c == NGX_HTTP_INFER_BALANCE_STALE) {
            c = avg;

        } else if (known) {

            /* LoRA: none for a peer with the adapter, half for room */

            if (!ngx_http_infer_balance_has_adapter(&node[i], bp->target)) {
                c += unit[NGX_HTTP_INFER_BALANCE_COST_LORA]
                     / ((node[i].nrunning < node[i].max_lora) ? 2 : 1);
            }
        }

        c += node[i].tokens;

        /* a peer twice as slow per token as the pool costs twice as much */

        c = ngx_min(c, NGX_HTTP_INFER_BALANCE_CAP);

        /*
         * pace: the cost times the peer's time per token over the pool's,
         * that ratio kept within 1/4 and 4, so that no peer's measure can
         * make it free or shut it out
         */

        if (pace && node[i].pace) {
            c = c * ngx_max(ngx_min(node[i].pace, 4 * pace), pace / 4) / pace;
        }

        bp->cost[i] = ngx_min(c, NGX_HTTP_INFER_BALANCE_CAP);
    }
}


/* the adapter is running or waiting on the peer */

static ngx_uint_t
ngx_http_infer_balance_has_adapter(ngx_http_infer_balance_node_t *node,
    uint32_t target)
{
    ngx_uint_t  i, n, w;

    n = ngx_min(node->nrunning, NGX_HTTP_INFER_SIGNALS_LORA_MAX);
    w = ngx_min(node->nwaiting, NGX_HTTP_INFER_SIGNALS_LORA_MAX);

    for (i = 0; i < n; i++) {
        if (node->lora[i] == target) {
            return 1;
        }
    }

    for (i = 0; i < w; i++) {
        if (node->lora[NGX_HTTP_INFER_SIGNALS_LORA_MAX + i] == target) {
            return 1;
        }
    }

    return 0;
}


/* called once per attempt: a retry releases the peer it leaves */

static void
ngx_http_infer_balance_free_peer(ngx_peer_connection_t *pc, void *data,
    ngx_uint_t state)
{
    ngx_http_infer_balance_peer_data_t  *bp = data;

    ngx_msec_t                      ms;
    ngx_uint_t                      status, whole, failed;
    ngx_atomic_uint_t               us;
    ngx_http_upstream_t            *u;
    ngx_http_infer_balance_ctx_t   *ctx;
    ngx_http_infer_balance_node_t  *node;

    node = bp->node;

    if (node == NULL) {
        ngx_http_upstream_free_round_robin_peer(pc, &bp->rrp, state);
        return;
    }

    (void) ngx_atomic_fetch_add(&node->tokens,
                                - (ngx_atomic_int_t) bp->tokens);
    *bp->mine -= bp->tokens;
    bp->node = NULL;

    /*
     * pace: how long the peer took per token of this request, averaged
     * over the peer's answers (each new one weighs 1/8, kept x 8); only
     * answers read to their end (nginx frees the peer with state 0 after
     * an answer cut short too), with a 200, that the client neither left
     * nor kept waiting past send_timeout
     */

    u = bp->request->upstream;
    status = (u && u->state) ? u->state->status : 0;
    whole = (u && ((u->pipe && u->pipe->upstream_done) || u->length == 0)
             && !bp->request->connection->error
             && !bp->request->connection->timedout);

    /*
     * outlier ejection: a failure is an attempt nginx gave up (a
     * connection error, a timeout, an invalid header, a 5xx it retries),
     * a 5xx answer, or a 200 cut short by the peer; an answer that never
     * got a status (the client left first) counts neither way
     */

    if (bp->conf->eject) {
        failed = (state & NGX_PEER_FAILED) || status >= 500
                 || (status == NGX_HTTP_OK && !whole
                     && !bp->request->connection->error
                     && !bp->request->connection->timedout);

        if (failed || status) {
            ctx = ngx_http_get_module_ctx(bp->request,
                                          ngx_http_infer_balance_module);
            ms = (!failed && status == NGX_HTTP_OK && ctx && ctx->first)
                 ? ngx_max(ctx->first - bp->start, 1) : 0;

            ngx_http_infer_balance_answered(bp->conf,
                                            node - bp->conf->sh->node,
                                            failed, ms, pc->log);
        }
    }

    if (bp->conf->pace && !(state & NGX_PEER_FAILED)
        && status == NGX_HTTP_OK && whole)
    {
        ms = ngx_current_msec - bp->start;
        us = (ngx_atomic_uint_t) ms * 1000 / bp->tokens;
        us = ngx_max(ngx_min(us, NGX_HTTP_INFER_BALANCE_PACE_MAX), 1);

        node->pace = ngx_http_infer_balance_ewma(node->pace, us,
                                           NGX_HTTP_INFER_BALANCE_PACE_SCALE);
    }

    ngx_http_upstream_free_round_robin_peer(pc, &bp->rrp, state);
}


static ngx_int_t
ngx_http_infer_balance_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                        *p;
    ngx_http_infer_balance_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_balance_module);

    if (ctx == NULL
        || (ctx->endpoint.len == 0
            && (data != 2 || ctx->reason != NGX_HTTP_INFER_BALANCE_SHED)))
    {
        v->not_found = 1;
        return NGX_OK;
    }

    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    switch (data) {

    case 0:
        v->len = ctx->endpoint.len;
        v->data = ctx->endpoint.data;
        break;

    case 1:
        p = ngx_pnalloc(r->pool, NGX_ATOMIC_T_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->len = ngx_sprintf(p, "%ui", ctx->score) - p;
        v->data = p;
        break;

    default:
        v->len = ngx_http_infer_balance_reasons[ctx->reason].len;
        v->data = ngx_http_infer_balance_reasons[ctx->reason].data;
        break;
    }

    return NGX_OK;
}


ngx_http_infer_balance_ctx_t *
ngx_http_infer_balance_get_ctx(ngx_http_request_t *r)
{
    ngx_http_infer_balance_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_balance_module);

    if (ctx == NULL) {
        ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_infer_balance_ctx_t));
        if (ctx == NULL) {
            return NULL;
        }

        ngx_http_set_ctx(r, ctx, ngx_http_infer_balance_module);
    }

    return ctx;
}


static ngx_int_t
ngx_http_infer_balance_add_variables(ngx_conf_t *cf)
{
    return ngx_http_infer_add_variables(cf, ngx_http_infer_balance_vars);
}


/*
 * A directive of a pool that has no infer_balance would be ignored
 * silently: refused instead.
 */

static ngx_int_t
ngx_http_infer_balance_postconfiguration(ngx_conf_t *cf)
{
    char                                *name;
    ngx_uint_t                           i;
    ngx_http_upstream_srv_conf_t       **uscfp;
    ngx_http_upstream_main_conf_t       *umcf;
    ngx_http_infer_balance_srv_conf_t   *bcf;

    umcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_upstream_module);
    uscfp = umcf->upstreams.elts;

    for (i = 0; i < umcf->upstreams.nelts; i++) {

        if (uscfp[i]->srv_conf == NULL) {
            continue;
        }

        bcf = ngx_http_conf_upstream_srv_conf(uscfp[i],
                                              ngx_http_infer_balance_module);

        if (bcf == NULL) {
            continue;
        }

        if (bcf->enable) {
            if (bcf->upstream == NULL) {
                ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                              "\"infer_balance\" is replaced by another "
                              "balancing method in upstream \"%V\"",
                              &uscfp[i]->host);
                return NGX_ERROR;
            }

            if (bcf->eject && bcf->eject->scrapes && bcf->scrape == NULL) {
                ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                              "\"infer_balance_eject\" with scrapes= needs "
                              "\"infer_balance_scrape\" in upstream \"%V\"",
                              &uscfp[i]->host);
                return NGX_ERROR;
            }

            if (bcf->shed && bcf->scrape == NULL) {
                ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                              "\"infer_balance_shed\" needs "
                              "\"infer_balance_scrape\" in upstream \"%V\"",
                              &uscfp[i]->host);
                return NGX_ERROR;
            }

            continue;
        }

        name = bcf->scrape ? "infer_balance_scrape"
               : bcf->shed ? "infer_balance_shed"
               : bcf->external ? "infer_balance_external"
               : bcf->eject ? "infer_balance_eject"
               : bcf->names_set ? "infer_balance_signal"
               : bcf->score_set ? "infer_balance_score" : NULL;

        if (name) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "\"%s\" needs \"infer_balance\" in upstream \"%V\"",
                          name, &uscfp[i]->host);
            return NGX_ERROR;
        }
    }

    return ngx_http_infer_balance_eject_init(cf);
}


static ngx_int_t
ngx_http_infer_balance_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                            i, k;
    ngx_atomic_t                         *mine;
    ngx_atomic_uint_t                     left, old;
    ngx_http_infer_balance_node_t        *node;
    ngx_http_infer_balance_srv_conf_t   **pool;
    ngx_http_infer_balance_main_conf_t   *bmcf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    bmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_infer_balance_module);
    if (bmcf == NULL) {
        return NGX_OK;
    }

    pool = bmcf->pools.elts;

    for (i = 0; i < bmcf->pools.nelts; i++) {

        /*
         * A process slot is given again only once its process is gone:
         * what the slot still counts in flight was left by a worker that
         * died (or was cut short by worker_shutdown_timeout), and nothing
         * will release it but this.
         */

        mine = ngx_http_infer_balance_mine(pool[i]->sh);
        left = 0;

        for (k = 0; k < pool[i]->number; k++) {
            if (mine[k] == 0) {
                continue;
            }

            /* never below zero: the dead one may have died between two
               updates of its request's counts */

            node = &pool[i]->sh->node[k];

            do {
                old = node->tokens;
            } while (!ngx_atomic_cmp_set(&node->tokens, old,
                                         old > mine[k] ? old - mine[k] : 0));

            left += mine[k];
            mine[k] = 0;
        }

        if (left) {
            ngx_log_error(NGX_LOG_NOTICE, cycle->log, 0,
                          "infer balance: %uA tokens in flight in upstream "
                          "\"%V\" left by a worker that is gone, released",
                          left, &pool[i]->upstream->host);
        }

        if (pool[i]->scrape
            && ngx_http_infer_balance_scrape_init_process(cycle, pool[i])
               != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static void *
ngx_http_infer_balance_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_infer_balance_main_conf_t  *bmcf;

    bmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_balance_main_conf_t));
    if (bmcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&bmcf->pools, cf->pool, 4,
                       sizeof(ngx_http_infer_balance_srv_conf_t *))
        != NGX_OK)
    {
        return NULL;
    }

    bmcf->export.size = ngx_http_infer_balance_export_size;
    bmcf->export.write = ngx_http_infer_balance_export_write;

    return bmcf;
}


static void *
ngx_http_infer_balance_create_conf(ngx_conf_t *cf)
{
    ngx_http_infer_balance_srv_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_balance_srv_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->enable = 0;
     *     conf->affinity = 0;
     *     conf->scrape = NULL;
     *     conf->shed = NULL;
     *     conf->eject = NULL;
     *     conf->external = NULL;
     *     conf->hash = NULL;
     *     conf->shm_zone = NULL;
     *     conf->sh = NULL;
     */

    /* "auto": in the pool's average request, see the costs */

    conf->cost[NGX_HTTP_INFER_BALANCE_COST_QUEUE] = NGX_CONF_UNSET_UINT;
    conf->cost[NGX_HTTP_INFER_BALANCE_COST_RUNNING] = NGX_CONF_UNSET_UINT;
    conf->cost[NGX_HTTP_INFER_BALANCE_COST_KV] = NGX_CONF_UNSET_UINT;
    conf->cost[NGX_HTTP_INFER_BALANCE_COST_LORA] = NGX_CONF_UNSET_UINT;

    return conf;
}


static char *
ngx_http_infer_balance(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_infer_balance_srv_conf_t  *bcf = conf;

    ngx_int_t                      n;
    ngx_str_t                     *value, name;
    ngx_uint_t                     i;
    ngx_http_upstream_srv_conf_t  *uscf;

    if (bcf->enable) {
        return "is duplicate";
    }

    uscf = ngx_http_conf_get_module_srv_conf(cf, ngx_http_upstream_module);

    if (uscf->peer.init_upstream) {
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                           "load balancing method redefined");
    }

    bcf->enable = 1;
    bcf->bound = 125;
    bcf->default_tokens = 1024;
    bcf->default_max_tokens = 256;

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strcmp(value[i].data, "least_tokens") == 0) {
            continue;
        }

        if (ngx_strcmp(value[i].data, "prefix_affinity") == 0) {
            bcf->affinity = 1;
            continue;
        }

        if (ngx_strcmp(value[i].data, "pace") == 0) {
            bcf->pace = 1;
            continue;
        }

        if (ngx_strncmp(value[i].data, "bound=", 6) == 0) {
            n = ngx_atofp(value[i].data + 6, value[i].len - 6, 2);

            if (n == NGX_ERROR || n < 100 || n > 10000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid bound \"%V\": a number from 1 "
                                   "to 100, two decimals at most",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            bcf->bound = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "default_tokens=", 15) == 0) {
            n = ngx_atoi(value[i].data + 15, value[i].len - 15);

            if (n == NGX_ERROR || n < 1
                || n > NGX_HTTP_INFER_BALANCE_TOKENS_MAX)
            {
                goto invalid_number;
            }

            bcf->default_tokens = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "default_max_tokens=", 19) == 0) {
            n = ngx_atoi(value[i].data + 19, value[i].len - 19);

            if (n == NGX_ERROR || n > NGX_HTTP_INFER_BALANCE_TOKENS_MAX) {
                goto invalid_number;
            }

            bcf->default_max_tokens = n;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    /* the route module's variables, built into the same object */

    ngx_str_set(&name, "infer_prompt_tokens_estimate");
    bcf->prompt_index = ngx_http_infer_variable_index(cf, &name);

    ngx_str_set(&name, "infer_max_tokens");
    bcf->max_tokens_index = ngx_http_infer_variable_index(cf, &name);

    ngx_str_set(&name, "infer_prefix_hash");
    bcf->prefix_index = ngx_http_infer_variable_index(cf, &name);

    ngx_str_set(&name, "infer_model_target");
    bcf->target_index = ngx_http_infer_variable_index(cf, &name);

    if (bcf->prompt_index == NGX_ERROR
        || bcf->max_tokens_index == NGX_ERROR
        || bcf->prefix_index == NGX_ERROR
        || bcf->target_index == NGX_ERROR)
    {
        return NGX_CONF_ERROR;
    }

    uscf->peer.init_upstream = ngx_http_infer_balance_init_upstream;

    uscf->flags = NGX_HTTP_UPSTREAM_CREATE
                  |NGX_HTTP_UPSTREAM_WEIGHT
                  |NGX_HTTP_UPSTREAM_MAX_CONNS
                  |NGX_HTTP_UPSTREAM_MAX_FAILS
                  |NGX_HTTP_UPSTREAM_FAIL_TIMEOUT
                  |NGX_HTTP_UPSTREAM_DOWN
                  |NGX_HTTP_UPSTREAM_BACKUP;

    return NGX_CONF_OK;

invalid_number:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid number in \"%V\"", &value[i]);
    return NGX_CONF_ERROR;
}


static char *
ngx_http_infer_balance_score(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_infer_balance_srv_conf_t  *bcf = conf;

    size_t       len;
    ngx_int_t    n;
    ngx_str_t   *value;
    ngx_uint_t   i, k;

    if (bcf->score_set) {
        return "is duplicate";
    }

    bcf->score_set = 1;

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {

        for (k = 0; k < NGX_HTTP_INFER_SIGNALS; k++) {
            len = ngx_http_infer_balance_signals[k].len;

            if (value[i].len > len && value[i].data[len] == '='
                && ngx_strncmp(value[i].data,
                               ngx_http_infer_balance_signals[k].data, len)
                   == 0)
            {
                break;
            }
        }

        if (k == NGX_HTTP_INFER_SIGNALS) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        if (value[i].len - len - 1 == 4
            && ngx_strncmp(value[i].data + len + 1, "auto", 4) == 0)
        {
            bcf->cost[k] = NGX_CONF_UNSET_UINT;
            continue;
        }

        n = ngx_atoi(value[i].data + len + 1, value[i].len - len - 1);

        if (n == NGX_ERROR || n > NGX_HTTP_INFER_BALANCE_TOKENS_MAX) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid number in \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        bcf->cost[k] = n;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_infer_balance_external_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_balance_srv_conf_t  *bcf = conf;

    ngx_str_t                          *value;
    ngx_http_compile_complex_value_t    ccv;

    if (bcf->external) {
        return "is duplicate";
    }

    value = cf->args->elts;

    bcf->external = ngx_palloc(cf->pool, sizeof(ngx_http_complex_value_t));
    if (bcf->external == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &value[1];
    ccv.complex_value = bcf->external;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}

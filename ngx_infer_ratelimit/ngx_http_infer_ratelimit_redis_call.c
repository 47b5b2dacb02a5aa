
/*
 * Copyright (C) ngx_infer authors
 *
 * The rate-limit module's calls to Redis: all of a request's limits are
 * checked and charged by one Lua script (EVALSHA) in one round trip;
 * corrections and approximate limits' syncs are calls of the same
 * script.  With a Redis Cluster a call goes to its slot's master, or is
 * split by slot (ngx_http_infer_ratelimit_redis_split()); MOVED and ASK
 * are followed.
 *
 * Who owns what:
 *
 *   - A call is a waiter, allocated from the heap: the reply may come
 *     after the request is gone.  The request's pool cleanup and the
 *     reply each drop their hold; the last one frees it.  A call split
 *     by slot is a call object holding its parts' waiters, owned the
 *     same way.
 *   - Every call has a timeout on nginx's timers.  A call that times out
 *     drops its connection (a Redis that does not answer one call will
 *     not answer the next either), which fails every pending call on it
 *     at once.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <ngx_sha1.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_ratelimit.h"


#define NGX_HTTP_INFER_RL_REDIRECTS   5


/*
 * A call whose keys are in several cluster slots: a part per slot, sent
 * at once.  It is answered when every part is; it admits when every part
 * did, and the parts that admitted are undone otherwise.
 */

struct ngx_http_infer_ratelimit_call_s {
    ngx_event_t                         ev;      /* the request resumes */
    ngx_http_request_t                 *r;
    ngx_http_infer_ratelimit_done_pt    done;
    ngx_http_infer_ratelimit_item_t    *items;  /* the request's */
    ngx_uint_t                          nitems;
    ngx_http_infer_ratelimit_waiter_t **part;
    ngx_uint_t                          nparts;
    ngx_uint_t                          waiting;
    ngx_int_t                           rc;
    u_char                              mode;
    unsigned                            finished:1;
    unsigned                            admitted:1;
};


static uint32_t *ngx_http_infer_ratelimit_redis_slots(
    ngx_http_infer_ratelimit_redis_conf_t *rcf,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n);
static ngx_int_t ngx_http_infer_ratelimit_redis_cmp(const void *one,
    const void *two);
static ngx_int_t ngx_http_infer_ratelimit_redis_split(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_redis_conf_t *rcf, u_char mode,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n, uint32_t *order,
    ngx_http_infer_ratelimit_done_pt done, ngx_uint_t hold);
static void ngx_http_infer_ratelimit_redis_hold(
    ngx_http_infer_ratelimit_waiter_t *w);
static void ngx_http_infer_ratelimit_redis_fail(
    ngx_http_infer_ratelimit_waiter_t *w);
static ngx_http_infer_ratelimit_waiter_t *ngx_http_infer_ratelimit_redis_waiter(
    ngx_http_infer_ratelimit_redis_conf_t *rcf, u_char mode,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t *index, ngx_uint_t n);
static size_t ngx_http_infer_ratelimit_redis_key_len(
    ngx_http_infer_ratelimit_redis_conf_t *rcf,
    ngx_http_infer_ratelimit_item_t *item);
static u_char *ngx_http_infer_ratelimit_redis_key(u_char *p,
    ngx_http_infer_ratelimit_redis_conf_t *rcf,
    ngx_http_infer_ratelimit_item_t *item);
static ngx_int_t ngx_http_infer_ratelimit_redis_redirect(
    ngx_http_infer_ratelimit_waiter_t *w, redisReply *rr);
static void ngx_http_infer_ratelimit_redis_part(
    ngx_http_infer_ratelimit_waiter_t *w, redisReply *rr);
static void ngx_http_infer_ratelimit_redis_finish(
    ngx_http_infer_ratelimit_call_t *call);
static void ngx_http_infer_ratelimit_redis_call_undo(
    ngx_http_infer_ratelimit_call_t *call);
static void ngx_http_infer_ratelimit_redis_call_event(ngx_event_t *ev);
static void ngx_http_infer_ratelimit_redis_call_cleanup(void *data);
static void ngx_http_infer_ratelimit_redis_call_free(
    ngx_http_infer_ratelimit_call_t *call);
static void ngx_http_infer_ratelimit_redis_failed(
    ngx_http_infer_ratelimit_redis_t *rd, redisReply *rr);
static void ngx_http_infer_ratelimit_redis_synced(
    ngx_http_infer_ratelimit_redis_t *rd, redisReply *rr);
static ngx_uint_t ngx_http_infer_ratelimit_redis_admitted(redisReply *rr);
static void ngx_http_infer_ratelimit_redis_undo(
    ngx_http_infer_ratelimit_waiter_t *w);
static ngx_int_t ngx_http_infer_ratelimit_redis_parse(
    ngx_http_infer_ratelimit_waiter_t *w, redisReply *reply);
static void ngx_http_infer_ratelimit_redis_waiter_event(ngx_event_t *ev);
static void ngx_http_infer_ratelimit_redis_waiter_cleanup(void *data);


/*
 * KEYS: one per limit.  ARGV[1]: "a" (admit: check all, charge all or
 * none), "r" (reconcile: move each key by a signed number of units) or
 * "s" (sync approximate limits: move each key so, and answer what is
 * left of each as an admission does, every key passing), or "b" (a
 * batch of admissions, each all-or-nothing in turn: ARGV[2] their
 * count, then each one's number of keys; KEYS one after the other; an
 * admission whose keys fail (a key of another type) answers -1 alone);
 * then per key: units, limit, window in ms (0: a count of requests in
 * flight, not a GCRA; negative: a calendar window's count, minus the ms
 * until the window ends, its key named by the window), and the floor:
 * how far ahead of now, in us, the gateway's own use puts the key at
 * least (see zone_floor), which an admission applies to a key Redis lost
 * or holds less of; and a correction an admission carries for its key,
 * made first whatever the admission decides (the coalesced ones, see
 * ngx_http_infer_ratelimit_coalesce.c; ignored by "r").  A debt is
 * charged from now if the bucket refilled meanwhile (its key may even
 * have expired during a long stream), as an admission would be.  The
 * time is Redis's own, so that replicas' clocks do not matter.  A GCRA
 * key expires when its bucket is full again, so an idle key costs no
 * memory; a count expires an hour after it last moved, in case its
 * gateway died before it could release it.
 *
 * Admission returns {admitted, then per key: remaining, reset ms, retry
 * ms (0 when this key would pass)}; a batch, that for each admission,
 * one after the other.
 */

static ngx_str_t  ngx_http_infer_ratelimit_script = ngx_string(
"local t = redis.call('TIME')\n"
"local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
"local res = {1}\n"
"local function fix(k, cost, limit, win)\n"
"  local v = tonumber(redis.call('GET', k))\n"
"  if win < 0 then\n"
"    local c = (v or 0) + cost\n"
"    if c > 0 then\n"
"      redis.call('SET', k, string.format('%.0f', c), 'PX',\n"
"                 -win / 1000 + 60000)\n"
"    else\n"
"      redis.call('DEL', k)\n"
"    end\n"
"  elseif win == 0 then\n"
"    local c = (v or 0) + cost\n"
"    local pt = redis.call('PTTL', k)\n"
"    if pt <= 0 then\n"
"      pt = " ngx_value(NGX_HTTP_INFER_RL_CONCURRENCY_TTL) "\n"
"    end\n"
"    if c > 0 then\n"
"      redis.call('SET', k, string.format('%.0f', c), 'PX', pt)\n"
"    else\n"
"      redis.call('DEL', k)\n"
"    end\n"
"  else\n"
"    local em = win / limit\n"
"    local tat = v\n"
"    if cost > 0 then\n"
"      tat = math.max(tat or now, now) + cost * em\n"
"    elseif tat then\n"
"      tat = tat + cost * em\n"
"    end\n"
"    if tat then\n"
"      if tat > now then\n"
"        redis.call('SET', k, string.format('%.0f', tat), 'PX',\n"
"                   math.max(1, math.ceil((tat - now) / 1000)))\n"
"      else\n"
"        redis.call('DEL', k)\n"
"      end\n"
"    end\n"
"  end\n"
"end\n"
"if ARGV[1] == 's' then\n"
"  for i = 1, #KEYS do\n"
"    local g = 5 * i - 3\n"
"    local a = 3 * i - 1\n"
"    local cost = tonumber(ARGV[g])\n"
"    local limit = tonumber(ARGV[g + 1])\n"
"    local win = tonumber(ARGV[g + 2]) * 1000\n"
"    if cost ~= 0 then\n"
"      fix(KEYS[i], cost, limit, win)\n"
"    end\n"
"    local v = tonumber(redis.call('GET', KEYS[i]))\n"
"    if win < 0 then\n"
"      res[a] = math.max(0, limit - (v or 0))\n"
"      res[a + 1] = -win / 1000\n"
"    else\n"
"      local em = win / limit\n"
"      local tat = math.max(v or now, now)\n"
"      res[a] = math.max(0, math.floor((now + win - tat) / em + 1e-6))\n"
"      res[a + 1] = math.ceil((tat - now) / 1000)\n"
"    end\n"
"    res[a + 2] = 0\n"
"  end\n"
"  return res\n"
"end\n"
"if ARGV[1] == 'r' then\n"
"  for i = 1, #KEYS do\n"
"    local g = 5 * i - 3\n"
"    fix(KEYS[i], tonumber(ARGV[g]), tonumber(ARGV[g + 1]),\n"
"        tonumber(ARGV[g + 2]) * 1000)\n"
"  end\n"
"  return res\n"
"end\n"
"local function admit(k0, n, g0, r0)\n"
"  local new = {}\n"
"  local ttl = {}\n"
"  res[r0] = 1\n"
"  for i = 1, n do\n"
"    local k = KEYS[k0 + i]\n"
"    local g = g0 + 5 * (i - 1)\n"
"    local a = r0 + 3 * i - 2\n"
"    local cost = tonumber(ARGV[g])\n"
"    local limit = tonumber(ARGV[g + 1])\n"
"    local win = tonumber(ARGV[g + 2]) * 1000\n"
"    local floor = now + tonumber(ARGV[g + 3])\n"
"    local pre = tonumber(ARGV[g + 4])\n"
"    if pre ~= 0 then\n"
"      fix(k, pre, limit, win)\n"
"    end\n"
"    local v = tonumber(redis.call('GET', k))\n"
"    if win < 0 then\n"
"      local left = -win / 1000\n"
"      local c = v or 0\n"
"      if c + cost > limit then\n"
"        res[r0] = 0\n"
"        res[a] = math.max(0, limit - c)\n"
"        res[a + 1] = left\n"
"        res[a + 2] = left\n"
"      else\n"
"        res[a] = limit - c - cost\n"
"        res[a + 1] = left\n"
"        res[a + 2] = 0\n"
"        new[i] = c + cost\n"
"        ttl[i] = left + 60000\n"
"      end\n"
"    elseif win == 0 then\n"
"      local c = v or 0\n"
"      local pt = redis.call('PTTL', k)\n"
"      if pt <= 0 then\n"
"        pt = " ngx_value(NGX_HTTP_INFER_RL_CONCURRENCY_TTL) "\n"
"      end\n"
"      if c + cost > limit then\n"
"        res[r0] = 0\n"
"        res[a] = math.max(0, limit - c)\n"
"        res[a + 1] = 0\n"
"        res[a + 2] = 1000\n"
"      else\n"
"        res[a] = limit - c - cost\n"
"        res[a + 1] = 0\n"
"        res[a + 2] = 0\n"
"        new[i] = c + cost\n"
"        ttl[i] = pt\n"
"      end\n"
"    else\n"
"      local em = win / limit\n"
"      local tat = v\n"
"      if not tat or tat < now then tat = now end\n"
"      if tat < floor then tat = floor end\n"
"      local nt = tat + cost * em\n"
"      if cost > limit or nt - now > win then\n"
"        res[r0] = 0\n"
"        res[a] = math.max(0, math.floor((now + win - tat) / em + 1e-6))\n"
"        res[a + 1] = math.ceil((tat - now) / 1000)\n"
"        if cost > limit then\n"
"          res[a + 2] = math.ceil(win / 1000)\n"
"        else\n"
"          res[a + 2] = math.max(1, math.ceil((nt - now - win) / 1000))\n"
"        end\n"
"      else\n"
"        res[a] = math.floor((now + win - nt) / em + 1e-6)\n"
"        res[a + 1] = math.ceil((nt - now) / 1000)\n"
"        res[a + 2] = 0\n"
"        new[i] = nt\n"
"        ttl[i] = math.max(1, math.ceil((nt - now) / 1000))\n"
"      end\n"
"    end\n"
"  end\n"
"  if res[r0] == 1 then\n"
"    for i = 1, n do\n"
"      redis.call('SET', KEYS[k0 + i], string.format('%.0f', new[i]),\n"
"                 'PX', ttl[i])\n"
"    end\n"
"  end\n"
"end\n"
"if ARGV[1] == 'b' then\n"
"  local q = tonumber(ARGV[2])\n"
"  local k0, g0, r0 = 0, 3 + q, 1\n"
"  for j = 1, q do\n"
"    local n = tonumber(ARGV[2 + j])\n"
"    if not pcall(admit, k0, n, g0, r0) then\n"
"      res[r0] = -1\n"
"      for i = 1, 3 * n do\n"
"        res[r0 + i] = 0\n"
"      end\n"
"    end\n"
"    k0 = k0 + n\n"
"    g0 = g0 + 5 * n\n"
"    r0 = r0 + 1 + 3 * n\n"
"  end\n"
"  return res\n"
"end\n"
"admit(0, #KEYS, 2, 1)\n"
"return res\n");


static u_char  ngx_http_infer_ratelimit_redis_sha[40];
static ngx_queue_t  ngx_http_infer_ratelimit_redis_waiting;


/*
 * Sends one call: the admission of a request's limits (done is called
 * with the outcome, NGX_AGAIN returned), a reconciliation (r only for
 * its log; fire and forget, NGX_OK returned) or an approximate limits'
 * sync (answered into the approximate limits' items).  NGX_DECLINED:
 * Redis is unavailable now, decide without it.
 *
 * In a cluster, the keys of one slot go in one part, to the slot's
 * master: a call whose keys share a slot is sent as it is; one whose
 * keys do not is split (see ngx_http_infer_ratelimit_redis_split()).
 */

ngx_int_t
ngx_http_infer_ratelimit_redis_eval(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_redis_conf_t *rcf, u_char mode,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n,
    ngx_http_infer_ratelimit_done_pt done)
{
    uint32_t                           *order;
    ngx_int_t                           known;
    ngx_uint_t                          slot;
    ngx_pool_cleanup_t                 *cln;
    ngx_http_infer_ratelimit_waiter_t  *w;
    ngx_http_infer_ratelimit_redis_t   *rd;

    rd = ngx_http_infer_ratelimit_redis_main();

    if (rd->rcf == NULL) {
        return NGX_DECLINED;
    }

    if (n > NGX_HTTP_INFER_RL_LIMITS_MAX) {
        /* its answer would be refused as too long */
        ngx_http_infer_ratelimit_redis_error(rd, "more than %d limits on "
                                             "one call",
                                             NGX_HTTP_INFER_RL_LIMITS_MAX);
        return NGX_DECLINED;
    }

    slot = 0;

    if (rcf->seeds) {
        if (n == 0) {
            return NGX_OK;
        }

        /* the map: known; asked for (the call waits for it); or neither */

        known = ngx_http_infer_ratelimit_cluster_known();
        if (known == NGX_DECLINED) {
            return NGX_DECLINED;
        }

        order = ngx_http_infer_ratelimit_redis_slots(rcf, items, n);
        if (order == NULL) {
            return NGX_DECLINED;
        }

        slot = order[0] >> 16;

        if ((order[n - 1] >> 16) != slot) {
            return ngx_http_infer_ratelimit_redis_split(r, rcf, mode, items,
                                                        n, order, done,
                                                        known == NGX_AGAIN);
        }

        if (known == NGX_AGAIN) {
            rd = NULL;

        } else {
            rd = ngx_http_infer_ratelimit_cluster_slot(slot);
            if (rd == NULL) {
                return NGX_DECLINED;
            }
        }

    } else if (ngx_http_infer_ratelimit_redis_open() != NGX_OK) {
        return NGX_DECLINED;
    }

    /* a request's admission: its hold on the waiter, made first */

    cln = NULL;

    if (mode == NGX_HTTP_INFER_RL_ADMIT && done) {
        cln = ngx_pool_cleanup_add(r->pool, 0);
        if (cln == NULL) {
            return NGX_ERROR;
        }
    }

    w = ngx_http_infer_ratelimit_redis_waiter(rcf, mode, items, NULL, n);
    if (w == NULL) {
        return NGX_DECLINED;
    }

    w->slot = slot;
    w->done = done;

    if (cln) {
        cln->handler = ngx_http_infer_ratelimit_redis_waiter_cleanup;
        cln->data = w;
        w->r = r;
    }

    if (rd == NULL) {
        ngx_http_infer_ratelimit_redis_hold(w);

    } else if (cln && rcf->batch && rcf->seeds == NULL) {
        /* sent now, or with others once the admission in flight is back */
        ngx_http_infer_ratelimit_batch_add(w, rd);

    } else if (ngx_http_infer_ratelimit_redis_call(w, rd) != NGX_OK) {
        if (cln) {
            cln->handler = NULL;
        }

        ngx_free(w);
        return NGX_DECLINED;
    }

    return cln ? NGX_AGAIN : NGX_OK;
}


/*
 * The items' slots, sorted: slot << 16 | the item's place, from a buffer
 * of the worker's that grows to the longest call seen.  NULL: no memory.
 */

static uint32_t *
ngx_http_infer_ratelimit_redis_slots(
    ngx_http_infer_ratelimit_redis_conf_t *rcf,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n)
{
    u_char      *p;
    size_t       size;
    uint32_t    *order;
    ngx_uint_t   i;

    static u_char  *buf;
    static size_t   len;

    size = n * sizeof(uint32_t);

    for (i = 0; i < n; i++) {
        size = ngx_max(size, n * sizeof(uint32_t)
                             + ngx_http_infer_ratelimit_redis_key_len(rcf,
                                                                  &items[i]));
    }

    if (size > len) {
        p = ngx_alloc(ngx_max(size, 4096), ngx_cycle->log);
        if (p == NULL) {
            return NULL;
        }

        if (buf) {
            ngx_free(buf);
        }

        buf = p;
        len = ngx_max(size, 4096);
    }

    order = (uint32_t *) buf;
    p = buf + n * sizeof(uint32_t);

    for (i = 0; i < n; i++) {
        order[i] = (uint32_t) (ngx_http_infer_ratelimit_slot(p,
                       ngx_http_infer_ratelimit_redis_key(p, rcf, &items[i])
                       - p) << 16 | i);
    }

    ngx_sort(order, n, sizeof(uint32_t), ngx_http_infer_ratelimit_redis_cmp);

    return order;
}


static ngx_int_t
ngx_http_infer_ratelimit_redis_cmp(const void *one, const void *two)
{
    uint32_t  a, b;

    a = *(uint32_t *) one;
    b = *(uint32_t *) two;

    return (a < b) ? -1 : (a > b);
}


/*
 * A call split by slot.  Reconciliations go each to its master on its
 * own (a part that cannot be sent is lost, as a whole call would be).
 * An admission's parts are sent at once, and answered together
 * (ngx_http_infer_ratelimit_redis_finish()): sent in full or not at all,
 * so that a master that cannot be asked decides the request by the
 * outage policy before anything is charged; while the cluster's map is
 * asked for, the parts wait for it, and one that then cannot be sent
 * fails, the others undone on their answers.  A sync's part whose
 * master cannot be asked keeps its units for the next sync
 * (item->unsent).
 */

static ngx_int_t
ngx_http_infer_ratelimit_redis_split(ngx_http_request_t *r,
    ngx_http_infer_ratelimit_redis_conf_t *rcf, u_char mode,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n, uint32_t *order,
    ngx_http_infer_ratelimit_done_pt done, ngx_uint_t hold)
{
    ngx_uint_t                          i, k, nparts, part, sent;
    ngx_uint_t                          index[NGX_HTTP_INFER_RL_LIMITS_MAX];
    ngx_pool_cleanup_t                 *cln;
    ngx_http_infer_ratelimit_call_t    *call;
    ngx_http_infer_ratelimit_waiter_t  *w;
    ngx_http_infer_ratelimit_redis_t   *rd;
    ngx_http_infer_ratelimit_redis_t   *node[NGX_HTTP_INFER_RL_LIMITS_MAX];

    /* a master per part: each part is a run of one slot in order */

    nparts = 0;

    for (i = 0; i < n; i++) {
        if (i > 0 && (order[i] >> 16) == (order[i - 1] >> 16)) {
            continue;
        }

        /* while the map is asked for, every part waits for it */

        rd = hold ? NULL
                  : ngx_http_infer_ratelimit_cluster_slot(order[i] >> 16);

        if (rd == NULL && !hold && mode == NGX_HTTP_INFER_RL_ADMIT) {
            return NGX_DECLINED;
        }

        node[nparts++] = rd;
    }

    call = NULL;
    cln = NULL;

    if (mode == NGX_HTTP_INFER_RL_ADMIT) {
        /* the request's hold on the call, made first */
        cln = ngx_pool_cleanup_add(r->pool, 0);
        if (cln == NULL) {
            return NGX_ERROR;
        }
    }

    if (mode != NGX_HTTP_INFER_RL_RECONCILE) {
        call = ngx_calloc(sizeof(ngx_http_infer_ratelimit_call_t)
                          + nparts
                            * sizeof(ngx_http_infer_ratelimit_waiter_t *),
                          ngx_cycle->log);
        if (call == NULL) {
            return NGX_DECLINED;
        }

        call->part = (ngx_http_infer_ratelimit_waiter_t **) (call + 1);
        call->r = r;
        call->items = items;
        call->nitems = n;
        call->mode = mode;
        call->done = done;
        call->ev.handler = ngx_http_infer_ratelimit_redis_call_event;
        call->ev.data = call;
        call->ev.log = ngx_cycle->log;
    }

    sent = 0;
    part = 0;
    i = 0;

    while (i < n) {
        k = 0;

        do {
            index[k++] = order[i++] & 0xffff;
        } while (i < n && (order[i] >> 16) == (order[i - 1] >> 16));

        rd = node[part++];

        w = (rd == NULL && !hold) ? NULL
            : ngx_http_infer_ratelimit_redis_waiter(rcf, mode, items, index,
                                                    k);

        if (w) {
            w->slot = order[i - 1] >> 16;
            w->call = call;

            if (hold) {
                ngx_http_infer_ratelimit_redis_hold(w);

            } else if (ngx_http_infer_ratelimit_redis_call(w, rd) != NGX_OK) {
                ngx_free(w);
                w = NULL;
            }
        }

        if (w == NULL) {
            /*
             * not sent: a sync's units wait for the next one; a
             * reconciliation's are lost, as a whole one's would be
             */
            while (k) {
                items[index[--k]].unsent = 1;
            }

            continue;
        }

        if (call) {
            call->part[call->nparts++] = w;
            call->waiting++;
        }

        sent++;
    }

    if (call == NULL) {
        return NGX_OK;
    }

    if (sent == 0) {
        if (cln) {
            cln->handler = NULL;
        }

        ngx_free(call);
        return NGX_DECLINED;
    }

    if (mode == NGX_HTTP_INFER_RL_SYNC) {
        return NGX_OK;
    }

    if (sent < nparts) {
        /* never half an admission: what was sent is undone on answer */
        call->rc = NGX_DECLINED;
    }

    cln->handler = ngx_http_infer_ratelimit_redis_call_cleanup;
    cln->data = call;

    return NGX_AGAIN;
}


/*
 * A waiter and its command, for the n items at index (all of them,
 * in order, when index is NULL), in one block: the waiter, its argv, a
 * part's copy of its items and of their places, then the arguments'
 * bytes.
 */

static ngx_http_infer_ratelimit_waiter_t *
ngx_http_infer_ratelimit_redis_waiter(
    ngx_http_infer_ratelimit_redis_conf_t *rcf, u_char mode,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t *index, ngx_uint_t n)
{
    u_char                             *p;
    size_t                              size;
    int64_t                             units;
    uint64_t                            now;
    ngx_uint_t                          i, argc, k;
    ngx_http_infer_ratelimit_item_t    *item;
    ngx_http_infer_ratelimit_waiter_t  *w;

    argc = 4 + 6 * n;
    size = sizeof(ngx_http_infer_ratelimit_waiter_t)
           + argc * (sizeof(char *) + sizeof(size_t)) + 64;

    if (index) {
        size += n * (sizeof(ngx_http_infer_ratelimit_item_t)
                     + sizeof(ngx_uint_t));
    }

    for (i = 0; i < n; i++) {
        item = index ? &items[index[i]] : &items[i];
        size += ngx_http_infer_ratelimit_redis_key_len(rcf, item)
                + 5 * (NGX_INT64_LEN + 1);
    }

    w = ngx_alloc(size, ngx_cycle->log);
    if (w == NULL) {
        return NULL;
    }

    ngx_memzero(w, sizeof(ngx_http_infer_ratelimit_waiter_t));

    w->argv = (const char **) (w + 1);
    w->argvlen = (size_t *) (w->argv + argc);
    p = (u_char *) (w->argvlen + argc);
    w->argc = (int) argc;

    w->items = items;
    w->nitems = n;

    if (index) {
        /* a part answers into its own items: the request may be gone */
        w->items = (ngx_http_infer_ratelimit_item_t *) p;
        w->index = (ngx_uint_t *) (w->items + n);
        p = (u_char *) (w->index + n);

        for (i = 0; i < n; i++) {
            w->items[i] = items[index[i]];
            w->index[i] = index[i];
        }
    }

    w->argv[0] = "EVALSHA";
    w->argvlen[0] = sizeof("EVALSHA") - 1;
    w->argv[1] = (char *) ngx_http_infer_ratelimit_redis_sha;
    w->argvlen[1] = 40;

    w->argv[2] = (char *) p;
    p = ngx_sprintf(p, "%ui", n);
    w->argvlen[2] = p - (u_char *) w->argv[2];

    for (i = 0; i < n; i++) {
        w->argv[3 + i] = (char *) p;
        p = ngx_http_infer_ratelimit_redis_key(p, rcf, &w->items[i]);
        w->argvlen[3 + i] = p - (u_char *) w->argv[3 + i];
    }

    k = 3 + n;
    w->argv[k] = (mode == NGX_HTTP_INFER_RL_ADMIT) ? "a"
                 : (mode == NGX_HTTP_INFER_RL_SYNC) ? "s" : "r";
    w->argvlen[k++] = 1;

    for (i = 0; i < n; i++) {
        item = &w->items[i];

        if (mode == NGX_HTTP_INFER_RL_ADMIT) {
            /* more than the limit never fits: no overflow, no reset */
            units = (int64_t) ngx_min(item->cost, item->limit->limit + 1);

        } else if (mode == NGX_HTTP_INFER_RL_SYNC) {
            units = item->delta;

        } else {
            units = (item->where == NGX_HTTP_INFER_RL_IN_REDIS)
                    ? item->delta : 0;
        }

        /* a "-" ahead of an admission's units, to undo it (see reply) */

        if (units >= 0) {
            *p++ = '-';
        }

        w->argv[k] = (char *) p;
        p = ngx_sprintf(p, "%L", units);
        w->argvlen[k] = p - (u_char *) w->argv[k];
        k++;

        w->argv[k] = (char *) p;
        p = ngx_sprintf(p, "%uL", item->limit->limit);
        w->argvlen[k] = p - (u_char *) w->argv[k];
        k++;

        w->argv[k] = (char *) p;

        if (item->limit->calendar) {
            /* the ms left in the window, by this gateway's clock */
            now = (uint64_t) ngx_time() * 1000 + (ngx_timeofday())->msec;
            p = ngx_sprintf(p, "-%uL", (item->end > now) ? item->end - now
                                                         : 1);

        } else {
            p = ngx_sprintf(p, "%M", item->limit->window);
        }

        w->argvlen[k] = p - (u_char *) w->argv[k];
        k++;

        w->argv[k] = (char *) p;
        p = ngx_sprintf(p, "%uL",
                        (mode == NGX_HTTP_INFER_RL_ADMIT) ? item->floor : 0);
        w->argvlen[k] = p - (u_char *) w->argv[k];
        k++;

        w->argv[k] = (char *) p;
        p = ngx_sprintf(p, "%L",
                        (mode == NGX_HTTP_INFER_RL_ADMIT) ? item->pre : 0);
        w->argvlen[k] = p - (u_char *) w->argv[k];
        k++;
    }

    w->mode = mode;

    w->ev.handler = ngx_http_infer_ratelimit_redis_waiter_event;
    w->ev.data = w;
    w->ev.log = ngx_cycle->log;
    /*
     * a worker told to quit waits for an admission's answer (at most the
     * timeout): the request it holds must not go unanswered; and for a
     * reconciliation's, so that its last corrections are written first
     */
    w->ev.cancelable = 0;

    return w;
}


/* PREFIX{key}:name[:window]: {the key} is the hash tag, see slots */

static size_t
ngx_http_infer_ratelimit_redis_key_len(
    ngx_http_infer_ratelimit_redis_conf_t *rcf,
    ngx_http_infer_ratelimit_item_t *item)
{
    return rcf->prefix.len + item->key.len + 4 + item->limit->name.len
           + item->window.len;
}


static u_char *
ngx_http_infer_ratelimit_redis_key(u_char *p,
    ngx_http_infer_ratelimit_redis_conf_t *rcf,
    ngx_http_infer_ratelimit_item_t *item)
{
    p = ngx_cpymem(p, rcf->prefix.data, rcf->prefix.len);
    *p++ = '{';
    p = ngx_cpymem(p, item->key.data, item->key.len);
    *p++ = '}';
    *p++ = ':';
    p = ngx_cpymem(p, item->limit->name.data, item->limit->name.len);

    if (item->window.len) {
        *p++ = ':';
        p = ngx_cpymem(p, item->window.data, item->window.len);
    }

    return p;
}


/* hands the waiter's command to a connection, its timeout running */

ngx_int_t
ngx_http_infer_ratelimit_redis_call(ngx_http_infer_ratelimit_waiter_t *w,
    ngx_http_infer_ratelimit_redis_t *rd)
{
    if (redisAsyncCommandArgv(rd->ac, ngx_http_infer_ratelimit_redis_reply,
                              w, w->argc, w->argv, w->argvlen)
        != REDIS_OK)
    {
        return NGX_ERROR;
    }

    w->rd = rd;
    w->pending = 1;

    /* a call that waited (a batch, the cluster's map) keeps its deadline */

    if (!w->ev.timer_set) {
        ngx_add_timer(&w->ev, rd->rcf->timeout);
    }

    return NGX_OK;
}


void
ngx_http_infer_ratelimit_redis_reply(redisAsyncContext *ac, void *reply,
    void *privdata)
{
    ngx_http_infer_ratelimit_waiter_t  *w = privdata;

    redisReply  *rr = reply;

    w->pending = 0;

    /* the script was flushed, or Redis restarted without our handshake */

    if (rr && rr->type == REDIS_REPLY_ERROR && !w->retried
        && rr->len >= 8 && ngx_strncmp(rr->str, "NOSCRIPT", 8) == 0)
    {
        w->retried = 1;
        w->argv[0] = "EVAL";
        w->argvlen[0] = 4;
        w->argv[1] = (char *) ngx_http_infer_ratelimit_script.data;
        w->argvlen[1] = ngx_http_infer_ratelimit_script.len;

        if (redisAsyncCommandArgv(ac, ngx_http_infer_ratelimit_redis_reply,
                                  w, w->argc, w->argv, w->argvlen)
            == REDIS_OK)
        {
            w->pending = 1;
            return;
        }
    }

    if (rr && rr->type == REDIS_REPLY_ERROR
        && ngx_http_infer_ratelimit_redis_redirect(w, rr) == NGX_OK)
    {
        return;
    }

    if (w->call) {
        ngx_http_infer_ratelimit_redis_part(w, rr);
        return;
    }

    if (w->gated) {
        /* the next batch may go */
        w->gated = 0;
        ngx_http_infer_ratelimit_batch_answered();
    }

    ngx_http_infer_ratelimit_redis_answered(ac, w, rr);
}


/*
 * A call's answer, or a batch member's part of its batch's (rr NULL:
 * none came).
 */

void
ngx_http_infer_ratelimit_redis_answered(redisAsyncContext *ac,
    ngx_http_infer_ratelimit_waiter_t *w, redisReply *rr)
{
    ngx_int_t  rc;

    w->pending = 0;

    if (w->r == NULL && w->done && !w->answered
        && ngx_http_infer_ratelimit_redis_admitted(rr))
    {
        /*
         * The request went away (its client closed) before Redis admitted
         * it: nothing was served, so the charge is undone, in-flight
         * counts included, by the same keys moved back by the same units.
         */

        ngx_http_infer_ratelimit_redis_undo(w);
        w->redirects = 0;

        if (redisAsyncCommandArgv(ac, ngx_http_infer_ratelimit_redis_reply,
                                  w, w->argc, w->argv, w->argvlen)
            == REDIS_OK)
        {
            w->pending = 1;
            ngx_add_timer(&w->ev, w->rd->rcf->timeout);
            return;
        }
    }

    if (w->mode == NGX_HTTP_INFER_RL_SYNC) {
        ngx_http_infer_ratelimit_redis_synced(w->rd, rr);
        ngx_http_infer_ratelimit_redis_waiter_free(w);
        return;
    }

    if (w->r == NULL) {
        /* a reconciliation, or a request that is gone */

        if (rr && rr->type == REDIS_REPLY_ERROR) {
            ngx_http_infer_ratelimit_redis_failed(w->rd, rr);
        }

        ngx_http_infer_ratelimit_redis_waiter_free(w);
        return;
    }

    if (w->answered) {
        /* timed out before: the request's cleanup frees the waiter */
        return;
    }

    rc = ngx_http_infer_ratelimit_redis_parse(w, rr);

    w->answered = 1;
    w->admitted = ngx_http_infer_ratelimit_redis_admitted(rr);
    w->rc = rc;

    if (w->ev.timer_set) {
        ngx_del_timer(&w->ev);
    }

    /* the request goes on from the event loop, not from inside hiredis */

    ngx_post_event(&w->ev, &ngx_posted_events);
}


/*
 * A cluster's MOVED or ASK: the call is sent again to the node named,
 * at most NGX_HTTP_INFER_RL_REDIRECTS times, within its first timeout.
 * After a MOVED the slot is that node's; an ASK is for this call only,
 * behind ASKING.  NGX_OK: sent again.
 */

static ngx_int_t
ngx_http_infer_ratelimit_redis_redirect(ngx_http_infer_ratelimit_waiter_t *w,
    redisReply *rr)
{
    ngx_int_t                              rc;
    ngx_uint_t                             slot;
    ngx_http_infer_ratelimit_redis_t      *rd;
    ngx_http_infer_ratelimit_node_addr_t   addr;

    if (w->rd == NULL || w->rd->node == 0
        || w->redirects == NGX_HTTP_INFER_RL_REDIRECTS)
    {
        return NGX_DECLINED;
    }

    rc = ngx_http_infer_ratelimit_nodes_redirect((u_char *) rr->str, rr->len,
                                                 &slot, &addr);
    if (rc == NGX_DECLINED) {
        if (rr->len >= 11 && ngx_strncmp(rr->str, "CLUSTERDOWN", 11) == 0) {
            ngx_http_infer_ratelimit_cluster_lost();
        }

        return NGX_DECLINED;
    }

    rd = ngx_http_infer_ratelimit_cluster_node(addr.addr, addr.port);
    if (rd == NULL) {
        return NGX_DECLINED;
    }

    if (rc == NGX_HTTP_INFER_RL_MOVED) {
        ngx_http_infer_ratelimit_cluster_moved(slot, rd);
    }

    if (ngx_http_infer_ratelimit_redis_open_node(rd) != NGX_OK) {
        return NGX_DECLINED;
    }

    if (rc == NGX_HTTP_INFER_RL_ASK
        && redisAsyncCommand(rd->ac, NULL, NULL, "ASKING") != REDIS_OK)
    {
        return NGX_DECLINED;
    }

    if (redisAsyncCommandArgv(rd->ac, ngx_http_infer_ratelimit_redis_reply,
                              w, w->argc, w->argv, w->argvlen)
        != REDIS_OK)
    {
        return NGX_DECLINED;
    }

    w->rd = rd;
    w->pending = 1;
    w->redirects++;

    return NGX_OK;
}


/* a part of a call split by slot answered, or failed (rr NULL) */

static void
ngx_http_infer_ratelimit_redis_part(ngx_http_infer_ratelimit_waiter_t *w,
    redisReply *rr)
{
    ngx_http_infer_ratelimit_call_t  *call;

    call = w->call;

    w->rc = NGX_DECLINED;

    if (rr && rr->type == REDIS_REPLY_ERROR) {
        ngx_http_infer_ratelimit_redis_failed(w->rd, rr);

    } else if (rr && ngx_http_infer_ratelimit_redis_answer(rr, w->items,
                                                           w->nitems)
                     == NGX_OK)
    {
        w->rc = NGX_OK;
        w->admitted = ngx_http_infer_ratelimit_redis_admitted(rr);
    }

    w->answered = 1;

    if (w->ev.timer_set) {
        ngx_del_timer(&w->ev);
    }

    if (--call->waiting == 0) {
        ngx_http_infer_ratelimit_redis_finish(call);
    }
}


/*
 * Every part answered.  An admission admits if every part did; else the
 * parts that admitted are undone, and the request is refused (a part
 * refused) or left to the outage policy (a part failed).  Between the
 * parts' answers and the undoing, the units undone were held for one
 * round trip: a request then may be refused that would have passed.
 */

static void
ngx_http_infer_ratelimit_redis_finish(ngx_http_infer_ratelimit_call_t *call)
{
    ngx_uint_t                          i, j, n;
    ngx_http_infer_ratelimit_item_t    *items;
    ngx_http_infer_ratelimit_waiter_t  *w;

    call->finished = 1;
    call->admitted = (call->rc == NGX_OK);

    for (i = 0; i < call->nparts; i++) {
        w = call->part[i];

        if (w->rc != NGX_OK) {
            call->rc = NGX_DECLINED;
            call->admitted = 0;

        } else if (!w->admitted) {
            call->admitted = 0;
        }
    }

    if (call->mode == NGX_HTTP_INFER_RL_SYNC) {
        items = ngx_http_infer_ratelimit_approx_items(&n);

        if (items == call->items) {
            for (i = 0; i < call->nparts; i++) {
                w = call->part[i];

                for (j = 0; w->rc == NGX_OK && j < w->nitems; j++) {
                    items[w->index[j]] = w->items[j];
                }
            }

            ngx_http_infer_ratelimit_approx_synced(call->rc, 1);
        }

        ngx_http_infer_ratelimit_redis_call_free(call);
        return;
    }

    for (i = 0; call->r && i < call->nparts; i++) {
        w = call->part[i];

        for (j = 0; w->rc == NGX_OK && j < w->nitems; j++) {
            call->items[w->index[j]] = w->items[j];

            if (!call->admitted) {
                call->items[w->index[j]].where = NGX_HTTP_INFER_RL_NOWHERE;
            }
        }
    }

    if (call->r == NULL || !call->admitted) {
        ngx_http_infer_ratelimit_redis_call_undo(call);
    }

    if (call->r == NULL) {
        ngx_http_infer_ratelimit_redis_call_free(call);
        return;
    }

    /* the request goes on from the event loop, not from inside hiredis */

    ngx_post_event(&call->ev, &ngx_posted_events);
}


/* the parts that admitted are charged back, each as a reconciliation */

static void
ngx_http_infer_ratelimit_redis_call_undo(ngx_http_infer_ratelimit_call_t *call)
{
    ngx_uint_t                          i;
    ngx_http_infer_ratelimit_waiter_t  *w;

    for (i = 0; i < call->nparts; i++) {
        w = call->part[i];

        if (w == NULL || w->rc != NGX_OK || !w->admitted) {
            continue;
        }

        w->admitted = 0;

        /* a connection lost since is made again: hiredis queues meanwhile */

        if (w->rd == NULL
            || ngx_http_infer_ratelimit_redis_open_node(w->rd) != NGX_OK)
        {
            ngx_http_infer_ratelimit_redis_error(
                ngx_http_infer_ratelimit_redis_main(),
                "a part admitted could not be undone: its master is "
                "unavailable");
            continue;
        }

        ngx_http_infer_ratelimit_redis_undo(w);

        /* its own now: its reply frees it */
        w->call = NULL;
        w->redirects = 0;

        if (ngx_http_infer_ratelimit_redis_call(w, w->rd) != NGX_OK) {
            w->call = call;
            continue;
        }

        call->part[i] = NULL;
    }
}


static void
ngx_http_infer_ratelimit_redis_call_event(ngx_event_t *ev)
{
    ngx_http_infer_ratelimit_call_t  *call = ev->data;

    if (call->r == NULL || call->done == NULL) {
        return;
    }

    /* may finalize the request, and free the call with it */

    call->done(call->r, call->admitted ? NGX_OK : call->rc);
}


static void
ngx_http_infer_ratelimit_redis_call_cleanup(void *data)
{
    ngx_http_infer_ratelimit_call_t  *call = data;

    call->r = NULL;

    if (!call->finished) {
        /* the last part's answer undoes and frees it */
        return;
    }

    if (call->ev.posted) {
        /* admitted, and gone before it read the answer: undone */
        ngx_delete_posted_event(&call->ev);
        ngx_http_infer_ratelimit_redis_call_undo(call);
    }

    ngx_http_infer_ratelimit_redis_call_free(call);
}


static void
ngx_http_infer_ratelimit_redis_call_free(ngx_http_infer_ratelimit_call_t *call)
{
    ngx_uint_t  i;

    for (i = 0; i < call->nparts; i++) {
        if (call->part[i]) {
            ngx_http_infer_ratelimit_redis_waiter_free(call->part[i]);
        }
    }

    if (call->ev.posted) {
        ngx_delete_posted_event(&call->ev);
    }

    ngx_free(call);
}


/*
 * An error a script call got.  A master that a failover made a replica,
 * and that kept our connection, answers writes with READONLY: the
 * connection is dropped, and the master asked for again (Sentinel,
 * Cluster).  Deferred by hiredis when called from a reply's callback.
 */

static void
ngx_http_infer_ratelimit_redis_failed(ngx_http_infer_ratelimit_redis_t *rd,
    redisReply *rr)
{
    ngx_http_infer_ratelimit_redis_error(rd, "script failed: %*s",
                                         (size_t) ngx_min(rr->len, 256),
                                         (u_char *) rr->str);

    if (rr->len >= 8 && ngx_strncmp(rr->str, "READONLY", 8) == 0) {
        ngx_http_infer_ratelimit_redis_error(rd, "a replica now: "
                                             "reconnecting");
        ngx_http_infer_ratelimit_redis_drop(rd);
    }
}


/* an approximate limits' sync answered, or not (rr NULL) */

static void
ngx_http_infer_ratelimit_redis_synced(ngx_http_infer_ratelimit_redis_t *rd,
    redisReply *rr)
{
    ngx_uint_t                        n;
    ngx_http_infer_ratelimit_item_t  *items;

    items = ngx_http_infer_ratelimit_approx_items(&n);

    if (items == NULL) {
        return;
    }

    if (rr && rr->type == REDIS_REPLY_ERROR) {
        ngx_http_infer_ratelimit_redis_failed(rd, rr);
        ngx_http_infer_ratelimit_approx_synced(NGX_DECLINED, 1);
        return;
    }

    if (rr == NULL
        || ngx_http_infer_ratelimit_redis_answer(rr, items, n) != NGX_OK)
    {
        ngx_http_infer_ratelimit_approx_synced(NGX_DECLINED, 1);
        return;
    }

    ngx_http_infer_ratelimit_approx_synced(NGX_OK, 1);
}


static ngx_uint_t
ngx_http_infer_ratelimit_redis_admitted(redisReply *rr)
{
    return rr && rr->type == REDIS_REPLY_ARRAY && rr->elements > 0
           && rr->element[0]->type == REDIS_REPLY_INTEGER
           && rr->element[0]->integer == 1;
}


/* the admission's argv becomes its reconciliation by minus its units */

static void
ngx_http_infer_ratelimit_redis_undo(ngx_http_infer_ratelimit_waiter_t *w)
{
    ngx_uint_t  i, k;

    w->done = NULL;

    k = 3 + w->nitems;
    w->argv[k++] = "r";

    /* the corrections the admission carried stay made: "r" ignores them */

    for (i = 0; i < w->nitems; i++, k += 5) {
        w->argv[k]--;
        w->argvlen[k]++;
    }
}


static ngx_int_t
ngx_http_infer_ratelimit_redis_parse(ngx_http_infer_ratelimit_waiter_t *w,
    redisReply *rr)
{
    if (rr == NULL) {
        return NGX_DECLINED;
    }

    if (rr->type == REDIS_REPLY_ERROR) {
        ngx_http_infer_ratelimit_redis_failed(w->rd, rr);
        return NGX_DECLINED;
    }

    if (ngx_http_infer_ratelimit_redis_answer(rr, w->items, w->nitems)
        != NGX_OK)
    {
        ngx_http_infer_ratelimit_redis_error(w->rd,
            "the script answered something unexpected");
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/*
 * An admission's answer into its n items: NGX_DECLINED, and the items
 * untouched, when it is not an array of 1 + 3 * n integers, none negative.
 */

ngx_int_t
ngx_http_infer_ratelimit_redis_answer(redisReply *rr,
    ngx_http_infer_ratelimit_item_t *items, ngx_uint_t n)
{
    ngx_uint_t                        i, admitted;
    redisReply                      **e;
    ngx_http_infer_ratelimit_item_t  *item;

    if (rr->type != REDIS_REPLY_ARRAY || rr->elements != 1 + 3 * n) {
        return NGX_DECLINED;
    }

    e = rr->element;

    for (i = 0; i < rr->elements; i++) {
        if (e[i]->type != REDIS_REPLY_INTEGER || e[i]->integer < 0) {
            return NGX_DECLINED;
        }
    }

    admitted = (e[0]->integer == 1);

    for (i = 0; i < n; i++) {
        item = &items[i];

        item->known = 1;
        item->limit_n = item->limit->limit;
        item->remaining = (uint64_t) e[1 + 3 * i]->integer;
        item->reset = (ngx_msec_t) e[2 + 3 * i]->integer;
        item->retry = (ngx_msec_t) e[3 + 3 * i]->integer;
        item->refused = (item->retry > 0);
        item->where = admitted ? NGX_HTTP_INFER_RL_IN_REDIS
                               : NGX_HTTP_INFER_RL_NOWHERE;
    }

    return NGX_OK;
}


/* the call's timeout, or its reply posted to the event loop */

static void
ngx_http_infer_ratelimit_redis_waiter_event(ngx_event_t *ev)
{
    ngx_http_request_t                 *r;
    ngx_http_infer_ratelimit_done_pt    done;
    ngx_http_infer_ratelimit_waiter_t  *w;
    ngx_http_infer_ratelimit_redis_t   *rd;

    w = ev->data;
    rd = w->rd;

    if (ev->timedout && w->held) {
        ev->timedout = 0;

        /*
         * The cluster's map did not come in time: the waiter leaves the
         * list first (asking again may fail the ones left, and free
         * them), then fails.
         */

        ngx_queue_remove(&w->hold);
        w->held = 0;

        (void) ngx_http_infer_ratelimit_cluster_known();

        ngx_http_infer_ratelimit_redis_fail(w);
        return;
    }

    if (ev->timedout) {
        ev->timedout = 0;

        ngx_http_infer_ratelimit_redis_error(rd, "a call timed out after "
                                             "%Mms: reconnecting",
                                             rd->rcf->timeout);

        if (w->queued) {
            ngx_http_infer_ratelimit_batch_remove(w);
        }

        if (w->r == NULL) {
            /*
             * no request: the drop's NULL reply frees the waiter (a
             * part's, its call)
             */
            ngx_http_infer_ratelimit_redis_drop(rd);
            return;
        }

        w->answered = 1;
        w->rc = NGX_DECLINED;

        ngx_http_infer_ratelimit_redis_drop(rd);
    }

    r = w->r;
    done = w->done;

    if (r == NULL || done == NULL) {
        return;
    }

    /* may finalize the request, and free w with it */

    done(r, w->rc);
}


static void
ngx_http_infer_ratelimit_redis_waiter_cleanup(void *data)
{
    ngx_http_infer_ratelimit_waiter_t  *w = data;

    ngx_http_infer_ratelimit_redis_t  *rd;

    w->r = NULL;

    if (w->ev.timer_set) {
        ngx_del_timer(&w->ev);
    }

    if (w->queued) {
        /* never sent: nothing to undo */
        ngx_http_infer_ratelimit_batch_remove(w);
    }

    if (w->held) {
        ngx_queue_remove(&w->hold);
        w->held = 0;

        /* never sent: the corrections it carried wait for the next call */
        ngx_http_infer_ratelimit_coalesce_restore(w->items, w->nitems);
    }

    if (w->ev.posted) {
        ngx_delete_posted_event(&w->ev);

        /*
         * Redis admitted the request, and the request went (its client
         * closed) before it read the answer: nothing was served, so the
         * charge is undone, as when the answer comes after it went.
         */

        rd = w->rd;

        if (w->admitted && !w->pending && rd->ac) {
            ngx_http_infer_ratelimit_redis_undo(w);

            if (redisAsyncCommandArgv(rd->ac,
                                      ngx_http_infer_ratelimit_redis_reply,
                                      w, w->argc, w->argv, w->argvlen)
                == REDIS_OK)
            {
                /* the reply frees the waiter */
                w->pending = 1;
                ngx_add_timer(&w->ev, rd->rcf->timeout);
                return;
            }
        }
    }

    if (!w->pending) {
        ngx_http_infer_ratelimit_redis_waiter_free(w);
    }
}


void
ngx_http_infer_ratelimit_redis_waiter_free(
    ngx_http_infer_ratelimit_waiter_t *w)
{
    if (w->ev.timer_set) {
        ngx_del_timer(&w->ev);
    }

    if (w->ev.posted) {
        ngx_delete_posted_event(&w->ev);
    }

    ngx_free(w);
}


/*
 * Calls that wait for a cluster's map: sent when it comes (rc NGX_OK),
 * failed when no node could tell it (the outage policy decides), or
 * when they time out.
 */

static void
ngx_http_infer_ratelimit_redis_hold(ngx_http_infer_ratelimit_waiter_t *w)
{
    w->held = 1;
    ngx_queue_insert_tail(&ngx_http_infer_ratelimit_redis_waiting, &w->hold);

    ngx_add_timer(&w->ev, ngx_http_infer_ratelimit_redis_main()->rcf->timeout);
}


void
ngx_http_infer_ratelimit_redis_release(ngx_int_t rc)
{
    ngx_queue_t                        *q, *list;
    ngx_http_infer_ratelimit_redis_t   *rd;
    ngx_http_infer_ratelimit_waiter_t  *w;

    list = &ngx_http_infer_ratelimit_redis_waiting;

    while (!ngx_queue_empty(list)) {
        q = ngx_queue_head(list);
        w = ngx_queue_data(q, ngx_http_infer_ratelimit_waiter_t, hold);

        rd = (rc == NGX_OK) ? ngx_http_infer_ratelimit_cluster_slot(w->slot)
                            : NULL;

        if (rd && ngx_http_infer_ratelimit_redis_call(w, rd) == NGX_OK) {
            ngx_queue_remove(q);
            w->held = 0;
            continue;
        }

        ngx_http_infer_ratelimit_redis_fail(w);
    }
}


/* a held call fails as if its connection had: no answer */

static void
ngx_http_infer_ratelimit_redis_fail(ngx_http_infer_ratelimit_waiter_t *w)
{
    ngx_uint_t  i;

    if (w->held) {
        ngx_queue_remove(&w->hold);
        w->held = 0;
    }

    if (w->mode == NGX_HTTP_INFER_RL_ADMIT) {
        /* never sent: the corrections it carried wait for the next call */
        ngx_http_infer_ratelimit_coalesce_restore(w->items, w->nitems);
    }

    if (w->mode == NGX_HTTP_INFER_RL_SYNC) {
        /* never sent: a sync's units wait for the next one */
        for (i = 0; i < w->nitems; i++) {
            if (w->call) {
                w->call->items[w->index[i]].unsent = 1;

            } else {
                w->items[i].unsent = 1;
            }
        }
    }

    ngx_http_infer_ratelimit_redis_reply(NULL, NULL, w);
}


/* the script's SHA1, for EVALSHA */

u_char *
ngx_http_infer_ratelimit_redis_evalsha(void)
{
    return ngx_http_infer_ratelimit_redis_sha;
}


/* computed once per worker; the calls held for a cluster's map, none */


void
ngx_http_infer_ratelimit_redis_sha1(void)
{
    u_char      hash[20];
    ngx_sha1_t  sha1;

    ngx_sha1_init(&sha1);
    ngx_sha1_update(&sha1, ngx_http_infer_ratelimit_script.data,
                    ngx_http_infer_ratelimit_script.len);
    ngx_sha1_final(hash, &sha1);

    ngx_hex_dump(ngx_http_infer_ratelimit_redis_sha, hash, 20);

    ngx_queue_init(&ngx_http_infer_ratelimit_redis_waiting);
}


/* for the handshake's SCRIPT LOAD */

ngx_str_t *
ngx_http_infer_ratelimit_redis_script(void)
{
    return &ngx_http_infer_ratelimit_script;
}

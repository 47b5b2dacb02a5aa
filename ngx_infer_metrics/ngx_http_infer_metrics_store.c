/*
 * Copyright (C) ngx_infer authors
 *
 * The store of ngx_http_infer_metrics_module: series in one shared zone,
 * created under the slab mutex, found by hash without it, updated with
 * atomic adds; and the label text that names them.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer_metrics.h"


static size_t ngx_http_infer_metrics_utf8(u_char *p, size_t len);
static u_char *ngx_http_infer_metrics_escape(u_char *dst, u_char *src,
    size_t len);
static uint32_t ngx_http_infer_metrics_hash(u_char *p, size_t len,
    uint64_t seed);
static ngx_http_infer_metrics_node_t *ngx_http_infer_metrics_find(
    ngx_http_infer_metrics_zone_t *zone, ngx_uint_t family, uint32_t layout,
    ngx_uint_t nvalues, u_char *labels, size_t len, ngx_uint_t overflow);


/* The configured labels, as `name="value",...`; returns the length. */

size_t
ngx_http_infer_metrics_labels(ngx_http_request_t *r, ngx_array_t *labels,
    u_char *buf)
{
    u_char                          *p;
    ngx_str_t                        v;
    ngx_uint_t                       i;
    ngx_http_infer_metrics_label_t  *lb;

    if (labels == NULL) {
        return 0;
    }

    p = buf;
    lb = labels->elts;

    for (i = 0; i < labels->nelts; i++) {
        if (ngx_http_complex_value(r, &lb[i].value, &v) != NGX_OK) {
            v.len = 0;
        }

        if (i) {
            *p++ = ',';
        }

        p = ngx_cpymem(p, lb[i].name.data, lb[i].name.len);
        *p++ = '=';
        *p++ = '"';
        p = ngx_http_infer_metrics_escape(p, v.data, v.len);
        *p++ = '"';
    }

    return p - buf;
}


/* Writes labels, then name="value"; labels may be p itself. */

u_char *
ngx_http_infer_metrics_label(u_char *p, u_char *labels, size_t len,
    char *name, u_char *value, size_t vlen)
{
    if (labels != p) {
        p = ngx_cpymem(p, labels, len);

    } else {
        p += len;
    }

    if (len) {
        *p++ = ',';
    }

    while (*name) {
        *p++ = (u_char) *name++;
    }

    *p++ = '=';
    *p++ = '"';
    p = ngx_http_infer_metrics_escape(p, value, vlen);
    *p++ = '"';

    return p;
}


/* "2xx"; "oth" for a status out of 100..599 (none, or a 0.9 request) */

void
ngx_http_infer_metrics_class(u_char *code, ngx_uint_t status)
{
    if (status >= 100 && status < 600) {
        code[0] = (u_char) ('0' + status / 100);
        code[1] = 'x';
        code[2] = 'x';

    } else {
        ngx_memcpy(code, "oth", 3);
    }
}


/*
 * A label value as the exposition format wants it: backslash, double
 * quote and newline escaped, and valid UTF-8 (Prometheus refuses a page
 * with anything else, so a stray byte becomes "?").  Values are cut to
 * NGX_HTTP_INFER_METRICS_VALUE_MAX bytes on a character boundary, so that
 * a client cannot make series of any size.  Writes at most twice the
 * bytes it reads.
 */

/*
 * The length of the well-formed UTF-8 character at p (RFC 3629: no
 * overlong forms, no surrogates, nothing past U+10FFFF), or 0: what Go's
 * utf8.Valid, and so Prometheus, accepts.  ngx_utf8_decode() is looser.
 */

static size_t
ngx_http_infer_metrics_utf8(u_char *p, size_t len)
{
    size_t  n, i;
    u_char  lo, hi;

    lo = 0x80;
    hi = 0xbf;

    if (p[0] >= 0xc2 && p[0] <= 0xdf) {
        n = 2;

    } else if (p[0] >= 0xe0 && p[0] <= 0xef) {
        n = 3;

        if (p[0] == 0xe0) {
            lo = 0xa0;

        } else if (p[0] == 0xed) {
            hi = 0x9f;
        }

    } else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        n = 4;

        if (p[0] == 0xf0) {
            lo = 0x90;

        } else if (p[0] == 0xf4) {
            hi = 0x8f;
        }

    } else {
        return 0;
    }

    if (len < n || p[1] < lo || p[1] > hi) {
        return 0;
    }

    for (i = 2; i < n; i++) {
        if (p[i] < 0x80 || p[i] > 0xbf) {
            return 0;
        }
    }

    return n;
}


static u_char *
ngx_http_infer_metrics_escape(u_char *dst, u_char *src, size_t len)
{
    u_char    *p, *last, *start;
    size_t     n;

    if (len > NGX_HTTP_INFER_METRICS_VALUE_MAX) {
        len = NGX_HTTP_INFER_METRICS_VALUE_MAX;

        while (len && (src[len] & 0xc0) == 0x80) {
            len--;
        }
    }

    p = src;
    last = src + len;

    while (p < last) {

        if (*p < 0x80) {
            switch (*p) {
            case '\\':
                *dst++ = '\\';
                *dst++ = '\\';
                break;
            case '"':
                *dst++ = '\\';
                *dst++ = '"';
                break;
            case '\n':
                *dst++ = '\\';
                *dst++ = 'n';
                break;
            default:
                *dst++ = *p;
            }

            p++;
            continue;
        }

        start = p;
        n = ngx_http_infer_metrics_utf8(p, last - p);

        if (n == 0) {
            *dst++ = '?';
            p = start + 1;
            continue;
        }

        p += n;
        dst = ngx_cpymem(dst, start, n);
    }

    return dst;
}


void
ngx_http_infer_metrics_count(ngx_http_infer_metrics_main_conf_t *mcf,
    ngx_uint_t family, u_char *labels, size_t len, uint64_t n)
{
    ngx_http_infer_metrics_node_t  *node;

    node = ngx_http_infer_metrics_series(mcf, family, labels, len);

    if (node) {
        (void) ngx_atomic_fetch_add(&node->values[0], (ngx_atomic_int_t) n);
    }
}


void
ngx_http_infer_metrics_observe(ngx_http_infer_metrics_main_conf_t *mcf,
    ngx_uint_t family, u_char *labels, size_t len, uint64_t usec)
{
    ngx_uint_t                         i;
    ngx_http_infer_metrics_node_t     *node;
    ngx_http_infer_metrics_buckets_t  *b;

    node = ngx_http_infer_metrics_series(mcf, family, labels, len);
    if (node == NULL) {
        return;
    }

    b = mcf->buckets[family];

    for (i = 0; i < b->n; i++) {
        if (usec <= b->usec[i]) {
            break;
        }
    }

    (void) ngx_atomic_fetch_add(&node->values[i], 1);
    (void) ngx_atomic_fetch_add(&node->values[b->n + 1],
                                (ngx_atomic_int_t) usec);
}


/*
 * The series of a family with these labels.  Past max_series (or when the
 * zone is full) the observation is folded into the family's overflow
 * series, and counted.
 */

ngx_http_infer_metrics_node_t *
ngx_http_infer_metrics_series(ngx_http_infer_metrics_main_conf_t *mcf,
    ngx_uint_t family, u_char *labels, size_t len)
{
    uint32_t                           layout;
    ngx_uint_t                         nvalues;
    ngx_http_infer_metrics_zone_t     *zone;
    ngx_http_infer_metrics_node_t     *node;
    ngx_http_infer_metrics_counter_t  *c;
    ngx_http_infer_metrics_buckets_t  *b;

    zone = mcf->shm_zone->data;

    if (family < NGX_HTTP_INFER_METRICS_NFAMILIES) {
        b = mcf->buckets[family];
        layout = b ? b->layout : 0;
        nvalues = b ? b->n + 2 : 1;

    } else {
        c = mcf->counters.elts;
        layout = c[family - NGX_HTTP_INFER_METRICS_NFAMILIES].layout;
        nvalues = 1;
    }

    node = ngx_http_infer_metrics_find(zone, family, layout, nvalues, labels,
                                       len, 0);
    if (node) {
        return node;
    }

    (void) ngx_atomic_fetch_add(&zone->sh->folded[family], 1);

    return ngx_http_infer_metrics_find(zone, family, layout, nvalues,
                                   (u_char *) NGX_HTTP_INFER_METRICS_OVERFLOW,
                                   sizeof(NGX_HTTP_INFER_METRICS_OVERFLOW) - 1,
                                   1);
}


/*
 * Series are only ever added, at the head of a hash chain and of their
 * family's list, once complete: a reader walks the chains without the
 * lock and sees either the old head or a whole new series.
 */

static ngx_http_infer_metrics_node_t *
ngx_http_infer_metrics_find(ngx_http_infer_metrics_zone_t *zone,
    ngx_uint_t family, uint32_t layout, ngx_uint_t nvalues, u_char *labels,
    size_t len, ngx_uint_t overflow)
{
    size_t                           size;
    uint32_t                         hash;
    ngx_uint_t                       pass;
    ngx_http_infer_metrics_node_t   *node, **slot;
    ngx_http_infer_metrics_shctx_t  *sh;

    sh = zone->sh;

    hash = ngx_http_infer_metrics_hash(labels, len,
                                       sh->seed ^ ((uint64_t) family << 32)
                                       ^ layout);

    slot = &sh->hash[hash & sh->mask];

    for (pass = 0; pass < 2; pass++) {

        for (node = *slot; node; node = node->next) {
            if (node->hash == hash
                && node->family == family
                && node->layout == layout
                && node->nvalues == nvalues
                && node->len == len
                && ngx_memcmp((u_char *) &node->values[node->nvalues], labels,
                              len)
                   == 0)
            {
                if (pass) {
                    ngx_shmtx_unlock(&zone->shpool->mutex);
                }

                return node;
            }
        }

        if (pass == 0) {
            /* another worker may create it meanwhile: look again locked */
            ngx_shmtx_lock(&zone->shpool->mutex);
        }
    }

    if (!overflow && sh->nseries >= zone->max_series) {
        ngx_shmtx_unlock(&zone->shpool->mutex);
        return NULL;
    }

    size = offsetof(ngx_http_infer_metrics_node_t, values)
           + nvalues * sizeof(ngx_atomic_t) + len;

    node = ngx_slab_calloc_locked(zone->shpool, size);
    if (node == NULL) {
        ngx_shmtx_unlock(&zone->shpool->mutex);
        return NULL;
    }

    node->hash = hash;
    node->layout = layout;
    node->family = (uint16_t) family;
    node->nvalues = (uint16_t) nvalues;
    node->len = (uint16_t) len;
    node->overflow = (uint16_t) overflow;
    ngx_memcpy((u_char *) &node->values[nvalues], labels, len);

    node->next = *slot;
    node->fnext = sh->head[family];

    ngx_memory_barrier();

    *slot = node;
    sh->head[family] = node;

    if (!overflow) {
        sh->nseries++;
    }

    ngx_shmtx_unlock(&zone->shpool->mutex);

    return node;
}


/*
 * A word at a time (ngx_crc32_short() goes a nibble at a time, and was the
 * LOG phase's largest cost), seeded per zone so that clients choosing label
 * values cannot aim at one hash chain.
 */

static uint32_t
ngx_http_infer_metrics_hash(u_char *p, size_t len, uint64_t seed)
{
    uint64_t  h, w;

    h = seed ^ (len * 0x9e3779b97f4a7c15ULL);

    while (len >= 8) {
        ngx_memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
        p += 8;
        len -= 8;
    }

    w = 0;

    while (len) {
        w = w << 8 | p[--len];
    }

    h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 29;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 32;

    return (uint32_t) h;
}


/*
 * Reused on reload, as limit_req does, so that counters survive it: the
 * new configuration's series are found by the same label text.  A
 * histogram whose buckets changed starts new series (the layout is part
 * of the key); the old ones are kept, not shown.
 */

ngx_int_t
ngx_http_infer_metrics_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_infer_metrics_zone_t  *ozone = data;

    size_t                          len;
    ngx_uint_t                      n;
    ngx_http_infer_metrics_zone_t  *zone;

    zone = shm_zone->data;

    if (ozone) {
        zone->sh = ozone->sh;
        zone->shpool = ozone->shpool;
        return NGX_OK;
    }

    zone->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        zone->sh = zone->shpool->data;
        return NGX_OK;
    }

    zone->sh = ngx_slab_calloc(zone->shpool,
                               sizeof(ngx_http_infer_metrics_shctx_t));
    if (zone->sh == NULL) {
        return NGX_ERROR;
    }

    zone->shpool->data = zone->sh;

    for (n = 64; n < zone->max_series; n <<= 1) { /* void */ }

    /* a full zone folds series into the overflow ones: not worth a crit */
    zone->shpool->log_nomem = 0;

    zone->sh->hash = ngx_slab_calloc(zone->shpool,
                               n * sizeof(ngx_http_infer_metrics_node_t *));
    if (zone->sh->hash == NULL) {
        ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                      "infer_metrics_zone \"%V\" is too small for "
                      "max_series=%ui: its hash table alone takes %uz bytes",
                      &shm_zone->shm.name, zone->max_series,
                      n * sizeof(ngx_http_infer_metrics_node_t *));
        return NGX_ERROR;
    }

    zone->sh->mask = n - 1;
    zone->sh->created = ngx_time();
    zone->sh->seed = (uint64_t) ngx_random() << 32 ^ ngx_random()
                     ^ (uint64_t) ngx_time();

    len = sizeof(" in infer_metrics_zone \"\"") + shm_zone->shm.name.len;

    zone->shpool->log_ctx = ngx_slab_alloc(zone->shpool, len);
    if (zone->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(zone->shpool->log_ctx, " in infer_metrics_zone \"%V\"%Z",
                &shm_zone->shm.name);

    return NGX_OK;
}

/*
 * Copyright (C) ngx_infer authors
 *
 * What the files of ngx_http_infer_metrics_module share: the families,
 * the configuration and the shared-memory store of series.
 */


#ifndef _NGX_HTTP_INFER_METRICS_H_INCLUDED_
#define _NGX_HTTP_INFER_METRICS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


#define NGX_HTTP_INFER_METRICS_VERSION      "0.1.0"

#define NGX_HTTP_INFER_METRICS_MAX_BUCKETS  32
#define NGX_HTTP_INFER_METRICS_MAX_LABELS   8

/* one label value is cut to this many bytes, before escaping */
#define NGX_HTTP_INFER_METRICS_VALUE_MAX    128

/* the label text of a series: up to 8 values escaped, names, extra label */
#define NGX_HTTP_INFER_METRICS_LABELS_MAX                                     \
    (NGX_HTTP_INFER_METRICS_MAX_LABELS + 2)                                   \
    * (NGX_HTTP_INFER_METRICS_VALUE_MAX * 2 + 64)

#define NGX_HTTP_INFER_METRICS_OVERFLOW     "infer_overflow=\"true\""

/* the built-in families, then those of infer_metrics_counter */
#define NGX_HTTP_INFER_METRICS_MAX_FAMILIES 64


typedef enum {
    NGX_HTTP_INFER_METRICS_REQUESTS = 0,
    NGX_HTTP_INFER_METRICS_IN_FLIGHT,
    NGX_HTTP_INFER_METRICS_DURATION,
    NGX_HTTP_INFER_METRICS_UPSTREAM_TIME,
    NGX_HTTP_INFER_METRICS_OVERHEAD,
    NGX_HTTP_INFER_METRICS_TTFT,
    NGX_HTTP_INFER_METRICS_TPOT,
    NGX_HTTP_INFER_METRICS_TOKENS,
    NGX_HTTP_INFER_METRICS_REQUEST_BYTES,
    NGX_HTTP_INFER_METRICS_RESPONSE_BYTES,
    NGX_HTTP_INFER_METRICS_AUTH,
    NGX_HTTP_INFER_METRICS_RATELIMIT,
    NGX_HTTP_INFER_METRICS_ENDPOINT_REQUESTS,
    NGX_HTTP_INFER_METRICS_ENDPOINT_TIME,
    NGX_HTTP_INFER_METRICS_ENDPOINT_PICKS,
    NGX_HTTP_INFER_METRICS_NFAMILIES
} ngx_http_infer_metrics_family_e;


typedef enum {
    NGX_HTTP_INFER_METRICS_COUNTER = 0,
    NGX_HTTP_INFER_METRICS_GAUGE,
    NGX_HTTP_INFER_METRICS_HISTOGRAM
} ngx_http_infer_metrics_type_e;


typedef struct {
    ngx_str_t                       name;      /* without _total */
    ngx_uint_t                      type;
    char                           *help;
    char                           *buckets;   /* histograms: the name in
                                                  infer_metrics_buckets */
} ngx_http_infer_metrics_family_t;


/* the upper bounds of a histogram's buckets */

typedef struct {
    ngx_uint_t                      n;
    uint64_t                        usec[NGX_HTTP_INFER_METRICS_MAX_BUCKETS];
    ngx_str_t                       text[NGX_HTTP_INFER_METRICS_MAX_BUCKETS];
    uint32_t                        layout;    /* a hash of usec[] */
} ngx_http_infer_metrics_buckets_t;


/*
 * One series in shared memory.  Series are never freed: a worker finds
 * one without a lock by its hash, and holds on to it (an in-flight
 * request's gauge) across a reload.  The label text follows values[].
 * A histogram's values are its buckets (not cumulative), the +Inf
 * bucket, then the sum in microseconds.
 */

typedef struct ngx_http_infer_metrics_node_s  ngx_http_infer_metrics_node_t;

struct ngx_http_infer_metrics_node_s {
    ngx_http_infer_metrics_node_t  *next;      /* in its hash chain */
    ngx_http_infer_metrics_node_t  *fnext;     /* in its family's list */
    uint32_t                        hash;
    uint32_t                        layout;    /* histograms: bucket bounds */
    uint16_t                        family;
    uint16_t                        nvalues;
    uint16_t                        len;       /* of the label text */
    uint16_t                        overflow;
    ngx_atomic_t                    values[1];
};


typedef struct {
    ngx_uint_t                      nseries;   /* under the mutex */
    ngx_uint_t                      mask;      /* of hash[] */
    ngx_http_infer_metrics_node_t **hash;
    ngx_http_infer_metrics_node_t  *head[NGX_HTTP_INFER_METRICS_MAX_FAMILIES];
    ngx_atomic_t                    folded[NGX_HTTP_INFER_METRICS_MAX_FAMILIES];
    time_t                          created;
    uint64_t                        seed;      /* of the hash: label values
                                                  come from clients */
} ngx_http_infer_metrics_shctx_t;


typedef struct {
    ngx_http_infer_metrics_shctx_t *sh;
    ngx_slab_pool_t                *shpool;
    ngx_uint_t                      max_series;
} ngx_http_infer_metrics_zone_t;


/*
 * A counter of infer_metrics_counter.  Its series are told from those of
 * a counter declared before in its place by the hash of its name, kept as
 * their layout.
 */

typedef struct {
    ngx_str_t                       name;      /* without _total */
    ngx_str_t                       help;
    ngx_http_complex_value_t        value;
    uint32_t                        layout;
} ngx_http_infer_metrics_counter_t;


typedef struct {
    ngx_shm_zone_t                 *shm_zone;
    ngx_uint_t                      max_series;
    ngx_flag_t                      used;       /* a location records or
                                                   exports */
    ngx_http_infer_metrics_buckets_t
                                   *buckets[NGX_HTTP_INFER_METRICS_NFAMILIES];
    ngx_array_t                     counters;   /* of *_counter_t */

    /* the indexes of route's variables; NGX_ERROR: not defined */
    ngx_int_t                       var_stream;
    ngx_int_t                       var_ttft;
    ngx_int_t                       var_tokens[4];
    ngx_int_t                       var_endpoint;   /* infer_balance's */
    ngx_int_t                       var_reason;
} ngx_http_infer_metrics_main_conf_t;


typedef struct {
    ngx_str_t                       name;
    ngx_http_complex_value_t        value;
} ngx_http_infer_metrics_label_t;


typedef struct {
    ngx_flag_t                      enable;
    ngx_array_t                    *labels;     /* of *_label_t */
    ngx_http_complex_value_t       *auth_status;
    ngx_http_complex_value_t       *ratelimit_status;
    ngx_array_t                    *ready;      /* of *_label_t */
} ngx_http_infer_metrics_loc_conf_t;


extern ngx_module_t  ngx_http_infer_metrics_module;

extern ngx_http_infer_metrics_family_t
    ngx_http_infer_metrics_families[NGX_HTTP_INFER_METRICS_NFAMILIES];


/* ngx_http_infer_metrics_store.c */

ngx_int_t ngx_http_infer_metrics_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
size_t ngx_http_infer_metrics_labels(ngx_http_request_t *r,
    ngx_array_t *labels, u_char *buf);
u_char *ngx_http_infer_metrics_label(u_char *p, u_char *labels, size_t len,
    char *name, u_char *value, size_t vlen);
void ngx_http_infer_metrics_class(u_char *code, ngx_uint_t status);
void ngx_http_infer_metrics_count(ngx_http_infer_metrics_main_conf_t *mcf,
    ngx_uint_t family, u_char *labels, size_t len, uint64_t n);
void ngx_http_infer_metrics_observe(ngx_http_infer_metrics_main_conf_t *mcf,
    ngx_uint_t family, u_char *labels, size_t len, uint64_t usec);
ngx_http_infer_metrics_node_t *ngx_http_infer_metrics_series(
    ngx_http_infer_metrics_main_conf_t *mcf, ngx_uint_t family,
    u_char *labels, size_t len);

/* ngx_http_infer_metrics_export.c */

ngx_int_t ngx_http_infer_metrics_export_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_infer_metrics_health_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_infer_metrics_ready_handler(ngx_http_request_t *r);


#endif /* _NGX_HTTP_INFER_METRICS_H_INCLUDED_ */

/*
 * Copyright (C) ngx_infer authors
 *
 * Backend signals from a metric page in the Prometheus text format
 * (0.0.4, and OpenMetrics), fed the body buffer by buffer with a
 * boundary anywhere: per signal, the samples of the first of its names
 * found on the page, summed (queue, running) or the largest (kv), and
 * the labels of the LoRA info sample with the largest value.  Pure: no
 * nginx calls but ngx_murmur_hash2, no allocation (bounded state inside
 * the struct).
 */


#ifndef _NGX_HTTP_INFER_BALANCE_SIGNALS_H_INCLUDED_
#define _NGX_HTTP_INFER_BALANCE_SIGNALS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


#define NGX_HTTP_INFER_SIGNAL_QUEUE    0
#define NGX_HTTP_INFER_SIGNAL_RUNNING  1
#define NGX_HTTP_INFER_SIGNAL_KV       2
#define NGX_HTTP_INFER_SIGNAL_LORA     3
#define NGX_HTTP_INFER_SIGNALS         4

/* longer lines are skipped; a CR before the LF does not count */
#define NGX_HTTP_INFER_SIGNALS_LINE_MAX  4096

/* adapters kept per list */
#define NGX_HTTP_INFER_SIGNALS_LORA_MAX  8

/* names per signal */
#define NGX_HTTP_INFER_SIGNALS_NAMES     8

/* values are saturated at +-2^62 thousandths */
#define NGX_HTTP_INFER_SIGNALS_VALUE_MAX  ((int64_t) 1 << 62)


typedef struct {
    ngx_str_t     names[NGX_HTTP_INFER_SIGNALS][NGX_HTTP_INFER_SIGNALS_NAMES];
    ngx_uint_t    nnames[NGX_HTTP_INFER_SIGNALS];
} ngx_http_infer_signals_conf_t;


typedef struct {
    /*
     * results, valid after each feed for the lines complete so far:
     * queue and running are sums of samples, kv the largest, all in
     * thousandths (3.0 is 3000, 0.953 is 953), rounded to nearest, half
     * away from zero; 0 when not found.  NaN and infinite samples are
     * ignored, as if absent.
     */
    int64_t       value[3];
    ngx_uint_t    found;                /* bit per signal (1 << SIGNAL_x):
                                           a sample was used */

    /* of the LoRA sample with the largest value; all 0 when none */
    int64_t       lora_stamp;           /* its value, thousandths */
    ngx_uint_t    max_lora;             /* label max_lora, 0 when absent
                                           or not an integer */
    ngx_uint_t    nrunning;             /* adapters in
                                           running_lora_adapters, even
                                           past LORA_MAX */
    ngx_uint_t    nwaiting;             /* in waiting_lora_adapters */
    uint32_t      running[NGX_HTTP_INFER_SIGNALS_LORA_MAX];
                                        /* ngx_murmur_hash2 of the first
                                           names */
    uint32_t      waiting[NGX_HTTP_INFER_SIGNALS_LORA_MAX];

    ngx_uint_t    samples;              /* sample lines parsed, any name */
    ngx_uint_t    skipped;              /* lines too long or malformed */

    /* state */
    ngx_http_infer_signals_conf_t  *conf;
    ngx_uint_t    name_index[NGX_HTTP_INFER_SIGNALS];
                                        /* the name in use, NAMES when
                                           none */
    size_t        line_len;
    unsigned      skipping:1;           /* the line kept is too long */
    u_char        line[NGX_HTTP_INFER_SIGNALS_LINE_MAX + 1];
} ngx_http_infer_signals_t;


/* the default names of the signals (vLLM, SGLang, TGI) */
void ngx_http_infer_signals_default(ngx_http_infer_signals_conf_t *conf);

void ngx_http_infer_signals_init(ngx_http_infer_signals_t *s,
    ngx_http_infer_signals_conf_t *conf);
void ngx_http_infer_signals_feed(ngx_http_infer_signals_t *s, u_char *p,
    size_t len);

/* end of page: parses a last line not ended with LF */
void ngx_http_infer_signals_finish(ngx_http_infer_signals_t *s);


#endif /* _NGX_HTTP_INFER_BALANCE_SIGNALS_H_INCLUDED_ */

/*
 * Copyright (C) ngx_infer authors
 *
 * A single-pass scanner for inference request bodies: validates the JSON
 * and picks out what routing needs, without building a tree.  Pure: it
 * takes a buffer and a length, allocates nothing, and calls no nginx
 * function, so a fuzzer can drive it alone.
 */


#ifndef _NGX_HTTP_INFER_ROUTE_JSON_H_INCLUDED_
#define _NGX_HTTP_INFER_ROUTE_JSON_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


#define NGX_HTTP_INFER_MODEL_MAX  256


typedef struct {
    /* in: how many bytes of prompt text the prefix hash covers */
    size_t        prefix_max;

    /* the top-level "model" string, escapes decoded */
    u_char        model[NGX_HTTP_INFER_MODEL_MAX];
    size_t        model_len;
    unsigned      has_model:1;

    /* -1 when absent or null */
    ngx_int_t     stream;               /* "stream": 0 or 1 */
    ngx_int_t     include_usage;        /* "stream_options.include_usage" */
    ngx_int_t     max_tokens;           /* "max_completion_tokens", else
                                           "max_tokens" */

    /* prompt text: raw (still escaped) bytes of the strings in
     * messages[].content (string or parts' "text"), "prompt", "input",
     * "payload" */
    size_t        prompt_bytes;
    ngx_uint_t    messages;             /* elements of "messages" */
    uint64_t      prefix_hash;          /* FNV-1a 64 over the first
                                           prefix_max bytes of prompt text */
    size_t        prefix_len;           /* bytes the hash covers */

    /* where the top-level "model" value and "stream_options" object start
     * and end in the input (offsets; 0/0 when absent), for rewriting */
    size_t        model_start;
    size_t        model_end;
    size_t        stream_options_start;
    size_t        stream_options_end;
    unsigned      has_stream_options:1; /* the key, whatever its value */
    unsigned      stream_options_empty:1;   /* the object has no member */
    size_t        object_end;           /* offset of the closing '}' */

    /* the value of "stream_options.include_usage", whatever its type (0/0
     * when absent), for a rewrite that replaces it */
    size_t        include_usage_start;
    size_t        include_usage_end;

    /* on error: a static message and the offset where it was found */
    const char   *error;
    size_t        error_offset;
} ngx_http_infer_route_body_t;


/*
 * NGX_OK: a JSON object, fields filled in.  NGX_ERROR: not valid JSON, or
 * a field we read has the wrong type or a duplicate key (error, offset
 * set).  NGX_DECLINED: valid JSON that is not an object.
 */
ngx_int_t ngx_http_infer_route_json_scan(u_char *p, size_t len,
    ngx_http_infer_route_body_t *b);


#endif /* _NGX_HTTP_INFER_ROUTE_JSON_H_INCLUDED_ */

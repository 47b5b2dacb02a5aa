/*
 * Copyright (C) ngx_infer authors
 *
 * Token usage from inference answers, fed the body as it passes, buffer
 * by buffer, with a boundary anywhere (mid-line, mid-key, mid-number).
 * JSON answers: the top-level "usage" object.  SSE streams: the "usage"
 * object of any "data:" event (the final usage chunk), and a count of the
 * events that carry content, as an estimate when no usage comes.  Pure:
 * no nginx calls, no allocation (bounded state inside the struct).
 */


#ifndef _NGX_HTTP_INFER_ROUTE_USAGE_H_INCLUDED_
#define _NGX_HTTP_INFER_ROUTE_USAGE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


#define NGX_HTTP_INFER_USAGE_JSON  0
#define NGX_HTTP_INFER_USAGE_SSE   1

/* longest SSE line kept whole for parsing; longer lines are skipped */
#define NGX_HTTP_INFER_USAGE_LINE_MAX  8192


typedef struct {
    /* results: -1 when not reported */
    ngx_int_t     prompt_tokens;
    ngx_int_t     completion_tokens;
    ngx_int_t     total_tokens;
    ngx_int_t     cached_tokens;        /* prompt_tokens_details.
                                           cached_tokens */
    ngx_int_t     reasoning_tokens;     /* completion_tokens_details.
                                           reasoning_tokens */
    ngx_uint_t    content_events;       /* SSE events with non-empty
                                           content or text */
    unsigned      found:1;              /* a usage object was seen */
    unsigned      done:1;               /* SSE: "data: [DONE]" seen */

    /*
     * SSE only: when strip is set, an event whose only payload is usage
     * ("choices": [] or absent, with a usage object) is reported through
     * usage_event_start/usage_event_end so the caller can drop it: byte
     * offsets in the whole stream, from the start of its "data:" line to
     * the end of the blank line after it.
     */
    unsigned      strip:1;
    off_t         usage_event_start;
    off_t         usage_event_end;

    /*
     * SSE: stream offset where the event not yet complete begins (equal
     * to the bytes fed when none is pending).  A caller that strips holds
     * back the bytes from here on until the event completes, and nothing
     * else.
     */
    off_t         event_start;

    /*
     * SSE, strip only: the '"usage": null' member of the last event that
     * was dispatched without usage, with its comma, in stream offsets
     * (0/0: none), so that a caller can give the client its chunks as the
     * backend would have sent them without include_usage.  Only a member
     * on one data line is reported.
     */
    off_t         null_start;
    off_t         null_end;

    /* SSE: events dispatched so far */
    ngx_uint_t    events;

    /* private state, whatever the parser needs (bounded) */
    ngx_uint_t    mode;
    off_t         offset;               /* bytes fed so far */
    ngx_uint_t    state;                /* of the JSON machine */
    ngx_uint_t    depth;                /* containers open */
    uint64_t      stack;                /* a bit per container: array */
    uint64_t      number;               /* being read, or a \u escape */
    ngx_uint_t    ctx;                  /* the innermost container of
                                           interest */
    ngx_uint_t    role;                 /* what the next value is */
    ngx_int_t     tokens[5];            /* the usage being read */
    u_char        scratch[64];          /* a key, decoded */
    ngx_uint_t    scratch_len;
    ngx_uint_t    flags;

    /* SSE strip: where the bytes the JSON machine reads sit in the stream */
    off_t         base;                 /* stream offset of base_p[0] */
    u_char       *base_p;
    off_t         line_start;           /* of the line kept in line[] */
    off_t         member;               /* where the top-level member read
                                           began: its comma, or its key if
                                           first; -1: none */
    off_t         m_start;              /* the '"usage": null' member of */
    off_t         m_end;                /* this event, 0/0: none */
    ngx_uint_t    m_first;              /* 1: it was first, the comma
                                           after it goes too; 2: so did
                                           the comma */

    /* SSE only, and last: a JSON parser is allocated without it */
    size_t        line_len;
    u_char        line[NGX_HTTP_INFER_USAGE_LINE_MAX];
} ngx_http_infer_usage_t;


/* the bytes a parser of this mode needs: JSON answers need no line */
#define NGX_HTTP_INFER_USAGE_SIZE(mode)                                      \
    ((mode) == NGX_HTTP_INFER_USAGE_JSON                                     \
     ? offsetof(ngx_http_infer_usage_t, line)                                \
     : sizeof(ngx_http_infer_usage_t))


void ngx_http_infer_usage_init(ngx_http_infer_usage_t *u, ngx_uint_t mode,
    ngx_uint_t strip);

/* NGX_OK; NGX_ERROR only for a JSON answer that is not valid JSON */
ngx_int_t ngx_http_infer_usage_feed(ngx_http_infer_usage_t *u, u_char *p,
    size_t len);

/*
 * SSE: feeds bytes up to the end of the next event dispatched, or all of
 * them; returns how many were taken.  A caller that strips acts on each
 * event as it completes.
 */
size_t ngx_http_infer_usage_step(ngx_http_infer_usage_t *u, u_char *p,
    size_t len);

/* end of body: completes a last SSE event not followed by a blank line */
void ngx_http_infer_usage_finish(ngx_http_infer_usage_t *u);


#endif /* _NGX_HTTP_INFER_ROUTE_USAGE_H_INCLUDED_ */

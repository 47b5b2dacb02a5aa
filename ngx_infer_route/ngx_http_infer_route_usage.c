/*
 * Copyright (C) ngx_infer authors
 *
 * Token usage from inference answers (see ngx_http_infer_route_usage.h).
 *
 * One JSON machine serves both modes.  It stops and resumes at any byte,
 * all of its state in the struct, and validates strictly (RFC 8259), but
 * it only follows the path to the fields we want: it knows what the
 * innermost container on that path is (the top-level object, "usage",
 * "choices", a choice, its "delta"...), and anything opened below that is
 * of no interest until it closes.  Keys are kept, decoded, only where
 * they can matter; other strings are skipped 16 or 8 bytes at a time.
 *
 * What a value means (its "role") follows Python's dict: the last of
 * duplicate keys wins, so each value of a field resets what an earlier
 * one set.
 *
 * SSE framing follows the WHATWG "server-sent events" parser: lines end
 * with CRLF, LF or CR; a blank line ends an event; the values of its
 * "data" fields, joined with LF, are its data, which goes through the
 * JSON machine one line at a time as lines complete.  An event's results
 * count only once the event is complete and its data valid.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include "ngx_http_infer_route_usage.h"
#include "ngx_http_infer_route_lex.h"


#define NGX_USAGE_DEPTH             64      /* bits in u->stack */
#define NGX_USAGE_INT_MAX           ((uint64_t) 1 << 53)
#define NGX_USAGE_NOT_INT           ((uint64_t) -1)

/* the JSON machine's states */
#define sw_value                    0
#define sw_first_value              1       /* after '[' */
#define sw_key                      2
#define sw_first_key                3       /* after '{' */
#define sw_colon                    4
#define sw_after                    5       /* after a value */
#define sw_string                   6       /* skipped: a value, or a key
                                               of no interest */
#define sw_string_first             7       /* "content", "text": is it
                                               empty? */
#define sw_string_esc               8
#define sw_string_u0                9       /* ... sw_string_u3 */
#define sw_string_u3                12
#define sw_key_string               13      /* kept, decoded */
#define sw_key_esc                  14
#define sw_key_u0                   15      /* ... sw_key_u3 */
#define sw_key_u3                   18
#define sw_minus                    19
#define sw_zero                     20
#define sw_int                      21
#define sw_dot                      22
#define sw_frac                     23
#define sw_exp                      24
#define sw_exp_sign                 25
#define sw_exp_digits               26
#define sw_literal                  27
#define sw_error                    28

/* contexts: what the innermost container of interest is */
#define NGX_USAGE_CTX_NONE          0
#define NGX_USAGE_CTX_TOP           1       /* the top-level object */
#define NGX_USAGE_CTX_USAGE         2       /* its "usage" */
#define NGX_USAGE_CTX_PDETAILS      3       /* "prompt_tokens_details" */
#define NGX_USAGE_CTX_CDETAILS      4       /* "completion_tokens_details" */
#define NGX_USAGE_CTX_CHOICES       5       /* the top-level "choices" */
#define NGX_USAGE_CTX_CHOICE        6       /* an element of it */
#define NGX_USAGE_CTX_DELTA         7       /* a choice's "delta" */

/* roles: what a value is */
#define NGX_USAGE_NONE              0
#define NGX_USAGE_ROOT              1
#define NGX_USAGE_USAGE             2
#define NGX_USAGE_PROMPT            3       /* the five integers, in the */
#define NGX_USAGE_COMPLETION        4       /* order of u->tokens[] */
#define NGX_USAGE_TOTAL             5
#define NGX_USAGE_CACHED            6
#define NGX_USAGE_REASONING         7
#define NGX_USAGE_PDETAILS          8
#define NGX_USAGE_CDETAILS          9
#define NGX_USAGE_CHOICES           10
#define NGX_USAGE_CHOICE            11
#define NGX_USAGE_DELTA             12
#define NGX_USAGE_CONTENT           13
#define NGX_USAGE_TEXT              14

/* u->flags: the value being read */
#define NGX_USAGE_F_FOUND           0x0001  /* "usage" is an object */
#define NGX_USAGE_F_CONTENT         0x0002  /* a choice has content */
#define NGX_USAGE_F_CHOICES_OK      0x0004  /* "choices": [], null or
                                               absent */
#define NGX_USAGE_F_DELTA           0x0008  /* this choice's delta.content
                                               is a non-empty string */
#define NGX_USAGE_F_TEXT            0x0010  /* its "text" is */
#define NGX_USAGE_F_SKEY            0x0020  /* the skipped string is a key */
#define NGX_USAGE_F_MFIRST          0x0040  /* strip: the top-level member
                                               being read is the first */

#define NGX_USAGE_F_JSON            0x007f

/* u->flags: SSE framing */
#define NGX_USAGE_F_EVENT           0x0100  /* an event is pending */
#define NGX_USAGE_F_DATA            0x0200  /* it has a "data" field */
#define NGX_USAGE_F_BROKEN          0x0400  /* a "data" line too long */
#define NGX_USAGE_F_DONE            0x0800  /* its data is "[DONE]" */
#define NGX_USAGE_F_CR              0x1000  /* a line ended with the last
                                               CR fed: skip an LF */
#define NGX_USAGE_F_DISPATCH        0x2000  /* and it was the blank line
                                               ending the event */
#define NGX_USAGE_F_LONG            0x4000  /* the line is too long */
#define NGX_USAGE_F_STARTED         0x8000  /* a line was seen (a BOM can
                                               only start the first) */

#define NGX_USAGE_F_PER_EVENT                                                \
    (NGX_USAGE_F_EVENT|NGX_USAGE_F_DATA|NGX_USAGE_F_BROKEN|NGX_USAGE_F_DONE)

#define ngx_usage_ws(c)                                                      \
    ((c) == ' ' || (c) == '\n' || (c) == '\r' || (c) == '\t')

#define ngx_usage_digit(c)  ((c) >= '0' && (c) <= '9')

/* strip: the stream offset of a byte the JSON machine reads */
#define ngx_usage_at(u, p)  ((u)->base + ((p) - (u)->base_p))

/* c may begin a value: what an earlier one set is reset only then */
#define ngx_usage_value(c)                                                   \
    (ngx_usage_digit(c) || (c) == '"' || (c) == '{' || (c) == '['           \
     || (c) == '-' || (c) == 't' || (c) == 'f' || (c) == 'n')


static ngx_int_t ngx_http_infer_usage_json(ngx_http_infer_usage_t *u,
    u_char *p, u_char *last);
static ngx_int_t ngx_http_infer_usage_json_end(ngx_http_infer_usage_t *u);
static void ngx_http_infer_usage_json_init(ngx_http_infer_usage_t *u);
static ngx_inline void ngx_http_infer_usage_begin(ngx_http_infer_usage_t *u,
    ngx_uint_t role, u_char c);
static ngx_uint_t ngx_http_infer_usage_key(ngx_http_infer_usage_t *u,
    u_char *k, size_t n);
static ngx_inline void ngx_http_infer_usage_key_add(ngx_http_infer_usage_t *u,
    u_char *p, size_t n);
static void ngx_http_infer_usage_publish(ngx_http_infer_usage_t *u);
static size_t ngx_http_infer_usage_sse(ngx_http_infer_usage_t *u, u_char *p,
    u_char *last);
static void ngx_http_infer_usage_line(ngx_http_infer_usage_t *u, u_char *s,
    size_t n, off_t off, ngx_uint_t overlong, ngx_uint_t *blank);
static void ngx_http_infer_usage_dispatch(ngx_http_infer_usage_t *u,
    off_t end);
static ngx_inline void ngx_http_infer_usage_member(ngx_http_infer_usage_t *u,
    u_char *p, ngx_uint_t first);
static ngx_inline void ngx_http_infer_usage_comma(ngx_http_infer_usage_t *u,
    u_char *p);
static ngx_inline void ngx_http_infer_usage_keep(ngx_http_infer_usage_t *u,
    u_char *p, size_t n);
static ngx_inline u_char *ngx_http_infer_usage_eol(u_char *p, u_char *last);
static ngx_inline ngx_int_t ngx_http_infer_usage_hex(u_char c);


/* the depth of each context, and the context of the container around */

static u_char  ngx_http_infer_usage_ctx_depth[] = {
    0, 1, 2, 3, 3, 2, 3, 4
};

static u_char  ngx_http_infer_usage_ctx_parent[] = {
    NGX_USAGE_CTX_NONE,                 /* none */
    NGX_USAGE_CTX_NONE,                 /* top */
    NGX_USAGE_CTX_TOP,                  /* usage */
    NGX_USAGE_CTX_USAGE,                /* prompt_tokens_details */
    NGX_USAGE_CTX_USAGE,                /* completion_tokens_details */
    NGX_USAGE_CTX_TOP,                  /* choices */
    NGX_USAGE_CTX_CHOICES,              /* choices[] */
    NGX_USAGE_CTX_CHOICE                /* choices[].delta */
};

/* the context of an object that is a value of a given role */

static u_char  ngx_http_infer_usage_object_ctx[] = {
    NGX_USAGE_CTX_NONE,                 /* none */
    NGX_USAGE_CTX_TOP,                  /* root */
    NGX_USAGE_CTX_USAGE,                /* usage */
    NGX_USAGE_CTX_NONE,                 /* prompt_tokens */
    NGX_USAGE_CTX_NONE,                 /* completion_tokens */
    NGX_USAGE_CTX_NONE,                 /* total_tokens */
    NGX_USAGE_CTX_NONE,                 /* cached_tokens */
    NGX_USAGE_CTX_NONE,                 /* reasoning_tokens */
    NGX_USAGE_CTX_PDETAILS,             /* prompt_tokens_details */
    NGX_USAGE_CTX_CDETAILS,             /* completion_tokens_details */
    NGX_USAGE_CTX_NONE,                 /* choices */
    NGX_USAGE_CTX_CHOICE,               /* choices[] */
    NGX_USAGE_CTX_DELTA,                /* choices[].delta */
    NGX_USAGE_CTX_NONE,                 /* choices[].delta.content */
    NGX_USAGE_CTX_NONE                  /* choices[].text */
};

/* the rest of "true", "false" and "null", from their first letter */

static u_char  ngx_http_infer_usage_literals[] = "rue\0alse\0ull";

#define NGX_USAGE_TRUE              0
#define NGX_USAGE_FALSE             4
#define NGX_USAGE_NULL              9


void
ngx_http_infer_usage_init(ngx_http_infer_usage_t *u, ngx_uint_t mode,
    ngx_uint_t strip)
{
    u->prompt_tokens = -1;
    u->completion_tokens = -1;
    u->total_tokens = -1;
    u->cached_tokens = -1;
    u->reasoning_tokens = -1;
    u->content_events = 0;
    u->found = 0;
    u->done = 0;
    u->strip = strip ? 1 : 0;
    u->usage_event_start = 0;
    u->usage_event_end = 0;
    u->event_start = 0;
    u->null_start = 0;
    u->null_end = 0;
    u->events = 0;

    u->base = 0;
    u->base_p = NULL;
    u->line_start = 0;
    u->member = -1;
    u->m_start = 0;
    u->m_end = 0;
    u->m_first = 0;

    u->mode = mode;
    u->offset = 0;
    u->line_len = 0;
    u->scratch_len = 0;
    u->flags = 0;

    /* the line buffer is not cleared: line_len says what is in it */

    ngx_http_infer_usage_json_init(u);
}


ngx_int_t
ngx_http_infer_usage_feed(ngx_http_infer_usage_t *u, u_char *p, size_t len)
{
    size_t  n;

    if (u->mode == NGX_HTTP_INFER_USAGE_SSE) {

        while (len) {
            n = ngx_http_infer_usage_sse(u, p, p + len);
            p += n;
            len -= n;
        }

        return NGX_OK;
    }

    if (len && u->state != sw_error) {
        (void) ngx_http_infer_usage_json(u, p, p + len);
        ngx_http_infer_usage_publish(u);
    }

    u->offset += len;
    u->event_start = u->offset;

    return (u->state == sw_error) ? NGX_ERROR : NGX_OK;
}


size_t
ngx_http_infer_usage_step(ngx_http_infer_usage_t *u, u_char *p, size_t len)
{
    if (len == 0) {
        return 0;
    }

    return ngx_http_infer_usage_sse(u, p, p + len);
}


void
ngx_http_infer_usage_finish(ngx_http_infer_usage_t *u)
{
    ngx_uint_t  blank;

    if (u->mode != NGX_HTTP_INFER_USAGE_SSE) {

        /* an answer cut short is not valid JSON: a later feed says so */

        if (u->state != sw_error) {
            (void) ngx_http_infer_usage_json_end(u);
            ngx_http_infer_usage_publish(u);
        }

        return;
    }

    if (u->flags & NGX_USAGE_F_CR) {
        u->flags &= ~NGX_USAGE_F_CR;

        if (u->flags & NGX_USAGE_F_DISPATCH) {
            u->flags &= ~NGX_USAGE_F_DISPATCH;
            ngx_http_infer_usage_dispatch(u, u->offset);
        }
    }

    /* a last line without its end is a line all the same */

    if (u->line_len) {
        ngx_http_infer_usage_line(u, u->line, u->line_len, u->line_start,
                                  u->flags & NGX_USAGE_F_LONG, &blank);
        u->line_len = 0;
        u->flags &= ~NGX_USAGE_F_LONG;
    }

    if (u->flags & NGX_USAGE_F_EVENT) {
        ngx_http_infer_usage_dispatch(u, u->offset);
    }

    u->event_start = u->offset;
}


static void
ngx_http_infer_usage_json_init(ngx_http_infer_usage_t *u)
{
    u->state = sw_value;
    u->role = NGX_USAGE_ROOT;
    u->depth = 0;
    u->stack = 0;
    u->number = 0;
    u->ctx = NGX_USAGE_CTX_NONE;

    u->member = -1;
    u->m_start = 0;
    u->m_end = 0;
    u->m_first = 0;

    u->tokens[0] = -1;
    u->tokens[1] = -1;
    u->tokens[2] = -1;
    u->tokens[3] = -1;
    u->tokens[4] = -1;

    u->flags = (u->flags & ~NGX_USAGE_F_JSON) | NGX_USAGE_F_CHOICES_OK;
}


/*
 * Runs the JSON machine over p..last.  NGX_ERROR: not JSON (the state
 * stays sw_error); NGX_OK: so far so good, the value may be incomplete.
 */

static ngx_int_t
ngx_http_infer_usage_json(ngx_http_infer_usage_t *u, u_char *p, u_char *last)
{
    u_char      c, *s;
    uint64_t    bit;
    ngx_int_t   d;
    ngx_uint_t  state, role, ctx;

    state = u->state;
    role = u->role;

    while (p < last) {

        c = *p;

        switch (state) {

        case sw_first_value:

            if (c == ']') {
                goto close;
            }

            /* fall through */

        case sw_value:

            if (ngx_usage_ws(c)) {
                p++;
                continue;
            }

            if (role != NGX_USAGE_NONE && ngx_usage_value(c)) {
                ngx_http_infer_usage_begin(u, role, c);
            }

            switch (c) {

            case '{':
            case '[':

                if (u->depth == NGX_USAGE_DEPTH) {
                    goto error;
                }

                bit = (uint64_t) 1 << u->depth++;
                p++;

                if (c == '{') {
                    u->stack &= ~bit;

                    ctx = ngx_http_infer_usage_object_ctx[role];
                    if (ctx != NGX_USAGE_CTX_NONE) {
                        u->ctx = ctx;
                    }

                    state = sw_first_key;
                    continue;
                }

                u->stack |= bit;

                if (role == NGX_USAGE_CHOICES) {
                    u->ctx = NGX_USAGE_CTX_CHOICES;
                    role = NGX_USAGE_CHOICE;

                } else {
                    role = NGX_USAGE_NONE;
                }

                state = sw_first_value;
                continue;

            case '"':
                p++;
                state = (role == NGX_USAGE_CONTENT || role == NGX_USAGE_TEXT)
                        ? sw_string_first : sw_string;
                continue;

            case 't':
                u->number = NGX_USAGE_TRUE;
                break;

            case 'f':
                u->number = NGX_USAGE_FALSE;
                break;

            case 'n':
                u->number = NGX_USAGE_NULL;
                break;

            case '-':
                u->number = NGX_USAGE_NOT_INT;
                p++;
                state = sw_minus;
                continue;

            case '0':
                u->number = 0;
                p++;
                state = sw_zero;
                continue;

            default:

                if (c >= '1' && c <= '9') {
                    u->number = c - '0';
                    p++;
                    state = sw_int;
                    continue;
                }

                goto error;
            }

            /* a literal */

            p++;
            state = sw_literal;
            continue;

        case sw_first_key:

            if (c == '}') {
                goto close;
            }

            /* fall through */

        case sw_key:

            if (ngx_usage_ws(c)) {
                p++;
                continue;
            }

            if (c != '"') {
                goto error;
            }

            if (u->strip && u->depth == 1) {
                ngx_http_infer_usage_member(u, p, state == sw_first_key);
            }

            p++;

            if (u->depth == ngx_http_infer_usage_ctx_depth[u->ctx]) {
                u->scratch_len = 0;
                state = sw_key_string;

            } else {
                u->flags |= NGX_USAGE_F_SKEY;
                state = sw_string;
            }

            continue;

        case sw_colon:

            if (ngx_usage_ws(c)) {
                p++;
                continue;
            }

            if (c != ':') {
                goto error;
            }

            p++;
            state = sw_value;
            continue;

        case sw_after:

            if (ngx_usage_ws(c)) {
                p++;
                continue;
            }

            if (u->depth == 0) {
                goto error;
            }

            if (c == ',') {

                if (u->strip && u->depth == 1) {
                    ngx_http_infer_usage_comma(u, p);
                }

                p++;

                if (u->stack & ((uint64_t) 1 << (u->depth - 1))) {
                    role = (u->ctx == NGX_USAGE_CTX_CHOICES
                            && u->depth == 2)
                           ? NGX_USAGE_CHOICE : NGX_USAGE_NONE;
                    state = sw_value;

                } else {
                    state = sw_key;
                }

                continue;
            }

            if (c == '}' || c == ']') {
                goto close;
            }

            goto error;

        case sw_string_first:

            if (c == '"') {
                p++;
                state = sw_after;
                continue;
            }

            u->flags |= (role == NGX_USAGE_CONTENT) ? NGX_USAGE_F_DELTA
                                                    : NGX_USAGE_F_TEXT;
            state = sw_string;

            /* fall through */

        case sw_string:

            s = ngx_http_infer_route_special(p, last);

            if (s == last) {
                p = last;
                continue;
            }

            p = s + 1;

            if (*s == '"') {

                if (u->flags & NGX_USAGE_F_SKEY) {
                    u->flags &= ~NGX_USAGE_F_SKEY;
                    role = NGX_USAGE_NONE;
                    state = sw_colon;

                } else {
                    state = sw_after;
                }

                continue;
            }

            if (*s == '\\') {
                state = sw_string_esc;
                continue;
            }

            goto error;

        case sw_string_esc:

            switch (c) {
            case '"': case '\\': case '/':
            case 'b': case 'f': case 'n': case 'r': case 't':
                state = sw_string;
                break;
            case 'u':
                state = sw_string_u0;
                break;
            default:
                goto error;
            }

            p++;
            continue;

        case sw_string_u0:
        case sw_string_u0 + 1:
        case sw_string_u0 + 2:
        case sw_string_u3:

            if (ngx_http_infer_usage_hex(c) == -1) {
                goto error;
            }

            p++;
            state = (state == sw_string_u3) ? sw_string : state + 1;
            continue;

        case sw_key_string:

            s = ngx_http_infer_route_special(p, last);

            if (s != last && *s == '"' && u->scratch_len == 0) {
                /* whole in the buffer, without escapes: not copied */
                role = ngx_http_infer_usage_key(u, p, s - p);
                p = s + 1;
                state = sw_colon;
                continue;
            }

            ngx_http_infer_usage_key_add(u, p, s - p);

            if (s == last) {
                p = last;
                continue;
            }

            p = s + 1;

            if (*s == '"') {
                role = ngx_http_infer_usage_key(u, u->scratch,
                                                u->scratch_len);
                state = sw_colon;
                continue;
            }

            if (*s == '\\') {
                state = sw_key_esc;
                continue;
            }

            goto error;

        case sw_key_esc:

            switch (c) {
            case '"': case '\\': case '/':
                break;
            case 'b':
                c = '\b';
                break;
            case 'f':
                c = '\f';
                break;
            case 'n':
                c = '\n';
                break;
            case 'r':
                c = '\r';
                break;
            case 't':
                c = '\t';
                break;
            case 'u':
                u->number = 0;
                p++;
                state = sw_key_u0;
                continue;
            default:
                goto error;
            }

            ngx_http_infer_usage_key_add(u, &c, 1);

            p++;
            state = sw_key_string;
            continue;

        case sw_key_u0:
        case sw_key_u0 + 1:
        case sw_key_u0 + 2:
        case sw_key_u3:

            d = ngx_http_infer_usage_hex(c);
            if (d == -1) {
                goto error;
            }

            u->number = u->number * 16 + d;
            p++;

            if (state != sw_key_u3) {
                state++;
                continue;
            }

            state = sw_key_string;

            if (u->number < 0x80) {
                c = (u_char) u->number;
                ngx_http_infer_usage_key_add(u, &c, 1);

            } else {
                /* our keys are ASCII */
                u->scratch_len = sizeof(u->scratch) + 1;
            }

            continue;

        case sw_minus:

            if (c == '0') {
                p++;
                state = sw_zero;
                continue;
            }

            if (c >= '1' && c <= '9') {
                p++;
                state = sw_int;
                continue;
            }

            goto error;

        case sw_int:

            if (ngx_usage_digit(c)) {

                do {
                    /* past the limit, it only has to stay past it */
                    if (u->number <= NGX_USAGE_INT_MAX) {
                        u->number = u->number * 10 + (c - '0');
                    }

                    if (++p == last) {
                        break;
                    }

                    c = *p;

                } while (ngx_usage_digit(c));

                continue;
            }

            /* fall through */

        case sw_zero:

            if (c == '.') {
                u->number = NGX_USAGE_NOT_INT;
                p++;
                state = sw_dot;
                continue;
            }

            if (c == 'e' || c == 'E') {
                u->number = NGX_USAGE_NOT_INT;
                p++;
                state = sw_exp;
                continue;
            }

            if (ngx_usage_digit(c)) {
                /* a leading zero */
                goto error;
            }

            goto number;

        case sw_dot:

            if (!ngx_usage_digit(c)) {
                goto error;
            }

            p++;
            state = sw_frac;
            continue;

        case sw_frac:

            while (ngx_usage_digit(c)) {
                if (++p == last) {
                    break;
                }

                c = *p;
            }

            if (p == last) {
                continue;
            }

            if (c == 'e' || c == 'E') {
                p++;
                state = sw_exp;
                continue;
            }

            goto number;

        case sw_exp:

            if (c == '+' || c == '-') {
                p++;
                state = sw_exp_sign;
                continue;
            }

            /* fall through */

        case sw_exp_sign:

            if (!ngx_usage_digit(c)) {
                goto error;
            }

            p++;
            state = sw_exp_digits;
            continue;

        case sw_exp_digits:

            while (ngx_usage_digit(c)) {
                if (++p == last) {
                    break;
                }

                c = *p;
            }

            if (p == last) {
                continue;
            }

            goto number;

        case sw_literal:

            if (c != ngx_http_infer_usage_literals[u->number]) {
                goto error;
            }

            p++;

            if (ngx_http_infer_usage_literals[++u->number] == '\0') {
                state = sw_after;

                if (u->strip && role == NGX_USAGE_USAGE
                    && u->number == NGX_USAGE_NULL + 3 && u->member != -1)
                {
                    /* "usage": null, which the backend sends only when
                     * asked for usage */
                    u->m_start = u->member;
                    u->m_end = ngx_usage_at(u, p);
                    u->m_first = (u->flags & NGX_USAGE_F_MFIRST) ? 1 : 0;
                }
            }

            continue;

        default: /* sw_error */
            goto error;
        }

    number:

        /* the number ended at c, which is looked at again after it */

        if (role >= NGX_USAGE_PROMPT && role <= NGX_USAGE_REASONING
            && u->number <= NGX_USAGE_INT_MAX
            && u->number <= (uint64_t) NGX_MAX_INT_T_VALUE)
        {
            u->tokens[role - NGX_USAGE_PROMPT] = (ngx_int_t) u->number;
        }

        state = sw_after;
        continue;

    close:

        if (((u->stack >> (u->depth - 1)) & 1) != (c == ']')) {
            goto error;
        }

        if (u->depth == ngx_http_infer_usage_ctx_depth[u->ctx]) {

            if (u->ctx == NGX_USAGE_CTX_CHOICE
                && (u->flags & (NGX_USAGE_F_DELTA|NGX_USAGE_F_TEXT)))
            {
                u->flags |= NGX_USAGE_F_CONTENT;
            }

            u->ctx = ngx_http_infer_usage_ctx_parent[u->ctx];
        }

        u->depth--;
        p++;
        state = sw_after;
    }

    u->state = state;
    u->role = role;

    return NGX_OK;

error:

    u->state = sw_error;

    return NGX_ERROR;
}


/* the end of the value: NGX_OK if it is one whole JSON value */

static ngx_int_t
ngx_http_infer_usage_json_end(ngx_http_infer_usage_t *u)
{
    switch (u->state) {

    case sw_zero:
    case sw_int:
    case sw_frac:
    case sw_exp_digits:

        /* a number at the top level: no field of ours */

        u->state = sw_after;
        break;

    default:
        break;
    }

    if (u->state == sw_after && u->depth == 0) {
        return NGX_OK;
    }

    u->state = sw_error;

    return NGX_ERROR;
}


/*
 * A value of a given role begins with c: whatever an earlier value of the
 * same key set is reset, as the last of duplicate keys wins.
 */

static ngx_inline void
ngx_http_infer_usage_begin(ngx_http_infer_usage_t *u, ngx_uint_t role,
    u_char c)
{
    switch (role) {

    case NGX_USAGE_USAGE:
        u->tokens[0] = -1;
        u->tokens[1] = -1;
        u->tokens[2] = -1;
        u->tokens[3] = -1;
        u->tokens[4] = -1;

        if (c == '{') {
            u->flags |= NGX_USAGE_F_FOUND;

        } else {
            u->flags &= ~NGX_USAGE_F_FOUND;
        }

        break;

    case NGX_USAGE_PROMPT:
    case NGX_USAGE_COMPLETION:
    case NGX_USAGE_TOTAL:
    case NGX_USAGE_CACHED:
    case NGX_USAGE_REASONING:
        u->tokens[role - NGX_USAGE_PROMPT] = -1;
        break;

    case NGX_USAGE_PDETAILS:
        u->tokens[NGX_USAGE_CACHED - NGX_USAGE_PROMPT] = -1;
        break;

    case NGX_USAGE_CDETAILS:
        u->tokens[NGX_USAGE_REASONING - NGX_USAGE_PROMPT] = -1;
        break;

    case NGX_USAGE_CHOICES:
        u->flags &= ~(NGX_USAGE_F_CONTENT|NGX_USAGE_F_CHOICES_OK);

        /* null, or an array until its first element */
        if (c == '[' || c == 'n') {
            u->flags |= NGX_USAGE_F_CHOICES_OK;
        }

        break;

    case NGX_USAGE_CHOICE:
        u->flags &= ~(NGX_USAGE_F_CHOICES_OK|NGX_USAGE_F_DELTA
                      |NGX_USAGE_F_TEXT);
        break;

    case NGX_USAGE_DELTA:
    case NGX_USAGE_CONTENT:
        u->flags &= ~NGX_USAGE_F_DELTA;
        break;

    case NGX_USAGE_TEXT:
        u->flags &= ~NGX_USAGE_F_TEXT;
        break;

    default:
        break;
    }
}


/*
 * The role of the value of the key just read, k, n long, in the current
 * context: a key whole in the buffer is read where it is, one cut by a
 * buffer's end or with an escape is decoded in the scratch first.
 */

static ngx_uint_t
ngx_http_infer_usage_key(ngx_http_infer_usage_t *u, u_char *k, size_t n)
{
#define ngx_usage_key_is(s)                                                  \
    (n == sizeof(s) - 1 && ngx_memcmp(k, s, sizeof(s) - 1) == 0)

    switch (u->ctx) {

    case NGX_USAGE_CTX_TOP:

        if (ngx_usage_key_is("usage")) {
            return NGX_USAGE_USAGE;
        }

        if (u->mode == NGX_HTTP_INFER_USAGE_SSE
            && ngx_usage_key_is("choices"))
        {
            return NGX_USAGE_CHOICES;
        }

        break;

    case NGX_USAGE_CTX_USAGE:

        if (ngx_usage_key_is("prompt_tokens")) {
            return NGX_USAGE_PROMPT;
        }

        if (ngx_usage_key_is("completion_tokens")) {
            return NGX_USAGE_COMPLETION;
        }

        if (ngx_usage_key_is("total_tokens")) {
            return NGX_USAGE_TOTAL;
        }

        if (ngx_usage_key_is("prompt_tokens_details")) {
            return NGX_USAGE_PDETAILS;
        }

        if (ngx_usage_key_is("completion_tokens_details")) {
            return NGX_USAGE_CDETAILS;
        }

        break;

    case NGX_USAGE_CTX_PDETAILS:

        if (ngx_usage_key_is("cached_tokens")) {
            return NGX_USAGE_CACHED;
        }

        break;

    case NGX_USAGE_CTX_CDETAILS:

        if (ngx_usage_key_is("reasoning_tokens")) {
            return NGX_USAGE_REASONING;
        }

        break;

    case NGX_USAGE_CTX_CHOICE:

        if (ngx_usage_key_is("delta")) {
            return NGX_USAGE_DELTA;
        }

        if (ngx_usage_key_is("text")) {
            return NGX_USAGE_TEXT;
        }

        break;

    case NGX_USAGE_CTX_DELTA:

        if (ngx_usage_key_is("content")) {
            return NGX_USAGE_CONTENT;
        }

        break;

    default:
        break;
    }

#undef ngx_usage_key_is

    return NGX_USAGE_NONE;
}


/* a key longer than the scratch buffer is none of ours: it is marked so */

static ngx_inline void
ngx_http_infer_usage_key_add(ngx_http_infer_usage_t *u, u_char *p, size_t n)
{
    if (u->scratch_len + n <= sizeof(u->scratch)) {
        ngx_memcpy(u->scratch + u->scratch_len, p, n);
        u->scratch_len += n;

    } else {
        u->scratch_len = sizeof(u->scratch) + 1;
    }
}


static void
ngx_http_infer_usage_publish(ngx_http_infer_usage_t *u)
{
    u->found = (u->flags & NGX_USAGE_F_FOUND) ? 1 : 0;
    u->prompt_tokens = u->tokens[0];
    u->completion_tokens = u->tokens[1];
    u->total_tokens = u->tokens[2];
    u->cached_tokens = u->tokens[3];
    u->reasoning_tokens = u->tokens[4];
}


/*
 * SSE: cuts p..last into lines.  A line whole in the buffer is parsed in
 * place; one that is not is kept in u->line until it is.  A CR at the end
 * of the buffer may be the first half of a CRLF: the blank line it ends
 * completes its event only once the next byte says where the event ends.
 */

static size_t
ngx_http_infer_usage_sse(ngx_http_infer_usage_t *u, u_char *p, u_char *last)
{
    u_char      *begin, *eol, *s;
    size_t       n;
    off_t        off;
    ngx_uint_t   overlong, blank, events;

    begin = p;
    events = u->events;

    if (u->flags & NGX_USAGE_F_CR) {
        u->flags &= ~NGX_USAGE_F_CR;

        if (*p == '\n') {
            p++;
        }

        if (u->flags & NGX_USAGE_F_DISPATCH) {
            u->flags &= ~NGX_USAGE_F_DISPATCH;
            ngx_http_infer_usage_dispatch(u, u->offset + (p - begin));
        }
    }

    while (p < last && u->events == events) {

        if (u->line_len == 0 && !(u->flags & NGX_USAGE_F_EVENT)
            && *p != '\r' && *p != '\n')
        {
            /* the first byte of an event */
            u->flags |= NGX_USAGE_F_EVENT;
            u->event_start = u->offset + (p - begin);
        }

        eol = ngx_http_infer_usage_eol(p, last);

        if (eol == last) {
            if (u->line_len == 0) {
                u->line_start = u->offset + (p - begin);
            }

            ngx_http_infer_usage_keep(u, p, last - p);
            p = last;
            break;
        }

        if (u->line_len == 0) {
            s = p;
            n = eol - p;
            off = u->offset + (p - begin);
            overlong = (n > NGX_HTTP_INFER_USAGE_LINE_MAX);

        } else {
            ngx_http_infer_usage_keep(u, p, eol - p);

            s = u->line;
            n = u->line_len;
            off = u->line_start;
            overlong = u->flags & NGX_USAGE_F_LONG;

            u->line_len = 0;
            u->flags &= ~NGX_USAGE_F_LONG;
        }

        ngx_http_infer_usage_line(u, s, n, off, overlong, &blank);

        p = eol + 1;

        if (*eol == '\r') {

            if (p == last) {
                u->flags |= NGX_USAGE_F_CR;

                if (blank && (u->flags & NGX_USAGE_F_EVENT)) {
                    u->flags |= NGX_USAGE_F_DISPATCH;
                }

                break;
            }

            if (*p == '\n') {
                p++;
            }
        }

        if (blank && (u->flags & NGX_USAGE_F_EVENT)) {
            ngx_http_infer_usage_dispatch(u, u->offset + (p - begin));
        }
    }

    n = p - begin;
    u->offset += n;

    if (!(u->flags & NGX_USAGE_F_EVENT)) {
        u->event_start = u->offset;
    }

    return n;
}


/* a line, without its end; *blank: it ends an event */

static void
ngx_http_infer_usage_line(ngx_http_infer_usage_t *u, u_char *s, size_t n,
    off_t off, ngx_uint_t overlong, ngx_uint_t *blank)
{
    u_char  *line;

    *blank = 0;
    line = s;

    if (!(u->flags & NGX_USAGE_F_STARTED)) {
        u->flags |= NGX_USAGE_F_STARTED;

        if (n >= 3 && s[0] == 0xef && s[1] == 0xbb && s[2] == 0xbf) {
            s += 3;
            n -= 3;
        }
    }

    if (n == 0) {
        *blank = 1;
        return;
    }

    /* only "data" matters: not "event", "id", "retry", nor a comment */

    if (n < 4 || ngx_memcmp(s, "data", 4) != 0) {
        return;
    }

    if (n > 4) {
        if (s[4] != ':') {
            return;
        }

        s += 5;
        n -= 5;

        if (n && *s == ' ') {
            s++;
            n--;
        }

    } else {
        n = 0;
    }

    if (u->flags & NGX_USAGE_F_BROKEN) {
        return;
    }

    if (overlong) {
        /* part of the data is lost: so is the event */
        u->flags |= NGX_USAGE_F_BROKEN;
        return;
    }

    if (u->flags & NGX_USAGE_F_DATA) {
        /* the data lines of an event are joined with LF */
        (void) ngx_http_infer_usage_json(u, (u_char *) "\n",
                                         (u_char *) "\n" + 1);

        /* strip: a member to drop lies on one line */

        u->member = -1;

        if (u->m_first == 1) {
            u->m_start = 0;
            u->m_end = 0;
        }

        u->m_first = 0;

    } else {
        u->flags |= NGX_USAGE_F_DATA;
        ngx_http_infer_usage_json_init(u);

        /* as the OpenAI SDKs: data that starts with it */
        if (n >= 6 && ngx_memcmp(s, "[DONE]", 6) == 0) {
            u->flags |= NGX_USAGE_F_DONE;
        }
    }

    u->base = off + (s - line);
    u->base_p = s;

    (void) ngx_http_infer_usage_json(u, s, s + n);
}


/* an event ends at "end": what it says counts if its data is valid */

static void
ngx_http_infer_usage_dispatch(ngx_http_infer_usage_t *u, off_t end)
{
    u->events++;
    u->null_start = 0;
    u->null_end = 0;

    if ((u->flags & (NGX_USAGE_F_DATA|NGX_USAGE_F_BROKEN))
        == NGX_USAGE_F_DATA)
    {
        if (u->flags & NGX_USAGE_F_DONE) {
            u->done = 1;

        } else if (ngx_http_infer_usage_json_end(u) == NGX_OK) {

            if (u->flags & NGX_USAGE_F_FOUND) {
                ngx_http_infer_usage_publish(u);

                if (u->strip && (u->flags & NGX_USAGE_F_CHOICES_OK)) {
                    u->usage_event_start = u->event_start;
                    u->usage_event_end = end;
                }

            } else if (u->strip && u->m_end) {
                u->null_start = u->m_start;
                u->null_end = u->m_end;
            }

            if (u->flags & NGX_USAGE_F_CONTENT) {
                u->content_events++;
            }
        }
    }

    u->flags &= ~NGX_USAGE_F_PER_EVENT;
    u->event_start = end;
}


/*
 * Strip: a top-level key begins at p; first: it is the first member.
 * After a first "usage": null, its comma and the blank after it go too.
 */

static ngx_inline void
ngx_http_infer_usage_member(ngx_http_infer_usage_t *u, u_char *p,
    ngx_uint_t first)
{
    if (u->m_first == 2) {
        u->m_end = ngx_usage_at(u, p);
        u->m_first = 0;
    }

    if (first) {
        u->member = ngx_usage_at(u, p);
        u->flags |= NGX_USAGE_F_MFIRST;
    }
}


/* strip: a comma between top-level members at p begins the next one */

static ngx_inline void
ngx_http_infer_usage_comma(ngx_http_infer_usage_t *u, u_char *p)
{
    if (u->m_first == 1) {
        u->m_end = ngx_usage_at(u, p) + 1;
        u->m_first = 2;
    }

    u->member = ngx_usage_at(u, p);
    u->flags &= ~NGX_USAGE_F_MFIRST;
}


/* part of a line not yet whole: its first LINE_MAX bytes are kept */

static ngx_inline void
ngx_http_infer_usage_keep(ngx_http_infer_usage_t *u, u_char *p, size_t n)
{
    size_t  room;

    room = NGX_HTTP_INFER_USAGE_LINE_MAX - u->line_len;

    if (n > room) {
        n = room;
        u->flags |= NGX_USAGE_F_LONG;
    }

    ngx_memcpy(u->line + u->line_len, p, n);
    u->line_len += n;
}


/* the first CR or LF, or last */

static ngx_inline u_char *
ngx_http_infer_usage_eol(u_char *p, u_char *last)
{
    uint64_t   v, r, l;
#if (NGX_HTTP_INFER_LEX_SSE2)
    int        m;
    __m128i    x, cr, lf;

    cr = _mm_set1_epi8('\r');
    lf = _mm_set1_epi8('\n');

    while (last - p >= 16) {
        x = _mm_loadu_si128((const __m128i *) p);

        m = _mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(x, cr),
                                           _mm_cmpeq_epi8(x, lf)));
        if (m) {
            return p + __builtin_ctz(m);
        }

        p += 16;
    }
#endif

    while (last - p >= 8) {
        ngx_memcpy(&v, p, 8);

        r = v ^ (NGX_HTTP_INFER_LEX_ONES * '\r');
        l = v ^ (NGX_HTTP_INFER_LEX_ONES * '\n');

        v = ngx_http_infer_lex_zero(r) | ngx_http_infer_lex_zero(l);

        if (v) {
#if (NGX_HTTP_INFER_LEX_CTZ)
            return p + (__builtin_ctzll(v) >> 3);
#else
            break;
#endif
        }

        p += 8;
    }

    while (p < last && *p != '\r' && *p != '\n') {
        p++;
    }

    return p;
}


static ngx_inline ngx_int_t
ngx_http_infer_usage_hex(u_char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }

    c |= 0x20;

    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }

    return -1;
}

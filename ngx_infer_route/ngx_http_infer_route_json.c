/*
 * Copyright (C) ngx_infer authors
 *
 * The request body scanner (see ngx_http_infer_route_json.h): strict JSON
 * (RFC 8259) validation and field extraction in one pass, no recursion.
 *
 * Open containers are kept on a small stack, one byte each: the kind of
 * container in the top bit and its "context" (what its members mean to
 * routing) in the rest.  Before each value, "role" says what that value
 * means: the top-level "model", a message's "content", a string of a
 * prompt, or nothing at all.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include "ngx_http_infer_route_json.h"
#include "ngx_http_infer_route_lex.h"


#define NGX_JSON_DEPTH              64
#define NGX_JSON_KEY_MAX            24

#define NGX_JSON_FNV_BASIS          14695981039346656037ULL
#define NGX_JSON_FNV_PRIME          1099511628211ULL

#define NGX_JSON_INT_MAX            0x80000000ULL

/* a stack frame: an array, else an object; the context in the low bits */
#define NGX_JSON_ARRAY              0x80

/* contexts */
#define NGX_JSON_CTX_NONE           0
#define NGX_JSON_CTX_TOP            1   /* the top-level object */
#define NGX_JSON_CTX_MESSAGES       2   /* the top-level "messages" array */
#define NGX_JSON_CTX_MESSAGE        3   /* an element of it */
#define NGX_JSON_CTX_PARTS          4   /* a message's "content" array */
#define NGX_JSON_CTX_PART           5   /* an element of it */
#define NGX_JSON_CTX_ALL            6   /* "prompt" & co: every string */
#define NGX_JSON_CTX_OPTIONS        7   /* the top-level "stream_options" */

/* roles */
#define NGX_JSON_NONE               0
#define NGX_JSON_ROOT               1
#define NGX_JSON_MODEL              2
#define NGX_JSON_STREAM             3
#define NGX_JSON_MAX_TOKENS         4
#define NGX_JSON_MAX_COMPLETION     5
#define NGX_JSON_OPTIONS            6
#define NGX_JSON_INCLUDE_USAGE      7
#define NGX_JSON_MESSAGES           8
#define NGX_JSON_MESSAGE            9
#define NGX_JSON_CONTENT            10
#define NGX_JSON_PART               11
#define NGX_JSON_TEXT               12
#define NGX_JSON_ALL                13

static ngx_inline const char *ngx_http_infer_route_json_string(u_char **pos,
    u_char *end, ngx_uint_t *escaped);
static ngx_int_t ngx_http_infer_route_json_number(u_char **pos, u_char *end,
    ngx_int_t *num);
static ngx_int_t ngx_http_infer_route_json_decode(u_char *src, u_char *last,
    u_char *dst, size_t max, size_t *len);
static ngx_inline ngx_int_t ngx_http_infer_route_json_hex(u_char *p);
static ngx_uint_t ngx_http_infer_route_json_key(ngx_uint_t ctx,
    u_char *start, u_char *last, ngx_uint_t escaped);
static ngx_inline void ngx_http_infer_route_json_text(
    ngx_http_infer_route_body_t *b, u_char *s, size_t n, ngx_uint_t *more);
static ngx_int_t ngx_http_infer_route_json_error(
    ngx_http_infer_route_body_t *b, const char *error, size_t offset);




/* the context of an object or an array that is a value of a given role */

static u_char  ngx_http_infer_route_json_object_ctx[] = {
    NGX_JSON_CTX_NONE,                  /* none */
    NGX_JSON_CTX_TOP,                   /* root */
    NGX_JSON_CTX_NONE,                  /* model */
    NGX_JSON_CTX_NONE,                  /* stream */
    NGX_JSON_CTX_NONE,                  /* max_tokens */
    NGX_JSON_CTX_NONE,                  /* max_completion_tokens */
    NGX_JSON_CTX_OPTIONS,               /* stream_options */
    NGX_JSON_CTX_NONE,                  /* include_usage */
    NGX_JSON_CTX_NONE,                  /* messages */
    NGX_JSON_CTX_MESSAGE,               /* messages[] */
    NGX_JSON_CTX_NONE,                  /* messages[].content */
    NGX_JSON_CTX_PART,                  /* messages[].content[] */
    NGX_JSON_CTX_NONE,                  /* messages[].content[].text */
    NGX_JSON_CTX_ALL                    /* prompt, input, payload */
};

static u_char  ngx_http_infer_route_json_array_ctx[] = {
    NGX_JSON_CTX_NONE,                  /* none */
    NGX_JSON_CTX_NONE,                  /* root */
    NGX_JSON_CTX_NONE,                  /* model */
    NGX_JSON_CTX_NONE,                  /* stream */
    NGX_JSON_CTX_NONE,                  /* max_tokens */
    NGX_JSON_CTX_NONE,                  /* max_completion_tokens */
    NGX_JSON_CTX_NONE,                  /* stream_options */
    NGX_JSON_CTX_NONE,                  /* include_usage */
    NGX_JSON_CTX_MESSAGES,              /* messages */
    NGX_JSON_CTX_NONE,                  /* messages[] */
    NGX_JSON_CTX_PARTS,                 /* messages[].content */
    NGX_JSON_CTX_NONE,                  /* messages[].content[] */
    NGX_JSON_CTX_NONE,                  /* messages[].content[].text */
    NGX_JSON_CTX_ALL                    /* prompt, input, payload */
};

/* the role of an element of an array of a given context */

static u_char  ngx_http_infer_route_json_element[] = {
    NGX_JSON_NONE,                      /* none */
    NGX_JSON_NONE,                      /* top */
    NGX_JSON_MESSAGE,                   /* messages */
    NGX_JSON_NONE,                      /* message */
    NGX_JSON_PART,                      /* parts */
    NGX_JSON_NONE,                      /* part */
    NGX_JSON_ALL,                       /* all */
    NGX_JSON_NONE                       /* stream_options */
};

/* roles whose value has one type only: the error for another one */

static const char  *ngx_http_infer_route_json_type[] = {
    NULL,
    NULL,
    "model must be a string",
    "stream must be a boolean",
    "max_tokens must be a non-negative integer",
    "max_completion_tokens must be a non-negative integer",
    NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
};

/* top-level keys that may appear once */

static const char  *ngx_http_infer_route_json_duplicate[] = {
    NULL,
    NULL,
    "duplicate \"model\" key",
    "duplicate \"stream\" key",
    "duplicate \"max_tokens\" key",
    "duplicate \"max_completion_tokens\" key",
    "duplicate \"stream_options\" key",
    NULL, NULL, NULL, NULL, NULL, NULL, NULL
};


ngx_int_t
ngx_http_infer_route_json_scan(u_char *p, size_t len,
    ngx_http_infer_route_body_t *b)
{
    u_char       *pos, *end, *start, *lit, frame;
    u_char        stack[NGX_JSON_DEPTH];
    size_t        n;
    ngx_int_t     rc, num, value, max_tokens, max_completion;
    ngx_uint_t    role, ctx, depth, seen, escaped, object, more, usage;
    const char   *err;
    enum {
        sw_value = 0,
        sw_first_value,
        sw_key,
        sw_first_key,
        sw_colon,
        sw_after_value
    } state;

    b->model_len = 0;
    b->has_model = 0;
    b->stream = -1;
    b->include_usage = -1;
    b->max_tokens = -1;
    b->prompt_bytes = 0;
    b->messages = 0;
    b->prefix_hash = NGX_JSON_FNV_BASIS;
    b->prefix_len = 0;
    b->model_start = 0;
    b->model_end = 0;
    b->stream_options_start = 0;
    b->stream_options_end = 0;
    b->has_stream_options = 0;
    b->stream_options_empty = 0;
    b->object_end = 0;
    b->include_usage_start = 0;
    b->include_usage_end = 0;
    b->error = NULL;
    b->error_offset = 0;

    if (len == 0) {
        return ngx_http_infer_route_json_error(b,
                                         "unexpected end of JSON input", 0);
    }

    pos = p;
    end = p + len;

    state = sw_value;
    role = NGX_JSON_ROOT;
    depth = 0;
    seen = 0;
    object = 0;
    more = 0;
    usage = 0;
    max_tokens = -1;
    max_completion = -1;

    for ( ;; ) {

        if (usage && state == sw_after_value && depth == usage) {
            /* the end of the include_usage value */
            b->include_usage_end = pos - p;
            usage = 0;
        }

        while (pos < end
               && (*pos == ' ' || *pos == '\n' || *pos == '\r'
                   || *pos == '\t'))
        {
            pos++;
        }

        if (pos == end) {
            if (state == sw_after_value && depth == 0) {
                break;
            }

            return ngx_http_infer_route_json_error(b,
                                         "unexpected end of JSON input", len);
        }

        switch (state) {

        case sw_after_value:

            if (depth == 0) {
                return ngx_http_infer_route_json_error(b,
                                       "trailing characters after JSON value",
                                       pos - p);
            }

            frame = stack[depth - 1];

            if (*pos == ',') {
                pos++;

                if (frame & NGX_JSON_ARRAY) {
                    role = ngx_http_infer_route_json_element[frame
                                                         & ~NGX_JSON_ARRAY];
                    state = sw_value;

                } else {
                    state = sw_key;
                }

                continue;
            }

            if (*pos == ((frame & NGX_JSON_ARRAY) ? ']' : '}')) {
                goto close;
            }

            return ngx_http_infer_route_json_error(b,
                                         (frame & NGX_JSON_ARRAY)
                                         ? "expected ',' or ']'"
                                         : "expected ',' or '}'",
                                         pos - p);

        case sw_first_key:

            if (*pos == '}') {
                goto close;
            }

            /* fall through */

        case sw_key:

            if (*pos != '"') {
                return ngx_http_infer_route_json_error(b,
                                         "expected a string key", pos - p);
            }

            start = ++pos;

            err = ngx_http_infer_route_json_string(&pos, end, &escaped);
            if (err) {
                return ngx_http_infer_route_json_error(b, err, pos - p);
            }

            ctx = stack[depth - 1];

            if (ctx == NGX_JSON_CTX_OPTIONS) {
                b->stream_options_empty = 0;
            }

            role = ngx_http_infer_route_json_key(ctx, start, pos, escaped);

            if (ngx_http_infer_route_json_duplicate[role]) {
                if (seen & (1 << role)) {
                    return ngx_http_infer_route_json_error(b,
                                  ngx_http_infer_route_json_duplicate[role],
                                  start - 1 - p);
                }

                seen |= 1 << role;

                if (role == NGX_JSON_OPTIONS) {
                    b->has_stream_options = 1;
                }
            }

            pos++;
            state = sw_colon;
            continue;

        case sw_colon:

            if (*pos != ':') {
                return ngx_http_infer_route_json_error(b, "expected ':'",
                                                       pos - p);
            }

            pos++;
            state = sw_value;
            continue;

        case sw_first_value:

            if (*pos == ']') {
                goto close;
            }

            /* fall through */

        case sw_value:
            break;
        }

        /* a value, of role "role" */

        if (role == NGX_JSON_MESSAGE) {
            b->messages++;

        } else if (role == NGX_JSON_INCLUDE_USAGE) {
            b->include_usage_start = pos - p;
            usage = depth;
        }

        state = sw_after_value;

        switch (*pos) {

        case '{':
        case '[':

            if (ngx_http_infer_route_json_type[role]) {
                return ngx_http_infer_route_json_error(b,
                                  ngx_http_infer_route_json_type[role],
                                  pos - p);
            }

            if (depth == NGX_JSON_DEPTH) {
                return ngx_http_infer_route_json_error(b,
                                         "JSON nested too deeply", pos - p);
            }

            if (*pos == '[') {
                ctx = ngx_http_infer_route_json_array_ctx[role];
                stack[depth++] = (u_char) (ctx | NGX_JSON_ARRAY);
                role = ngx_http_infer_route_json_element[ctx];
                state = sw_first_value;

            } else {
                ctx = ngx_http_infer_route_json_object_ctx[role];
                stack[depth++] = (u_char) ctx;
                state = sw_first_key;

                if (role == NGX_JSON_ROOT) {
                    object = 1;

                } else if (role == NGX_JSON_OPTIONS) {
                    b->stream_options_start = pos - p;
                    b->stream_options_empty = 1;
                }
            }

            pos++;
            continue;

        case '"':

            if (role != NGX_JSON_MODEL && ngx_http_infer_route_json_type[role])
            {
                return ngx_http_infer_route_json_error(b,
                                  ngx_http_infer_route_json_type[role],
                                  pos - p);
            }

            start = ++pos;

            err = ngx_http_infer_route_json_string(&pos, end, &escaped);
            if (err) {
                return ngx_http_infer_route_json_error(b, err, pos - p);
            }

            switch (role) {

            case NGX_JSON_MODEL:

                if (!escaped) {
                    n = pos - start;

                    if (n > NGX_HTTP_INFER_MODEL_MAX) {
                        rc = NGX_DECLINED;

                    } else {
                        ngx_memcpy(b->model, start, n);
                        b->model_len = n;
                        rc = NGX_OK;
                    }

                } else {
                    rc = ngx_http_infer_route_json_decode(start, pos, b->model,
                                                      NGX_HTTP_INFER_MODEL_MAX,
                                                      &b->model_len);
                }

                if (rc == NGX_DECLINED) {
                    return ngx_http_infer_route_json_error(b,
                                         "model name too long", start - 1 - p);
                }

                if (rc == NGX_ERROR) {
                    return ngx_http_infer_route_json_error(b,
                                         "unpaired surrogate in model",
                                         start - 1 - p);
                }

                b->has_model = 1;
                b->model_start = start - 1 - p;
                b->model_end = pos + 1 - p;
                break;

            case NGX_JSON_CONTENT:
            case NGX_JSON_TEXT:
            case NGX_JSON_ALL:
                ngx_http_infer_route_json_text(b, start, pos - start, &more);
                break;

            default:
                break;
            }

            pos++;
            continue;

        case 't':
        case 'f':
        case 'n':

            if (*pos == 't') {
                lit = (u_char *) "true";
                value = 1;

            } else if (*pos == 'f') {
                lit = (u_char *) "false";
                value = 0;

            } else {
                lit = (u_char *) "null";
                value = -1;
            }

            n = (value == 0) ? 5 : 4;

            if ((size_t) (end - pos) < n || ngx_memcmp(pos, lit, n) != 0) {
                return ngx_http_infer_route_json_error(b, "invalid literal",
                                                       pos - p);
            }

            switch (role) {

            case NGX_JSON_MODEL:
                return ngx_http_infer_route_json_error(b,
                                  ngx_http_infer_route_json_type[role],
                                  pos - p);

            case NGX_JSON_STREAM:
                b->stream = value;
                break;

            case NGX_JSON_INCLUDE_USAGE:
                b->include_usage = value;
                break;

            case NGX_JSON_MAX_TOKENS:
            case NGX_JSON_MAX_COMPLETION:

                if (value != -1) {
                    return ngx_http_infer_route_json_error(b,
                                  ngx_http_infer_route_json_type[role],
                                  pos - p);
                }

                break;

            default:
                break;
            }

            pos += n;
            continue;

        case '-':
        case '0': case '1': case '2': case '3': case '4':
        case '5': case '6': case '7': case '8': case '9':

            start = pos;

            if (ngx_http_infer_route_json_number(&pos, end, &num) != NGX_OK) {
                return ngx_http_infer_route_json_error(b, "invalid number",
                                                       pos - p);
            }

            if (role == NGX_JSON_MAX_TOKENS
                || role == NGX_JSON_MAX_COMPLETION)
            {
                if (num == -1) {
                    return ngx_http_infer_route_json_error(b,
                                  ngx_http_infer_route_json_type[role],
                                  start - p);
                }

                if (role == NGX_JSON_MAX_TOKENS) {
                    max_tokens = num;

                } else {
                    max_completion = num;
                }

            } else if (ngx_http_infer_route_json_type[role]) {
                return ngx_http_infer_route_json_error(b,
                                  ngx_http_infer_route_json_type[role],
                                  start - p);
            }

            continue;

        default:
            return ngx_http_infer_route_json_error(b, "unexpected character",
                                                   pos - p);
        }

    close:

        frame = stack[--depth];

        if (frame == NGX_JSON_CTX_TOP) {
            b->object_end = pos - p;

        } else if (frame == NGX_JSON_CTX_OPTIONS) {
            b->stream_options_end = pos + 1 - p;
        }

        pos++;
        state = sw_after_value;
    }

    if (!object) {
        return NGX_DECLINED;
    }

    b->max_tokens = (max_completion != -1) ? max_completion : max_tokens;

    return NGX_OK;

}


/*
 * Scans a string from just after its opening quote; on success *pos is at
 * the closing quote.  On error, returns the message, *pos at the culprit.
 */

static ngx_inline const char *
ngx_http_infer_route_json_string(u_char **pos, u_char *end,
    ngx_uint_t *escaped)
{
    u_char  *s;

    s = *pos;
    *escaped = 0;

    for ( ;; ) {

        s = ngx_http_infer_route_special(s, end);

        if (s == end) {
            *pos = s;
            return "unterminated string";
        }

        if (*s == '"') {
            *pos = s;
            return NULL;
        }

        if (*s != '\\') {
            *pos = s;
            return "control character in string";
        }

        *escaped = 1;

        if (end - s < 2) {
            *pos = end;
            return "unterminated string";
        }

        switch (s[1]) {

        case '"': case '\\': case '/':
        case 'b': case 'f': case 'n': case 'r': case 't':
            s += 2;
            break;

        case 'u':

            if (end - s < 6) {
                *pos = end;
                return "unterminated string";
            }

            if (ngx_http_infer_route_json_hex(s + 2) == -1) {
                *pos = s;
                return "bad \\u escape";
            }

            s += 6;
            break;

        default:
            *pos = s;
            return "bad escape";
        }
    }
}


/*
 * Scans a number; *num is its value if it is an integer from 0 to 2^31 - 1
 * written without fraction or exponent, else -1.  On error, *pos is at the
 * culprit.
 */

static ngx_int_t
ngx_http_infer_route_json_number(u_char **pos, u_char *end, ngx_int_t *num)
{
    u_char      *s;
    uint64_t     n;
    ngx_uint_t   integer;

    s = *pos;
    n = 0;
    integer = 1;

    if (*s == '-') {
        integer = 0;

        if (++s == end) {
            goto invalid;
        }
    }

    if (*s == '0') {
        s++;

    } else if (*s >= '1' && *s <= '9') {

        do {
            if (n < NGX_JSON_INT_MAX) {
                n = n * 10 + (*s - '0');
            }

            s++;

        } while (s < end && *s >= '0' && *s <= '9');

    } else {
        goto invalid;
    }

    if (s < end && *s == '.') {
        integer = 0;

        if (++s == end || *s < '0' || *s > '9') {
            goto invalid;
        }

        do {
            s++;
        } while (s < end && *s >= '0' && *s <= '9');
    }

    if (s < end && (*s == 'e' || *s == 'E')) {
        integer = 0;

        if (++s < end && (*s == '+' || *s == '-')) {
            s++;
        }

        if (s == end || *s < '0' || *s > '9') {
            goto invalid;
        }

        do {
            s++;
        } while (s < end && *s >= '0' && *s <= '9');
    }

    *pos = s;
    *num = (integer && n < NGX_JSON_INT_MAX) ? (ngx_int_t) n : -1;

    return NGX_OK;

invalid:

    *pos = s;

    return NGX_ERROR;
}


/*
 * Decodes a scanned string (escapes known to be well formed) into dst, as
 * UTF-8.  NGX_DECLINED: longer than max.  NGX_ERROR: an unpaired surrogate.
 */

static ngx_int_t
ngx_http_infer_route_json_decode(u_char *src, u_char *last, u_char *dst,
    size_t max, size_t *len)
{
    u_char      c, *d, *dend;
    uint32_t    u, lo;
    ngx_uint_t  k;

    d = dst;
    dend = dst + max;

    while (src < last) {

        if (*src != '\\') {
            if (d == dend) {
                return NGX_DECLINED;
            }

            *d++ = *src++;
            continue;
        }

        c = src[1];
        src += 2;

        switch (c) {
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
            break;
        default:            /* '"', '\\', '/' */
            break;
        }

        if (c != 'u') {
            if (d == dend) {
                return NGX_DECLINED;
            }

            *d++ = c;
            continue;
        }

        u = (uint32_t) ngx_http_infer_route_json_hex(src);
        src += 4;

        if (u >= 0xdc00 && u <= 0xdfff) {
            return NGX_ERROR;
        }

        if (u >= 0xd800 && u <= 0xdbff) {

            if (last - src < 6 || src[0] != '\\' || src[1] != 'u') {
                return NGX_ERROR;
            }

            lo = (uint32_t) ngx_http_infer_route_json_hex(src + 2);

            if (lo < 0xdc00 || lo > 0xdfff) {
                return NGX_ERROR;
            }

            u = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
            src += 6;
        }

        k = (u < 0x80) ? 1 : (u < 0x800) ? 2 : (u < 0x10000) ? 3 : 4;

        if ((size_t) (dend - d) < k) {
            return NGX_DECLINED;
        }

        switch (k) {
        case 1:
            *d++ = (u_char) u;
            break;
        case 2:
            *d++ = (u_char) (0xc0 | (u >> 6));
            *d++ = (u_char) (0x80 | (u & 0x3f));
            break;
        case 3:
            *d++ = (u_char) (0xe0 | (u >> 12));
            *d++ = (u_char) (0x80 | ((u >> 6) & 0x3f));
            *d++ = (u_char) (0x80 | (u & 0x3f));
            break;
        default:
            *d++ = (u_char) (0xf0 | (u >> 18));
            *d++ = (u_char) (0x80 | ((u >> 12) & 0x3f));
            *d++ = (u_char) (0x80 | ((u >> 6) & 0x3f));
            *d++ = (u_char) (0x80 | (u & 0x3f));
            break;
        }
    }

    *len = d - dst;

    return NGX_OK;
}


/* the value of 4 hex digits, or -1 */

static ngx_inline ngx_int_t
ngx_http_infer_route_json_hex(u_char *p)
{
    u_char      c, *last;
    ngx_int_t   n;

    n = 0;

    for (last = p + 4; p < last; p++) {
        c = *p;

        if (c >= '0' && c <= '9') {
            n = n * 16 + (c - '0');
            continue;
        }

        c |= 0x20;

        if (c >= 'a' && c <= 'f') {
            n = n * 16 + (c - 'a' + 10);
            continue;
        }

        return -1;
    }

    return n;
}


/*
 * The role of the value of a key in an object of a given context.  The
 * key is compared decoded: "mod\u0065l" is "model".
 */

static ngx_uint_t
ngx_http_infer_route_json_key(ngx_uint_t ctx, u_char *start, u_char *last,
    ngx_uint_t escaped)
{
    size_t  n;
    u_char  buf[NGX_JSON_KEY_MAX];

    switch (ctx) {

    case NGX_JSON_CTX_TOP:
    case NGX_JSON_CTX_MESSAGE:
    case NGX_JSON_CTX_PART:
    case NGX_JSON_CTX_OPTIONS:
        break;

    case NGX_JSON_CTX_ALL:
        return NGX_JSON_ALL;

    default:
        return NGX_JSON_NONE;
    }

    if (escaped) {
        if (ngx_http_infer_route_json_decode(start, last, buf, sizeof(buf), &n)
            != NGX_OK)
        {
            return NGX_JSON_NONE;
        }

        start = buf;

    } else {
        n = last - start;
    }

#define ngx_json_key_is(s)                                                   \
    (n == sizeof(s) - 1 && ngx_memcmp(start, s, sizeof(s) - 1) == 0)

    switch (ctx) {

    case NGX_JSON_CTX_TOP:

        if (ngx_json_key_is("model")) {
            return NGX_JSON_MODEL;
        }

        if (ngx_json_key_is("messages")) {
            return NGX_JSON_MESSAGES;
        }

        if (ngx_json_key_is("stream")) {
            return NGX_JSON_STREAM;
        }

        if (ngx_json_key_is("max_tokens")) {
            return NGX_JSON_MAX_TOKENS;
        }

        if (ngx_json_key_is("max_completion_tokens")) {
            return NGX_JSON_MAX_COMPLETION;
        }

        if (ngx_json_key_is("stream_options")) {
            return NGX_JSON_OPTIONS;
        }

        if (ngx_json_key_is("prompt")
            || ngx_json_key_is("input")
            || ngx_json_key_is("payload"))
        {
            return NGX_JSON_ALL;
        }

        break;

    case NGX_JSON_CTX_MESSAGE:

        if (ngx_json_key_is("content")) {
            return NGX_JSON_CONTENT;
        }

        break;

    case NGX_JSON_CTX_PART:

        if (ngx_json_key_is("text")) {
            return NGX_JSON_TEXT;
        }

        break;

    default: /* NGX_JSON_CTX_OPTIONS */

        if (ngx_json_key_is("include_usage")) {
            return NGX_JSON_INCLUDE_USAGE;
        }

        break;
    }

#undef ngx_json_key_is

    return NGX_JSON_NONE;
}


/*
 * A string of prompt text: counted, and hashed while the prefix lasts,
 * a 0x00 byte between two strings.
 */

static ngx_inline void
ngx_http_infer_route_json_text(ngx_http_infer_route_body_t *b, u_char *s,
    size_t n, ngx_uint_t *more)
{
    u_char    *last;
    size_t     room;
    uint64_t   h;

    b->prompt_bytes += n;

    if (b->prefix_len >= b->prefix_max) {
        return;
    }

    h = b->prefix_hash;

    if (*more) {
        /* h ^= 0x00 */
        h *= NGX_JSON_FNV_PRIME;
        b->prefix_len++;
    }

    *more = 1;

    room = b->prefix_max - b->prefix_len;

    if (n > room) {
        n = room;
    }

    for (last = s + n; s < last; s++) {
        h ^= *s;
        h *= NGX_JSON_FNV_PRIME;
    }

    b->prefix_len += n;
    b->prefix_hash = h;
}


static ngx_int_t
ngx_http_infer_route_json_error(ngx_http_infer_route_body_t *b,
    const char *error, size_t offset)
{
    b->error = error;
    b->error_offset = offset;

    return NGX_ERROR;
}

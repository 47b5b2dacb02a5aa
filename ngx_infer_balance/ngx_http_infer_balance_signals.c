/*
 * Copyright (C) ngx_infer authors
 *
 * Backend signals from a metric page (see ngx_http_infer_balance_signals.h).
 *
 * A page is cut into lines at LF.  A line whole in the buffer is parsed
 * in place; one that is not is kept in s->line until it is, and one
 * longer than LINE_MAX is skipped.  Every line is checked whole, as the
 * Prometheus text format says, before its sample counts: a line cut
 * short or mangled on the way is skipped, and says nothing.
 *
 * Values are read without floating point: up to 19 significant digits
 * and a decimal exponent, scaled to thousandths with one division or
 * multiplication, so that "0.953", "9.53e-1" and "953e-3" are all 953.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include "ngx_http_infer_balance_signals.h"


#define NGX_SIGNALS_DIGITS          19      /* significant digits kept:
                                               less than 2^64 */
#define NGX_SIGNALS_EXP_MAX         100000  /* an exponent stops growing
                                               past it */
#define NGX_SIGNALS_MAX_LORA        NGX_MAX_INT32_VALUE

#define ngx_signals_blank(c)  ((c) == ' ' || (c) == '\t')

#define ngx_signals_digit(c)  ((c) >= '0' && (c) <= '9')

#define ngx_signals_alpha(c)                                                 \
    (((c) >= 'a' && (c) <= 'z') || ((c) >= 'A' && (c) <= 'Z') || (c) == '_')

/* metric names may have colons, label names may not */
#define ngx_signals_label_char(c)                                            \
    (ngx_signals_alpha(c) || ngx_signals_digit(c))

#define ngx_signals_name_char(c)                                             \
    (ngx_signals_label_char(c) || (c) == ':')


static void ngx_http_infer_signals_keep(ngx_http_infer_signals_t *s,
    u_char *p, size_t n);
static void ngx_http_infer_signals_end(ngx_http_infer_signals_t *s,
    u_char *p, size_t n, ngx_uint_t overlong);
static void ngx_http_infer_signals_line(ngx_http_infer_signals_t *s,
    u_char *p, size_t n);
static u_char *ngx_http_infer_signals_labels(u_char *p, u_char *last);
static ngx_int_t ngx_http_infer_signals_number(u_char *p, u_char *last,
    int64_t *value);
static ngx_uint_t ngx_http_infer_signals_special(u_char *p, u_char *last);
static void ngx_http_infer_signals_sample(ngx_http_infer_signals_t *s,
    u_char *name, size_t len, int64_t value, u_char *line, size_t n,
    u_char *labels);
static void ngx_http_infer_signals_reset(ngx_http_infer_signals_t *s,
    ngx_uint_t signal);
static void ngx_http_infer_signals_lora(ngx_http_infer_signals_t *s,
    u_char *p, u_char *last);
static ngx_uint_t ngx_http_infer_signals_list(u_char *p, u_char *last,
    uint32_t *hash);
static ngx_uint_t ngx_http_infer_signals_integer(u_char *p, u_char *last);
static ngx_inline int64_t ngx_http_infer_signals_add(int64_t a, int64_t b);


/* the default names, each list ending with a null string */

static ngx_str_t  ngx_http_infer_signals_names[][4] = {

    /* queue */
    { ngx_string("vllm:num_requests_waiting"),
      ngx_string("sglang:num_queue_reqs"),
      ngx_string("tgi_queue_size"),
      ngx_null_string },

    /* running */
    { ngx_string("vllm:num_requests_running"),
      ngx_string("sglang:num_running_reqs"),
      ngx_string("tgi_batch_current_size"),
      ngx_null_string },

    /* kv */
    { ngx_string("vllm:kv_cache_usage_perc"),
      ngx_string("vllm:gpu_cache_usage_perc"),
      ngx_string("sglang:token_usage"),
      ngx_null_string },

    /* lora */
    { ngx_string("vllm:lora_requests_info"),
      ngx_null_string }
};


static uint64_t  ngx_http_infer_signals_pow10[] = {
    1ULL,
    10ULL,
    100ULL,
    1000ULL,
    10000ULL,
    100000ULL,
    1000000ULL,
    10000000ULL,
    100000000ULL,
    1000000000ULL,
    10000000000ULL,
    100000000000ULL,
    1000000000000ULL,
    10000000000000ULL,
    100000000000000ULL,
    1000000000000000ULL,
    10000000000000000ULL,
    100000000000000000ULL,
    1000000000000000000ULL,
    10000000000000000000ULL
};


void
ngx_http_infer_signals_default(ngx_http_infer_signals_conf_t *conf)
{
    ngx_uint_t  i, j;

    for (i = 0; i < NGX_HTTP_INFER_SIGNALS; i++) {

        for (j = 0; ngx_http_infer_signals_names[i][j].len; j++) {
            conf->names[i][j] = ngx_http_infer_signals_names[i][j];
        }

        conf->nnames[i] = j;
    }
}


void
ngx_http_infer_signals_init(ngx_http_infer_signals_t *s,
    ngx_http_infer_signals_conf_t *conf)
{
    ngx_uint_t  i;

    s->value[0] = 0;
    s->value[1] = 0;
    s->value[2] = 0;
    s->found = 0;

    s->lora_stamp = 0;
    s->max_lora = 0;
    s->nrunning = 0;
    s->nwaiting = 0;
    ngx_memzero(s->running, sizeof(s->running));
    ngx_memzero(s->waiting, sizeof(s->waiting));

    s->samples = 0;
    s->skipped = 0;

    s->conf = conf;

    for (i = 0; i < NGX_HTTP_INFER_SIGNALS; i++) {
        s->name_index[i] = NGX_HTTP_INFER_SIGNALS_NAMES;
    }

    /* the line buffer is not cleared: line_len says what is in it */

    s->line_len = 0;
    s->skipping = 0;
}


void
ngx_http_infer_signals_feed(ngx_http_infer_signals_t *s, u_char *p,
    size_t len)
{
    u_char  *last, *eol;

    /* an empty buffer may have no address */

    if (len == 0) {
        return;
    }

    last = p + len;

    while (p < last) {

        eol = memchr(p, '\n', last - p);

        if (eol == NULL) {
            ngx_http_infer_signals_keep(s, p, last - p);
            return;
        }

        if (s->line_len == 0) {
            ngx_http_infer_signals_end(s, p, eol - p, 0);

        } else {
            ngx_http_infer_signals_keep(s, p, eol - p);
            ngx_http_infer_signals_end(s, s->line, s->line_len, s->skipping);

            s->line_len = 0;
            s->skipping = 0;
        }

        p = eol + 1;
    }
}


void
ngx_http_infer_signals_finish(ngx_http_infer_signals_t *s)
{
    if (s->line_len) {
        ngx_http_infer_signals_end(s, s->line, s->line_len, s->skipping);

        s->line_len = 0;
        s->skipping = 0;
    }
}


/*
 * Part of a line not yet whole: its first LINE_MAX bytes are kept, and
 * one more, which may be the CR of a CRLF.
 */

static void
ngx_http_infer_signals_keep(ngx_http_infer_signals_t *s, u_char *p,
    size_t n)
{
    size_t  room;

    room = sizeof(s->line) - s->line_len;

    if (n > room) {
        n = room;
        s->skipping = 1;
    }

    ngx_memcpy(s->line + s->line_len, p, n);
    s->line_len += n;
}


/* a line without its LF; overlong: more of it was lost than p..p+n */

static void
ngx_http_infer_signals_end(ngx_http_infer_signals_t *s, u_char *p, size_t n,
    ngx_uint_t overlong)
{
    size_t  i;

    if (!overlong && n && p[n - 1] == '\r') {
        n--;
    }

    if (!overlong && n <= NGX_HTTP_INFER_SIGNALS_LINE_MAX) {
        ngx_http_infer_signals_line(s, p, n);
        return;
    }

    /*
     * Too long: at least LINE_MAX bytes are here.  A long comment (a HELP
     * text) is no loss, and not counted.
     */

    for (i = 0; i < NGX_HTTP_INFER_SIGNALS_LINE_MAX; i++) {
        if (!ngx_signals_blank(p[i])) {
            break;
        }
    }

    if (i < NGX_HTTP_INFER_SIGNALS_LINE_MAX && p[i] == '#') {
        return;
    }

    s->skipped++;
}


/*
 * A line: blank, a comment, or a sample
 *
 *     name [ "{" labels "}" ] value [ timestamp ] [ "#" exemplar ]
 *
 * with spaces or tabs around the tokens.
 */

static void
ngx_http_infer_signals_line(ngx_http_infer_signals_t *s, u_char *p, size_t n)
{
    u_char     *line, *last, *name, *end, *labels, *value;
    size_t      len;
    int64_t     v, t;
    ngx_int_t   rc;

    line = p;
    last = p + n;

    while (p < last && ngx_signals_blank(*p)) {
        p++;
    }

    if (p == last || *p == '#') {
        return;
    }

    if (!ngx_signals_alpha(*p) && *p != ':') {
        goto malformed;
    }

    name = p;

    while (p < last && ngx_signals_name_char(*p)) {
        p++;
    }

    len = p - name;
    end = p;

    while (p < last && ngx_signals_blank(*p)) {
        p++;
    }

    labels = NULL;

    if (p < last && *p == '{') {
        labels = p;

        p = ngx_http_infer_signals_labels(p + 1, last);
        if (p == NULL) {
            goto malformed;
        }

        while (p < last && ngx_signals_blank(*p)) {
            p++;
        }

    } else if (p == end) {
        /* the name runs into something else */
        goto malformed;
    }

    value = p;

    while (p < last && !ngx_signals_blank(*p)) {
        p++;
    }

    rc = ngx_http_infer_signals_number(value, p, &v);
    if (rc == NGX_ERROR) {
        goto malformed;
    }

    while (p < last && ngx_signals_blank(*p)) {
        p++;
    }

    if (p < last && *p != '#') {
        end = p;

        while (p < last && !ngx_signals_blank(*p)) {
            p++;
        }

        if (ngx_http_infer_signals_number(end, p, &t) != NGX_OK) {
            goto malformed;
        }

        while (p < last && ngx_signals_blank(*p)) {
            p++;
        }

        if (p < last && *p != '#') {
            goto malformed;
        }
    }

    s->samples++;

    /* NaN and infinities say nothing of a backend's load */

    if (rc == NGX_OK) {
        ngx_http_infer_signals_sample(s, name, len, v, line, n, labels);
    }

    return;

malformed:

    s->skipped++;
}


/*
 * Labels, after the "{": name = "value" pairs, separated by commas, a
 * comma allowed before the "}".  Returns what follows the "}", or NULL
 * if the labels are malformed.
 */

static u_char *
ngx_http_infer_signals_labels(u_char *p, u_char *last)
{
    for ( ;; ) {

        while (p < last && ngx_signals_blank(*p)) {
            p++;
        }

        if (p == last) {
            return NULL;
        }

        if (*p == '}') {
            return p + 1;
        }

        if (!ngx_signals_alpha(*p)) {
            return NULL;
        }

        while (p < last && ngx_signals_label_char(*p)) {
            p++;
        }

        while (p < last && ngx_signals_blank(*p)) {
            p++;
        }

        if (p == last || *p++ != '=') {
            return NULL;
        }

        while (p < last && ngx_signals_blank(*p)) {
            p++;
        }

        if (p == last || *p++ != '"') {
            return NULL;
        }

        /* a "}" or a "," in the value is the value's */

        for ( ;; ) {

            if (p == last) {
                return NULL;
            }

            if (*p == '"') {
                break;
            }

            if (*p == '\\') {
                if (++p == last) {
                    return NULL;
                }
            }

            p++;
        }

        p++;

        while (p < last && ngx_signals_blank(*p)) {
            p++;
        }

        if (p == last) {
            return NULL;
        }

        if (*p == ',') {
            p++;
            continue;
        }

        if (*p != '}') {
            return NULL;
        }
    }
}


/*
 * [+-]digits[.digits][(e|E)[+-]digits], or "." with digits on one side
 * at least: NGX_OK and the value in thousandths, saturated at 2^62,
 * rounded to nearest, half away from zero.  NaN, Inf, Infinity (any
 * case, any sign): NGX_DECLINED.  Anything else: NGX_ERROR.
 */

static ngx_int_t
ngx_http_infer_signals_number(u_char *p, u_char *last, int64_t *value)
{
    u_char      c, round;
    int64_t     limit;
    uint64_t    m, r, pow;
    ngx_int_t   scale, exp;
    ngx_uint_t  kept, digits, minus, exp_minus, dropped;

    if (p == last) {
        return NGX_ERROR;
    }

    minus = 0;

    if (*p == '+' || *p == '-') {
        minus = (*p == '-');
        p++;
    }

    if (p < last && !ngx_signals_digit(*p) && *p != '.') {
        return ngx_http_infer_signals_special(p, last) ? NGX_DECLINED
                                                       : NGX_ERROR;
    }

    /*
     * The value is m * 10^scale, m its first 19 significant digits; the
     * first digit dropped rounds m when the thousandths are m itself (a
     * larger scale saturates: m has 19 digits then).
     */

    m = 0;
    scale = 0;
    kept = 0;
    digits = 0;
    dropped = 0;
    round = 0;

    while (p < last && ngx_signals_digit(*p)) {
        c = *p++ - '0';
        digits++;

        if (kept == 0 && c == 0) {
            continue;
        }

        if (kept < NGX_SIGNALS_DIGITS) {
            m = m * 10 + c;
            kept++;
            continue;
        }

        if (!dropped) {
            dropped = 1;
            round = c;
        }

        scale++;
    }

    if (p < last && *p == '.') {
        p++;

        while (p < last && ngx_signals_digit(*p)) {
            c = *p++ - '0';
            digits++;

            if (kept == 0 && c == 0) {
                scale--;
                continue;
            }

            if (kept < NGX_SIGNALS_DIGITS) {
                m = m * 10 + c;
                kept++;
                scale--;
                continue;
            }

            if (!dropped) {
                dropped = 1;
                round = c;
            }
        }
    }

    if (digits == 0) {
        return NGX_ERROR;
    }

    if (p < last && (*p == 'e' || *p == 'E')) {
        p++;

        exp_minus = 0;

        if (p < last && (*p == '+' || *p == '-')) {
            exp_minus = (*p == '-');
            p++;
        }

        if (p == last || !ngx_signals_digit(*p)) {
            return NGX_ERROR;
        }

        exp = 0;

        while (p < last && ngx_signals_digit(*p)) {
            if (exp < NGX_SIGNALS_EXP_MAX) {
                exp = exp * 10 + (*p - '0');
            }

            p++;
        }

        scale += exp_minus ? -exp : exp;
    }

    if (p != last) {
        return NGX_ERROR;
    }

    limit = NGX_HTTP_INFER_SIGNALS_VALUE_MAX;

    /* thousandths */
    scale += 3;

    if (m == 0) {
        r = 0;

    } else if (scale >= 0) {

        if (scale >= NGX_SIGNALS_DIGITS) {
            r = (uint64_t) limit;

        } else {
            pow = ngx_http_infer_signals_pow10[scale];

            if (m > (uint64_t) limit / pow) {
                r = (uint64_t) limit;

            } else {
                r = m * pow + (scale == 0 && round >= 5);
            }
        }

    } else if (-scale > NGX_SIGNALS_DIGITS) {
        /* m < 10^19: less than half of 10^20 */
        r = 0;

    } else {
        pow = ngx_http_infer_signals_pow10[-scale];
        r = m / pow + (m % pow >= pow / 2);
    }

    if (r > (uint64_t) limit) {
        r = (uint64_t) limit;
    }

    *value = minus ? -(int64_t) r : (int64_t) r;

    return NGX_OK;
}


/* NaN, Inf, Infinity, in any case, after the sign */

static ngx_uint_t
ngx_http_infer_signals_special(u_char *p, u_char *last)
{
    u_char  buf[8];
    size_t  n, i;

    n = last - p;

    if (n != 3 && n != 8) {
        return 0;
    }

    for (i = 0; i < n; i++) {
        buf[i] = ngx_tolower(p[i]);
    }

    if (n == 3) {
        return ngx_memcmp(buf, "nan", 3) == 0
               || ngx_memcmp(buf, "inf", 3) == 0;
    }

    return ngx_memcmp(buf, "infinity", 8) == 0;
}


/*
 * A sample of a finite value: for each signal that has its name, the
 * names earlier in the list win over later ones, whatever the order of
 * the page, and the samples of the name in use are summed, or the
 * largest taken.
 */

static void
ngx_http_infer_signals_sample(ngx_http_infer_signals_t *s, u_char *name,
    size_t len, int64_t value, u_char *line, size_t n, u_char *labels)
{
    ngx_str_t                      *names;
    ngx_uint_t                      i, j, nnames, bit;
    ngx_http_infer_signals_conf_t  *conf;

    conf = s->conf;

    if (conf == NULL) {
        return;
    }

    for (i = 0; i < NGX_HTTP_INFER_SIGNALS; i++) {

        names = conf->names[i];
        nnames = ngx_min(conf->nnames[i], NGX_HTTP_INFER_SIGNALS_NAMES);

        for (j = 0; j < nnames; j++) {
            if (names[j].len == len
                && ngx_memcmp(names[j].data, name, len) == 0)
            {
                break;
            }
        }

        if (j == nnames || j > s->name_index[i]) {
            continue;
        }

        if (j < s->name_index[i]) {
            ngx_http_infer_signals_reset(s, i);
            s->name_index[i] = j;
        }

        bit = (ngx_uint_t) 1 << i;

        switch (i) {

        case NGX_HTTP_INFER_SIGNAL_QUEUE:
        case NGX_HTTP_INFER_SIGNAL_RUNNING:
            s->value[i] = ngx_http_infer_signals_add(s->value[i], value);
            break;

        case NGX_HTTP_INFER_SIGNAL_KV:

            if (!(s->found & bit) || value > s->value[i]) {
                s->value[i] = value;
            }

            break;

        default: /* NGX_HTTP_INFER_SIGNAL_LORA */

            /*
             * vLLM's value is the time its label set was made, and the
             * old sets stay on the page: the latest wins, the first of
             * equals
             */

            if ((s->found & bit) && value <= s->lora_stamp) {
                break;
            }

            s->lora_stamp = value;
            s->max_lora = 0;
            s->nrunning = 0;
            s->nwaiting = 0;
            ngx_memzero(s->running, sizeof(s->running));
            ngx_memzero(s->waiting, sizeof(s->waiting));

            if (labels == NULL) {
                break;
            }

            /* values are unescaped in place: not in the caller's buffer */

            if (line != s->line) {
                ngx_memcpy(s->line, line, n);
                labels = s->line + (labels - line);
            }

            ngx_http_infer_signals_lora(s, labels + 1, s->line + n);

            break;
        }

        s->found |= bit;
    }
}


static void
ngx_http_infer_signals_reset(ngx_http_infer_signals_t *s, ngx_uint_t signal)
{
    s->found &= ~((ngx_uint_t) 1 << signal);

    if (signal != NGX_HTTP_INFER_SIGNAL_LORA) {
        s->value[signal] = 0;
        return;
    }

    s->lora_stamp = 0;
    s->max_lora = 0;
    s->nrunning = 0;
    s->nwaiting = 0;
    ngx_memzero(s->running, sizeof(s->running));
    ngx_memzero(s->waiting, sizeof(s->waiting));
}


/*
 * The labels of the LoRA sample, after the "{", in a line of s->line
 * already checked: each value is unescaped in place (it only shrinks).
 */

static void
ngx_http_infer_signals_lora(ngx_http_infer_signals_t *s, u_char *p,
    u_char *last)
{
    u_char  *name, *value, *d;
    size_t   len;

    for ( ;; ) {

        while (p < last && (ngx_signals_blank(*p) || *p == ',')) {
            p++;
        }

        if (p == last || *p == '}') {
            return;
        }

        name = p;

        while (p < last && ngx_signals_label_char(*p)) {
            p++;
        }

        len = p - name;

        while (p < last && ngx_signals_blank(*p)) {
            p++;
        }

        if (p == last || *p++ != '=') {
            return;
        }

        while (p < last && ngx_signals_blank(*p)) {
            p++;
        }

        if (p == last || *p++ != '"') {
            return;
        }

        value = p;
        d = p;

        while (p < last && *p != '"') {

            if (*p == '\\' && p + 1 < last) {

                switch (p[1]) {

                case 'n':
                    *d++ = '\n';
                    break;

                case '\\':
                case '"':
                    *d++ = p[1];
                    break;

                default:
                    /* as Prometheus' own clients: kept as it is */
                    *d++ = '\\';
                    *d++ = p[1];
                    break;
                }

                p += 2;
                continue;
            }

            *d++ = *p++;
        }

        if (p == last) {
            return;
        }

        p++;

#define ngx_signals_label_is(s)                                              \
    (len == sizeof(s) - 1 && ngx_memcmp(name, s, sizeof(s) - 1) == 0)

        if (ngx_signals_label_is("running_lora_adapters")) {
            s->nrunning = ngx_http_infer_signals_list(value, d, s->running);

        } else if (ngx_signals_label_is("waiting_lora_adapters")) {
            s->nwaiting = ngx_http_infer_signals_list(value, d, s->waiting);

        } else if (ngx_signals_label_is("max_lora")) {
            s->max_lora = ngx_http_infer_signals_integer(value, d);
        }

#undef ngx_signals_label_is
    }
}


/*
 * "a,b, c": the number of names, empty ones not counted, and the hashes
 * of the first LORA_MAX, spaces and tabs around them trimmed
 */

static ngx_uint_t
ngx_http_infer_signals_list(u_char *p, u_char *last, uint32_t *hash)
{
    u_char      *end, *e;
    ngx_uint_t   n;

    ngx_memzero(hash, NGX_HTTP_INFER_SIGNALS_LORA_MAX * sizeof(uint32_t));

    n = 0;

    while (p < last) {

        end = memchr(p, ',', last - p);
        if (end == NULL) {
            end = last;
        }

        e = end;

        while (p < e && ngx_signals_blank(*p)) {
            p++;
        }

        while (e > p && ngx_signals_blank(e[-1])) {
            e--;
        }

        if (e > p) {
            if (n < NGX_HTTP_INFER_SIGNALS_LORA_MAX) {
                hash[n] = ngx_murmur_hash2(p, e - p);
            }

            n++;
        }

        if (end == last) {
            break;
        }

        p = end + 1;
    }

    return n;
}


/* digits only, saturated; anything else is 0 */

static ngx_uint_t
ngx_http_infer_signals_integer(u_char *p, u_char *last)
{
    ngx_uint_t  n, d;

    if (p == last) {
        return 0;
    }

    n = 0;

    while (p < last) {

        if (!ngx_signals_digit(*p)) {
            return 0;
        }

        d = *p++ - '0';

        n = (n > (NGX_SIGNALS_MAX_LORA - d) / 10) ? NGX_SIGNALS_MAX_LORA
                                                  : n * 10 + d;
    }

    return n;
}


/* a sum saturated at +-2^62: both terms are within it */

static ngx_inline int64_t
ngx_http_infer_signals_add(int64_t a, int64_t b)
{
    int64_t  max;

    max = NGX_HTTP_INFER_SIGNALS_VALUE_MAX;

    if (b > 0 && a > max - b) {
        return max;
    }

    if (b < 0 && a < -max - b) {
        return -max;
    }

    return a + b;
}

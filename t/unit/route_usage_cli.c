/*
 * Copyright (C) ngx_infer authors
 *
 * route_usage_cli: the token usage parser (ngx_http_infer_route_usage.c)
 * from the shell, for the tests (t/test_route_usage.py).
 *
 *   route_usage_cli json|sse [strip] FILE|-
 *       feed one input in one buffer, finish, print one JSON line
 *
 *   route_usage_cli --batch
 *       on stdin, records "LEN MODE STRIP TRACE CUTS\n" then LEN bytes;
 *       one JSON line per record.  MODE: json or sse; STRIP, TRACE: 0 or
 *       1; CUTS: "-" (one buffer), "eK" (buffers of K bytes) or
 *       "c:A,B,..." (buffers cut at those offsets, increasing)
 *
 *   route_usage_cli --bench json|sse FILE N [K]
 *       feed FILE N times (in buffers of K bytes, else in one), print the
 *       time per pass and MB/s (10^6 bytes)
 *
 * Every buffer is fed from an allocation of exactly its size, so that an
 * address sanitizer sees any read past its end.
 *
 * The result: "rc" is "error" if a feed returned NGX_ERROR, "error_feed"
 * the first that did (else -1), "final" what a feed of nothing returns
 * after finish() (an incomplete JSON answer is an error then), "feeds"
 * the number of buffers.  With TRACE, "trace" lists [feed, event_start,
 * usage_event_start, usage_event_end] after each feed where one of them
 * changed, feed -1 for the initial values and "feeds" for after finish().
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "ngx_http_infer_route_usage.h"
#include "unit.h"


typedef struct {
    ngx_int_t     rc;
    ngx_int_t     final;
    long          error_feed;
    long          feeds;
} run_t;


static void run(u_char *data, size_t len, ngx_uint_t mode, ngx_uint_t strip,
    ngx_uint_t trace, size_t *cuts, size_t ncuts, ngx_http_infer_usage_t *u,
    run_t *r);
static void trace_point(ngx_http_infer_usage_t *u, long feed, off_t *last,
    ngx_uint_t *first);
static void print_result(ngx_http_infer_usage_t *u, run_t *r,
    ngx_uint_t trace);
static int batch(void);
static int bench(ngx_uint_t mode, const char *path, unsigned long n,
    size_t k);


int
main(int argc, char **argv)
{
    FILE                    *f;
    run_t                    r;
    u_char                  *data;
    size_t                   len;
    ngx_uint_t               mode, strip;
    ngx_http_infer_usage_t  *u;

    if (argc >= 2 && strcmp(argv[1], "--batch") == 0) {
        return batch();
    }

    if (argc >= 5 && strcmp(argv[1], "--bench") == 0) {
        return bench(strcmp(argv[2], "sse") == 0
                     ? NGX_HTTP_INFER_USAGE_SSE : NGX_HTTP_INFER_USAGE_JSON,
                     argv[3], strtoul(argv[4], NULL, 10),
                     (argc >= 6) ? strtoul(argv[5], NULL, 10) : 0);
    }

    if (argc < 3 || argc > 4
        || (strcmp(argv[1], "json") != 0 && strcmp(argv[1], "sse") != 0)
        || (argc == 4 && strcmp(argv[2], "strip") != 0))
    {
        fprintf(stderr, "usage: %s json|sse [strip] FILE|-\n"
                        "       %s --batch\n"
                        "       %s --bench json|sse FILE N [K]\n",
                argv[0], argv[0], argv[0]);
        return 2;
    }

    mode = (strcmp(argv[1], "sse") == 0) ? NGX_HTTP_INFER_USAGE_SSE
                                          : NGX_HTTP_INFER_USAGE_JSON;
    strip = (argc == 4);

    if (strcmp(argv[argc - 1], "-") == 0) {
        f = stdin;

    } else {
        f = fopen(argv[argc - 1], "rb");
        if (f == NULL) {
            perror(argv[argc - 1]);
            return 2;
        }
    }

    data = read_all(f, &len);

    if (f != stdin) {
        fclose(f);
    }

    u = malloc(sizeof(ngx_http_infer_usage_t));

    if (data == NULL || u == NULL) {
        return 2;
    }

    run(data, len, mode, strip, 0, NULL, 0, u, &r);
    print_result(u, &r, 0);

    free(u);
    free(data);

    return 0;
}


/* init (over garbage), the feeds, finish, one more empty feed */

static void
run(u_char *data, size_t len, ngx_uint_t mode, ngx_uint_t strip,
    ngx_uint_t trace, size_t *cuts, size_t ncuts,
    ngx_http_infer_usage_t *out, run_t *r)
{
    off_t                    last[3];
    u_char                  *copy;
    size_t                   from, to, i, size;
    ngx_int_t                rc;
    ngx_uint_t               first;
    ngx_http_infer_usage_t  *u;

    /* exactly as large as the module allocates it, for ASan to watch */
    size = NGX_HTTP_INFER_USAGE_SIZE(mode);

    u = malloc(size);
    if (u == NULL) {
        perror("malloc");
        exit(2);
    }

    memset(u, 0xa5, size);
    ngx_http_infer_usage_init(u, mode, strip);

    r->rc = NGX_OK;
    r->error_feed = -1;
    r->feeds = 0;

    first = 1;

    if (trace) {
        printf("{\"trace\": [");
        trace_point(u, -1, last, &first);
    }

    from = 0;

    for (i = 0; i <= ncuts; i++) {
        to = (i < ncuts) ? cuts[i] : len;

        /* the last cut may be the end: no empty feed for it */
        if (i == ncuts && from == len && len > 0) {
            break;
        }

        copy = malloc(to - from ? to - from : 1);
        if (copy == NULL) {
            perror("malloc");
            exit(2);
        }

        memcpy(copy, data + from, to - from);

        rc = ngx_http_infer_usage_feed(u, copy, to - from);

        free(copy);

        if (rc != NGX_OK) {
            if (rc != NGX_ERROR) {
                fprintf(stderr, "feed returned %ld\n", (long) rc);
                exit(3);
            }

            if (r->error_feed == -1) {
                r->error_feed = r->feeds;
            }

            r->rc = NGX_ERROR;
        }

        if (trace) {
            trace_point(u, r->feeds, last, &first);
        }

        r->feeds++;
        from = to;
    }

    ngx_http_infer_usage_finish(u);

    if (trace) {
        trace_point(u, r->feeds, last, &first);
        printf("], ");
    }

    r->final = ngx_http_infer_usage_feed(u, (u_char *) "", 0);

    memcpy(out, u, size);
    free(u);
}


static void
trace_point(ngx_http_infer_usage_t *u, long feed, off_t *last,
    ngx_uint_t *first)
{
    if (!*first
        && last[0] == u->event_start
        && last[1] == u->usage_event_start
        && last[2] == u->usage_event_end)
    {
        return;
    }

    printf("%s[%ld, %lld, %lld, %lld]", *first ? "" : ", ", feed,
           (long long) u->event_start, (long long) u->usage_event_start,
           (long long) u->usage_event_end);

    last[0] = u->event_start;
    last[1] = u->usage_event_start;
    last[2] = u->usage_event_end;
    *first = 0;
}


static void
print_result(ngx_http_infer_usage_t *u, run_t *r, ngx_uint_t trace)
{
    /* with a trace, run() opened the object */

    printf("%s\"rc\": \"%s\", \"error_feed\": %ld, \"final\": \"%s\""
           ", \"feeds\": %ld, \"found\": %u, \"done\": %u"
           ", \"prompt_tokens\": %ld, \"completion_tokens\": %ld"
           ", \"total_tokens\": %ld, \"cached_tokens\": %ld"
           ", \"reasoning_tokens\": %ld, \"content_events\": %lu"
           ", \"usage_event_start\": %lld, \"usage_event_end\": %lld"
           ", \"event_start\": %lld, \"offset\": %lld}\n",
           trace ? "" : "{", r->rc == NGX_OK ? "ok" : "error", r->error_feed,
           r->final == NGX_OK ? "ok" : "error", r->feeds,
           (unsigned) u->found, (unsigned) u->done,
           (long) u->prompt_tokens, (long) u->completion_tokens,
           (long) u->total_tokens, (long) u->cached_tokens,
           (long) u->reasoning_tokens, (unsigned long) u->content_events,
           (long long) u->usage_event_start, (long long) u->usage_event_end,
           (long long) u->event_start, (long long) u->offset);
}


static int
batch(void)
{
    run_t                    r;
    char                    *head, mode[8], cutspec[16];
    u_char                  *data, *p, *last, *nl;
    size_t                   len, n, ncuts, *cuts;
    unsigned                 strip, trace;
    ngx_http_infer_usage_t  *u;

    data = read_all(stdin, &len);
    u = malloc(sizeof(ngx_http_infer_usage_t));

    if (data == NULL || u == NULL) {
        return 2;
    }

    p = data;
    last = data + len;

    while (p < last) {
        nl = memchr(p, '\n', last - p);

        if (nl == NULL) {
            goto bad;
        }

        head = malloc(nl - p + 1);
        if (head == NULL) {
            return 2;
        }

        memcpy(head, p, nl - p);
        head[nl - p] = '\0';

        cutspec[0] = '\0';

        if (sscanf(head, "%zu %7s %u %u %15s", &n, mode, &strip, &trace,
                   cutspec) != 5
            || (size_t) (last - nl - 1) < n
            || (strcmp(mode, "json") != 0 && strcmp(mode, "sse") != 0))
        {
            free(head);
            goto bad;
        }

        /* the cuts may be long: they are read from the line itself */

        if (parse_cuts(strrchr(head, ' ') + 1, n, &cuts, &ncuts) != 0) {
            free(head);
            goto bad;
        }

        free(head);

        run(nl + 1, n, strcmp(mode, "sse") == 0 ? NGX_HTTP_INFER_USAGE_SSE
                                                : NGX_HTTP_INFER_USAGE_JSON,
            strip, trace, cuts, ncuts, u, &r);
        print_result(u, &r, trace);

        free(cuts);

        p = nl + 1 + n;
    }

    free(u);
    free(data);
    fflush(stdout);

    return 0;

bad:

    fprintf(stderr, "bad batch record at byte %zu\n", (size_t) (p - data));
    free(u);
    free(data);

    return 2;
}


static int
bench(ngx_uint_t mode, const char *path, unsigned long n, size_t k)
{
    FILE                    *f;
    u_char                  *data;
    size_t                   len, at, step;
    double                   ns;
    unsigned long            i;
    struct timespec          t0, t1;
    ngx_http_infer_usage_t  *u;

    f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        return 2;
    }

    data = read_all(f, &len);
    fclose(f);

    u = malloc(sizeof(ngx_http_infer_usage_t));

    if (data == NULL || u == NULL || n == 0) {
        return 2;
    }

    if (k == 0) {
        k = len ? len : 1;
    }

    clock_gettime(CLOCK_MONOTONIC, &t0);

    for (i = 0; i < n; i++) {
        ngx_http_infer_usage_init(u, mode, 1);

        for (at = 0; at < len; at += step) {
            step = (len - at < k) ? len - at : k;
            (void) ngx_http_infer_usage_feed(u, data + at, step);
        }

        ngx_http_infer_usage_finish(u);
    }

    clock_gettime(CLOCK_MONOTONIC, &t1);

    ns = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n;

    printf("{\"bytes\": %zu, \"iterations\": %lu, \"buffer\": %zu"
           ", \"found\": %u, \"prompt_tokens\": %ld"
           ", \"content_events\": %lu, \"ns_per_pass\": %.1f"
           ", \"mb_per_s\": %.1f}\n",
           len, n, k, (unsigned) u->found, (long) u->prompt_tokens,
           (unsigned long) u->content_events, ns,
           ns > 0 ? len / ns * 1e3 : 0.0);

    free(u);
    free(data);

    return 0;
}

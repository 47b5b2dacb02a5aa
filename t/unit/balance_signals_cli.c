/*
 * Copyright (C) ngx_infer authors
 *
 * balance_signals_cli: the metric page parser
 * (ngx_http_infer_balance_signals.c) from the shell, for the tests
 * (t/test_balance_page.py).
 *
 *   balance_signals_cli FILE|- [--cuts CUTS] [--names SIGNAL=name,name ...]
 *       feed one page, finish, print one JSON line.  CUTS: "-" (one
 *       buffer), "eK" (buffers of K bytes) or "c:A,B,..." (buffers cut at
 *       those offsets, increasing).  Each SIGNAL=name,name replaces the
 *       default names of one signal (queue, running, kv, lora); "SIGNAL="
 *       leaves it none.
 *
 *   balance_signals_cli --batch
 *       on stdin, records "LEN CUTS NAMES\n" then LEN bytes, NAMES "-"
 *       (the defaults) or "SIGNAL=name,name;SIGNAL=..."; one JSON line
 *       per record
 *
 *   balance_signals_cli --bench FILE N [K]
 *       parse FILE N times (in buffers of K bytes, else in one), print
 *       the time per pass and MB/s (10^6 bytes)
 *
 * Every buffer is fed from an allocation of exactly its size, and the
 * parser's struct is one of exactly its size filled with garbage before
 * init, so that an address sanitizer sees any read past either.
 *
 * The result: "queue", "running", "kv" (thousandths), "found" (names of
 * the signals), "name_index", "lora_stamp", "max_lora", "nrunning",
 * "nwaiting", "lora_running" and "lora_waiting" (the hashes kept),
 * "samples", "skipped", "feeds" (buffers fed).
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "ngx_http_infer_balance_signals.h"
#include "unit.h"
#include "murmur.h"


static int parse_names(char *spec, ngx_http_infer_signals_conf_t *conf);
static void run(u_char *data, size_t len, size_t *cuts, size_t ncuts,
    ngx_http_infer_signals_conf_t *conf, ngx_http_infer_signals_t *out,
    long *feeds);
static void print_hashes(const char *key, uint32_t *hash, ngx_uint_t n);
static void print_result(ngx_http_infer_signals_t *s, long feeds);
static int batch(void);
static int bench(const char *path, unsigned long n, size_t k);


static const char  *signal_names[] = { "queue", "running", "kv", "lora" };


int
main(int argc, char **argv)
{
    int                             i;
    FILE                           *f;
    long                            feeds;
    char                           *cutspec;
    u_char                         *data;
    size_t                          len, ncuts, *cuts;
    ngx_http_infer_signals_t       *s;
    ngx_http_infer_signals_conf_t   conf;

    if (argc >= 2 && strcmp(argv[1], "--batch") == 0) {
        return batch();
    }

    if (argc >= 4 && strcmp(argv[1], "--bench") == 0) {
        return bench(argv[2], strtoul(argv[3], NULL, 10),
                     (argc >= 5) ? strtoul(argv[4], NULL, 10) : 0);
    }

    if (argc < 2 || argv[1][0] == '\0'
        || (argv[1][0] == '-' && argv[1][1] != '\0'))
    {
        goto usage;
    }

    ngx_http_infer_signals_default(&conf);
    cutspec = "-";

    for (i = 2; i < argc; i++) {

        if (strcmp(argv[i], "--cuts") == 0 && i + 1 < argc) {
            cutspec = argv[++i];
            continue;
        }

        if (strcmp(argv[i], "--names") == 0 && i + 1 < argc) {

            /* one or more SIGNAL=name,name */

            do {
                if (parse_names(argv[++i], &conf) != 0) {
                    goto usage;
                }
            } while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0);

            continue;
        }

        goto usage;
    }

    if (strcmp(argv[1], "-") == 0) {
        f = stdin;

    } else {
        f = fopen(argv[1], "rb");
        if (f == NULL) {
            perror(argv[1]);
            return 2;
        }
    }

    data = read_all(f, &len);

    if (f != stdin) {
        fclose(f);
    }

    s = malloc(sizeof(ngx_http_infer_signals_t));

    if (data == NULL || s == NULL) {
        return 2;
    }

    if (parse_cuts(cutspec, len, &cuts, &ncuts) != 0) {
        fprintf(stderr, "bad cuts \"%s\"\n", cutspec);
        return 2;
    }

    run(data, len, cuts, ncuts, &conf, s, &feeds);
    print_result(s, feeds);

    free(cuts);
    free(s);
    free(data);

    return 0;

usage:

    fprintf(stderr, "usage: %s FILE|- [--cuts eK|c:A,B,...]"
                    " [--names SIGNAL=name,name ...]\n"
                    "       %s --batch\n"
                    "       %s --bench FILE N [K]\n",
            argv[0], argv[0], argv[0]);

    return 2;
}


/* "queue=a,b" or "queue=a,b;kv=c": the names point into spec */

static int
parse_names(char *spec, ngx_http_infer_signals_conf_t *conf)
{
    char        *eq, *end, *name, *comma;
    ngx_uint_t   i, n;

    while (*spec) {
        end = strchr(spec, ';');
        if (end == NULL) {
            end = spec + strlen(spec);
        }

        eq = memchr(spec, '=', end - spec);
        if (eq == NULL) {
            return -1;
        }

        for (i = 0; i < NGX_HTTP_INFER_SIGNALS; i++) {
            if ((size_t) (eq - spec) == strlen(signal_names[i])
                && memcmp(spec, signal_names[i], eq - spec) == 0)
            {
                break;
            }
        }

        if (i == NGX_HTTP_INFER_SIGNALS) {
            return -1;
        }

        n = 0;

        for (name = eq + 1; name < end; name = comma + 1) {
            comma = memchr(name, ',', end - name);
            if (comma == NULL) {
                comma = end;
            }

            if (n == NGX_HTTP_INFER_SIGNALS_NAMES) {
                return -1;
            }

            conf->names[i][n].data = (u_char *) name;
            conf->names[i][n].len = comma - name;
            n++;
        }

        conf->nnames[i] = n;

        spec = *end ? end + 1 : end;
    }

    return 0;
}


/* init (over garbage), the feeds, finish */

static void
run(u_char *data, size_t len, size_t *cuts, size_t ncuts,
    ngx_http_infer_signals_conf_t *conf, ngx_http_infer_signals_t *out,
    long *feeds)
{
    u_char                    *copy;
    size_t                     from, to, i;
    ngx_http_infer_signals_t  *s;

    s = malloc(sizeof(ngx_http_infer_signals_t));
    if (s == NULL) {
        perror("malloc");
        exit(2);
    }

    memset(s, 0xa5, sizeof(ngx_http_infer_signals_t));
    ngx_http_infer_signals_init(s, conf);

    *feeds = 0;
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

        ngx_http_infer_signals_feed(s, copy, to - from);

        free(copy);

        (*feeds)++;
        from = to;
    }

    ngx_http_infer_signals_finish(s);

    /* an empty buffer, as nginx may have one, with no address */
    ngx_http_infer_signals_feed(s, NULL, 0);

    memcpy(out, s, sizeof(ngx_http_infer_signals_t));
    free(s);
}


static void
print_hashes(const char *key, uint32_t *hash, ngx_uint_t n)
{
    ngx_uint_t  i;

    printf(", \"%s\": [", key);

    for (i = 0; i < n && i < NGX_HTTP_INFER_SIGNALS_LORA_MAX; i++) {
        printf("%s%u", i ? ", " : "", (unsigned) hash[i]);
    }

    printf("]");
}


static void
print_result(ngx_http_infer_signals_t *s, long feeds)
{
    ngx_uint_t  i, first;

    printf("{\"feeds\": %ld, \"queue\": %lld, \"running\": %lld"
           ", \"kv\": %lld, \"found\": [",
           feeds,
           (long long) s->value[NGX_HTTP_INFER_SIGNAL_QUEUE],
           (long long) s->value[NGX_HTTP_INFER_SIGNAL_RUNNING],
           (long long) s->value[NGX_HTTP_INFER_SIGNAL_KV]);

    first = 1;

    for (i = 0; i < NGX_HTTP_INFER_SIGNALS; i++) {
        if (s->found & ((ngx_uint_t) 1 << i)) {
            printf("%s\"%s\"", first ? "" : ", ", signal_names[i]);
            first = 0;
        }
    }

    printf("], \"found_bits\": %lu, \"name_index\": [%lu, %lu, %lu, %lu]"
           ", \"lora_stamp\": %lld, \"max_lora\": %lu, \"nrunning\": %lu"
           ", \"nwaiting\": %lu",
           (unsigned long) s->found,
           (unsigned long) s->name_index[0], (unsigned long) s->name_index[1],
           (unsigned long) s->name_index[2], (unsigned long) s->name_index[3],
           (long long) s->lora_stamp, (unsigned long) s->max_lora,
           (unsigned long) s->nrunning, (unsigned long) s->nwaiting);

    print_hashes("lora_running", s->running, s->nrunning);
    print_hashes("lora_waiting", s->waiting, s->nwaiting);

    printf(", \"samples\": %lu, \"skipped\": %lu, \"line_len\": %lu}\n",
           (unsigned long) s->samples, (unsigned long) s->skipped,
           (unsigned long) s->line_len);
}


static int
batch(void)
{
    long                            feeds;
    char                           *head, cutspec[16], *names;
    u_char                         *data, *p, *last, *nl;
    size_t                          len, n, ncuts, *cuts;
    ngx_http_infer_signals_t       *s;
    ngx_http_infer_signals_conf_t   conf;

    data = read_all(stdin, &len);
    s = malloc(sizeof(ngx_http_infer_signals_t));

    if (data == NULL || s == NULL) {
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

        if (sscanf(head, "%zu %15s", &n, cutspec) != 2
            || (size_t) (last - nl - 1) < n)
        {
            free(head);
            goto bad;
        }

        /* the cuts may be long, the names too: read from the line */

        names = strrchr(head, ' ');
        if (names == NULL) {
            free(head);
            goto bad;
        }

        *names++ = '\0';

        ngx_http_infer_signals_default(&conf);

        if ((strcmp(names, "-") != 0 && parse_names(names, &conf) != 0)
            || parse_cuts(strchr(head, ' ') + 1, n, &cuts, &ncuts) != 0)
        {
            free(head);
            goto bad;
        }

        run(nl + 1, n, cuts, ncuts, &conf, s, &feeds);
        print_result(s, feeds);

        free(cuts);
        free(head);

        p = nl + 1 + n;
    }

    free(s);
    free(data);
    fflush(stdout);

    return 0;

bad:

    fprintf(stderr, "bad batch record at byte %zu\n", (size_t) (p - data));
    free(s);
    free(data);

    return 2;
}


static int
bench(const char *path, unsigned long n, size_t k)
{
    FILE                           *f;
    u_char                         *data;
    size_t                          len, at, step;
    double                          ns;
    unsigned long                   i;
    struct timespec                 t0, t1;
    ngx_http_infer_signals_t       *s;
    ngx_http_infer_signals_conf_t   conf;

    f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        return 2;
    }

    data = read_all(f, &len);
    fclose(f);

    s = malloc(sizeof(ngx_http_infer_signals_t));

    if (data == NULL || s == NULL || n == 0) {
        return 2;
    }

    if (k == 0) {
        k = len ? len : 1;
    }

    ngx_http_infer_signals_default(&conf);

    clock_gettime(CLOCK_MONOTONIC, &t0);

    for (i = 0; i < n; i++) {
        ngx_http_infer_signals_init(s, &conf);

        for (at = 0; at < len; at += step) {
            step = (len - at < k) ? len - at : k;
            ngx_http_infer_signals_feed(s, data + at, step);
        }

        ngx_http_infer_signals_finish(s);
    }

    clock_gettime(CLOCK_MONOTONIC, &t1);

    ns = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n;

    printf("{\"bytes\": %zu, \"iterations\": %lu, \"buffer\": %zu"
           ", \"samples\": %lu, \"found_bits\": %lu, \"ns_per_pass\": %.1f"
           ", \"mb_per_s\": %.1f}\n",
           len, n, k, (unsigned long) s->samples, (unsigned long) s->found,
           ns, ns > 0 ? len / ns * 1e3 : 0.0);

    free(s);
    free(data);

    return 0;
}

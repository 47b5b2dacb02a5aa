/*
 * Copyright (C) ngx_infer authors
 *
 * route_json_cli: ngx_http_infer_route_json_scan() from the shell, for
 * the tests (t/test_route_json.py).
 *
 *   route_json_cli FILE|- [PREFIX_MAX]
 *       scan one input, print one JSON line (PREFIX_MAX: 256)
 *
 *   route_json_cli --batch
 *       on stdin, records "LEN PREFIX_MAX\n" then LEN bytes; one JSON
 *       line per record
 *
 *   route_json_cli --bench FILE N [PREFIX_MAX]
 *       scan FILE N times, print ns per scan and MB/s (10^6 bytes)
 *
 * Every input is scanned from a buffer of exactly its size, so that an
 * address sanitizer sees any read past its end.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "ngx_http_infer_route_json.h"
#include "unit.h"


static ngx_int_t scan(u_char *data, size_t len, size_t prefix_max,
    ngx_http_infer_route_body_t *b);
static void print_result(ngx_int_t rc, ngx_http_infer_route_body_t *b);
static void print_string(const u_char *s, size_t len);
static int batch(void);
static int bench(const char *path, unsigned long n, size_t prefix_max);


int
main(int argc, char **argv)
{
    int                           rc;
    FILE                         *f;
    u_char                       *data;
    size_t                        len, prefix_max;
    ngx_http_infer_route_body_t   b;

    if (argc >= 2 && strcmp(argv[1], "--batch") == 0) {
        return batch();
    }

    if (argc >= 4 && strcmp(argv[1], "--bench") == 0) {
        prefix_max = (argc >= 5) ? strtoul(argv[4], NULL, 10) : 256;
        return bench(argv[2], strtoul(argv[3], NULL, 10), prefix_max);
    }

    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s FILE|- [PREFIX_MAX]\n"
                        "       %s --batch\n"
                        "       %s --bench FILE N [PREFIX_MAX]\n",
                argv[0], argv[0], argv[0]);
        return 2;
    }

    prefix_max = (argc == 3) ? strtoul(argv[2], NULL, 10) : 256;

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

    if (data == NULL) {
        return 2;
    }

    rc = scan(data, len, prefix_max, &b);
    print_result(rc, &b);

    free(data);

    return 0;
}


/* a copy in a buffer of exactly len bytes */

static ngx_int_t
scan(u_char *data, size_t len, size_t prefix_max,
    ngx_http_infer_route_body_t *b)
{
    u_char     *copy;
    ngx_int_t   rc;

    copy = malloc(len ? len : 1);
    if (copy == NULL) {
        perror("malloc");
        exit(2);
    }

    memcpy(copy, data, len);

    /* garbage in the outputs: the scanner must set them all */
    memset(b, 0xa5, sizeof(ngx_http_infer_route_body_t));
    b->prefix_max = prefix_max;

    rc = ngx_http_infer_route_json_scan(copy, len, b);

    free(copy);

    return rc;
}


static void
print_result(ngx_int_t rc, ngx_http_infer_route_body_t *b)
{
    printf("{\"rc\": \"%s\", \"error\": ",
           rc == NGX_OK ? "ok" : rc == NGX_DECLINED ? "declined"
           : rc == NGX_ERROR ? "error" : "bad-rc");

    if (b->error) {
        print_string((u_char *) b->error, strlen(b->error));

    } else {
        printf("null");
    }

    printf(", \"error_offset\": %zu, \"model\": ", b->error_offset);

    if (b->has_model) {
        print_string(b->model, b->model_len);

    } else {
        printf("null");
    }

    printf(", \"model_len\": %zu, \"stream\": %ld, \"include_usage\": %ld"
           ", \"max_tokens\": %ld, \"prompt_bytes\": %zu, \"messages\": %lu"
           ", \"prefix_hash\": \"%016llx\", \"prefix_len\": %zu"
           ", \"model_start\": %zu, \"model_end\": %zu"
           ", \"stream_options_start\": %zu, \"stream_options_end\": %zu"
           ", \"object_end\": %zu}\n",
           b->model_len, (long) b->stream, (long) b->include_usage,
           (long) b->max_tokens, b->prompt_bytes,
           (unsigned long) b->messages,
           (unsigned long long) b->prefix_hash, b->prefix_len,
           b->model_start, b->model_end,
           b->stream_options_start, b->stream_options_end, b->object_end);
}


/* bytes from 0x80 up go out as they are: the reader decodes them */

static void
print_string(const u_char *s, size_t len)
{
    size_t  i;

    putchar('"');

    for (i = 0; i < len; i++) {
        if (s[i] == '"' || s[i] == '\\') {
            printf("\\%c", s[i]);

        } else if (s[i] < 0x20 || s[i] == 0x7f) {
            printf("\\u%04x", s[i]);

        } else {
            putchar(s[i]);
        }
    }

    putchar('"');
}


static int
batch(void)
{
    char                          head[64];
    u_char                       *data, *p, *last, *nl;
    size_t                        len, n, prefix_max;
    ngx_int_t                     rc;
    ngx_http_infer_route_body_t   b;

    data = read_all(stdin, &len);
    if (data == NULL) {
        return 2;
    }

    p = data;
    last = data + len;

    while (p < last) {
        nl = memchr(p, '\n', last - p);

        if (nl != NULL && (size_t) (nl - p) < sizeof(head)) {
            memcpy(head, p, nl - p);
            head[nl - p] = '\0';

        } else {
            head[0] = '\0';
        }

        if (nl == NULL
            || sscanf(head, "%zu %zu", &n, &prefix_max) != 2
            || (size_t) (last - nl - 1) < n)
        {
            fprintf(stderr, "bad batch record at byte %zu\n",
                    (size_t) (p - data));
            free(data);
            return 2;
        }

        rc = scan(nl + 1, n, prefix_max, &b);
        print_result(rc, &b);

        p = nl + 1 + n;
    }

    free(data);
    fflush(stdout);

    return 0;
}


static int
bench(const char *path, unsigned long n, size_t prefix_max)
{
    FILE                         *f;
    u_char                       *data, *copy;
    size_t                        len;
    double                        ns;
    ngx_int_t                     rc;
    unsigned long                 i;
    struct timespec               t0, t1;
    ngx_http_infer_route_body_t   b;

    f = fopen(path, "rb");
    if (f == NULL) {
        perror(path);
        return 2;
    }

    data = read_all(f, &len);
    fclose(f);

    if (data == NULL || n == 0) {
        return 2;
    }

    copy = malloc(len ? len : 1);
    if (copy == NULL) {
        return 2;
    }

    memcpy(copy, data, len);

    rc = NGX_ERROR;

    clock_gettime(CLOCK_MONOTONIC, &t0);

    for (i = 0; i < n; i++) {
        b.prefix_max = prefix_max;
        rc = ngx_http_infer_route_json_scan(copy, len, &b);
    }

    clock_gettime(CLOCK_MONOTONIC, &t1);

    ns = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n;

    printf("{\"file\": ");
    print_string((u_char *) path, strlen(path));
    printf(", \"bytes\": %zu, \"iterations\": %lu, \"rc\": %ld"
           ", \"prompt_bytes\": %zu, \"ns_per_scan\": %.1f"
           ", \"mb_per_s\": %.1f}\n",
           len, n, (long) rc, b.prompt_bytes, ns,
           ns > 0 ? len / ns * 1e3 : 0.0);

    free(copy);
    free(data);

    return 0;
}

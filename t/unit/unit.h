/*
 * Copyright (C) ngx_infer authors
 *
 * What the parsers' test programs in t/unit share: the CLIs, the fuzzers.
 */


#ifndef _NGX_INFER_UNIT_H_INCLUDED_
#define _NGX_INFER_UNIT_H_INCLUDED_


#include <stdio.h>
#include <stdlib.h>
#include <string.h>


/* a fuzzer's invariant: abort() so that libFuzzer keeps the input */

#define check(e)                                                             \
    do {                                                                     \
        if (!(e)) {                                                          \
            fprintf(stderr, "invariant failed: %s (line %d)\n", #e,          \
                    __LINE__);                                               \
            abort();                                                         \
        }                                                                    \
    } while (0)


/* all of f, in a malloc()ed buffer; NULL (and a message) on failure */

static inline unsigned char *
read_all(FILE *f, size_t *len)
{
    unsigned char  *buf, *nbuf;
    size_t          size, n;

    size = 65536;
    *len = 0;

    buf = malloc(size);
    if (buf == NULL) {
        perror("malloc");
        return NULL;
    }

    for ( ;; ) {
        n = fread(buf + *len, 1, size - *len, f);
        *len += n;

        if (*len < size) {
            break;
        }

        size *= 2;

        nbuf = realloc(buf, size);
        if (nbuf == NULL) {
            perror("realloc");
            free(buf);
            return NULL;
        }

        buf = nbuf;
    }

    if (ferror(f)) {
        perror("fread");
        free(buf);
        return NULL;
    }

    return buf;
}



/*
 * The offsets where a CLI's buffers end, from "-" (one buffer), "eK"
 * (buffers of K bytes) or "c:A,B,..." (increasing offsets up to len).
 */

static inline int
parse_cuts(const char *spec, size_t len, size_t **cuts, size_t *ncuts)
{
    char    *end;
    size_t   n, k, at, *c;

    *cuts = NULL;
    *ncuts = 0;

    if (strcmp(spec, "-") == 0) {
        return 0;
    }

    if (spec[0] == 'e') {
        k = strtoul(spec + 1, &end, 10);
        if (k == 0 || *end != '\0') {
            return -1;
        }

        c = malloc((len / k + 1) * sizeof(size_t));
        if (c == NULL) {
            return -1;
        }

        for (at = k; at < len; at += k) {
            c[(*ncuts)++] = at;
        }

        *cuts = c;
        return 0;
    }

    if (spec[0] != 'c' || spec[1] != ':') {
        return -1;
    }

    for (n = 1, end = (char *) spec; *end; end++) {
        n += (*end == ',');
    }

    c = malloc(n * sizeof(size_t));
    if (c == NULL) {
        return -1;
    }

    spec += 2;

    while (*spec) {
        at = strtoul(spec, &end, 10);

        if (end == spec || at > len
            || (*ncuts && at < c[*ncuts - 1])
            || (*end != ',' && *end != '\0'))
        {
            free(c);
            *ncuts = 0;
            return -1;
        }

        c[(*ncuts)++] = at;
        spec = (*end == ',') ? end + 1 : end;
    }

    *cuts = c;
    return 0;
}


#endif /* _NGX_INFER_UNIT_H_INCLUDED_ */

/*
 * Copyright (C) ngx_infer authors
 *
 * What the parsers' test programs in t/unit share: the CLIs, the fuzzers.
 */


#ifndef _NGX_INFER_UNIT_H_INCLUDED_
#define _NGX_INFER_UNIT_H_INCLUDED_


#include <stdio.h>
#include <stdlib.h>


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


#endif /* _NGX_INFER_UNIT_H_INCLUDED_ */

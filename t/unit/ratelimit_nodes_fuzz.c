/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for what the rate-limit module reads of a Redis
 * Cluster without a connection (ngx_http_infer_ratelimit_nodes.c):
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fuse-ld=lld \
 *       -ffunction-sections -Wl,--gc-sections -I ... \
 *       t/unit/ratelimit_nodes_fuzz.c t/unit/ngx_shim.c \
 *       ngx_infer_ratelimit/ngx_http_infer_ratelimit_nodes.c
 *
 * The first byte says what the rest is: "k" a key, whose slot is
 * compared with an oracle written from Redis's documentation in another
 * way (CRC16 bit by bit, the hash tag found by indexes); "r" an error
 * reply, MOVED or ASK or other; anything else CLUSTER NODES's answer,
 * where every slot a master line lists must be that master's, and no
 * other slot anyone's.  Each input is parsed from a buffer of exactly
 * its size.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ngx_http.h>

#include "ngx_http_infer_ratelimit.h"
#include "unit.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static unsigned oracle_slot(const unsigned char *p, size_t len);
static void check_nodes(const unsigned char *p, size_t len,
    ngx_http_infer_ratelimit_nodes_t *nodes);
static int has_flag(const char *flags, const char *flag);


static ngx_http_infer_ratelimit_nodes_t  nodes;


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                                *p;
    ngx_int_t                              rc;
    ngx_uint_t                             slot, i, n;
    ngx_http_infer_ratelimit_node_addr_t   addr;

    if (size < 1) {
        return 0;
    }

    p = malloc(size);
    if (p == NULL) {
        return 0;
    }

    memcpy(p, data + 1, size - 1);

    switch (data[0]) {

    case 'k':
        slot = ngx_http_infer_ratelimit_slot(p, size - 1);

        if (getenv("FUZZ_VERBOSE")) {
            fprintf(stderr, "slot=%u\n", (unsigned) slot);
        }

        check(slot == oracle_slot(p, size - 1));
        break;

    case 'r':
        rc = ngx_http_infer_ratelimit_nodes_redirect(p, size - 1, &slot,
                                                     &addr);

        if (getenv("FUZZ_VERBOSE")) {
            fprintf(stderr, "rc=%d slot=%u port=%u\n", (int) rc,
                    (unsigned) slot, (unsigned) addr.port);
        }

        if (rc != NGX_DECLINED) {
            check(rc == NGX_HTTP_INFER_RL_MOVED
                  || rc == NGX_HTTP_INFER_RL_ASK);
            check(slot < NGX_HTTP_INFER_RL_SLOTS);
            check(addr.addr != 0 && addr.port != 0);
            check(memcmp(p, rc == NGX_HTTP_INFER_RL_MOVED ? "MOVED " : "ASK ",
                         rc == NGX_HTTP_INFER_RL_MOVED ? 6 : 4) == 0);
        }

        break;

    default:
        rc = ngx_http_infer_ratelimit_nodes_parse(p, size - 1, &nodes);

        n = 0;

        for (i = 0; i < NGX_HTTP_INFER_RL_SLOTS; i++) {
            check(nodes.slot[i] <= nodes.n);
            n += (nodes.slot[i] != 0);
        }

        if (getenv("FUZZ_VERBOSE")) {
            fprintf(stderr, "rc=%d masters=%u slots=%u\n", (int) rc,
                    (unsigned) nodes.n, (unsigned) n);
        }

        check(nodes.n <= NGX_HTTP_INFER_RL_NODES_MAX);

        if (rc == NGX_OK) {
            check(n > 0);

            for (i = 0; i < nodes.n; i++) {
                check(nodes.node[i].port != 0);
            }

            check_nodes(p, size - 1, &nodes);
        }

        break;
    }

    free(p);

    return 0;
}


/*
 * The slot as Redis documents it: if the key has a "{", and a "}" after
 * it with at least one byte between, only those bytes are hashed; then
 * CRC16 (XMODEM) of them, bit by bit, modulo 16384.
 */

static unsigned
oracle_slot(const unsigned char *p, size_t len)
{
    size_t    s, e, from, to;
    unsigned  crc, bit;

    from = 0;
    to = len;

    for (s = 0; s < len; s++) {
        if (p[s] == '{') {
            break;
        }
    }

    if (s < len) {
        for (e = s + 1; e < len; e++) {
            if (p[e] == '}') {
                break;
            }
        }

        if (e < len && e != s + 1) {
            from = s + 1;
            to = e;
        }
    }

    crc = 0;

    for (s = from; s < to; s++) {
        crc ^= (unsigned) p[s] << 8;

        for (bit = 0; bit < 8; bit++) {
            crc = (crc & 0x8000) ? ((crc << 1) ^ 0x1021) : (crc << 1);
            crc &= 0xffff;
        }
    }

    return crc % 16384;
}


/*
 * Each line split on spaces again: a line whose third word has the flag
 * "master" (and neither "handshake" nor "noaddr") owns the slots listed
 * from its ninth word on, unless a later master line lists them too; the
 * node it names has the line's port.
 */

static void
check_nodes(const unsigned char *p, size_t len,
    ngx_http_infer_ratelimit_nodes_t *nodes)
{
    char           *line, *save, *word, *save2, *flags, *addr, *colon;
    char           *text, *at;
    int             nw, master, a, b, k;
    static int      owner[NGX_HTTP_INFER_RL_SLOTS];
    static int      port[NGX_HTTP_INFER_RL_SLOTS];

    memset(owner, 0, sizeof(owner));

    text = malloc(len + 1);
    if (text == NULL) {
        return;
    }

    memcpy(text, p, len);
    text[len] = '\0';

    if (strlen(text) != len) {
        /* a NUL inside: strtok would stop there */
        free(text);
        return;
    }

    for (line = strtok_r(text, "\n", &save); line;
         line = strtok_r(NULL, "\n", &save))
    {
        if (line[0] && line[strlen(line) - 1] == '\r') {
            line[strlen(line) - 1] = '\0';
        }

        nw = 0;
        master = 0;
        flags = NULL;
        addr = NULL;

        for (word = strtok_r(line, " ", &save2); word;
             word = strtok_r(NULL, " ", &save2))
        {
            nw++;

            if (nw == 2) {
                addr = word;

            } else if (nw == 3) {
                flags = word;
                master = has_flag(flags, "master")
                         && !has_flag(flags, "handshake")
                         && !has_flag(flags, "noaddr");

            } else if (nw >= 9 && master && word[0] != '[') {
                /* a parsed input's words are N or N-M: see the parser */
                if (sscanf(word, "%d-%d", &a, &b) != 2) {
                    a = b = atoi(word);
                }

                at = strchr(addr, '@');
                if (at) {
                    *at = '\0';
                }

                colon = strrchr(addr, ':');

                for (k = a; k <= b && k >= 0
                     && k < NGX_HTTP_INFER_RL_SLOTS; k++)
                {
                    owner[k] = 1;
                    port[k] = colon ? atoi(colon + 1) : 0;
                }
            }
        }

    }

    for (k = 0; k < NGX_HTTP_INFER_RL_SLOTS; k++) {
        check((nodes->slot[k] != 0) == owner[k]);

        if (owner[k]) {
            check(nodes->node[nodes->slot[k] - 1].port == port[k]);
        }
    }

    free(text);
}


/* the comma-separated words of flags, one of them flag */

static int
has_flag(const char *flags, const char *flag)
{
    size_t       n;
    const char  *p, *comma;

    n = strlen(flag);

    for (p = flags; ; p = comma + 1) {
        comma = strchr(p, ',');

        if ((comma ? (size_t) (comma - p) : strlen(p)) == n
            && strncmp(p, flag, n) == 0)
        {
            return 1;
        }

        if (comma == NULL) {
            return 0;
        }
    }
}

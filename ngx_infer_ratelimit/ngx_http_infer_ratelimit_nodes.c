
/*
 * Copyright (C) ngx_infer authors
 *
 * What a Redis Cluster client needs to know without a connection: the
 * slot of a key (Redis's rule: CRC16 of the key, or of its hash tag, the
 * part between the first "{" and the next "}" when it is not empty,
 * modulo 16384), and which master serves which slot, read from the text
 * that CLUSTER NODES answers.  Pure: bytes in, a table out, so that a
 * fuzzer can drive them (t/unit/ratelimit_nodes_fuzz.c).
 *
 * CLUSTER NODES answers a line per node:
 *
 *   <id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent>
 *       <pong-recv> <config-epoch> <link-state> <slot> <slot> ...
 *
 * flags are comma-separated (myself, master, slave, fail?, fail,
 * handshake, noaddr, ...); a slot is "N", "N-M", or "[N->-id]" and
 * "[N-<-id]" for a slot being moved, which the moving master still
 * serves and which are not listed otherwise.  CLUSTER NODES is used
 * rather than CLUSTER SLOTS or SHARDS because its answer is one string:
 * the client's reader refuses nested arrays (see the Redis client).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer_ratelimit.h"


static ngx_int_t ngx_http_infer_ratelimit_nodes_line(u_char *p, u_char *last,
    ngx_http_infer_ratelimit_nodes_t *nodes);
static ngx_int_t ngx_http_infer_ratelimit_nodes_slots(u_char *p,
    u_char *last, ngx_uint_t *first, ngx_uint_t *end);
static ngx_uint_t ngx_http_infer_ratelimit_nodes_flag(u_char *p,
    u_char *last, const char *flag);
static ngx_int_t ngx_http_infer_ratelimit_nodes_addr(u_char *p, u_char *last,
    ngx_http_infer_ratelimit_node_addr_t *addr);


static uint16_t    ngx_http_infer_ratelimit_crc16[256];
static ngx_uint_t  ngx_http_infer_ratelimit_crc16_made;


/* CRC16-CCITT (XMODEM): polynomial 0x1021, initial 0, as Redis's */

ngx_uint_t
ngx_http_infer_ratelimit_slot(u_char *key, size_t len)
{
    u_char      *p, *last, *open, *close;
    uint16_t     crc;
    ngx_uint_t   i, b;

    if (!ngx_http_infer_ratelimit_crc16_made) {
        for (i = 0; i < 256; i++) {
            crc = (uint16_t) (i << 8);

            for (b = 0; b < 8; b++) {
                crc = (crc & 0x8000) ? (uint16_t) ((crc << 1) ^ 0x1021)
                                     : (uint16_t) (crc << 1);
            }

            ngx_http_infer_ratelimit_crc16[i] = crc;
        }

        ngx_http_infer_ratelimit_crc16_made = 1;
    }

    p = key;
    last = key + len;

    open = ngx_strlchr(p, last, '{');

    if (open) {
        close = ngx_strlchr(open + 1, last, '}');

        if (close && close > open + 1) {
            p = open + 1;
            last = close;
        }
    }

    crc = 0;

    while (p < last) {
        crc = (uint16_t) ((crc << 8)
                          ^ ngx_http_infer_ratelimit_crc16[
                                ((crc >> 8) ^ *p++) & 0xff]);
    }

    return crc & (NGX_HTTP_INFER_RL_SLOTS - 1);
}


/*
 * The masters and their slots.  NGX_OK: every line was understood and at
 * least one slot has a master; NGX_DECLINED otherwise (nodes then holds
 * what was read, which the caller does not use).
 */

ngx_int_t
ngx_http_infer_ratelimit_nodes_parse(u_char *p, size_t len,
    ngx_http_infer_ratelimit_nodes_t *nodes)
{
    u_char      *last, *eol;
    ngx_uint_t   i;

    nodes->n = 0;
    ngx_memzero(nodes->slot, sizeof(nodes->slot));

    last = p + len;

    while (p < last) {
        eol = ngx_strlchr(p, last, '\n');
        if (eol == NULL) {
            eol = last;
        }

        if (eol > p && eol[-1] == '\r') {
            if (ngx_http_infer_ratelimit_nodes_line(p, eol - 1, nodes)
                != NGX_OK)
            {
                return NGX_DECLINED;
            }

        } else if (eol > p
                   && ngx_http_infer_ratelimit_nodes_line(p, eol, nodes)
                      != NGX_OK)
        {
            return NGX_DECLINED;
        }

        p = eol + 1;
    }

    for (i = 0; i < NGX_HTTP_INFER_RL_SLOTS; i++) {
        if (nodes->slot[i]) {
            return NGX_OK;
        }
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_infer_ratelimit_nodes_line(u_char *p, u_char *last,
    ngx_http_infer_ratelimit_nodes_t *nodes)
{
    u_char                                *field[8], *end[8], *q;
    ngx_uint_t                             i, k, first, stop, index;
    ngx_http_infer_ratelimit_node_addr_t   addr;

    /* the eight fields ahead of the slots */

    for (i = 0; i < 8; i++) {
        while (p < last && *p == ' ') {
            p++;
        }

        if (p == last) {
            return NGX_DECLINED;
        }

        field[i] = p;

        while (p < last && *p != ' ') {
            p++;
        }

        end[i] = p;
    }

    if (!ngx_http_infer_ratelimit_nodes_flag(field[2], end[2], "master")
        || ngx_http_infer_ratelimit_nodes_flag(field[2], end[2], "handshake")
        || ngx_http_infer_ratelimit_nodes_flag(field[2], end[2], "noaddr"))
    {
        /* a replica, or a master nobody can reach yet: no slots */
        return NGX_OK;
    }

    index = 0;

    for ( ;; ) {
        while (p < last && *p == ' ') {
            p++;
        }

        if (p == last) {
            break;
        }

        q = p;

        while (p < last && *p != ' ') {
            p++;
        }

        if (*q == '[') {
            /* a slot moving in or out: its master is listed otherwise */
            continue;
        }

        if (ngx_http_infer_ratelimit_nodes_slots(q, p, &first, &stop)
            != NGX_OK)
        {
            return NGX_DECLINED;
        }

        if (index == 0) {
            /* the node's address, once it has slots */

            if (ngx_http_infer_ratelimit_nodes_addr(field[1], end[1], &addr)
                != NGX_OK)
            {
                return NGX_DECLINED;
            }

            for (k = 0; k < nodes->n; k++) {
                if (nodes->node[k].addr == addr.addr
                    && nodes->node[k].port == addr.port)
                {
                    break;
                }
            }

            if (k == nodes->n) {
                if (nodes->n == NGX_HTTP_INFER_RL_NODES_MAX) {
                    return NGX_DECLINED;
                }

                nodes->node[nodes->n++] = addr;
            }

            index = k + 1;
        }

        for (k = first; k <= stop; k++) {
            nodes->slot[k] = (uint16_t) index;
        }
    }

    return NGX_OK;
}


/*
 * A cluster's redirection: "MOVED <slot> <ip>:<port>" or "ASK <slot>
 * <ip>:<port>" (NGX_HTTP_INFER_RL_MOVED, _ASK), or another error
 * (NGX_DECLINED).
 */

ngx_int_t
ngx_http_infer_ratelimit_nodes_redirect(u_char *p, size_t len,
    ngx_uint_t *slot, ngx_http_infer_ratelimit_node_addr_t *addr)
{
    u_char     *last, *space;
    ngx_int_t   rc, n;

    last = p + len;

    if (len > 6 && ngx_strncmp(p, "MOVED ", 6) == 0) {
        rc = NGX_HTTP_INFER_RL_MOVED;
        p += 6;

    } else if (len > 4 && ngx_strncmp(p, "ASK ", 4) == 0) {
        rc = NGX_HTTP_INFER_RL_ASK;
        p += 4;

    } else {
        return NGX_DECLINED;
    }

    space = ngx_strlchr(p, last, ' ');
    if (space == NULL) {
        return NGX_DECLINED;
    }

    n = ngx_atoi(p, space - p);
    if (n == NGX_ERROR || n >= NGX_HTTP_INFER_RL_SLOTS) {
        return NGX_DECLINED;
    }

    if (ngx_http_infer_ratelimit_nodes_addr(space + 1, last, addr) != NGX_OK
        || addr->addr == 0)
    {
        return NGX_DECLINED;
    }

    *slot = (ngx_uint_t) n;

    return rc;
}


/*
 * "ip:port@cport" or "ip:port@cport,hostname", IPv4 only (the client
 * connects to addresses, never names); ":port@cport", the answering
 * node that does not know its own address yet, gives addr 0.
 */

static ngx_int_t
ngx_http_infer_ratelimit_nodes_addr(u_char *p, u_char *last,
    ngx_http_infer_ratelimit_node_addr_t *addr)
{
    u_char     *at, *colon;
    ngx_int_t   port;

    at = ngx_strlchr(p, last, '@');
    if (at) {
        last = at;
    }

    colon = NULL;

    for (at = p; at < last; at++) {
        if (*at == ':') {
            colon = at;
        }
    }

    if (colon == NULL) {
        return NGX_DECLINED;
    }

    port = ngx_atoi(colon + 1, last - colon - 1);
    if (port < 1 || port > 65535) {
        return NGX_DECLINED;
    }

    addr->port = (in_port_t) port;

    if (colon == p) {
        addr->addr = 0;
        return NGX_OK;
    }

    addr->addr = ngx_inet_addr(p, colon - p);

    if (addr->addr == INADDR_NONE || addr->addr == 0) {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/* "N" or "N-M", 0 <= N <= M < 16384 */

static ngx_int_t
ngx_http_infer_ratelimit_nodes_slots(u_char *p, u_char *last,
    ngx_uint_t *first, ngx_uint_t *end)
{
    u_char     *dash;
    ngx_int_t   a, b;

    dash = ngx_strlchr(p, last, '-');

    a = ngx_atoi(p, (dash ? dash : last) - p);
    b = dash ? ngx_atoi(dash + 1, last - dash - 1) : a;

    if (a == NGX_ERROR || b == NGX_ERROR || a > b
        || b >= NGX_HTTP_INFER_RL_SLOTS)
    {
        return NGX_DECLINED;
    }

    *first = (ngx_uint_t) a;
    *end = (ngx_uint_t) b;

    return NGX_OK;
}


/* whether a comma-separated list of flags holds this one */

static ngx_uint_t
ngx_http_infer_ratelimit_nodes_flag(u_char *p, u_char *last,
    const char *flag)
{
    u_char  *comma;
    size_t   len;

    len = ngx_strlen(flag);

    while (p < last) {
        comma = ngx_strlchr(p, last, ',');
        if (comma == NULL) {
            comma = last;
        }

        if ((size_t) (comma - p) == len && ngx_strncmp(p, flag, len) == 0) {
            return 1;
        }

        p = comma + 1;
    }

    return 0;
}

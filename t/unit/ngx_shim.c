/*
 * Copyright (C) ngx_infer authors
 *
 * The few nginx core functions the modules' parsers call, for their
 * fuzzers: Debian's nginx-dev tree (build/nginx-src) has nginx's headers
 * and none of its .c files.  Test-only, written for what the linker asks
 * and no more, to the contracts of nginx 1.22's own:
 *
 *   - a pool is a list of malloc()ed blocks, each its own allocation, so
 *     that ASan sees a read past any of them; ngx_destroy_pool() runs the
 *     cleanups, then frees them all.  A pool that grows past
 *     NGX_SHIM_POOL_MAX bytes aborts: what a parser keeps is bounded;
 *   - ngx_hash_*: exact names only, as nginx keeps them (the key hashed
 *     by the caller's function, the name stored in lower case, a lookup
 *     comparing bytes), not nginx's bucket packing;
 *   - ngx_regex_*: PCRE2, as nginx's NGX_PCRE2 build, or PCRE1 on a tree
 *     configured --without-pcre2 (ingress-nginx's).
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ngx_http.h>        /* and, by ngx_regex.h, pcre2.h */


#define NGX_SHIM_POOL_MAX  (64 * 1024 * 1024)


typedef struct ngx_shim_block_s  ngx_shim_block_t;

struct ngx_shim_block_s {
    ngx_shim_block_t  *next;
    size_t             size;
};


typedef struct {
    ngx_pool_t         pool;        /* first: a pool is one of these */
    ngx_shim_block_t  *blocks;
    size_t             bytes;
} ngx_shim_pool_t;


#define ngx_shim_blocks(p)  (((ngx_shim_pool_t *) (p))->blocks)
#define ngx_shim_bytes(p)   (((ngx_shim_pool_t *) (p))->bytes)


ngx_uint_t             ngx_cacheline_size = 64;

static ngx_time_t      ngx_shim_time = { 1700000000, 0, 0 };
volatile ngx_time_t   *ngx_cached_time = &ngx_shim_time;


ngx_pool_t *
ngx_create_pool(size_t size, ngx_log_t *log)
{
    ngx_pool_t  *p;

    (void) size;

    p = calloc(1, sizeof(ngx_shim_pool_t));
    if (p == NULL) {
        return NULL;
    }

    p->log = log;

    return p;
}


void
ngx_destroy_pool(ngx_pool_t *pool)
{
    ngx_pool_cleanup_t  *c;
    ngx_shim_block_t    *b, *next;

    /* the cleanups' records are blocks: freed below, after them all */

    for (c = pool->cleanup; c; c = c->next) {
        if (c->handler) {
            c->handler(c->data);
        }
    }

    for (b = ngx_shim_blocks(pool); b; b = next) {
        next = b->next;
        free(b);
    }

    free(pool);
}


void *
ngx_palloc(ngx_pool_t *pool, size_t size)
{
    ngx_shim_block_t  *b;

    if (size > NGX_SHIM_POOL_MAX - ngx_shim_bytes(pool)) {
        fprintf(stderr, "ngx_shim: a pool grew past %d bytes\n",
                NGX_SHIM_POOL_MAX);
        abort();
    }

    /* the header keeps the block aligned as ngx_palloc()'s are */

    b = malloc(ngx_align(sizeof(ngx_shim_block_t), NGX_ALIGNMENT) + size);
    if (b == NULL) {
        return NULL;
    }

    b->next = ngx_shim_blocks(pool);
    b->size = size;
    ngx_shim_blocks(pool) = b;
    ngx_shim_bytes(pool) += size;

    return (u_char *) b + ngx_align(sizeof(ngx_shim_block_t), NGX_ALIGNMENT);
}


void *
ngx_pnalloc(ngx_pool_t *pool, size_t size)
{
    return ngx_palloc(pool, size);
}


void *
ngx_pcalloc(ngx_pool_t *pool, size_t size)
{
    void  *p;

    p = ngx_palloc(pool, size);
    if (p) {
        ngx_memzero(p, size);
    }

    return p;
}


ngx_pool_cleanup_t *
ngx_pool_cleanup_add(ngx_pool_t *p, size_t size)
{
    ngx_pool_cleanup_t  *c;

    c = ngx_palloc(p, sizeof(ngx_pool_cleanup_t));
    if (c == NULL) {
        return NULL;
    }

    if (size) {
        c->data = ngx_palloc(p, size);
        if (c->data == NULL) {
            return NULL;
        }

    } else {
        c->data = NULL;
    }

    c->handler = NULL;
    c->next = p->cleanup;
    p->cleanup = c;

    return c;
}


void *
ngx_array_push(ngx_array_t *a)
{
    return ngx_array_push_n(a, 1);
}


void *
ngx_array_push_n(ngx_array_t *a, ngx_uint_t n)
{
    void        *elt, *new;
    ngx_uint_t   nalloc;

    if (a->nelts + n > a->nalloc) {
        nalloc = 2 * ((n >= a->nalloc) ? n : a->nalloc);

        new = ngx_palloc(a->pool, nalloc * a->size);
        if (new == NULL) {
            return NULL;
        }

        if (a->nelts) {
            ngx_memcpy(new, a->elts, a->nelts * a->size);
        }

        a->elts = new;
        a->nalloc = nalloc;
    }

    elt = (u_char *) a->elts + a->size * a->nelts;
    a->nelts += n;

    return elt;
}


void
ngx_strlow(u_char *dst, u_char *src, size_t n)
{
    while (n) {
        *dst = ngx_tolower(*src);
        dst++;
        src++;
        n--;
    }
}


u_char *
ngx_pstrdup(ngx_pool_t *pool, ngx_str_t *src)
{
    u_char  *dst;

    dst = ngx_pnalloc(pool, src->len);
    if (dst == NULL) {
        return NULL;
    }

    ngx_memcpy(dst, src->data, src->len);

    return dst;
}


u_char *
ngx_strlcasestrn(u_char *s1, u_char *last, u_char *s2, size_t n)
{
    ngx_uint_t  c1, c2;

    /* as nginx's: n is the length of s2 less one */

    c2 = (ngx_uint_t) *s2++;
    c2 = (c2 >= 'A' && c2 <= 'Z') ? (c2 | 0x20) : c2;
    last -= n;

    do {
        do {
            if (s1 >= last) {
                return NULL;
            }

            c1 = (ngx_uint_t) *s1++;
            c1 = (c1 >= 'A' && c1 <= 'Z') ? (c1 | 0x20) : c1;

        } while (c1 != c2);

    } while (ngx_strncasecmp(s1, s2, n) != 0);

    return --s1;
}


ngx_int_t
ngx_strncasecmp(u_char *s1, u_char *s2, size_t n)
{
    ngx_uint_t  c1, c2;

    while (n) {
        c1 = (ngx_uint_t) *s1++;
        c2 = (ngx_uint_t) *s2++;

        c1 = (c1 >= 'A' && c1 <= 'Z') ? (c1 | 0x20) : c1;
        c2 = (c2 >= 'A' && c2 <= 'Z') ? (c2 | 0x20) : c2;

        if (c1 == c2) {
            if (c1) {
                n--;
                continue;
            }

            return 0;
        }

        return c1 - c2;
    }

    return 0;
}


ngx_int_t
ngx_atoi(u_char *line, size_t n)
{
    ngx_int_t  value, cutoff, cutlim;

    if (n == 0) {
        return NGX_ERROR;
    }

    cutoff = NGX_MAX_INT_T_VALUE / 10;
    cutlim = NGX_MAX_INT_T_VALUE % 10;

    for (value = 0; n--; line++) {
        if (*line < '0' || *line > '9') {
            return NGX_ERROR;
        }

        if (value >= cutoff && (value > cutoff || *line - '0' > cutlim)) {
            return NGX_ERROR;
        }

        value = value * 10 + (*line - '0');
    }

    return value;
}


/* a dotted quad, four numbers of 0..255: nginx 1.22's contract */

in_addr_t
ngx_inet_addr(u_char *text, size_t len)
{
    u_char      *p, c;
    in_addr_t    addr;
    ngx_uint_t   octet, n;

    addr = 0;
    octet = 0;
    n = 0;

    for (p = text; p < text + len; p++) {
        c = *p;

        if (c >= '0' && c <= '9') {
            octet = octet * 10 + (c - '0');

            if (octet > 255) {
                return INADDR_NONE;
            }

            continue;
        }

        if (c == '.') {
            addr = (addr << 8) + octet;
            octet = 0;
            n++;
            continue;
        }

        return INADDR_NONE;
    }

    if (n == 3) {
        addr = (addr << 8) + octet;
        return htonl(addr);
    }

    return INADDR_NONE;
}


ngx_int_t
ngx_hextoi(u_char *line, size_t n)
{
    u_char     c, ch;
    ngx_int_t  value, cutoff;

    if (n == 0) {
        return NGX_ERROR;
    }

    cutoff = NGX_MAX_INT_T_VALUE / 16;

    for (value = 0; n--; line++) {
        if (value > cutoff) {
            return NGX_ERROR;
        }

        ch = *line;

        if (ch >= '0' && ch <= '9') {
            value = value * 16 + (ch - '0');
            continue;
        }

        c = (u_char) (ch | 0x20);

        if (c >= 'a' && c <= 'f') {
            value = value * 16 + (c - 'a' + 10);
            continue;
        }

        return NGX_ERROR;
    }

    return value;
}


off_t
ngx_parse_offset(ngx_str_t *line)
{
    u_char  unit;
    off_t   offset, scale, max;
    size_t  len;

    len = line->len;

    if (len == 0) {
        return NGX_ERROR;
    }

    unit = line->data[len - 1];

    switch (unit) {
    case 'K':
    case 'k':
        len--;
        max = NGX_MAX_OFF_T_VALUE / 1024;
        scale = 1024;
        break;

    case 'M':
    case 'm':
        len--;
        max = NGX_MAX_OFF_T_VALUE / (1024 * 1024);
        scale = 1024 * 1024;
        break;

    case 'G':
    case 'g':
        len--;
        max = NGX_MAX_OFF_T_VALUE / (1024 * 1024 * 1024);
        scale = 1024 * 1024 * 1024;
        break;

    default:
        max = NGX_MAX_OFF_T_VALUE;
        scale = 1;
    }

    offset = ngx_atoof(line->data, len);
    if (offset == NGX_ERROR || offset > max) {
        return NGX_ERROR;
    }

    return offset * scale;
}


off_t
ngx_atoof(u_char *line, size_t n)
{
    off_t  value, cutoff, cutlim;

    if (n == 0) {
        return NGX_ERROR;
    }

    cutoff = NGX_MAX_OFF_T_VALUE / 10;
    cutlim = NGX_MAX_OFF_T_VALUE % 10;

    for (value = 0; n--; line++) {
        if (*line < '0' || *line > '9') {
            return NGX_ERROR;
        }

        if (value >= cutoff && (value > cutoff || *line - '0' > cutlim)) {
            return NGX_ERROR;
        }

        value = value * 10 + (*line - '0');
    }

    return value;
}


/* nginx's insertion sort: stable, as callers may expect */

void
ngx_sort(void *base, size_t n, size_t size,
    ngx_int_t (*cmp)(const void *, const void *))
{
    u_char  *p1, *p2, *p;

    p = malloc(size);
    if (p == NULL) {
        abort();
    }

    for (p1 = (u_char *) base + size;
         p1 < (u_char *) base + n * size;
         p1 += size)
    {
        ngx_memcpy(p, p1, size);

        for (p2 = p1;
             p2 > (u_char *) base && cmp(p2 - size, p) > 0;
             p2 -= size)
        {
            ngx_memcpy(p2, p2 - size, size);
        }

        ngx_memcpy(p2, p, size);
    }

    free(p);
}


static ngx_int_t
ngx_shim_decode_base64(ngx_str_t *dst, ngx_str_t *src, const u_char *basis)
{
    size_t   len;
    u_char  *d, *s;

    for (len = 0; len < src->len; len++) {
        if (src->data[len] == '=') {
            break;
        }

        if (basis[src->data[len]] == 77) {
            return NGX_ERROR;
        }
    }

    if (len % 4 == 1) {
        return NGX_ERROR;
    }

    s = src->data;
    d = dst->data;

    while (len > 3) {
        *d++ = (u_char) (basis[s[0]] << 2 | basis[s[1]] >> 4);
        *d++ = (u_char) (basis[s[1]] << 4 | basis[s[2]] >> 2);
        *d++ = (u_char) (basis[s[2]] << 6 | basis[s[3]]);

        s += 4;
        len -= 4;
    }

    if (len > 1) {
        *d++ = (u_char) (basis[s[0]] << 2 | basis[s[1]] >> 4);
    }

    if (len > 2) {
        *d++ = (u_char) (basis[s[1]] << 4 | basis[s[2]] >> 2);
    }

    dst->len = d - dst->data;

    return NGX_OK;
}


/* nginx's table: 77 is no digit */

ngx_int_t
ngx_decode_base64url(ngx_str_t *dst, ngx_str_t *src)
{
    static u_char  basis64[] = {
        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77,
        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77,
        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 62, 77, 77,
        52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 77, 77, 77, 77, 77, 77,
        77,  0,  1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12, 13, 14,
        15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 77, 77, 77, 77, 63,
        77, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
        41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 77, 77, 77, 77, 77,

        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77,
        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77,
        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77,
        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77,
        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77,
        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77,
        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77,
        77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77, 77
    };

    return ngx_shim_decode_base64(dst, src, basis64);
}


u_char * ngx_cdecl
ngx_sprintf(u_char *buf, const char *fmt, ...)
{
    u_char   *p;
    va_list   args;

    va_start(args, fmt);
    p = ngx_vslprintf(buf, (void *) -1, fmt, args);
    va_end(args);

    return p;
}


u_char * ngx_cdecl
ngx_snprintf(u_char *buf, size_t max, const char *fmt, ...)
{
    u_char   *p;
    va_list   args;

    va_start(args, fmt);
    p = ngx_vslprintf(buf, buf + max, fmt, args);
    va_end(args);

    return p;
}


u_char * ngx_cdecl
ngx_slprintf(u_char *buf, u_char *last, const char *fmt, ...)
{
    u_char   *p;
    va_list   args;

    va_start(args, fmt);
    p = ngx_vslprintf(buf, last, fmt, args);
    va_end(args);

    return p;
}


static u_char *
ngx_shim_num(u_char *buf, u_char *last, uint64_t ui64, u_char zero,
    ngx_uint_t hexadecimal, ngx_uint_t width)
{
    u_char      *p, temp[NGX_INT64_LEN + 1];
    size_t       len;
    const char  *digits;

    digits = (hexadecimal == 2) ? "0123456789ABCDEF" : "0123456789abcdef";
    p = temp + NGX_INT64_LEN;

    do {
        *--p = digits[hexadecimal ? ui64 & 0xf : ui64 % 10];
        ui64 = hexadecimal ? ui64 >> 4 : ui64 / 10;
    } while (ui64);

    len = (temp + NGX_INT64_LEN) - p;

    while (len++ < width && buf < last) {
        *buf++ = zero;
    }

    len = (temp + NGX_INT64_LEN) - p;

    if (buf + len > last) {
        len = last - buf;
    }

    return ngx_cpymem(buf, p, len);
}


/*
 * nginx's formats: %[0][width][x|X][u]{V,s,*s,d,i,l,D,L,z,O,T,M,p,c,%,N,Z};
 * what nginx prints, byte for byte, for those the modules use.
 */

u_char *
ngx_vslprintf(u_char *buf, u_char *last, const char *fmt, va_list args)
{
    u_char      *p, zero;
    int64_t      i64;
    uint64_t     ui64;
    size_t       len, slen;
    ngx_str_t   *v;
    ngx_uint_t   width, sign, hex;

    while (*fmt && buf < last) {

        if (*fmt != '%') {
            *buf++ = *fmt++;
            continue;
        }

        i64 = 0;
        ui64 = 0;

        zero = (u_char) ((*++fmt == '0') ? '0' : ' ');
        width = 0;
        sign = 1;
        hex = 0;
        slen = (size_t) -1;

        while (*fmt >= '0' && *fmt <= '9') {
            width = width * 10 + (*fmt++ - '0');
        }

        for ( ;; ) {
            switch (*fmt) {

            case 'u':
                sign = 0;
                fmt++;
                continue;

            case 'x':
                hex = 1;
                sign = 0;
                fmt++;
                continue;

            case 'X':
                hex = 2;
                sign = 0;
                fmt++;
                continue;

            case '*':
                slen = va_arg(args, size_t);
                fmt++;
                continue;

            default:
                break;
            }

            break;
        }

        switch (*fmt) {

        case 'V':
            v = va_arg(args, ngx_str_t *);

            /*
             * nginx 1.22 copies even an empty string, whose data may be
             * NULL (ngx_str_null): memcpy(buf, NULL, 0), harmless but
             * undefined, which UBSan would stop at in nginx's code
             */
            len = ngx_min((size_t) (last - buf), v->len);

            if (len) {
                buf = ngx_cpymem(buf, v->data, len);
            }

            fmt++;
            continue;

        case 's':
            p = va_arg(args, u_char *);

            if (slen == (size_t) -1) {
                while (*p && buf < last) {
                    *buf++ = *p++;
                }

            } else {
                len = ngx_min((size_t) (last - buf), slen);

                if (len) {
                    buf = ngx_cpymem(buf, p, len);
                }
            }

            fmt++;
            continue;

        case 'O':
            i64 = (int64_t) va_arg(args, off_t);
            sign = 1;
            break;

        case 'T':
            i64 = (int64_t) va_arg(args, time_t);
            sign = 1;
            break;

        case 'M':
            ui64 = (uint64_t) va_arg(args, ngx_msec_t);
            if ((ngx_msec_int_t) ui64 == -1) {
                sign = 1;
                i64 = -1;

            } else {
                sign = 0;
            }
            break;

        case 'z':
            if (sign) {
                i64 = (int64_t) va_arg(args, ssize_t);
            } else {
                ui64 = (uint64_t) va_arg(args, size_t);
            }
            break;

        case 'i':
            if (sign) {
                i64 = (int64_t) va_arg(args, ngx_int_t);
            } else {
                ui64 = (uint64_t) va_arg(args, ngx_uint_t);
            }
            break;

        case 'd':
            if (sign) {
                i64 = (int64_t) va_arg(args, int);
            } else {
                ui64 = (uint64_t) va_arg(args, u_int);
            }
            break;

        case 'l':
            if (sign) {
                i64 = (int64_t) va_arg(args, long);
            } else {
                ui64 = (uint64_t) va_arg(args, u_long);
            }
            break;

        case 'D':
            if (sign) {
                i64 = (int64_t) va_arg(args, int32_t);
            } else {
                ui64 = (uint64_t) va_arg(args, uint32_t);
            }
            break;

        case 'L':
            if (sign) {
                i64 = va_arg(args, int64_t);
            } else {
                ui64 = va_arg(args, uint64_t);
            }
            break;

        case 'p':
            ui64 = (uintptr_t) va_arg(args, void *);
            hex = 2;
            sign = 0;
            zero = '0';
            width = 2 * sizeof(void *);
            break;

        case 'c':
            *buf++ = (u_char) (va_arg(args, int) & 0xff);
            fmt++;
            continue;

        case 'Z':
            *buf++ = '\0';
            fmt++;
            continue;

        case 'N':
            *buf++ = LF;
            fmt++;
            continue;

        case '%':
            *buf++ = '%';
            fmt++;
            continue;

        default:
            *buf++ = *fmt++;
            continue;
        }

        if (sign) {
            if (i64 < 0) {
                *buf++ = '-';
                ui64 = (uint64_t) -(i64 + 1) + 1;

            } else {
                ui64 = (uint64_t) i64;
            }
        }

        buf = ngx_shim_num(buf, last, ui64, zero, hex, width);

        fmt++;
    }

    return buf;
}


ngx_uint_t
ngx_hash_key(u_char *data, size_t len)
{
    ngx_uint_t  i, key;

    key = 0;

    for (i = 0; i < len; i++) {
        key = ngx_hash(key, data[i]);
    }

    return key;
}


ngx_uint_t
ngx_hash_strlow(u_char *dst, u_char *src, size_t n)
{
    ngx_uint_t  key;

    key = 0;

    while (n--) {
        *dst = ngx_tolower(*src);
        key = ngx_hash(key, *dst);
        dst++;
        src++;
    }

    return key;
}


/* exact keys only: NGX_HASH_SMALL's hsize, nginx's conflict check */

ngx_int_t
ngx_hash_keys_array_init(ngx_hash_keys_arrays_t *ha, ngx_uint_t type)
{
    ha->hsize = (type == NGX_HASH_SMALL) ? 107 : 10007;

    if (ngx_array_init(&ha->keys, ha->temp_pool, 4, sizeof(ngx_hash_key_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ha->keys_hash = ngx_pcalloc(ha->temp_pool,
                                sizeof(ngx_array_t) * ha->hsize);
    if (ha->keys_hash == NULL) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_int_t
ngx_hash_add_key(ngx_hash_keys_arrays_t *ha, ngx_str_t *key, void *value,
    ngx_uint_t flags)
{
    ngx_str_t       *name;
    ngx_uint_t       i, k;
    ngx_hash_key_t  *hk;

    if (key->len > 65535 || (flags & NGX_HASH_WILDCARD_KEY)) {
        return NGX_ERROR;
    }

    k = 0;

    for (i = 0; i < key->len; i++) {
        if (!(flags & NGX_HASH_READONLY_KEY)) {
            key->data[i] = ngx_tolower(key->data[i]);
        }

        k = ngx_hash(k, key->data[i]);
    }

    k %= ha->hsize;

    /* as nginx: a key given twice, byte for byte, is NGX_BUSY */

    name = ha->keys_hash[k].elts;

    if (name) {
        for (i = 0; i < ha->keys_hash[k].nelts; i++) {
            if (key->len == name[i].len
                && ngx_strncmp(key->data, name[i].data, key->len) == 0)
            {
                return NGX_BUSY;
            }
        }

    } else if (ngx_array_init(&ha->keys_hash[k], ha->temp_pool, 4,
                              sizeof(ngx_str_t))
               != NGX_OK)
    {
        return NGX_ERROR;
    }

    name = ngx_array_push(&ha->keys_hash[k]);
    if (name == NULL) {
        return NGX_ERROR;
    }

    *name = *key;

    hk = ngx_array_push(&ha->keys);
    if (hk == NULL) {
        return NGX_ERROR;
    }

    hk->key = *key;
    hk->key_hash = ngx_hash_key(key->data, key->len);
    hk->value = value;

    return NGX_OK;
}


/*
 * As nginx's: the bucket is the key_hash the caller's function gave, the
 * name is kept in lower case, an element must fit bucket_size; unlike
 * nginx's, one bucket per key at most and no packing.
 */

#define ngx_shim_elt_size(name)                                             \
    (sizeof(void *) + ngx_align((name)->key.len + 2, sizeof(void *)))

ngx_int_t
ngx_hash_init(ngx_hash_init_t *hinit, ngx_hash_key_t *names, ngx_uint_t nelts)
{
    u_char          *elts;
    size_t           len;
    ngx_uint_t       i, n, size, *test;
    ngx_hash_elt_t  *elt, **buckets;

    for (n = 0; n < nelts; n++) {
        if (hinit->bucket_size < ngx_shim_elt_size(&names[n]) + sizeof(void *))
        {
            return NGX_ERROR;
        }
    }

    size = nelts ? nelts : 1;

    buckets = ngx_pcalloc(hinit->pool, size * sizeof(ngx_hash_elt_t *));
    test = calloc(size, sizeof(ngx_uint_t));

    if (buckets == NULL || test == NULL) {
        free(test);
        return NGX_ERROR;
    }

    for (n = 0; n < nelts; n++) {
        test[names[n].key_hash % size] += ngx_shim_elt_size(&names[n]);
    }

    for (i = 0; i < size; i++) {
        len = test[i] + sizeof(void *);

        elts = ngx_palloc(hinit->pool, len);
        if (elts == NULL) {
            free(test);
            return NGX_ERROR;
        }

        buckets[i] = (ngx_hash_elt_t *) elts;
        test[i] = 0;
    }

    for (n = 0; n < nelts; n++) {
        i = names[n].key_hash % size;
        elt = (ngx_hash_elt_t *) ((u_char *) buckets[i] + test[i]);

        elt->value = names[n].value;
        elt->len = (u_short) names[n].key.len;

        ngx_strlow(elt->name, names[n].key.data, names[n].key.len);

        test[i] += ngx_shim_elt_size(&names[n]);
    }

    for (i = 0; i < size; i++) {
        elt = (ngx_hash_elt_t *) ((u_char *) buckets[i] + test[i]);
        elt->value = NULL;
    }

    free(test);

    hinit->hash->buckets = buckets;
    hinit->hash->size = size;

    return NGX_OK;
}


void *
ngx_hash_find(ngx_hash_t *hash, ngx_uint_t key, u_char *name, size_t len)
{
    ngx_uint_t       i;
    ngx_hash_elt_t  *elt;

    elt = hash->buckets[key % hash->size];

    while (elt->value) {
        if (len == (size_t) elt->len) {
            for (i = 0; i < len; i++) {
                if (name[i] != elt->name[i]) {
                    goto next;
                }
            }

            return elt->value;
        }

    next:

        elt = (ngx_hash_elt_t *) ngx_align_ptr(&elt->name[0] + elt->len,
                                               sizeof(void *));
    }

    return NULL;
}


uint32_t
ngx_murmur_hash2(u_char *data, size_t len)
{
    uint32_t  h, k;

    h = 0 ^ len;

    while (len >= 4) {
        k  = data[0];
        k |= data[1] << 8;
        k |= data[2] << 16;
        k |= (uint32_t) data[3] << 24;

        k *= 0x5bd1e995;
        k ^= k >> 24;
        k *= 0x5bd1e995;

        h *= 0x5bd1e995;
        h ^= k;

        data += 4;
        len -= 4;
    }

    switch (len) {
    case 3:
        h ^= data[2] << 16;
        /* fall through */
    case 2:
        h ^= data[1] << 8;
        /* fall through */
    case 1:
        h ^= data[0];
        h *= 0x5bd1e995;
    }

    h ^= h >> 13;
    h *= 0x5bd1e995;
    h ^= h >> 15;

    return h;
}


#if (NGX_PCRE2)

static void
ngx_shim_regex_free(void *data)
{
    pcre2_code_free(data);
}


/* nginx's compile, its message; the code freed with rc->pool */

ngx_int_t
ngx_regex_compile(ngx_regex_compile_t *rc)
{
    int                  errcode;
    u_char               errstr[128];
    PCRE2_SIZE           erroff;
    pcre2_code          *re;
    ngx_pool_cleanup_t  *cln;

    cln = ngx_pool_cleanup_add(rc->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    re = pcre2_compile(rc->pattern.data, rc->pattern.len,
                       (rc->options & NGX_REGEX_CASELESS) ? PCRE2_CASELESS
                                                          : 0,
                       &errcode, &erroff, NULL);

    if (re == NULL) {
        pcre2_get_error_message(errcode, errstr, sizeof(errstr));

        if ((size_t) erroff == rc->pattern.len) {
            rc->err.len = ngx_snprintf(rc->err.data, rc->err.len,
                              "pcre2_compile() failed: %s in \"%V\"",
                               errstr, &rc->pattern)
                          - rc->err.data;

        } else {
            rc->err.len = ngx_snprintf(rc->err.data, rc->err.len,
                              "pcre2_compile() failed: %s in \"%V\" at "
                              "\"%s\"", errstr, &rc->pattern,
                              rc->pattern.data + erroff)
                          - rc->err.data;
        }

        return NGX_ERROR;
    }

    cln->handler = ngx_shim_regex_free;
    cln->data = re;

    rc->regex = re;

    pcre2_pattern_info(re, PCRE2_INFO_CAPTURECOUNT, &rc->captures);
    pcre2_pattern_info(re, PCRE2_INFO_NAMECOUNT, &rc->named_captures);

    return NGX_OK;
}


ngx_int_t
ngx_regex_exec(ngx_regex_t *re, ngx_str_t *s, int *captures, ngx_uint_t size)
{
    int                rc;
    pcre2_match_data  *md;

    (void) captures;

    if (size) {
        /* no caller here asks for captures */
        abort();
    }

    md = pcre2_match_data_create(1, NULL);
    if (md == NULL) {
        return NGX_ERROR;
    }

    rc = pcre2_match(re, s->data, s->len, 0, 0, md, NULL);

    pcre2_match_data_free(md);

    return rc;
}

#elif (NGX_PCRE)

static void
ngx_shim_regex_free(void *data)
{
    ngx_regex_t  *re = data;

    pcre_free(re->code);
}


ngx_int_t
ngx_regex_compile(ngx_regex_compile_t *rc)
{
    int                  erroff;
    u_char              *p;
    const char          *errstr;
    ngx_regex_t         *re;
    ngx_pool_cleanup_t  *cln;

    re = ngx_pcalloc(rc->pool, sizeof(ngx_regex_t));
    p = ngx_pnalloc(rc->pool, rc->pattern.len + 1);
    cln = ngx_pool_cleanup_add(rc->pool, 0);

    if (re == NULL || p == NULL || cln == NULL) {
        return NGX_ERROR;
    }

    /* PCRE1 takes a NUL-terminated pattern */
    *ngx_cpymem(p, rc->pattern.data, rc->pattern.len) = '\0';

    re->code = pcre_compile((const char *) p,
                            (rc->options & NGX_REGEX_CASELESS) ? PCRE_CASELESS
                                                               : 0,
                            &errstr, &erroff, NULL);

    if (re->code == NULL) {
        rc->err.len = ngx_snprintf(rc->err.data, rc->err.len,
                          "pcre_compile() failed: %s in \"%V\" at \"%s\"",
                          errstr, &rc->pattern, p + erroff)
                      - rc->err.data;
        return NGX_ERROR;
    }

    cln->handler = ngx_shim_regex_free;
    cln->data = re;

    rc->regex = re;

    pcre_fullinfo(re->code, NULL, PCRE_INFO_CAPTURECOUNT, &rc->captures);
    pcre_fullinfo(re->code, NULL, PCRE_INFO_NAMECOUNT, &rc->named_captures);

    return NGX_OK;
}


ngx_int_t
ngx_regex_exec(ngx_regex_t *re, ngx_str_t *s, int *captures, ngx_uint_t size)
{
    if (size) {
        /* no caller here asks for captures */
        abort();
    }

    return pcre_exec(re->code, re->extra, (const char *) s->data, s->len, 0,
                     0, captures, 0);
}

#endif


/*
 * Not reached: only a model of infer_model has a sticky key (a registry
 * file refuses one), and the fuzzers pick no target of those.
 */

ngx_int_t
ngx_http_complex_value(ngx_http_request_t *r, ngx_http_complex_value_t *val,
    ngx_str_t *value)
{
    (void) r;
    (void) val;
    (void) value;

    fprintf(stderr, "ngx_shim: ngx_http_complex_value() called\n");
    abort();
}

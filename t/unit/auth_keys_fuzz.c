/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for the API key file parser,
 * ngx_http_infer_auth_apikeys_parse():
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fuse-ld=lld \
 *       -ffunction-sections -Wl,--gc-sections -I ... \
 *       t/unit/auth_keys_fuzz.c t/unit/ngx_shim.c \
 *       ngx_infer_auth/ngx_http_infer_auth_keys.c -ljansson -lcrypto
 *
 * An input is a key file, in a buffer of exactly its size.  A table the
 * parser makes is checked against the file as jansson reads it here: one
 * key per entry, sorted by hash with no hash twice (what the request's
 * binary search needs), each hash the entry's hex digits, and nothing
 * that goes into a header or a log line holding a control character.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ngx_http_infer_auth.h"
#include "unit.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ngx_uint_t is_control(u_char c);
static ngx_uint_t has_control(ngx_str_t *s);
static void hex_hash(const char *s, u_char *hash);


static ngx_log_t  log_;


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                         *p;
    u_char                          err[NGX_HTTP_INFER_AUTH_ERRSTR];
    u_char                          hash[SHA256_DIGEST_LENGTH];
    size_t                          i, j;
    json_t                         *root, *list, *obj;
    ngx_uint_t                      found;
    ngx_http_infer_auth_apikey_t   *k;
    ngx_http_infer_auth_apikeys_t  *keys;

    log_.log_level = NGX_LOG_DEBUG_ALL;

    p = malloc(size ? size : 1);
    if (p == NULL) {
        return 0;
    }

    memcpy(p, data, size);
    memset(err, 0, sizeof(err));

    keys = ngx_http_infer_auth_apikeys_parse(p, size, &log_, err);

    check(strlen((char *) err) < sizeof(err));

    if (keys == NULL) {
        check(err[0] != '\0');
        free(p);
        return 0;
    }

    root = json_loadb((char *) data, size, JSON_REJECT_DUPLICATES, NULL);
    check(root != NULL);

    list = json_object_get(root, "keys");
    check(json_is_array(list));
    check(keys->keys.nelts == json_array_size(list));

    k = keys->keys.elts;

    for (i = 0; i < keys->keys.nelts; i++) {
        check(k[i].id.len > 0 && k[i].tenant.len > 0);
        check(!has_control(&k[i].id) && !has_control(&k[i].tenant)
              && !has_control(&k[i].plan) && !has_control(&k[i].models));
        check(k[i].disabled == 0 || k[i].disabled == 1);

        if (i > 0) {
            check(memcmp(k[i - 1].hash, k[i].hash, SHA256_DIGEST_LENGTH)
                  < 0);
        }
    }

    /* every entry of the file is a key of the table, by its hash */

    json_array_foreach(list, i, obj) {
        hex_hash(json_string_value(json_object_get(obj, "hash")), hash);

        found = 0;

        for (j = 0; j < keys->keys.nelts; j++) {
            if (memcmp(k[j].hash, hash, SHA256_DIGEST_LENGTH) == 0) {
                check(k[j].id.len
                      == json_string_length(json_object_get(obj, "id")));
                check(memcmp(k[j].id.data,
                             json_string_value(json_object_get(obj, "id")),
                             k[j].id.len)
                      == 0);
                check(k[j].disabled
                      == (ngx_uint_t) json_is_true(json_object_get(
                                                       obj, "disabled")));
                found++;
            }
        }

        check(found == 1);
    }

    json_decref(root);
    ngx_destroy_pool(keys->pool);
    free(p);

    return 0;
}


static ngx_uint_t
is_control(u_char c)
{
    return c < 0x20 || c == 0x7f;
}


static ngx_uint_t
has_control(ngx_str_t *s)
{
    size_t  i;

    for (i = 0; i < s->len; i++) {
        if (is_control(s->data[i])) {
            return 1;
        }
    }

    return 0;
}


/* "sha256:" and 64 hex digits, as the parser took it */

static void
hex_hash(const char *s, u_char *hash)
{
    char    byte[3];
    size_t  i;

    check(s != NULL && strlen(s) == 7 + 2 * SHA256_DIGEST_LENGTH);
    check(strncmp(s, "sha256:", 7) == 0);

    for (i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        byte[0] = s[7 + 2 * i];
        byte[1] = s[8 + 2 * i];
        byte[2] = '\0';

        check(strspn(byte, "0123456789abcdefABCDEF") == 2);
        hash[i] = (u_char) strtoul(byte, NULL, 16);
    }
}

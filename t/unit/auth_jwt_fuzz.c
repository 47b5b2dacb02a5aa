/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for the token decoder, ngx_http_infer_auth_jwt_decode(),
 * and the signature checks after it, ngx_http_infer_auth_jwt_verify():
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined \
 *       -ffunction-sections -Wl,--gc-sections -I ... \
 *       t/unit/auth_jwt_fuzz.c t/unit/ngx_shim.c \
 *       ngx_infer_auth/ngx_http_infer_auth_jwt.c -ljansson -lcrypto
 *
 * An input is a token, in a buffer of exactly its size.  A token that
 * decodes is checked against every key of a set that has one of each
 * family (HMAC with a fixed secret, so that a seed can be signed, RSA,
 * RSA-PSS, EC on three curves, Ed25519): only the key of the token's own
 * algorithm may say yes, and only the HMAC key can (no one forges the
 * others).  With FUZZ_VERBOSE set, a token that verifies says so.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/pem.h>

#include "ngx_http_infer_auth.h"
#include "unit.h"


/* the secret t/test_fuzz.py signs the seeds' HS256 tokens with */
#define SECRET  "ngx_infer fuzz secret: 64 bytes or more, as HS512 wants, " \
                "for HS256, HS384 and HS512"


int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void add_pem(EVP_PKEY *pkey, const char *alg, const char *kid);


static ngx_log_t                      log_;
static ngx_http_infer_auth_keyset_t  *keys;


int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    u_char      err[NGX_HTTP_INFER_AUTH_ERRSTR];
    ngx_str_t   alg, kid;
    ngx_uint_t  i;

    static char  *hs[] = { "HS256", "HS384", "HS512" };

    (void) argc;
    (void) argv;

    log_.log_level = NGX_LOG_DEBUG_ALL;

    keys = ngx_http_infer_auth_keyset_create(&log_);
    check(keys != NULL);

    for (i = 0; i < 3; i++) {
        alg.data = (u_char *) hs[i];
        alg.len = 5;
        kid = alg;

        check(ngx_http_infer_auth_keyset_pem(keys, (u_char *) SECRET,
                                             sizeof(SECRET) - 1, &alg, &kid,
                                             err)
              == NGX_OK);
    }

    add_pem(EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t) 2048), "RS256",
            "rsa");
    add_pem(EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t) 2048), "PS384",
            "pss");
    add_pem(EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256"), "", "p256");
    add_pem(EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384"), "", "p384");
    add_pem(EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-521"), "", "p521");
    add_pem(EVP_PKEY_Q_keygen(NULL, NULL, "ED25519"), "", "ed");

    check(keys->keys.nelts == 9);

    return 0;
}


static void
add_pem(EVP_PKEY *pkey, const char *alg, const char *kid)
{
    BIO        *bio;
    char       *pem;
    long        len;
    u_char      err[NGX_HTTP_INFER_AUTH_ERRSTR];
    ngx_str_t   a, k;

    check(pkey != NULL);

    bio = BIO_new(BIO_s_mem());
    check(bio != NULL);
    check(PEM_write_bio_PUBKEY(bio, pkey) == 1);

    len = BIO_get_mem_data(bio, &pem);

    a.data = (u_char *) alg;
    a.len = strlen(alg);
    k.data = (u_char *) kid;
    k.len = strlen(kid);

    if (ngx_http_infer_auth_keyset_pem(keys, (u_char *) pem, (size_t) len,
                                       &a, &k, err)
        != NGX_OK)
    {
        fprintf(stderr, "%s: %s\n", kid, err);
        abort();
    }

    BIO_free(bio);
    EVP_PKEY_free(pkey);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                     *p, *h, *hl;
    u_char                      err[NGX_HTTP_INFER_AUTH_ERRSTR];
    ngx_int_t                   rc;
    ngx_uint_t                  i, yes;
    ngx_http_infer_auth_key_t  *k;
    ngx_http_infer_auth_jwt_t   jwt;

    p = malloc(size ? size : 1);
    if (p == NULL) {
        return 0;
    }

    memcpy(p, data, size);

    memset(&jwt, 0xa5, sizeof(jwt));
    memset(err, 0, sizeof(err));

    rc = ngx_http_infer_auth_jwt_decode(p, size, &jwt, err);

    check(rc == NGX_OK || rc == NGX_ERROR);

    if (rc == NGX_ERROR) {
        check(err[0] != '\0');
        check(strlen((char *) err) < sizeof(err));
        check(jwt.header == NULL && jwt.payload == NULL);
        free(p);
        return 0;
    }

    check(json_is_object(jwt.header) && json_is_object(jwt.payload));
    check(jwt.alg != NULL && ngx_http_infer_auth_alg(&jwt.alg->name)
                             == jwt.alg);

    /* what is signed: the first two parts, as they came */
    check(jwt.input.data == p && jwt.input.len < size);
    check(p[jwt.input.len] == '.');
    check(memchr(p, '=', size) == NULL);

    check(jwt.signature.len > 0
          && jwt.signature.len <= NGX_HTTP_INFER_AUTH_TOKEN_MAX);

    if (jwt.kid.data) {
        h = (u_char *) json_string_value(json_object_get(jwt.header, "kid"));
        hl = h + json_string_length(json_object_get(jwt.header, "kid"));
        check(jwt.kid.data == h && jwt.kid.data + jwt.kid.len == hl);
    }

    yes = 0;
    k = keys->keys.elts;

    for (i = 0; i < keys->keys.nelts; i++) {
        rc = ngx_http_infer_auth_jwt_verify(&jwt, &k[i]);

        check(rc == NGX_OK || rc == NGX_DECLINED);

        if (rc == NGX_OK) {
            check(k[i].alg == jwt.alg);
            check(k[i].alg->family == NGX_HTTP_INFER_AUTH_HMAC);
            yes++;

            if (getenv("FUZZ_VERBOSE")) {
                /* t/test_fuzz.py: the seeds signed with SECRET verify */
                fprintf(stderr, "verified by \"%.*s\"\n",
                        (int) k[i].kid.len, k[i].kid.data);
            }
        }
    }

    check(yes <= 1);

    ngx_http_infer_auth_jwt_free(&jwt);
    check(jwt.header == NULL && jwt.payload == NULL);

    free(p);

    return 0;
}

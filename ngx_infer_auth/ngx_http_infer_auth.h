
/*
 * Copyright (C) ngx_infer authors
 *
 * What the files of ngx_http_infer_auth_module share: JWT keys and their
 * algorithms, decoded tokens, and API key records.
 */


#ifndef _NGX_HTTP_INFER_AUTH_H_INCLUDED_
#define _NGX_HTTP_INFER_AUTH_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>

#include <jansson.h>
#include <openssl/evp.h>


/* a token longer than this is refused before it is decoded */
#define NGX_HTTP_INFER_AUTH_TOKEN_MAX  8192

#define NGX_HTTP_INFER_AUTH_ERRSTR     256


/* what went wrong, into err of NGX_HTTP_INFER_AUTH_ERRSTR bytes */
#define ngx_http_infer_auth_error(err, ...)                                   \
    *ngx_snprintf(err, NGX_HTTP_INFER_AUTH_ERRSTR - 1, __VA_ARGS__) = '\0'


typedef enum {
    NGX_HTTP_INFER_AUTH_HMAC = 0,
    NGX_HTTP_INFER_AUTH_RSA,
    NGX_HTTP_INFER_AUTH_PSS,
    NGX_HTTP_INFER_AUTH_EC,
    NGX_HTTP_INFER_AUTH_EDDSA
} ngx_http_infer_auth_family_e;


typedef struct {
    ngx_str_t                      name;        /* "RS256" */
    ngx_http_infer_auth_family_e   family;
    const EVP_MD                *(*md)(void);   /* NULL for EdDSA */
    size_t                         size;        /* HMAC: min key; EC: r */
    int                            curve;       /* EC: the curve's NID */
} ngx_http_infer_auth_alg_t;


/*
 * A key pinned to one algorithm: a public key, or an HMAC secret.
 */

typedef struct {
    ngx_str_t                      kid;         /* empty: none */
    ngx_http_infer_auth_alg_t     *alg;
    EVP_PKEY                      *pkey;
    ngx_str_t                      secret;
} ngx_http_infer_auth_key_t;


/*
 * A set of keys in a pool of its own, whose cleanup frees the EVP_PKEYs;
 * a JWKS file or URL replaces its set as a whole.
 */

typedef struct {
    ngx_array_t                    keys;        /* ngx_http_infer_auth_key_t */
    ngx_pool_t                    *pool;
} ngx_http_infer_auth_keyset_t;


typedef struct {
    ngx_str_t                      input;       /* header.payload */
    ngx_str_t                      signature;   /* decoded */
    ngx_http_infer_auth_alg_t     *alg;
    ngx_str_t                      kid;         /* points into header */
    json_t                        *header;
    json_t                        *payload;
} ngx_http_infer_auth_jwt_t;


ngx_http_infer_auth_alg_t *ngx_http_infer_auth_alg(ngx_str_t *name);
ngx_int_t ngx_http_infer_auth_jwt_decode(u_char *p, size_t len,
    ngx_http_infer_auth_jwt_t *jwt, u_char *err);
void ngx_http_infer_auth_jwt_free(ngx_http_infer_auth_jwt_t *jwt);
ngx_int_t ngx_http_infer_auth_jwt_verify(ngx_http_infer_auth_jwt_t *jwt,
    ngx_http_infer_auth_key_t *key);

ngx_http_infer_auth_keyset_t *ngx_http_infer_auth_keyset_create(
    ngx_log_t *log);
void ngx_http_infer_auth_keyset_free(ngx_http_infer_auth_keyset_t *ks);
ngx_int_t ngx_http_infer_auth_keyset_pem(ngx_http_infer_auth_keyset_t *ks,
    u_char *data, size_t len, ngx_str_t *alg, ngx_str_t *kid, u_char *err);
ngx_int_t ngx_http_infer_auth_keyset_jwks(ngx_http_infer_auth_keyset_t *ks,
    u_char *data, size_t len, u_char *err);


#endif /* _NGX_HTTP_INFER_AUTH_H_INCLUDED_ */

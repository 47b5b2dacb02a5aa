
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
#include <ngx_http.h>

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include "ngx_http_infer_file.h"


/* a token longer than this is refused before it is decoded */
#define NGX_HTTP_INFER_AUTH_TOKEN_MAX  8192

#define NGX_HTTP_INFER_AUTH_ERRSTR     256

/* a JWKS larger than this is refused */
#define NGX_HTTP_INFER_AUTH_JWKS_MAX   (1024 * 1024)


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
    EVP_PKEY_CTX                  *vctx;        /* made on first use */
    ngx_str_t                      secret;
} ngx_http_infer_auth_key_t;


/*
 * A set of keys in a pool of its own, whose cleanup frees the EVP_PKEYs;
 * a JWKS file or URL replaces its set as a whole.
 */

typedef struct {
    ngx_array_t                    keys;        /* ngx_http_infer_auth_key_t */
    ngx_pool_t                    *pool;
    ngx_uint_t                     skipped;     /* JWKS keys not usable */
} ngx_http_infer_auth_keyset_t;


/* a token verified before: infer_auth_token_cache */

typedef struct {
    ngx_rbtree_node_t              node;        /* key: hash's first bytes */
    ngx_queue_t                    queue;       /* most recent first */
    u_char                         hash[SHA256_DIGEST_LENGTH];
    ngx_http_infer_auth_keyset_t  *keys;        /* that verified it */
    ngx_uint_t                     epoch;
    time_t                         expires;
    json_t                        *payload;     /* decoded, referenced */
    ngx_str_t                      kid;         /* follows the node */
} ngx_http_infer_auth_cache_node_t;


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

/* log: one that lives as long as the key set (ngx_http_infer_conf_log) */
ngx_http_infer_auth_keyset_t *ngx_http_infer_auth_keyset_create(
    ngx_log_t *log);
void ngx_http_infer_auth_keyset_free(ngx_http_infer_auth_keyset_t *ks);
ngx_int_t ngx_http_infer_auth_keyset_pem(ngx_http_infer_auth_keyset_t *ks,
    u_char *data, size_t len, ngx_str_t *alg, ngx_str_t *kid, u_char *err);
ngx_int_t ngx_http_infer_auth_keyset_jwks(ngx_http_infer_auth_keyset_t *ks,
    u_char *data, size_t len, u_char *err);


/* an API key file or JWKS file: a bound against a wrong path */
#define NGX_HTTP_INFER_AUTH_FILE_MAX  (16 * 1024 * 1024)

/* how often a request waiting for another worker's JWKS fetch looks */
#define NGX_HTTP_INFER_AUTH_POLL      20


typedef enum {
    NGX_HTTP_INFER_AUTH_NONE = 0,
    NGX_HTTP_INFER_AUTH_OK,
    NGX_HTTP_INFER_AUTH_MISSING,
    NGX_HTTP_INFER_AUTH_INVALID,
    NGX_HTTP_INFER_AUTH_EXPIRED,
    NGX_HTTP_INFER_AUTH_DISABLED,
    NGX_HTTP_INFER_AUTH_FORBIDDEN,
    NGX_HTTP_INFER_AUTH_UNAVAILABLE,
    NGX_HTTP_INFER_AUTH_MISCONFIGURED
} ngx_http_infer_auth_status_e;


typedef struct {
    u_char                            hash[SHA256_DIGEST_LENGTH];
    ngx_str_t                         id;
    ngx_str_t                         tenant;
    ngx_str_t                         plan;
    ngx_str_t                         models;    /* empty: not set */
    ngx_uint_t                        disabled;
} ngx_http_infer_auth_apikey_t;


typedef struct {
    ngx_array_t                       keys;      /* sorted by hash */
    ngx_pool_t                       *pool;
} ngx_http_infer_auth_apikeys_t;


/* an API key file or a JWKS file, followed by every worker */

typedef struct {
    ngx_http_infer_watch_t            watch;
    ngx_uint_t                        jwks;
    void                             *data;      /* keyset or apikeys */
} ngx_http_infer_auth_watch_t;


/* the answer of a JWKS subrequest, as the body filter takes it */

typedef struct {
    u_char                           *data;
    size_t                            len;
    size_t                            size;
    unsigned                          failed:1;
} ngx_http_infer_auth_jwks_body_t;


/* a JWKS as the workers share it */

typedef struct {
    ngx_queue_t                       queue;
    ngx_str_t                         uri;
    ngx_uint_t                        generation; /* 0: never fetched */
    time_t                            fetched;
    ngx_msec_t                        attempted;
    ngx_msec_t                        fetching;   /* until then */
    size_t                            len;
    u_char                           *data;
} ngx_http_infer_auth_jwks_node_t;


typedef struct {
    ngx_queue_t                       nodes;
} ngx_http_infer_auth_shctx_t;


typedef struct {
    ngx_str_t                         uri;
    time_t                            ttl;
    ngx_msec_t                        refresh;
    ngx_msec_t                        timeout;
    ngx_shm_zone_t                   *zone;

    /* per worker */
    ngx_http_infer_auth_jwks_node_t  *node;
    ngx_uint_t                        generation;
    ngx_http_infer_auth_keyset_t     *keys;
} ngx_http_infer_auth_jwks_uri_t;


typedef struct {
    ngx_str_t                         tenant;
    ngx_str_t                         models;
} ngx_http_infer_auth_tenant_t;


typedef struct {
    ngx_array_t                       watches;   /* watch * */
    ngx_shm_zone_t                   *zone;
    ngx_uint_t                        token_cache; /* 0: off */
    ngx_int_t                         model_index;
    ngx_int_t                         target_index;
} ngx_http_infer_auth_main_conf_t;


/* infer_auth */
#define NGX_HTTP_INFER_AUTH_OFF       0
#define NGX_HTTP_INFER_AUTH_ON        1
#define NGX_HTTP_INFER_AUTH_REQUIRED  2

/* a location "infer_auth required" leaves without keys logs this often */
#define NGX_HTTP_INFER_AUTH_MISCONF_LOG  10


typedef struct {
    ngx_uint_t                        enable;    /* NGX_HTTP_INFER_AUTH_* */
    ngx_uint_t                        unkeyed;   /* required, no key source:
                                                    every request is 500 */
    time_t                            misconf_logged;  /* per worker */
    ngx_http_infer_auth_keyset_t     *keys;      /* infer_auth_jwt_key */
    ngx_http_infer_auth_watch_t      *jwks_file;
    ngx_http_infer_auth_jwks_uri_t   *jwks_uri;
    ngx_http_infer_auth_watch_t      *api_keys;
    ngx_array_t                      *issuers;   /* ngx_str_t */
    ngx_array_t                      *audiences;
    ngx_array_t                      *required;
    ngx_array_t                      *tenants;   /* tenant_t */
    ngx_str_t                         tenant_claim;
    ngx_str_t                         models_claim;
    ngx_str_t                         plan_claim;
    ngx_str_t                         header;    /* lowercase */
    ngx_str_t                         key_header;
    ngx_str_t                         realm;
    ngx_uint_t                        denied;
    time_t                            leeway;
    ngx_flag_t                        strip;
} ngx_http_infer_auth_loc_conf_t;


typedef struct {
    ngx_http_infer_auth_status_e      status;
    ngx_int_t                         rc;        /* the decision */
    ngx_uint_t                        http_status;
    const char                       *code;
    ngx_str_t                         message;
    ngx_str_t                         www_authenticate;
    ngx_buf_t                        *envelope;  /* the answer's body */

    ngx_str_t                         credential;
    ngx_str_t                         method;
    ngx_str_t                         tenant;
    ngx_str_t                         subject;
    ngx_str_t                         key_id;
    ngx_str_t                         plan;
    ngx_str_t                         models;    /* "*": all */

    ngx_http_infer_auth_jwt_t         jwt;
    ngx_msec_t                        wait_until;
    ngx_uint_t                        wait_generation;

    u_char                            hash[SHA256_DIGEST_LENGTH];
    ngx_http_infer_auth_loc_conf_t   *conf;      /* that decided */

    unsigned                          decided:1;
    unsigned                          api_key:1;
    unsigned                          decoded:1;
    unsigned                          unknown_kid:1;
    unsigned                          fetched:1;   /* or waited */
    unsigned                          waiting:1;
    unsigned                          replaced:1;
    unsigned                          sent:1;
} ngx_http_infer_auth_ctx_t;


ngx_int_t ngx_http_infer_auth_api_key(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf);
/* an API key file's contents; log: one that lives as long as the table */
ngx_http_infer_auth_apikeys_t *ngx_http_infer_auth_apikeys_parse(
    u_char *data, size_t len, ngx_log_t *log, u_char *err);

/* ngx_http_infer_auth_filter.c: refusals and nginx's page for them */
ngx_int_t ngx_http_infer_auth_reject(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf,
    ngx_http_infer_auth_status_e status, const char *code,
    const char *fmt, ...);
void ngx_http_infer_auth_filter_init(void);

ngx_int_t ngx_http_infer_auth_jwks_body(ngx_http_request_t *r,
    ngx_http_infer_auth_jwks_body_t *body, ngx_chain_t *in);
ngx_int_t ngx_http_infer_auth_jwks_prepare(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_jwks_uri_t *u);
ngx_int_t ngx_http_infer_auth_copy(ngx_pool_t *pool, ngx_str_t *dst,
    ngx_str_t *src);
ngx_int_t ngx_http_infer_auth_join(ngx_pool_t *pool, json_t *v,
    ngx_str_t *out);
char *ngx_http_infer_auth_jwt_key_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
char *ngx_http_infer_auth_file_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
char *ngx_http_infer_auth_jwks_uri_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);

ngx_http_infer_auth_cache_node_t *ngx_http_infer_auth_cache_find(
    ngx_str_t *token, ngx_http_infer_auth_keyset_t **sets, ngx_uint_t nsets,
    u_char *hash);
void ngx_http_infer_auth_cache_add(u_char *hash,
    ngx_http_infer_auth_keyset_t *keys, json_t *payload, ngx_str_t *kid,
    time_t expires, ngx_uint_t max, ngx_log_t *log);

extern ngx_uint_t    ngx_http_infer_auth_key_epoch;
extern ngx_module_t  ngx_http_infer_auth_module;


#endif /* _NGX_HTTP_INFER_AUTH_H_INCLUDED_ */


/*
 * Copyright (C) ngx_infer authors
 *
 * ngx_http_infer_auth_module: JWTs checked against pinned keys (key
 * files, a JWKS file, a JWKS URL fetched through a subrequest and shared
 * by the workers), API keys looked up by their SHA-256, a tenant per
 * request, and the models each tenant may use.  Runs in ACCESS, so it
 * composes with allow, deny and satisfy as nginx's own access modules do.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_file.h"
#include "ngx_http_infer_auth.h"


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
    NGX_HTTP_INFER_AUTH_UNAVAILABLE
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
    ngx_http_infer_file_t             file;
    ngx_msec_t                        interval;
    ngx_uint_t                        jwks;
    void                             *data;      /* keyset or apikeys */
    ngx_event_t                       event;
} ngx_http_infer_auth_watch_t;


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
    ngx_int_t                         model_index;
    ngx_int_t                         target_index;
} ngx_http_infer_auth_main_conf_t;


typedef struct {
    ngx_flag_t                        enable;
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

    unsigned                          decided:1;
    unsigned                          api_key:1;
    unsigned                          decoded:1;
    unsigned                          unknown_kid:1;
    unsigned                          fetched:1;   /* or waited */
    unsigned                          waiting:1;
    unsigned                          replaced:1;
    unsigned                          sent:1;
} ngx_http_infer_auth_ctx_t;


static ngx_int_t ngx_http_infer_auth_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_auth_decide(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf);
static ngx_int_t ngx_http_infer_auth_credential(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf);
static ngx_int_t ngx_http_infer_auth_api_key(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf);
static ngx_int_t ngx_http_infer_auth_copy(ngx_pool_t *pool, ngx_str_t *dst,
    ngx_str_t *src);
static ngx_int_t ngx_http_infer_auth_jwt(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf);
static ngx_int_t ngx_http_infer_auth_jwt_key(ngx_http_infer_auth_ctx_t *ctx,
    ngx_http_infer_auth_keyset_t *ks, ngx_uint_t *candidates);
static ngx_int_t ngx_http_infer_auth_claims(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf);
static ngx_int_t ngx_http_infer_auth_claim_str(json_t *v, ngx_str_t *s);
static ngx_int_t ngx_http_infer_auth_model(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf);
static ngx_int_t ngx_http_infer_auth_strip(ngx_http_request_t *r,
    ngx_http_infer_auth_loc_conf_t *lcf);
static ngx_int_t ngx_http_infer_auth_reject(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf,
    ngx_http_infer_auth_status_e status, const char *code,
    const char *fmt, ...);
static ngx_http_infer_auth_ctx_t *ngx_http_infer_auth_get_ctx(
    ngx_http_request_t *r);
static void ngx_http_infer_auth_cleanup(void *data);

static ngx_int_t ngx_http_infer_auth_jwks_prepare(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_jwks_uri_t *u);
static void ngx_http_infer_auth_jwks_sync(ngx_http_infer_auth_jwks_uri_t *u,
    ngx_log_t *log);
static ngx_int_t ngx_http_infer_auth_jwks_fetch(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_jwks_uri_t *u);
static ngx_int_t ngx_http_infer_auth_jwks_done(ngx_http_request_t *r,
    void *data, ngx_int_t rc);
static void ngx_http_infer_auth_jwks_store(ngx_http_infer_auth_jwks_uri_t *u,
    u_char *data, size_t len, ngx_log_t *log);
static ngx_int_t ngx_http_infer_auth_wait(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx);
static void ngx_http_infer_auth_wait_handler(ngx_http_request_t *r);
static ngx_http_infer_auth_jwks_node_t *ngx_http_infer_auth_jwks_node(
    ngx_http_infer_auth_jwks_uri_t *u);
static ngx_int_t ngx_http_infer_auth_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);

static ngx_int_t ngx_http_infer_auth_watch_load(
    ngx_http_infer_auth_watch_t *w, ngx_log_t *log, u_char *err);
static void ngx_http_infer_auth_watch_timer(ngx_event_t *ev);
static ngx_http_infer_auth_apikeys_t *ngx_http_infer_auth_apikeys_parse(
    u_char *data, size_t len, ngx_log_t *log, u_char *err);
static ngx_int_t ngx_http_infer_auth_apikey_parse(json_t *obj, size_t n,
    ngx_pool_t *pool, ngx_http_infer_auth_apikey_t *k, u_char *err);
static ngx_int_t ngx_http_infer_auth_join(ngx_pool_t *pool, json_t *v,
    ngx_str_t *out);
static ngx_int_t ngx_http_infer_auth_apikey_cmp(const void *one,
    const void *two);
static void ngx_http_infer_auth_data_free(ngx_http_infer_auth_watch_t *w,
    void *data);

static ngx_int_t ngx_http_infer_auth_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_auth_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);

static ngx_int_t ngx_http_infer_auth_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_infer_auth_variable_status(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_infer_auth_variable_claim(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);

static char *ngx_http_infer_auth_jwt_key_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_auth_file_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_auth_jwks_uri_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_auth_tenant_models_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_auth_header_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static void ngx_http_infer_auth_conf_cleanup(void *data);
static void ngx_http_infer_auth_watch_cleanup(void *data);
static ngx_int_t ngx_http_infer_auth_add_variables(ngx_conf_t *cf);
static void *ngx_http_infer_auth_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_infer_auth_create_conf(ngx_conf_t *cf);
static char *ngx_http_infer_auth_merge_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_infer_auth_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_infer_auth_init_process(ngx_cycle_t *cycle);
static void ngx_http_infer_auth_exit_process(ngx_cycle_t *cycle);


static ngx_conf_enum_t  ngx_http_infer_auth_denied[] = {
    { ngx_string("403"), NGX_HTTP_FORBIDDEN },
    { ngx_string("404"), NGX_HTTP_NOT_FOUND },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_infer_auth_commands[] = {

    { ngx_string("infer_auth"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, enable),
      NULL },

    { ngx_string("infer_auth_api_keys"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE12,
      ngx_http_infer_auth_file_conf,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, api_keys),
      NULL },

    { ngx_string("infer_auth_jwt_key"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE123,
      ngx_http_infer_auth_jwt_key_conf,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_auth_jwks"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE12,
      ngx_http_infer_auth_file_conf,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, jwks_file),
      NULL },

    { ngx_string("infer_auth_jwks_uri"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_infer_auth_jwks_uri_conf,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_auth_issuer"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_conf_set_str_array_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, issuers),
      NULL },

    { ngx_string("infer_auth_audience"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_conf_set_str_array_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, audiences),
      NULL },

    { ngx_string("infer_auth_require_claim"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_conf_set_str_array_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, required),
      NULL },

    { ngx_string("infer_auth_leeway"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, leeway),
      NULL },

    { ngx_string("infer_auth_tenant_claim"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, tenant_claim),
      NULL },

    { ngx_string("infer_auth_models_claim"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, models_claim),
      NULL },

    { ngx_string("infer_auth_plan_claim"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, plan_claim),
      NULL },

    { ngx_string("infer_auth_tenant_models"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_2MORE,
      ngx_http_infer_auth_tenant_models_conf,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("infer_auth_model_denied"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, denied),
      &ngx_http_infer_auth_denied },

    { ngx_string("infer_auth_header"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_infer_auth_header_conf,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, header),
      NULL },

    { ngx_string("infer_auth_api_key_header"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_infer_auth_header_conf,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, key_header),
      NULL },

    { ngx_string("infer_auth_strip_credentials"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, strip),
      NULL },

    { ngx_string("infer_auth_realm"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, realm),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_infer_auth_module_ctx = {
    ngx_http_infer_auth_add_variables,     /* preconfiguration */
    ngx_http_infer_auth_init,              /* postconfiguration */

    ngx_http_infer_auth_create_main_conf,  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_infer_auth_create_conf,       /* create location configuration */
    ngx_http_infer_auth_merge_conf         /* merge location configuration */
};


ngx_module_t  ngx_http_infer_auth_module = {
    NGX_MODULE_V1,
    &ngx_http_infer_auth_module_ctx,       /* module context */
    ngx_http_infer_auth_commands,          /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_infer_auth_init_process,      /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_infer_auth_exit_process,      /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_variable_t  ngx_http_infer_auth_vars[] = {

    { ngx_string("infer_tenant"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, tenant), 0, 0 },

    { ngx_string("infer_subject"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, subject), 0, 0 },

    { ngx_string("infer_key_id"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, key_id), 0, 0 },

    { ngx_string("infer_auth_method"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, method), 0, 0 },

    { ngx_string("infer_plan"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, plan), 0, 0 },

    { ngx_string("infer_allowed_models"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, models), 0, 0 },

    { ngx_string("infer_auth_status"), NULL,
      ngx_http_infer_auth_variable_status, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_claim_"), NULL, ngx_http_infer_auth_variable_claim,
      0, NGX_HTTP_VAR_PREFIX|NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_str_t  ngx_http_infer_auth_statuses[] = {
    ngx_null_string,
    ngx_string("ok"),
    ngx_string("missing"),
    ngx_string("invalid"),
    ngx_string("expired"),
    ngx_string("disabled"),
    ngx_string("forbidden"),
    ngx_string("unavailable")
};


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


/*
 * The ACCESS handler.  A decision is made once per request and kept: the
 * phase runs again after an internal redirect (a route failover, an
 * error_page), and again when a JWKS fetch this request waited for ends.
 * A refusal is returned as a status, not sent, so that "satisfy any" can
 * still let allow pass the request; the filters below then give nginx's
 * error page the OpenAI envelope.
 */

static ngx_int_t
ngx_http_infer_auth_handler(ngx_http_request_t *r)
{
    ngx_int_t                        rc;
    ngx_pool_cleanup_t              *cln;
    ngx_http_infer_auth_ctx_t       *ctx;
    ngx_http_infer_auth_loc_conf_t  *lcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_auth_module);

    if (!lcf->enable) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_infer_auth_get_ctx(r);

    if (ctx == NULL) {
        ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_infer_auth_ctx_t));
        if (ctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        /* frees the token's JSON, and finds ctx after a redirect */

        cln = ngx_pool_cleanup_add(r->pool, 0);
        if (cln == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        cln->handler = ngx_http_infer_auth_cleanup;
        cln->data = ctx;

        ngx_http_set_ctx(r, ctx, ngx_http_infer_auth_module);
    }

    if (ctx->decided) {
        return ctx->rc;
    }

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer auth access handler");

    rc = ngx_http_infer_auth_decide(r, ctx, lcf);

    if (rc == NGX_AGAIN) {
        return NGX_AGAIN;
    }

    ctx->decided = 1;
    ctx->rc = rc;

    return rc;
}


static ngx_int_t
ngx_http_infer_auth_decide(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf)
{
    ngx_int_t  rc;

    if (ctx->credential.data == NULL) {
        rc = ngx_http_infer_auth_credential(r, ctx, lcf);

        if (rc != NGX_OK) {
            return rc;
        }
    }

    rc = ctx->api_key ? ngx_http_infer_auth_api_key(r, ctx, lcf)
                      : ngx_http_infer_auth_jwt(r, ctx, lcf);

    if (rc != NGX_OK) {
        return rc;
    }

    rc = ngx_http_infer_auth_model(r, ctx, lcf);

    if (rc != NGX_OK) {
        return rc;
    }

    if (lcf->strip && ngx_http_infer_auth_strip(r, lcf) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->status = NGX_HTTP_INFER_AUTH_OK;

    return NGX_OK;
}


/*
 * The API-key header first (a bare key), then "Bearer" in the
 * authorization header: an "sk-" value is an API key, any other a JWT.
 */

static ngx_int_t
ngx_http_infer_auth_credential(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf)
{
    u_char           *p, *last;
    ngx_str_t         bearer;
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    ngx_str_null(&bearer);

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == lcf->key_header.len
            && ngx_strncmp(h[i].lowcase_key, lcf->key_header.data,
                           h[i].key.len) == 0
            && h[i].value.len)
        {
            ctx->credential = h[i].value;
            ctx->api_key = 1;
            break;
        }

        if (bearer.data == NULL
            && h[i].key.len == lcf->header.len
            && ngx_strncmp(h[i].lowcase_key, lcf->header.data,
                           h[i].key.len) == 0)
        {
            bearer = h[i].value;
        }
    }

    if (ctx->credential.data == NULL && bearer.len > sizeof("Bearer ") - 1
        && ngx_strncasecmp(bearer.data, (u_char *) "Bearer ",
                           sizeof("Bearer ") - 1) == 0)
    {
        p = bearer.data + sizeof("Bearer ") - 1;
        last = bearer.data + bearer.len;

        while (p < last && *p == ' ') {
            p++;
        }

        while (last > p && last[-1] == ' ') {
            last--;
        }

        if (p < last) {
            ctx->credential.data = p;
            ctx->credential.len = last - p;
            ctx->api_key = (last - p > 3 && ngx_strncmp(p, "sk-", 3) == 0);
        }
    }

    if (ctx->credential.data == NULL) {
        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_MISSING, "missing_credentials",
                   "Missing credentials: send an API key or a token as "
                   "\"Authorization: Bearer ...\".");
    }

    if (ctx->api_key) {
        ngx_str_set(&ctx->method, "api_key");

    } else {
        ngx_str_set(&ctx->method, "jwt");
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_auth_api_key(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf)
{
    u_char                          hash[SHA256_DIGEST_LENGTH];
    ngx_int_t                       lo, hi, mid, c;
    ngx_http_infer_auth_apikey_t   *k, *found;
    ngx_http_infer_auth_apikeys_t  *keys;

    keys = lcf->api_keys ? lcf->api_keys->data : NULL;

    if (keys == NULL) {
        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_INVALID, "invalid_api_key",
                   "API keys are not accepted here.");
    }

    SHA256(ctx->credential.data, ctx->credential.len, hash);

    /*
     * The search compares hashes, not keys: its timing says nothing of a
     * key.  The final comparison is in constant time all the same.
     */

    k = keys->keys.elts;
    found = NULL;
    lo = 0;
    hi = (ngx_int_t) keys->keys.nelts - 1;

    while (lo <= hi) {
        mid = lo + (hi - lo) / 2;
        c = ngx_memcmp(hash, k[mid].hash, SHA256_DIGEST_LENGTH);

        if (c == 0) {
            found = &k[mid];
            break;
        }

        if (c < 0) {
            hi = mid - 1;

        } else {
            lo = mid + 1;
        }
    }

    if (found == NULL
        || CRYPTO_memcmp(hash, found->hash, SHA256_DIGEST_LENGTH) != 0)
    {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "infer auth: unknown API key (sha256 %*xs...)",
                      (size_t) 4, hash);

        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_INVALID, "invalid_api_key",
                   "Incorrect API key provided.");
    }

    /* the file may be read again while the request lives: copies */

    if (ngx_http_infer_auth_copy(r->pool, &ctx->key_id, &found->id)
           != NGX_OK
        || ngx_http_infer_auth_copy(r->pool, &ctx->tenant, &found->tenant)
           != NGX_OK
        || ngx_http_infer_auth_copy(r->pool, &ctx->plan, &found->plan)
           != NGX_OK
        || ngx_http_infer_auth_copy(r->pool, &ctx->models, &found->models)
           != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->subject = ctx->key_id;

    if (found->disabled) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "infer auth: disabled API key \"%V\"", &ctx->key_id);

        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_DISABLED, "invalid_api_key",
                   "This API key has been disabled.");
    }

    return NGX_OK;
}


/* a copy of src, or none (data NULL) when src is unset */

static ngx_int_t
ngx_http_infer_auth_copy(ngx_pool_t *pool, ngx_str_t *dst, ngx_str_t *src)
{
    if (src->data == NULL) {
        ngx_str_null(dst);
        return NGX_OK;
    }

    dst->len = src->len;
    dst->data = ngx_pstrdup(pool, src);

    return dst->data ? NGX_OK : NGX_ERROR;
}


/*
 * A JWT: decoded once, then checked against the keys of the location:
 * infer_auth_jwt_key, the JWKS file, and the JWKS URL, whose keys may
 * first have to be fetched (NGX_AGAIN: the phase runs again after).
 */

static ngx_int_t
ngx_http_infer_auth_jwt(ngx_http_request_t *r, ngx_http_infer_auth_ctx_t *ctx,
    ngx_http_infer_auth_loc_conf_t *lcf)
{
    u_char                          err[NGX_HTTP_INFER_AUTH_ERRSTR];
    ngx_int_t                       rc;
    ngx_uint_t                      candidates;
    ngx_http_infer_auth_jwks_uri_t *u;

    if (!ctx->decoded) {
        if (ngx_http_infer_auth_jwt_decode(ctx->credential.data,
                                           ctx->credential.len, &ctx->jwt,
                                           err)
            != NGX_OK)
        {
            return ngx_http_infer_auth_reject(r, ctx, lcf,
                       NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                       "%s", err);
        }

        ctx->decoded = 1;
        ctx->key_id = ctx->jwt.kid;
    }

    u = lcf->jwks_uri;

    if (u) {
        rc = ngx_http_infer_auth_jwks_prepare(r, ctx, u);

        if (rc != NGX_OK) {
            return rc;
        }
    }

    candidates = 0;

    rc = ngx_http_infer_auth_jwt_key(ctx, lcf->keys, &candidates);

    if (rc == NGX_DECLINED && lcf->jwks_file) {
        rc = ngx_http_infer_auth_jwt_key(ctx, lcf->jwks_file->data,
                                         &candidates);
    }

    if (rc == NGX_DECLINED && u) {
        rc = ngx_http_infer_auth_jwt_key(ctx, u->keys, &candidates);

        if (candidates == 0 && !ctx->fetched) {
            /* an unknown kid: the provider may have rotated its keys */
            ctx->unknown_kid = 1;

            rc = ngx_http_infer_auth_jwks_prepare(r, ctx, u);

            if (rc != NGX_OK) {
                return rc;
            }

            rc = ngx_http_infer_auth_jwt_key(ctx, u->keys, &candidates);
        }

        if (u->keys == NULL && candidates == 0) {
            return ngx_http_infer_auth_reject(r, ctx, lcf,
                       NGX_HTTP_INFER_AUTH_UNAVAILABLE, "auth_unavailable",
                       "The signing keys could not be fetched; "
                       "try again later.");
        }
    }

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rc != NGX_OK) {
        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                   candidates ? "signature verification failed"
                              : "no key for the token's kid and alg");
    }

    return ngx_http_infer_auth_claims(r, ctx, lcf);
}


/*
 * Tries the keys of ks that the token's kid names (every key, when it has
 * none) pinned to the token's alg.
 */

static ngx_int_t
ngx_http_infer_auth_jwt_key(ngx_http_infer_auth_ctx_t *ctx,
    ngx_http_infer_auth_keyset_t *ks, ngx_uint_t *candidates)
{
    ngx_int_t                   rc;
    ngx_uint_t                  i;
    ngx_http_infer_auth_key_t  *k;

    if (ks == NULL) {
        return NGX_DECLINED;
    }

    k = ks->keys.elts;

    for (i = 0; i < ks->keys.nelts; i++) {

        if (ctx->jwt.kid.data
            && (k[i].kid.len != ctx->jwt.kid.len
                || ngx_strncmp(k[i].kid.data, ctx->jwt.kid.data,
                               k[i].kid.len) != 0))
        {
            continue;
        }

        if (k[i].alg != ctx->jwt.alg) {
            continue;
        }

        (*candidates)++;

        rc = ngx_http_infer_auth_jwt_verify(&ctx->jwt, &k[i]);

        if (rc != NGX_DECLINED) {
            return rc;
        }
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_infer_auth_claims(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf)
{
    time_t       now;
    size_t       i;
    json_t      *p, *v, *a;
    ngx_str_t   *s;
    ngx_uint_t   j, found;

    p = ctx->jwt.payload;
    now = ngx_time();

    v = json_object_get(p, "exp");

    if (v) {
        if (!json_is_number(v)) {
            return ngx_http_infer_auth_reject(r, ctx, lcf,
                       NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                       "malformed \"exp\"");
        }

        if ((double) now > json_number_value(v) + (double) lcf->leeway) {
            return ngx_http_infer_auth_reject(r, ctx, lcf,
                       NGX_HTTP_INFER_AUTH_EXPIRED, "invalid_token",
                       "the token has expired");
        }
    }

    v = json_object_get(p, "nbf");

    if (v) {
        if (!json_is_number(v)) {
            return ngx_http_infer_auth_reject(r, ctx, lcf,
                       NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                       "malformed \"nbf\"");
        }

        if ((double) now + (double) lcf->leeway < json_number_value(v)) {
            return ngx_http_infer_auth_reject(r, ctx, lcf,
                       NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                       "the token is not valid yet");
        }
    }

    if (lcf->issuers) {
        v = json_object_get(p, "iss");
        s = lcf->issuers->elts;
        found = 0;

        for (j = 0; json_is_string(v) && j < lcf->issuers->nelts; j++) {
            if (s[j].len == json_string_length(v)
                && ngx_memcmp(s[j].data, json_string_value(v), s[j].len) == 0)
            {
                found = 1;
                break;
            }
        }

        if (!found) {
            return ngx_http_infer_auth_reject(r, ctx, lcf,
                       NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                       "the token's issuer is not accepted");
        }
    }

    if (lcf->audiences) {
        v = json_object_get(p, "aud");
        s = lcf->audiences->elts;
        found = 0;

        for (j = 0; !found && j < lcf->audiences->nelts; j++) {

            if (json_is_string(v)) {
                found = (s[j].len == json_string_length(v)
                         && ngx_memcmp(s[j].data, json_string_value(v),
                                       s[j].len) == 0);
                continue;
            }

            json_array_foreach(v, i, a) {
                if (json_is_string(a)
                    && s[j].len == json_string_length(a)
                    && ngx_memcmp(s[j].data, json_string_value(a), s[j].len)
                       == 0)
                {
                    found = 1;
                    break;
                }
            }
        }

        if (!found) {
            return ngx_http_infer_auth_reject(r, ctx, lcf,
                       NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                       "the token's audience is not accepted");
        }
    }

    if (lcf->required) {
        s = lcf->required->elts;

        for (j = 0; j < lcf->required->nelts; j++) {
            v = json_object_get(p, (char *) s[j].data);

            if (v == NULL || json_is_null(v)) {
                return ngx_http_infer_auth_reject(r, ctx, lcf,
                           NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                           "the token lacks a required claim");
            }
        }
    }

    v = json_object_get(p, (char *) lcf->tenant_claim.data);

    if (ngx_http_infer_auth_claim_str(v, &ctx->tenant) != NGX_OK
        || ctx->tenant.len == 0)
    {
        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                   "the token names no tenant");
    }

    v = json_object_get(p, "sub");
    (void) ngx_http_infer_auth_claim_str(v, &ctx->subject);

    v = json_object_get(p, (char *) lcf->plan_claim.data);
    (void) ngx_http_infer_auth_claim_str(v, &ctx->plan);

    v = json_object_get(p, (char *) lcf->models_claim.data);

    if (v) {
        if (ngx_http_infer_auth_join(r->pool, v, &ctx->models) != NGX_OK) {
            return ngx_http_infer_auth_reject(r, ctx, lcf,
                       NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                       "malformed models claim");
        }
    }

    return NGX_OK;
}


/*
 * A string claim as an ngx_str_t: ctx holds the token's JSON until the
 * request's pool goes.
 */

static ngx_int_t
ngx_http_infer_auth_claim_str(json_t *v, ngx_str_t *s)
{
    if (!json_is_string(v)) {
        return NGX_DECLINED;
    }

    s->data = (u_char *) json_string_value(v);
    s->len = json_string_length(v);

    return NGX_OK;
}


/*
 * With ngx_infer_route loaded, the model requested ($infer_model) or the
 * one it resolved to ($infer_model_target) must be among the tenant's.
 * A refusal is a 403 to nginx, so that "satisfy any" works as for any
 * access module; the header filter shows it as infer_auth_model_denied
 * says.
 */

static ngx_int_t
ngx_http_infer_auth_model(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf)
{
    ngx_uint_t                        i;
    ngx_http_variable_value_t        *model, *target;
    ngx_http_infer_auth_tenant_t     *t;
    ngx_http_infer_auth_main_conf_t  *amcf;

    if (ctx->models.data == NULL && lcf->tenants) {
        t = lcf->tenants->elts;

        for (i = 0; i < lcf->tenants->nelts; i++) {
            if (t[i].tenant.len == ctx->tenant.len
                && ngx_strncmp(t[i].tenant.data, ctx->tenant.data,
                               ctx->tenant.len) == 0)
            {
                ctx->models = t[i].models;
                break;
            }
        }
    }

    if (ctx->models.data == NULL) {
        ngx_str_set(&ctx->models, "*");
        return NGX_OK;
    }

    amcf = ngx_http_get_module_main_conf(r, ngx_http_infer_auth_module);

    if (amcf->model_index == NGX_ERROR) {
        return NGX_OK;
    }

    model = ngx_http_get_indexed_variable(r, amcf->model_index);

    if (model == NULL || model->not_found || model->len == 0) {
        /* no model named here: /v1/models, say */
        return NGX_OK;
    }

    if (ngx_http_infer_list_match(&ctx->models, model->data, model->len)) {
        return NGX_OK;
    }

    target = ngx_http_get_indexed_variable(r, amcf->target_index);

    if (target && !target->not_found && target->len
        && ngx_http_infer_list_match(&ctx->models, target->data,
                                     target->len))
    {
        return NGX_OK;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "infer auth: tenant \"%V\" may not use model \"%v\"",
                  &ctx->tenant, model);

    if (lcf->denied == NGX_HTTP_NOT_FOUND) {
        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_FORBIDDEN, "model_not_found",
                   "The model `%*s` does not exist or you do not have "
                   "access to it.", model->len, model->data);
    }

    return ngx_http_infer_auth_reject(r, ctx, lcf,
               NGX_HTTP_INFER_AUTH_FORBIDDEN, "model_not_allowed",
               "You are not allowed to use the model `%*s`.",
               model->len, model->data);
}


/*
 * Removes the credential headers, so that model servers never see keys.
 * proxy_pass sends every element of headers_in.headers, so the list is
 * rebuilt without them; the known-header pointers into the old list stay
 * valid, as its memory stays with the request.
 */

static ngx_int_t
ngx_http_infer_auth_strip(ngx_http_request_t *r,
    ngx_http_infer_auth_loc_conf_t *lcf)
{
    ngx_uint_t        i, n, drop;
    ngx_list_t        old;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h, *nh;

    n = 0;
    drop = 0;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        n++;

        if ((h[i].key.len == lcf->header.len
             && ngx_strncmp(h[i].lowcase_key, lcf->header.data,
                            h[i].key.len) == 0)
            || (h[i].key.len == lcf->key_header.len
                && ngx_strncmp(h[i].lowcase_key, lcf->key_header.data,
                               h[i].key.len) == 0))
        {
            drop++;
        }
    }

    if (drop == 0) {
        return NGX_OK;
    }

    old = r->headers_in.headers;

    if (ngx_list_init(&r->headers_in.headers, r->pool, n - drop + 1,
                      sizeof(ngx_table_elt_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    part = &old.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if ((h[i].key.len == lcf->header.len
             && ngx_strncmp(h[i].lowcase_key, lcf->header.data,
                            h[i].key.len) == 0)
            || (h[i].key.len == lcf->key_header.len
                && ngx_strncmp(h[i].lowcase_key, lcf->key_header.data,
                               h[i].key.len) == 0))
        {
            continue;
        }

        nh = ngx_list_push(&r->headers_in.headers);
        if (nh == NULL) {
            return NGX_ERROR;
        }

        *nh = h[i];
    }

    r->headers_in.authorization = NULL;

    return NGX_OK;
}


/*
 * Records a refusal and returns the status nginx finalizes the request
 * with; the filters give it the OpenAI envelope.  fmt says what was wrong
 * without a secret; for a 401 it also goes in WWW-Authenticate (RFC 6750),
 * and so holds no double quote.
 */

static ngx_int_t
ngx_http_infer_auth_reject(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf,
    ngx_http_infer_auth_status_e status, const char *code,
    const char *fmt, ...)
{
    u_char     *p;
    u_char      buf[NGX_HTTP_INFER_AUTH_ERRSTR * 2];
    va_list     args;
    ngx_str_t   desc, *www;

    va_start(args, fmt);
    p = ngx_vslprintf(buf, buf + sizeof(buf), fmt, args);
    va_end(args);

    desc.data = buf;
    desc.len = p - buf;

    ctx->status = status;
    ctx->code = code;

    switch (status) {

    case NGX_HTTP_INFER_AUTH_FORBIDDEN:
        ctx->http_status = NGX_HTTP_FORBIDDEN;
        ctx->message.data = ngx_pstrdup(r->pool, &desc);
        ctx->message.len = desc.len;
        break;

    case NGX_HTTP_INFER_AUTH_UNAVAILABLE:
        ctx->http_status = NGX_HTTP_SERVICE_UNAVAILABLE;
        ctx->message.data = ngx_pstrdup(r->pool, &desc);
        ctx->message.len = desc.len;
        break;

    default:
        ctx->http_status = NGX_HTTP_UNAUTHORIZED;

        /* the header filter sends it, with the refusal only */

        www = &ctx->www_authenticate;

        www->data = ngx_pnalloc(r->pool,
                                sizeof("Bearer realm=\"\", error=\"invalid_token\""
                                       ", error_description=\"\"") - 1
                                + lcf->realm.len + desc.len);
        if (www->data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        p = ngx_sprintf(www->data, "Bearer realm=\"%V\"", &lcf->realm);

        if (status != NGX_HTTP_INFER_AUTH_MISSING) {
            p = ngx_sprintf(p, ", error=\"invalid_token\", "
                            "error_description=\"%V\"", &desc);
        }

        www->len = p - www->data;

        if (status == NGX_HTTP_INFER_AUTH_MISSING
            || ngx_strcmp(code, "invalid_api_key") == 0)
        {
            ctx->message.data = ngx_pstrdup(r->pool, &desc);
            ctx->message.len = desc.len;
            break;
        }

        ctx->message.data = ngx_pnalloc(r->pool, desc.len + 32);
        if (ctx->message.data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        p = ngx_sprintf(ctx->message.data, "Invalid token: %V.", &desc);
        ctx->message.len = p - ctx->message.data;

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "infer auth: invalid token: %V", &desc);
    }

    if (ctx->message.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ctx->http_status;
}


/*
 * The request's context; after an internal redirect, which clears the
 * module contexts, it is found again through its pool cleanup.
 */

static ngx_http_infer_auth_ctx_t *
ngx_http_infer_auth_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t         *cln;
    ngx_http_infer_auth_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_infer_auth_module);

    if (ctx || !r->main->internal) {
        return ctx;
    }

    for (cln = r->main->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_infer_auth_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r->main, ctx, ngx_http_infer_auth_module);
            return ctx;
        }
    }

    return NULL;
}


static void
ngx_http_infer_auth_cleanup(void *data)
{
    ngx_http_infer_auth_ctx_t  *ctx = data;

    ngx_http_infer_auth_jwt_free(&ctx->jwt);
}


/*
 * Makes sure the JWKS URL's keys are there and fresh before the token is
 * checked.  One request at a time, across workers, fetches (the node's
 * "fetching" deadline is the lock); the others go on with the keys they
 * have, or, when they have none or the token names an unknown kid, wait
 * for that fetch.  A request fetches or waits once at most.
 */

static ngx_int_t
ngx_http_infer_auth_jwks_prepare(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_jwks_uri_t *u)
{
    ngx_uint_t                        cold, stale, unknown, busy, fetch;
    ngx_msec_t                        now;
    ngx_slab_pool_t                  *shpool;
    ngx_http_infer_auth_jwks_node_t  *node;

    ngx_http_infer_auth_jwks_sync(u, r->connection->log);

    node = u->node;

    if (node == NULL || ctx->fetched) {
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) u->zone->shm.addr;
    now = ngx_current_msec;

    ngx_shmtx_lock(&shpool->mutex);

    if (ctx->waiting) {
        busy = (ngx_msec_int_t) (node->fetching - now) > 0;

        if (!busy || node->generation != ctx->wait_generation
            || (ngx_msec_int_t) (now - ctx->wait_until) >= 0)
        {
            ngx_shmtx_unlock(&shpool->mutex);

            ctx->waiting = 0;
            ctx->fetched = 1;

            ngx_http_infer_auth_jwks_sync(u, r->connection->log);
            return NGX_OK;
        }

        ngx_shmtx_unlock(&shpool->mutex);

        return ngx_http_infer_auth_wait(r, ctx);
    }

    cold = (node->generation == 0);
    stale = !cold && ngx_time() - node->fetched >= u->ttl;
    unknown = ctx->unknown_kid
              && (ngx_msec_int_t) (now - node->attempted)
                 >= (ngx_msec_int_t) u->refresh;
    busy = (ngx_msec_int_t) (node->fetching - now) > 0;

    fetch = 0;

    if ((cold || stale || unknown) && !busy) {
        node->fetching = now + u->timeout;
        node->attempted = now;
        fetch = 1;

    } else if ((cold || ctx->unknown_kid) && busy) {
        ctx->waiting = 1;
        ctx->wait_generation = node->generation;
        ctx->wait_until = now + u->timeout;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (fetch) {
        return ngx_http_infer_auth_jwks_fetch(r, ctx, u);
    }

    if (ctx->waiting) {
        return ngx_http_infer_auth_wait(r, ctx);
    }

    return NGX_OK;
}


/*
 * Brings the worker's keys up to the shared JWKS: parsed again only when
 * another generation was stored.
 */

static void
ngx_http_infer_auth_jwks_sync(ngx_http_infer_auth_jwks_uri_t *u,
    ngx_log_t *log)
{
    u_char                        err[NGX_HTTP_INFER_AUTH_ERRSTR];
    u_char                       *copy;
    size_t                        len;
    ngx_uint_t                    generation;
    ngx_slab_pool_t              *shpool;
    ngx_http_infer_auth_keyset_t *ks;

    if (u->node == NULL) {
        u->node = ngx_http_infer_auth_jwks_node(u);

        if (u->node == NULL) {
            return;
        }
    }

    shpool = (ngx_slab_pool_t *) u->zone->shm.addr;
    copy = NULL;
    len = 0;

    ngx_shmtx_lock(&shpool->mutex);

    generation = u->node->generation;

    if (generation != u->generation && u->node->len) {
        len = u->node->len;
        copy = ngx_alloc(len, log);

        if (copy) {
            ngx_memcpy(copy, u->node->data, len);
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (copy == NULL) {
        return;
    }

    ks = ngx_http_infer_auth_keyset_create(log);

    if (ks == NULL) {
        ngx_free(copy);
        return;
    }

    if (ngx_http_infer_auth_keyset_jwks(ks, copy, len, err) != NGX_OK) {
        /* it was checked before it was stored: not expected */
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "infer_auth_jwks_uri \"%V\": %s", &u->uri, err);
        ngx_http_infer_auth_keyset_free(ks);
        ngx_free(copy);
        return;
    }

    ngx_free(copy);

    ngx_http_infer_auth_keyset_free(u->keys);

    u->keys = ks;
    u->generation = generation;
}


static ngx_int_t
ngx_http_infer_auth_jwks_fetch(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_jwks_uri_t *u)
{
    ngx_http_request_t          *sr;
    ngx_http_post_subrequest_t  *ps;

    static ngx_str_t  get = ngx_string("GET");

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer auth: fetching JWKS from \"%V\"", &u->uri);

    ps = ngx_palloc(r->pool, sizeof(ngx_http_post_subrequest_t));
    if (ps == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ps->handler = ngx_http_infer_auth_jwks_done;
    ps->data = u;

    ctx->fetched = 1;

    /* the phases run again once the subrequest is done */
    r->write_event_handler = ngx_http_core_run_phases;

    if (ngx_http_subrequest(r, &u->uri, NULL, &sr, ps,
                            NGX_HTTP_SUBREQUEST_WAITED
                            |NGX_HTTP_SUBREQUEST_IN_MEMORY)
        != NGX_OK)
    {
        ngx_http_infer_auth_jwks_store(u, NULL, 0, r->connection->log);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* a GET without the client's body */

    sr->method = NGX_HTTP_GET;
    sr->method_name = get;
    sr->header_only = 0;

    sr->request_body = ngx_pcalloc(r->pool, sizeof(ngx_http_request_body_t));
    if (sr->request_body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return NGX_AGAIN;
}


static ngx_int_t
ngx_http_infer_auth_jwks_done(ngx_http_request_t *r, void *data,
    ngx_int_t rc)
{
    ngx_http_infer_auth_jwks_uri_t *u = data;

    u_char                        err[NGX_HTTP_INFER_AUTH_ERRSTR];
    ngx_buf_t                    *b;
    ngx_http_infer_auth_keyset_t *ks;

    b = r->out ? r->out->buf : NULL;

    if (rc != NGX_OK || r->headers_out.status != NGX_HTTP_OK
        || b == NULL || b->last == b->pos)
    {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "infer_auth_jwks_uri \"%V\": the fetch failed "
                      "(status %ui), keeping the keys cached",
                      &u->uri, r->headers_out.status);

        ngx_http_infer_auth_jwks_store(u, NULL, 0, r->connection->log);
        return rc;
    }

    /* checked before the other workers see it */

    ks = ngx_http_infer_auth_keyset_create(r->connection->log);

    if (ks == NULL
        || ngx_http_infer_auth_keyset_jwks(ks, b->pos, b->last - b->pos, err)
           != NGX_OK)
    {
        if (ks) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "infer_auth_jwks_uri \"%V\": %s, keeping the keys "
                          "cached", &u->uri, err);
        }

        ngx_http_infer_auth_keyset_free(ks);
        ngx_http_infer_auth_jwks_store(u, NULL, 0, r->connection->log);

        return rc;
    }

    ngx_http_infer_auth_keyset_free(ks);
    ngx_http_infer_auth_jwks_store(u, b->pos, b->last - b->pos,
                                   r->connection->log);

    return rc;
}


/*
 * Ends a fetch: with data, a new generation for every worker; without,
 * only the lock goes, and the cached keys stay.
 */

static void
ngx_http_infer_auth_jwks_store(ngx_http_infer_auth_jwks_uri_t *u,
    u_char *data, size_t len, ngx_log_t *log)
{
    u_char                           *copy;
    ngx_slab_pool_t                  *shpool;
    ngx_http_infer_auth_jwks_node_t  *node;

    node = u->node;
    shpool = (ngx_slab_pool_t *) u->zone->shm.addr;

    ngx_shmtx_lock(&shpool->mutex);

    node->fetching = ngx_current_msec;

    if (data) {
        copy = ngx_slab_alloc_locked(shpool, len);

        if (copy == NULL) {
            ngx_shmtx_unlock(&shpool->mutex);
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "infer_auth_jwks_uri \"%V\": a JWKS of %uz bytes "
                          "does not fit in the shared zone", &u->uri, len);
            return;
        }

        ngx_memcpy(copy, data, len);

        if (node->data) {
            ngx_slab_free_locked(shpool, node->data);
        }

        node->data = copy;
        node->len = len;
        node->generation++;
        node->fetched = ngx_time();
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (data) {
        ngx_log_error(NGX_LOG_INFO, log, 0,
                      "infer_auth_jwks_uri \"%V\": keys fetched", &u->uri);
    }
}


/* limit_req's way of delaying a request in its phase */

static ngx_int_t
ngx_http_infer_auth_wait(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx)
{
    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_infer_auth_wait_handler;

    r->connection->write->delayed = 1;
    ngx_add_timer(r->connection->write, NGX_HTTP_INFER_AUTH_POLL);

    return NGX_AGAIN;
}


static void
ngx_http_infer_auth_wait_handler(ngx_http_request_t *r)
{
    ngx_event_t  *wev;

    wev = r->connection->write;

    if (wev->delayed) {
        if (ngx_handle_write_event(wev, 0) != NGX_OK) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        }

        return;
    }

    if (ngx_handle_read_event(r->connection->read, 0) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);
}


/* the URL's node in the shared zone, made on first use */

static ngx_http_infer_auth_jwks_node_t *
ngx_http_infer_auth_jwks_node(ngx_http_infer_auth_jwks_uri_t *u)
{
    ngx_queue_t                      *q;
    ngx_slab_pool_t                  *shpool;
    ngx_http_infer_auth_shctx_t      *sh;
    ngx_http_infer_auth_jwks_node_t  *node;

    shpool = (ngx_slab_pool_t *) u->zone->shm.addr;
    sh = u->zone->data;

    ngx_shmtx_lock(&shpool->mutex);

    for (q = ngx_queue_head(&sh->nodes);
         q != ngx_queue_sentinel(&sh->nodes);
         q = ngx_queue_next(q))
    {
        node = ngx_queue_data(q, ngx_http_infer_auth_jwks_node_t, queue);

        if (node->uri.len == u->uri.len
            && ngx_strncmp(node->uri.data, u->uri.data, u->uri.len) == 0)
        {
            goto done;
        }
    }

    node = ngx_slab_calloc_locked(shpool,
                         sizeof(ngx_http_infer_auth_jwks_node_t) + u->uri.len);
    if (node == NULL) {
        goto done;
    }

    node->uri.data = (u_char *) node
                     + sizeof(ngx_http_infer_auth_jwks_node_t);
    node->uri.len = u->uri.len;
    ngx_memcpy(node->uri.data, u->uri.data, u->uri.len);

    ngx_queue_insert_tail(&sh->nodes, &node->queue);

done:

    ngx_shmtx_unlock(&shpool->mutex);

    return node;
}


static ngx_int_t
ngx_http_infer_auth_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_slab_pool_t              *shpool;
    ngx_http_infer_auth_shctx_t  *sh;

    if (data) {
        /* a reload keeps the fetched keys */
        shm_zone->data = data;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        shm_zone->data = shpool->data;
        return NGX_OK;
    }

    sh = ngx_slab_alloc(shpool, sizeof(ngx_http_infer_auth_shctx_t));
    if (sh == NULL) {
        return NGX_ERROR;
    }

    ngx_queue_init(&sh->nodes);

    shpool->data = sh;
    shm_zone->data = sh;

    shpool->log_ctx = (u_char *) " in infer_auth_jwks_uri zone";
    shpool->log_nomem = 0;

    return NGX_OK;
}


/*
 * Reads a watched file into a new key set or API key table; on success
 * the new one replaces the old, and otherwise the old stays.
 */

static ngx_int_t
ngx_http_infer_auth_watch_load(ngx_http_infer_auth_watch_t *w,
    ngx_log_t *log, u_char *err)
{
    u_char                        *buf;
    void                          *data;
    size_t                         len;
    ngx_http_infer_auth_keyset_t  *ks;

    buf = ngx_http_infer_file_read(&w->file, NGX_HTTP_INFER_AUTH_FILE_MAX,
                                   &len, log, err,
                                   NGX_HTTP_INFER_AUTH_ERRSTR);
    if (buf == NULL) {
        return NGX_ERROR;
    }

    if (w->jwks) {
        ks = ngx_http_infer_auth_keyset_create(log);

        if (ks && ngx_http_infer_auth_keyset_jwks(ks, buf, len, err)
                  != NGX_OK)
        {
            ngx_http_infer_auth_keyset_free(ks);
            ks = NULL;
        }

        data = ks;

    } else {
        data = ngx_http_infer_auth_apikeys_parse(buf, len, log, err);
    }

    ngx_free(buf);

    if (data == NULL) {
        return NGX_ERROR;
    }

    ngx_http_infer_auth_data_free(w, w->data);
    w->data = data;

    return NGX_OK;
}


static void
ngx_http_infer_auth_data_free(ngx_http_infer_auth_watch_t *w, void *data)
{
    if (data == NULL) {
        return;
    }

    if (w->jwks) {
        ngx_http_infer_auth_keyset_free(data);

    } else {
        ngx_destroy_pool(((ngx_http_infer_auth_apikeys_t *) data)->pool);
    }
}


/*
 * Every worker follows the file; worker 0 speaks for them all in the error
 * log, so that one failure is one line.
 */

static void
ngx_http_infer_auth_watch_timer(ngx_event_t *ev)
{
    ngx_http_infer_auth_watch_t *w = ev->data;

    u_char      err[NGX_HTTP_INFER_AUTH_ERRSTR];
    ngx_int_t   rc;
    ngx_uint_t  level;

    if (ngx_exiting) {
        return;
    }

    rc = ngx_http_infer_file_check(&w->file, err, sizeof(err));

    if (rc == NGX_OK) {
        rc = ngx_http_infer_auth_watch_load(w, ev->log, err);

        level = (ngx_worker == 0) ? NGX_LOG_NOTICE : NGX_LOG_DEBUG;

        if (rc == NGX_OK) {
            ngx_log_error(level, ev->log, 0, "%s \"%V\": loaded",
                          w->jwks ? "infer_auth_jwks" : "infer_auth_api_keys",
                          &w->file.name);
        }
    }

    if (rc == NGX_ERROR) {
        level = (ngx_worker == 0) ? NGX_LOG_ERR : NGX_LOG_DEBUG;

        ngx_log_error(level, ev->log, 0, "%s \"%V\": %s, keeping the keys "
                      "loaded before",
                      w->jwks ? "infer_auth_jwks" : "infer_auth_api_keys",
                      &w->file.name, err);
    }

    ngx_add_timer(ev, w->interval);
}


/*
 * {"keys": [{"id", "hash": "sha256:<hex>", "tenant", "plan", "models",
 * "disabled"}]}
 */

static ngx_http_infer_auth_apikeys_t *
ngx_http_infer_auth_apikeys_parse(u_char *data, size_t len, ngx_log_t *log,
    u_char *err)
{
    size_t                          i;
    json_t                         *root, *list, *obj;
    ngx_pool_t                     *pool;
    ngx_uint_t                      n;
    json_error_t                    jerr;
    ngx_http_infer_auth_apikey_t   *k;
    ngx_http_infer_auth_apikeys_t  *keys;

    root = json_loadb((char *) data, len, JSON_REJECT_DUPLICATES, &jerr);

    if (root == NULL) {
        ngx_http_infer_auth_error(err, "invalid JSON at line %d, column %d: "
                                  "%s", jerr.line, jerr.column, jerr.text);
        return NULL;
    }

    list = json_object_get(root, "keys");

    if (!json_is_array(list)) {
        ngx_http_infer_auth_error(err, "no \"keys\" array");
        json_decref(root);
        return NULL;
    }

    pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, log);
    if (pool == NULL) {
        json_decref(root);
        return NULL;
    }

    keys = ngx_pcalloc(pool, sizeof(ngx_http_infer_auth_apikeys_t));
    if (keys == NULL
        || ngx_array_init(&keys->keys, pool, json_array_size(list) + 1,
                          sizeof(ngx_http_infer_auth_apikey_t))
           != NGX_OK)
    {
        goto failed;
    }

    keys->pool = pool;

    json_array_foreach(list, i, obj) {
        k = ngx_array_push(&keys->keys);
        if (k == NULL) {
            goto failed;
        }

        if (ngx_http_infer_auth_apikey_parse(obj, i, pool, k, err) != NGX_OK)
        {
            goto failed;
        }
    }

    json_decref(root);
    root = NULL;

    ngx_sort(keys->keys.elts, keys->keys.nelts,
             sizeof(ngx_http_infer_auth_apikey_t),
             ngx_http_infer_auth_apikey_cmp);

    k = keys->keys.elts;

    for (n = 1; n < keys->keys.nelts; n++) {
        if (ngx_memcmp(k[n - 1].hash, k[n].hash, SHA256_DIGEST_LENGTH) == 0) {
            ngx_http_infer_auth_error(err, "keys \"%V\" and \"%V\" have the "
                                      "same hash", &k[n - 1].id, &k[n].id);
            goto failed;
        }
    }

    return keys;

failed:

    if (root) {
        json_decref(root);
    }

    ngx_destroy_pool(pool);

    return NULL;
}


static ngx_int_t
ngx_http_infer_auth_apikey_parse(json_t *obj, size_t n, ngx_pool_t *pool,
    ngx_http_infer_auth_apikey_t *k, u_char *err)
{
    u_char      *h;
    json_t      *v;
    ngx_int_t    hi, lo;
    ngx_uint_t   i;
    ngx_str_t    s;

    ngx_memzero(k, sizeof(ngx_http_infer_auth_apikey_t));

    if (!json_is_object(obj)) {
        ngx_http_infer_auth_error(err, "key %uz: not an object", n);
        return NGX_ERROR;
    }

    v = json_object_get(obj, "id");

    if (!json_is_string(v) || json_string_length(v) == 0) {
        ngx_http_infer_auth_error(err, "key %uz: no \"id\"", n);
        return NGX_ERROR;
    }

    s.data = (u_char *) json_string_value(v);
    s.len = json_string_length(v);

    k->id.data = ngx_pstrdup(pool, &s);
    k->id.len = s.len;

    v = json_object_get(obj, "tenant");

    if (!json_is_string(v) || json_string_length(v) == 0) {
        ngx_http_infer_auth_error(err, "key \"%V\": no \"tenant\"", &k->id);
        return NGX_ERROR;
    }

    s.data = (u_char *) json_string_value(v);
    s.len = json_string_length(v);

    k->tenant.data = ngx_pstrdup(pool, &s);
    k->tenant.len = s.len;

    v = json_object_get(obj, "hash");

    if (!json_is_string(v)
        || json_string_length(v) != sizeof("sha256:") - 1
                                    + 2 * SHA256_DIGEST_LENGTH
        || ngx_strncmp(json_string_value(v), "sha256:",
                       sizeof("sha256:") - 1) != 0)
    {
        ngx_http_infer_auth_error(err, "key \"%V\": \"hash\" must be "
                                  "\"sha256:\" and 64 hex digits", &k->id);
        return NGX_ERROR;
    }

    h = (u_char *) json_string_value(v) + sizeof("sha256:") - 1;

    for (i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        hi = ngx_hextoi(&h[2 * i], 1);
        lo = ngx_hextoi(&h[2 * i + 1], 1);

        if (hi == NGX_ERROR || lo == NGX_ERROR) {
            ngx_http_infer_auth_error(err, "key \"%V\": \"hash\" must be "
                                      "\"sha256:\" and 64 hex digits",
                                      &k->id);
            return NGX_ERROR;
        }

        k->hash[i] = (u_char) (hi << 4 | lo);
    }

    v = json_object_get(obj, "plan");

    if (v && !json_is_null(v)) {
        if (!json_is_string(v)) {
            ngx_http_infer_auth_error(err, "key \"%V\": \"plan\" must be a "
                                      "string", &k->id);
            return NGX_ERROR;
        }

        s.data = (u_char *) json_string_value(v);
        s.len = json_string_length(v);

        k->plan.data = ngx_pstrdup(pool, &s);
        k->plan.len = s.len;
    }

    v = json_object_get(obj, "models");

    if (v && !json_is_null(v)
        && ngx_http_infer_auth_join(pool, v, &k->models) != NGX_OK)
    {
        ngx_http_infer_auth_error(err, "key \"%V\": \"models\" must be an "
                                  "array of strings", &k->id);
        return NGX_ERROR;
    }

    v = json_object_get(obj, "disabled");

    if (v && !json_is_boolean(v)) {
        ngx_http_infer_auth_error(err, "key \"%V\": \"disabled\" must be "
                                  "true or false", &k->id);
        return NGX_ERROR;
    }

    k->disabled = json_is_true(v);

    return NGX_OK;
}


/*
 * A list of models, a JSON array of strings or one string, as one string
 * of names separated by spaces: the form $infer_allowed_models shows and
 * infer_model_list reads.
 */

static ngx_int_t
ngx_http_infer_auth_join(ngx_pool_t *pool, json_t *v, ngx_str_t *out)
{
    u_char  *p;
    size_t   i, len;
    json_t  *e;

    if (json_is_string(v)) {
        out->len = json_string_length(v);
        out->data = ngx_pnalloc(pool, out->len + 1);
        if (out->data == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(out->data, json_string_value(v), out->len);
        return NGX_OK;
    }

    if (!json_is_array(v)) {
        return NGX_ERROR;
    }

    len = 0;

    json_array_foreach(v, i, e) {
        if (!json_is_string(e)) {
            return NGX_ERROR;
        }

        len += json_string_length(e) + 1;
    }

    out->data = ngx_pnalloc(pool, len + 1);
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    p = out->data;

    json_array_foreach(v, i, e) {
        if (i) {
            *p++ = ' ';
        }

        p = ngx_cpymem(p, json_string_value(e), json_string_length(e));
    }

    out->len = p - out->data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_auth_apikey_cmp(const void *one, const void *two)
{
    const ngx_http_infer_auth_apikey_t  *a = one, *b = two;

    return ngx_memcmp(a->hash, b->hash, SHA256_DIGEST_LENGTH);
}


/*
 * Gives nginx's page for a refusal of ours the OpenAI envelope (and a
 * model refusal the status infer_auth_model_denied chose).  Only answers
 * nginx made itself are touched: never one from an upstream.
 */

static ngx_int_t
ngx_http_infer_auth_header_filter(ngx_http_request_t *r)
{
    ngx_table_elt_t                 *h;
    ngx_http_infer_auth_ctx_t       *ctx;
    ngx_http_infer_auth_loc_conf_t  *lcf;

    static u_char  ct[] = "application/json";

    if (r != r->main || r->upstream) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_auth_module);

    if (ctx == NULL || ctx->http_status == 0 || ctx->replaced
        || r->headers_out.status != ctx->http_status)
    {
        return ngx_http_next_header_filter(r);
    }

    ctx->replaced = 1;

    if (ctx->www_authenticate.len) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "WWW-Authenticate");
        h->value = ctx->www_authenticate;
    }

    if (ctx->status == NGX_HTTP_INFER_AUTH_FORBIDDEN) {
        lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_auth_module);

        r->headers_out.status = (lcf->denied == NGX_HTTP_NOT_FOUND)
                                ? NGX_HTTP_NOT_FOUND : NGX_HTTP_FORBIDDEN;
        r->headers_out.status_line.len = 0;

        /* what $status logs */
        r->err_status = r->headers_out.status;
    }

    r->headers_out.content_type.len = sizeof(ct) - 1;
    r->headers_out.content_type.data = ct;
    r->headers_out.content_type_len = sizeof(ct) - 1;
    r->headers_out.content_type_lowcase = NULL;

    r->headers_out.content_length_n = sizeof("{\"error\": {\"message\": \"")
        - 1 + ctx->message.len
        + ngx_escape_json(NULL, ctx->message.data, ctx->message.len)
        + sizeof("\", \"type\": \"invalid_request_error\", \"param\": null, "
                 "\"code\": \"\"}}\n") - 1
        + ngx_strlen(ctx->code);

    if (r->headers_out.content_length) {
        r->headers_out.content_length->hash = 0;
        r->headers_out.content_length = NULL;
    }

    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_etag(r);

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_infer_auth_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_buf_t                  *b;
    ngx_chain_t                *cl, out;
    ngx_http_infer_auth_ctx_t  *ctx;

    if (r != r->main) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_auth_module);

    if (ctx == NULL || !ctx->replaced) {
        return ngx_http_next_body_filter(r, in);
    }

    /* nginx's own page is dropped */

    for (cl = in; cl; cl = cl->next) {
        cl->buf->pos = cl->buf->last;
        cl->buf->file_pos = cl->buf->file_last;
    }

    if (ctx->sent) {
        return ngx_http_next_body_filter(r, NULL);
    }

    ctx->sent = 1;

    b = ngx_http_infer_error_buf(r->pool, "invalid_request_error", ctx->code,
                                 &ctx->message);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->last_buf = 1;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_next_body_filter(r, &out);
}


static ngx_int_t
ngx_http_infer_auth_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                  *s;
    ngx_http_infer_auth_ctx_t  *ctx;

    ctx = ngx_http_infer_auth_get_ctx(r);

    if (ctx == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    s = (ngx_str_t *) ((char *) ctx + data);

    if (s->data == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = s->len;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
    v->data = s->data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_auth_variable_status(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_infer_auth_ctx_t  *ctx;

    ctx = ngx_http_infer_auth_get_ctx(r);

    if (ctx == NULL || ctx->status == NGX_HTTP_INFER_AUTH_NONE) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = ngx_http_infer_auth_statuses[ctx->status].len;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
    v->data = ngx_http_infer_auth_statuses[ctx->status].data;

    return NGX_OK;
}


/*
 * $infer_claim_NAME: a string claim as it is, an array of strings joined
 * by spaces, any other value as compact JSON.
 */

static ngx_int_t
ngx_http_infer_auth_variable_claim(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t *var = (ngx_str_t *) data;

    char                       *dump;
    u_char                      name[128];
    json_t                     *c;
    size_t                      len;
    ngx_str_t                   s;
    ngx_http_infer_auth_ctx_t  *ctx;

    ctx = ngx_http_infer_auth_get_ctx(r);
    len = var->len - (sizeof("infer_claim_") - 1);

    if (ctx == NULL || ctx->jwt.payload == NULL || ctx->status
        != NGX_HTTP_INFER_AUTH_OK || len >= sizeof(name))
    {
        v->not_found = 1;
        return NGX_OK;
    }

    ngx_memcpy(name, var->data + sizeof("infer_claim_") - 1, len);
    name[len] = '\0';

    c = json_object_get(ctx->jwt.payload, (char *) name);

    if (c == NULL || json_is_null(c)) {
        v->not_found = 1;
        return NGX_OK;
    }

    if (json_is_string(c) || json_is_array(c)) {
        if (ngx_http_infer_auth_join(r->pool, c, &s) == NGX_OK) {
            goto found;
        }
    }

    dump = json_dumps(c, JSON_COMPACT|JSON_ENCODE_ANY);
    if (dump == NULL) {
        return NGX_ERROR;
    }

    s.len = ngx_strlen(dump);
    s.data = ngx_pnalloc(r->pool, s.len);

    if (s.data == NULL) {
        free(dump);
        return NGX_ERROR;
    }

    ngx_memcpy(s.data, dump, s.len);
    free(dump);

found:

    v->len = s.len;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
    v->data = s.data;

    return NGX_OK;
}


/*
 * infer_auth_jwt_key file [alg=] [kid=]: read now, so that "nginx -t"
 * names a wrong key.
 */

static char *
ngx_http_infer_auth_jwt_key_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_auth_loc_conf_t *lcf = conf;

    u_char                  err[NGX_HTTP_INFER_AUTH_ERRSTR];
    u_char                 *buf;
    size_t                  len;
    ngx_str_t              *value, alg, kid;
    ngx_uint_t              i;
    ngx_pool_cleanup_t     *cln;
    ngx_http_infer_file_t   file;

    value = cf->args->elts;

    ngx_str_null(&alg);
    ngx_str_null(&kid);

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "alg=", 4) == 0) {
            alg.data = value[i].data + 4;
            alg.len = value[i].len - 4;
            continue;
        }

        if (ngx_strncmp(value[i].data, "kid=", 4) == 0) {
            kid.data = value[i].data + 4;
            kid.len = value[i].len - 4;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (lcf->keys == NULL) {
        lcf->keys = ngx_http_infer_auth_keyset_create(cf->log);
        if (lcf->keys == NULL) {
            return NGX_CONF_ERROR;
        }

        cln = ngx_pool_cleanup_add(cf->pool, 0);
        if (cln == NULL) {
            ngx_http_infer_auth_keyset_free(lcf->keys);
            return NGX_CONF_ERROR;
        }

        cln->handler = ngx_http_infer_auth_conf_cleanup;
        cln->data = lcf->keys;
    }

    ngx_memzero(&file, sizeof(ngx_http_infer_file_t));
    file.name = value[1];

    if (ngx_conf_full_name(cf->cycle, &file.name, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    buf = ngx_http_infer_file_read(&file, NGX_HTTP_INFER_AUTH_FILE_MAX, &len,
                                   cf->log, err, sizeof(err));
    if (buf == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_auth_jwt_key \"%V\": %s", &value[1], err);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_infer_auth_keyset_pem(lcf->keys, buf, len, &alg, &kid, err)
        != NGX_OK)
    {
        ngx_explicit_memzero(buf, len);
        ngx_free(buf);
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_auth_jwt_key \"%V\": %s", &value[1], err);
        return NGX_CONF_ERROR;
    }

    ngx_explicit_memzero(buf, len);
    ngx_free(buf);

    return NGX_CONF_OK;
}


static void
ngx_http_infer_auth_conf_cleanup(void *data)
{
    ngx_http_infer_auth_keyset_free(data);
}


/* the free of a watched file's data when its cycle goes */

static void
ngx_http_infer_auth_watch_cleanup(void *data)
{
    ngx_http_infer_auth_watch_t *w = data;

    ngx_http_infer_auth_data_free(w, w->data);
    w->data = NULL;
}


/*
 * infer_auth_api_keys file [interval=] and infer_auth_jwks file
 * [interval=]: read now, so that "nginx -t" names a broken file.
 */

static char *
ngx_http_infer_auth_file_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    char  *p = conf;

    u_char                            err[NGX_HTTP_INFER_AUTH_ERRSTR];
    ngx_str_t                        *value, s;
    ngx_msec_t                        interval;
    ngx_pool_cleanup_t               *cln;
    ngx_http_infer_auth_watch_t     **wp, *w;
    ngx_http_infer_auth_main_conf_t  *amcf;

    wp = (ngx_http_infer_auth_watch_t **) (p + cmd->offset);

    if (*wp != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;
    interval = 5000;

    if (cf->args->nelts == 3) {
        if (ngx_strncmp(value[2].data, "interval=", 9) != 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[2]);
            return NGX_CONF_ERROR;
        }

        s.data = value[2].data + 9;
        s.len = value[2].len - 9;

        interval = ngx_parse_time(&s, 0);

        if (interval == (ngx_msec_t) NGX_ERROR || interval == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid interval \"%V\"", &value[2]);
            return NGX_CONF_ERROR;
        }
    }

    w = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_auth_watch_t));
    if (w == NULL) {
        return NGX_CONF_ERROR;
    }

    w->file.name = value[1];
    w->interval = interval;
    w->jwks = (cmd->offset
               == offsetof(ngx_http_infer_auth_loc_conf_t, jwks_file));

    if (ngx_conf_full_name(cf->cycle, &w->file.name, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_http_infer_auth_watch_cleanup;
    cln->data = w;

    if (ngx_http_infer_auth_watch_load(w, cf->log, err) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%V \"%V\": %s",
                           &cmd->name, &value[1], err);
        return NGX_CONF_ERROR;
    }

    amcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_infer_auth_module);

    wp = ngx_array_push(&amcf->watches);
    if (wp == NULL) {
        return NGX_CONF_ERROR;
    }

    *wp = w;
    *(ngx_http_infer_auth_watch_t **) (p + cmd->offset) = w;

    return NGX_CONF_OK;
}


static char *
ngx_http_infer_auth_jwks_uri_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_auth_loc_conf_t *lcf = conf;

    ngx_str_t                        *value, s, name;
    ngx_uint_t                        i;
    ngx_msec_t                        t;
    ngx_http_infer_auth_jwks_uri_t   *u;
    ngx_http_infer_auth_main_conf_t  *amcf;

    if (lcf->jwks_uri != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 0 || value[1].data[0] != '/') {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_auth_jwks_uri \"%V\" must be a URI of "
                           "this server, such as \"/_jwks\", whose location "
                           "proxies to the identity provider", &value[1]);
        return NGX_CONF_ERROR;
    }

    u = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_auth_jwks_uri_t));
    if (u == NULL) {
        return NGX_CONF_ERROR;
    }

    u->uri = value[1];
    u->ttl = 600;
    u->refresh = 30000;
    u->timeout = 5000;

    for (i = 2; i < cf->args->nelts; i++) {

        s = value[i];

        if (ngx_strncmp(s.data, "ttl=", 4) == 0) {
            s.data += 4;
            s.len -= 4;
            t = ngx_parse_time(&s, 1);

            if (t == (ngx_msec_t) NGX_ERROR || t == 0) {
                goto invalid;
            }

            u->ttl = (time_t) t;
            continue;
        }

        if (ngx_strncmp(s.data, "refresh=", 8) == 0) {
            s.data += 8;
            s.len -= 8;
            t = ngx_parse_time(&s, 0);

            if (t == (ngx_msec_t) NGX_ERROR) {
                goto invalid;
            }

            u->refresh = t;
            continue;
        }

        if (ngx_strncmp(s.data, "timeout=", 8) == 0) {
            s.data += 8;
            s.len -= 8;
            t = ngx_parse_time(&s, 0);

            if (t == (ngx_msec_t) NGX_ERROR || t == 0) {
                goto invalid;
            }

            u->timeout = t;
            continue;
        }

        goto invalid;
    }

    amcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_infer_auth_module);

    if (amcf->zone == NULL) {
        ngx_str_set(&name, "infer_auth_jwks");

        amcf->zone = ngx_shared_memory_add(cf, &name, 1024 * 1024,
                                           &ngx_http_infer_auth_module);
        if (amcf->zone == NULL) {
            return NGX_CONF_ERROR;
        }

        amcf->zone->init = ngx_http_infer_auth_init_zone;
    }

    u->zone = amcf->zone;
    lcf->jwks_uri = u;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_infer_auth_tenant_models_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_auth_loc_conf_t *lcf = conf;

    u_char                        *p;
    size_t                         len;
    ngx_str_t                     *value;
    ngx_uint_t                     i;
    ngx_http_infer_auth_tenant_t  *t;

    value = cf->args->elts;

    if (lcf->tenants == NULL) {
        lcf->tenants = ngx_array_create(cf->pool, 4,
                                        sizeof(ngx_http_infer_auth_tenant_t));
        if (lcf->tenants == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    t = lcf->tenants->elts;

    for (i = 0; i < lcf->tenants->nelts; i++) {
        if (t[i].tenant.len == value[1].len
            && ngx_strncmp(t[i].tenant.data, value[1].data, value[1].len)
               == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate tenant \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    t = ngx_array_push(lcf->tenants);
    if (t == NULL) {
        return NGX_CONF_ERROR;
    }

    t->tenant = value[1];

    len = 0;

    for (i = 2; i < cf->args->nelts; i++) {
        len += value[i].len + 1;
    }

    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    t->models.data = p;

    for (i = 2; i < cf->args->nelts; i++) {
        if (i > 2) {
            *p++ = ' ';
        }

        p = ngx_cpymem(p, value[i].data, value[i].len);
    }

    t->models.len = p - t->models.data;

    return NGX_CONF_OK;
}


/* a header name, kept in lowercase to compare with lowcase_key */

static char *
ngx_http_infer_auth_header_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    char  *p = conf;

    u_char       c;
    ngx_str_t   *s, *value;
    ngx_uint_t   i;

    s = (ngx_str_t *) (p + cmd->offset);

    if (s->data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    for (i = 0; i < value[1].len; i++) {
        c = ngx_tolower(value[1].data[i]);

        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
              || c == '-' || c == '_'))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid header name \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }
    }

    if (value[1].len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "empty header name");
        return NGX_CONF_ERROR;
    }

    s->len = value[1].len;
    s->data = ngx_pnalloc(cf->pool, s->len);
    if (s->data == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_strlow(s->data, value[1].data, s->len);

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_infer_auth_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_infer_auth_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static void *
ngx_http_infer_auth_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_infer_auth_main_conf_t  *amcf;

    amcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_auth_main_conf_t));
    if (amcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&amcf->watches, cf->pool, 2,
                       sizeof(ngx_http_infer_auth_watch_t *))
        != NGX_OK)
    {
        return NULL;
    }

    amcf->model_index = NGX_ERROR;
    amcf->target_index = NGX_ERROR;

    return amcf;
}


static void *
ngx_http_infer_auth_create_conf(ngx_conf_t *cf)
{
    ngx_http_infer_auth_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_auth_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->keys = NULL;
     *     conf->tenants = NULL;
     *     conf->tenant_claim = { 0, NULL };
     *     conf->header = { 0, NULL };
     */

    conf->enable = NGX_CONF_UNSET;
    conf->jwks_file = NGX_CONF_UNSET_PTR;
    conf->jwks_uri = NGX_CONF_UNSET_PTR;
    conf->api_keys = NGX_CONF_UNSET_PTR;
    conf->issuers = NGX_CONF_UNSET_PTR;
    conf->audiences = NGX_CONF_UNSET_PTR;
    conf->required = NGX_CONF_UNSET_PTR;
    conf->denied = NGX_CONF_UNSET_UINT;
    conf->leeway = NGX_CONF_UNSET;
    conf->strip = NGX_CONF_UNSET;

    return conf;
}


static char *
ngx_http_infer_auth_merge_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_infer_auth_loc_conf_t  *prev = parent;
    ngx_http_infer_auth_loc_conf_t  *conf = child;

    ngx_conf_merge_value(conf->enable, prev->enable, 0);

    if (conf->keys == NULL) {
        conf->keys = prev->keys;
    }

    if (conf->tenants == NULL) {
        conf->tenants = prev->tenants;
    }

    ngx_conf_merge_ptr_value(conf->jwks_file, prev->jwks_file, NULL);
    ngx_conf_merge_ptr_value(conf->jwks_uri, prev->jwks_uri, NULL);
    ngx_conf_merge_ptr_value(conf->api_keys, prev->api_keys, NULL);
    ngx_conf_merge_ptr_value(conf->issuers, prev->issuers, NULL);
    ngx_conf_merge_ptr_value(conf->audiences, prev->audiences, NULL);
    ngx_conf_merge_ptr_value(conf->required, prev->required, NULL);

    ngx_conf_merge_str_value(conf->tenant_claim, prev->tenant_claim,
                             "tenant");
    ngx_conf_merge_str_value(conf->models_claim, prev->models_claim,
                             "models");
    ngx_conf_merge_str_value(conf->plan_claim, prev->plan_claim, "plan");
    ngx_conf_merge_str_value(conf->header, prev->header, "authorization");
    ngx_conf_merge_str_value(conf->key_header, prev->key_header,
                             "x-api-key");
    ngx_conf_merge_str_value(conf->realm, prev->realm, "ngx_infer");

    ngx_conf_merge_uint_value(conf->denied, prev->denied, NGX_HTTP_NOT_FOUND);
    ngx_conf_merge_sec_value(conf->leeway, prev->leeway, 0);
    ngx_conf_merge_value(conf->strip, prev->strip, 1);

    if (conf->realm.len == 0
        || ngx_strlchr(conf->realm.data, conf->realm.data + conf->realm.len,
                       '"'))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_auth_realm must be a non-empty string "
                           "without double quotes");
        return NGX_CONF_ERROR;
    }

    if (conf->enable && conf->keys == NULL && conf->jwks_file == NULL
        && conf->jwks_uri == NULL && conf->api_keys == NULL)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"infer_auth on\" needs infer_auth_api_keys, "
                           "infer_auth_jwt_key, infer_auth_jwks or "
                           "infer_auth_jwks_uri");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * The pipeline gives each ngx_infer module a phase of its own, so the
 * order of load_module lines never changes what runs first.  The model
 * check uses ngx_infer_route's variables only when that module is loaded.
 */

static ngx_int_t
ngx_http_infer_auth_init(ngx_conf_t *cf)
{
    ngx_str_t                         model, target;
    ngx_uint_t                        i;
    ngx_hash_key_t                   *key;
    ngx_http_handler_pt              *h;
    ngx_http_core_main_conf_t        *cmcf;
    ngx_http_infer_auth_main_conf_t  *amcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);
    amcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_infer_auth_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_infer_auth_handler;

    ngx_str_set(&model, "infer_model");
    ngx_str_set(&target, "infer_model_target");

    key = cmcf->variables_keys->keys.elts;

    for (i = 0; i < cmcf->variables_keys->keys.nelts; i++) {
        if (key[i].key.len == model.len
            && ngx_strncmp(key[i].key.data, model.data, model.len) == 0)
        {
            amcf->model_index = ngx_http_get_variable_index(cf, &model);
            amcf->target_index = ngx_http_get_variable_index(cf, &target);
            break;
        }
    }

    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_infer_auth_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_infer_auth_body_filter;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_auth_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                        i;
    ngx_http_infer_auth_watch_t     **w;
    ngx_http_infer_auth_main_conf_t  *amcf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    amcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_infer_auth_module);
    if (amcf == NULL) {
        return NGX_OK;
    }

    w = amcf->watches.elts;

    for (i = 0; i < amcf->watches.nelts; i++) {
        w[i]->event.handler = ngx_http_infer_auth_watch_timer;
        w[i]->event.data = w[i];
        w[i]->event.log = cycle->log;

        /* a graceful shutdown does not wait for it */
        w[i]->event.cancelable = 1;

        ngx_add_timer(&w[i]->event, w[i]->interval);
    }

    return NGX_OK;
}


static void
ngx_http_infer_auth_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                        i;
    ngx_http_infer_auth_watch_t     **w;
    ngx_http_infer_auth_main_conf_t  *amcf;

    amcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_infer_auth_module);
    if (amcf == NULL) {
        return;
    }

    w = amcf->watches.elts;

    for (i = 0; i < amcf->watches.nelts; i++) {
        if (w[i]->event.timer_set) {
            ngx_del_timer(&w[i]->event);
        }
    }
}


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
#include "ngx_http_infer_auth.h"


static ngx_int_t ngx_http_infer_auth_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_auth_decide(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf);
static ngx_int_t ngx_http_infer_auth_unkeyed(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf);
static ngx_int_t ngx_http_infer_auth_credential(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf);
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
static ngx_uint_t ngx_http_infer_auth_credential_header(
    ngx_http_infer_auth_loc_conf_t *lcf, ngx_table_elt_t *h);
static void ngx_http_infer_auth_reset(ngx_http_infer_auth_ctx_t *ctx);
static ngx_http_infer_auth_ctx_t *ngx_http_infer_auth_get_ctx(
    ngx_http_request_t *r);
static void ngx_http_infer_auth_cleanup(void *data);
static ngx_int_t ngx_http_infer_auth_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_infer_auth_variable_status(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_infer_auth_variable_claim(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static char *ngx_http_infer_auth_strings_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_auth_token_cache_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_auth_tenant_models_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_infer_auth_header_conf(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_infer_auth_add_variables(ngx_conf_t *cf);
static void *ngx_http_infer_auth_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_infer_auth_create_conf(ngx_conf_t *cf);
static char *ngx_http_infer_auth_merge_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_infer_auth_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_infer_auth_init_process(ngx_cycle_t *cycle);
static void ngx_http_infer_auth_exit_process(ngx_cycle_t *cycle);


static ngx_conf_enum_t  ngx_http_infer_auth_enable[] = {
    { ngx_string("off"), NGX_HTTP_INFER_AUTH_OFF },
    { ngx_string("on"), NGX_HTTP_INFER_AUTH_ON },
    { ngx_string("required"), NGX_HTTP_INFER_AUTH_REQUIRED },
    { ngx_null_string, 0 }
};


static ngx_conf_enum_t  ngx_http_infer_auth_denied[] = {
    { ngx_string("403"), NGX_HTTP_FORBIDDEN },
    { ngx_string("404"), NGX_HTTP_NOT_FOUND },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_infer_auth_commands[] = {

    { ngx_string("infer_auth"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, enable),
      &ngx_http_infer_auth_enable },

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
      ngx_http_infer_auth_strings_conf,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, issuers),
      NULL },

    { ngx_string("infer_auth_audience"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_infer_auth_strings_conf,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_infer_auth_loc_conf_t, audiences),
      NULL },

    { ngx_string("infer_auth_require_claim"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_infer_auth_strings_conf,
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

    { ngx_string("infer_auth_token_cache"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_infer_auth_token_cache_conf,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
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
      offsetof(ngx_http_infer_auth_ctx_t, tenant),
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_subject"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, subject),
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_key_id"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, key_id),
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_auth_method"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, method),
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_plan"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, plan),
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("infer_allowed_models"), NULL, ngx_http_infer_auth_variable,
      offsetof(ngx_http_infer_auth_ctx_t, models),
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

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



/*
 * The ACCESS handler.  A decision is made once per request and kept: the
 * phase runs again after an internal redirect (a route failover, an
 * error_page), and again when a JWKS fetch this request waited for ends.
 * A refusal is returned as a status, not sent, so that "satisfy any" can
 * still let allow pass the request; the filters then give nginx's error
 * page the OpenAI envelope (ngx_http_infer_auth_filter.c).
 */

static ngx_int_t
ngx_http_infer_auth_handler(ngx_http_request_t *r)
{
    ngx_int_t                        rc;
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
        /* the cleanup frees the token's JSON */

        ctx = ngx_http_infer_ctx_create(r, &ngx_http_infer_auth_module,
                                        sizeof(ngx_http_infer_auth_ctx_t),
                                        ngx_http_infer_auth_cleanup);
        if (ctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    if (ctx->decided) {
        if (ctx->conf == lcf) {
            return ctx->rc;
        }

        /*
         * an internal redirect to a location configured otherwise (other
         * keys, audiences, models): the same credentials, decided again
         */
        ngx_http_infer_auth_reset(ctx);
    }

    ctx->conf = lcf;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer auth access handler");

    rc = lcf->unkeyed ? ngx_http_infer_auth_unkeyed(r, ctx, lcf)
                      : ngx_http_infer_auth_decide(r, ctx, lcf);

    if (rc == NGX_AGAIN) {
        return NGX_AGAIN;
    }

    /* refused or not, the credentials go: not to a backend, not to a log */

    if (lcf->strip && ctx->credential.data
        && ngx_http_infer_auth_strip(r, lcf) != NGX_OK)
    {
        rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
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

    ctx->status = NGX_HTTP_INFER_AUTH_OK;

    return NGX_OK;
}


/*
 * "infer_auth required" with no key source for the location: nobody can
 * be authenticated, and it is the gateway's fault, not the client's.  One
 * error-log line per location, worker and NGX_HTTP_INFER_AUTH_MISCONF_LOG
 * seconds.
 */

static ngx_int_t
ngx_http_infer_auth_unkeyed(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf)
{
    if (ngx_time() - lcf->misconf_logged >= NGX_HTTP_INFER_AUTH_MISCONF_LOG) {
        lcf->misconf_logged = ngx_time();
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "infer auth: \"infer_auth required\" and no key "
                      "source for this location: it answers 500 "
                      "gateway_misconfigured (logged at most once in %d s)",
                      NGX_HTTP_INFER_AUTH_MISCONF_LOG);
    }

    return ngx_http_infer_auth_reject(r, ctx, lcf,
               NGX_HTTP_INFER_AUTH_MISCONFIGURED, "gateway_misconfigured",
               NGX_HTTP_INFER_MISCONFIGURED_MSG);
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


/*
 * A JWT: decoded once, then checked against the keys of the location:
 * infer_auth_jwt_key, the JWKS file, and the JWKS URL, whose keys may
 * first have to be fetched (NGX_AGAIN: the phase runs again after).
 */

static ngx_int_t
ngx_http_infer_auth_jwt(ngx_http_request_t *r, ngx_http_infer_auth_ctx_t *ctx,
    ngx_http_infer_auth_loc_conf_t *lcf)
{
    u_char                             err[NGX_HTTP_INFER_AUTH_ERRSTR];
    json_t                            *exp;
    ngx_str_t                          sig;
    ngx_int_t                          rc;
    ngx_uint_t                         i, candidates;
    ngx_http_infer_auth_keyset_t      *sets[3];
    ngx_http_infer_auth_jwks_uri_t    *u;
    ngx_http_infer_auth_main_conf_t   *amcf;
    ngx_http_infer_auth_cache_node_t  *cn;

    u = lcf->jwks_uri;

    if (u) {
        /* keys are fetched again on their TTL, cached tokens or not */
        rc = ngx_http_infer_auth_jwks_prepare(r, ctx, u);

        if (rc != NGX_OK) {
            return rc;
        }
    }

    /* the location's key sets, in the order they are tried */

    sets[0] = lcf->keys;
    sets[1] = lcf->jwks_file ? lcf->jwks_file->data : NULL;
    sets[2] = u ? u->keys : NULL;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_infer_auth_module);

    if (amcf->token_cache && !ctx->decoded) {
        cn = ngx_http_infer_auth_cache_find(&ctx->credential, sets, 3,
                                            ctx->hash);
        if (cn) {
            ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                           "infer auth: token known from the token cache");

            /* the entry may go before the request: its own references */

            ctx->jwt.payload = json_incref(cn->payload);
            ctx->decoded = 1;

            if (ngx_http_infer_auth_copy(r->pool, &ctx->key_id, &cn->kid)
                != NGX_OK)
            {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }

            return ngx_http_infer_auth_claims(r, ctx, lcf);
        }
    }

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

        /*
         * the decoder's buffer is the worker's: the request may wait for
         * a JWKS fetch while others decode theirs
         */
        sig.len = ctx->jwt.signature.len;
        sig.data = ngx_pnalloc(r->pool, sig.len);
        if (sig.data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ngx_memcpy(sig.data, ctx->jwt.signature.data, sig.len);
        ctx->jwt.signature = sig;

        ctx->decoded = 1;
        ctx->key_id = ctx->jwt.kid;

        /* the kid is $infer_key_id: it goes into headers and logs */

        if (ngx_http_infer_has_control(ctx->key_id.data, ctx->key_id.len)) {
            return ngx_http_infer_auth_reject(r, ctx, lcf,
                       NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                       "a control character in the kid");
        }
    }

    candidates = 0;
    rc = NGX_DECLINED;

    for (i = 0; i < 2; i++) {
        rc = ngx_http_infer_auth_jwt_key(ctx, sets[i], &candidates);

        if (rc != NGX_DECLINED) {
            break;
        }
    }

    if (rc == NGX_DECLINED && u) {
        i = 2;
        rc = ngx_http_infer_auth_jwt_key(ctx, u->keys, &candidates);

        if (candidates == 0 && !ctx->fetched) {
            /* an unknown kid: the provider may have rotated its keys */
            ctx->unknown_kid = 1;

            rc = ngx_http_infer_auth_jwks_prepare(r, ctx, u);

            if (rc != NGX_OK) {
                return rc;
            }

            rc = ngx_http_infer_auth_jwt_key(ctx, u->keys, &candidates);
            sets[2] = u->keys;
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

    if (amcf->token_cache) {
        /* sets[i] verified it; remembered until exp, 5 min at most */
        exp = json_object_get(ctx->jwt.payload, "exp");

        /* ctx->hash: the cache was asked before the token was decoded */

        ngx_http_infer_auth_cache_add(ctx->hash, sets[i], ctx->jwt.payload,
                                      &ctx->jwt.kid,
                                      json_is_integer(exp)
                                      ? ngx_min((time_t)
                                                json_integer_value(exp),
                                                ngx_time() + 300)
                                      : ngx_time() + 300,
                                      amcf->token_cache, r->connection->log);
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

    /*
     * who the client is goes into headers ($infer_tenant) and log lines:
     * a claim that could split or forge one is refused, not passed on
     */

    if (ngx_http_infer_has_control(ctx->tenant.data, ctx->tenant.len)
        || ngx_http_infer_has_control(ctx->subject.data, ctx->subject.len)
        || ngx_http_infer_has_control(ctx->plan.data, ctx->plan.len)
        || ngx_http_infer_has_control(ctx->models.data, ctx->models.len))
    {
        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_INVALID, "invalid_token",
                   "a control character in the tenant, sub, plan or models "
                   "claim");
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

    model = ngx_http_infer_variable(r, amcf->model_index);

    if (model == NULL || model->len == 0) {
        /* no model named here: /v1/models, say */
        return NGX_OK;
    }

    if (ngx_http_infer_list_match(&ctx->models, model->data, model->len)) {
        return NGX_OK;
    }

    target = ngx_http_infer_variable(r, amcf->target_index);

    if (target && target->len
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

        if (ngx_http_infer_auth_credential_header(lcf, &h[i])) {
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

        if (ngx_http_infer_auth_credential_header(lcf, &h[i])) {
            continue;
        }

        nh = ngx_list_push(&r->headers_in.headers);
        if (nh == NULL) {
            return NGX_ERROR;
        }

        *nh = h[i];
    }

    if (lcf->header.len == sizeof("authorization") - 1
        && ngx_strncmp(lcf->header.data, "authorization",
                       lcf->header.len) == 0)
    {
        r->headers_in.authorization = NULL;
    }

    return NGX_OK;
}


static ngx_uint_t
ngx_http_infer_auth_credential_header(ngx_http_infer_auth_loc_conf_t *lcf,
    ngx_table_elt_t *h)
{
    return (h->key.len == lcf->header.len
            && ngx_strncmp(h->lowcase_key, lcf->header.data, h->key.len) == 0)
           || (h->key.len == lcf->key_header.len
               && ngx_strncmp(h->lowcase_key, lcf->key_header.data,
                              h->key.len) == 0);
}


/* a decision forgotten, the credentials kept */

static void
ngx_http_infer_auth_reset(ngx_http_infer_auth_ctx_t *ctx)
{
    ngx_str_t  credential, method;
    unsigned   api_key;

    credential = ctx->credential;
    method = ctx->method;
    api_key = ctx->api_key;

    ngx_http_infer_auth_jwt_free(&ctx->jwt);
    ngx_memzero(ctx, sizeof(ngx_http_infer_auth_ctx_t));

    ctx->credential = credential;
    ctx->method = method;
    ctx->api_key = api_key;
}


/* the request's context, after an internal redirect too */

static ngx_http_infer_auth_ctx_t *
ngx_http_infer_auth_get_ctx(ngx_http_request_t *r)
{
    return ngx_http_infer_ctx_get(r->main, &ngx_http_infer_auth_module,
                                  ngx_http_infer_auth_cleanup);
}


static void
ngx_http_infer_auth_cleanup(void *data)
{
    ngx_http_infer_auth_ctx_t  *ctx = data;

    ngx_http_infer_auth_jwt_free(&ctx->jwt);
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

    /* any claim may go into a header: never one that splits it */

    if (ngx_http_infer_escape_control(r->pool, &s, &s) != NGX_OK) {
        return NGX_ERROR;
    }

    v->len = s.len;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
    v->data = s.data;

    return NGX_OK;
}


/* infer_auth_token_cache number | off; */

static char *
ngx_http_infer_auth_token_cache_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_auth_main_conf_t *amcf = conf;

    ngx_int_t   n;
    ngx_str_t  *value;

    if (amcf->token_cache != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        amcf->token_cache = 0;
        return NGX_CONF_OK;
    }

    n = ngx_atoi(value[1].data, value[1].len);

    if (n == NGX_ERROR || n == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid number of tokens \"%V\": a positive "
                           "number or \"off\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    amcf->token_cache = (ngx_uint_t) n;

    return NGX_CONF_OK;
}


/* every argument, where ngx_conf_set_str_array_slot takes the first */

static char *
ngx_http_infer_auth_strings_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    char  *p = conf;

    ngx_str_t     *s, *value;
    ngx_uint_t     i;
    ngx_array_t  **a;

    a = (ngx_array_t **) (p + cmd->offset);

    if (*a != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    *a = ngx_array_create(cf->pool, cf->args->nelts - 1, sizeof(ngx_str_t));
    if (*a == NULL) {
        return NGX_CONF_ERROR;
    }

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {
        s = ngx_array_push(*a);
        if (s == NULL) {
            return NGX_CONF_ERROR;
        }

        *s = value[i];
    }

    return NGX_CONF_OK;
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
    return ngx_http_infer_add_variables(cf, ngx_http_infer_auth_vars);
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

    amcf->token_cache = NGX_CONF_UNSET_UINT;
    amcf->model_index = NGX_DECLINED;
    amcf->target_index = NGX_DECLINED;

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

    conf->enable = NGX_CONF_UNSET_UINT;
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

    ngx_conf_merge_uint_value(conf->enable, prev->enable,
                              NGX_HTTP_INFER_AUTH_OFF);

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

    if (conf->enable != NGX_HTTP_INFER_AUTH_OFF && conf->keys == NULL
        && conf->jwks_file == NULL && conf->jwks_uri == NULL
        && conf->api_keys == NULL)
    {
        if (conf->enable == NGX_HTTP_INFER_AUTH_ON) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"infer_auth on\" needs infer_auth_api_keys, "
                               "infer_auth_jwt_key, infer_auth_jwks or "
                               "infer_auth_jwks_uri");
            return NGX_CONF_ERROR;
        }

        /*
         * what an ingress controller's template writes for an annotation:
         * an Ingress must not fail the controller's configuration, and
         * without keys nobody is let in (docs/kubernetes.md)
         */

        ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                           "\"infer_auth required\" without "
                           "infer_auth_api_keys, infer_auth_jwt_key, "
                           "infer_auth_jwks or infer_auth_jwks_uri: every "
                           "request is answered 500");
        conf->unkeyed = 1;
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
    ngx_http_handler_pt              *h;
    ngx_http_core_main_conf_t        *cmcf;
    ngx_http_infer_auth_main_conf_t  *amcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);
    amcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_infer_auth_module);

    /* the id of the error envelopes, one per request */

    if (ngx_http_infer_request_id_init(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_infer_auth_handler;

    if (amcf->token_cache == NGX_CONF_UNSET_UINT) {
        amcf->token_cache = 1024;
    }

    ngx_str_set(&model, "infer_model");
    ngx_str_set(&target, "infer_model_target");

    /* the route module's, when it is loaded */

    amcf->model_index = ngx_http_infer_variable_index(cf, &model);
    amcf->target_index = ngx_http_infer_variable_index(cf, &target);

    if (amcf->model_index == NGX_ERROR || amcf->target_index == NGX_ERROR) {
        return NGX_ERROR;
    }

    ngx_http_infer_auth_filter_init();

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
        ngx_http_infer_watch_start(&w[i]->watch, cycle);
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
        ngx_http_infer_watch_stop(&w[i]->watch);
    }
}

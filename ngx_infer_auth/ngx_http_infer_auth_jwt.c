
/*
 * Copyright (C) ngx_infer authors
 *
 * JWTs: decoding, keys pinned to one algorithm, and signature checks
 * through OpenSSL's EVP interface with keys parsed once per key set.
 *
 * libjwt 1.10 was not used for the checks: it takes the algorithm from the
 * token, parses the PEM key again on every verification, and accepts an
 * HS256 token whose secret is an RSA public key's PEM; here the key decides
 * the algorithm, and the token must agree.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include "ngx_http_infer_auth.h"


/* the smallest RSA modulus accepted, in bits */
#define NGX_HTTP_INFER_AUTH_RSA_MIN   2048



static const EVP_MD *ngx_http_infer_auth_md(ngx_http_infer_auth_alg_t *alg);
static ngx_int_t ngx_http_infer_auth_verify_ctx(
    ngx_http_infer_auth_key_t *key);
static ngx_int_t ngx_http_infer_auth_verify_eddsa(
    ngx_http_infer_auth_jwt_t *jwt, ngx_http_infer_auth_key_t *key);
static ngx_int_t ngx_http_infer_auth_b64(ngx_pool_t *pool, json_t *v,
    ngx_str_t *out);
static ngx_int_t ngx_http_infer_auth_b64_decode(u_char *p, size_t len,
    u_char *buf, size_t size, ngx_str_t *out);
static json_t *ngx_http_infer_auth_json(u_char *p, size_t len, u_char *buf,
    size_t size);
static EVP_PKEY *ngx_http_infer_auth_jwk_rsa(ngx_pool_t *pool, json_t *jwk);
static EVP_PKEY *ngx_http_infer_auth_jwk_ec(ngx_pool_t *pool, json_t *jwk,
    ngx_http_infer_auth_alg_t **alg);
static EVP_PKEY *ngx_http_infer_auth_jwk_okp(ngx_pool_t *pool, json_t *jwk);
static ngx_int_t ngx_http_infer_auth_key_add(ngx_http_infer_auth_keyset_t *ks,
    EVP_PKEY *pkey, ngx_str_t *secret, ngx_http_infer_auth_alg_t *alg,
    ngx_str_t *kid, u_char *err);
static ngx_http_infer_auth_alg_t *ngx_http_infer_auth_pkey_alg(
    EVP_PKEY *pkey);
static ngx_int_t ngx_http_infer_auth_fits(ngx_http_infer_auth_alg_t *alg,
    EVP_PKEY *pkey, ngx_str_t *secret);
static int ngx_http_infer_auth_ec_curve(EVP_PKEY *pkey);
static ngx_int_t ngx_http_infer_auth_ec_der(ngx_http_infer_auth_jwt_t *jwt,
    u_char *der, size_t *len);
static void ngx_http_infer_auth_keyset_cleanup(void *data);
static ngx_uint_t ngx_http_infer_auth_is_pubkey(u_char *data, size_t len);


static ngx_http_infer_auth_alg_t  ngx_http_infer_auth_algs[] = {
    { ngx_string("HS256"), NGX_HTTP_INFER_AUTH_HMAC, EVP_sha256, 32, 0 },
    { ngx_string("HS384"), NGX_HTTP_INFER_AUTH_HMAC, EVP_sha384, 48, 0 },
    { ngx_string("HS512"), NGX_HTTP_INFER_AUTH_HMAC, EVP_sha512, 64, 0 },
    { ngx_string("RS256"), NGX_HTTP_INFER_AUTH_RSA, EVP_sha256, 0, 0 },
    { ngx_string("RS384"), NGX_HTTP_INFER_AUTH_RSA, EVP_sha384, 0, 0 },
    { ngx_string("RS512"), NGX_HTTP_INFER_AUTH_RSA, EVP_sha512, 0, 0 },
    { ngx_string("PS256"), NGX_HTTP_INFER_AUTH_PSS, EVP_sha256, 0, 0 },
    { ngx_string("PS384"), NGX_HTTP_INFER_AUTH_PSS, EVP_sha384, 0, 0 },
    { ngx_string("PS512"), NGX_HTTP_INFER_AUTH_PSS, EVP_sha512, 0, 0 },
    { ngx_string("ES256"), NGX_HTTP_INFER_AUTH_EC, EVP_sha256, 32,
      NID_X9_62_prime256v1 },
    { ngx_string("ES384"), NGX_HTTP_INFER_AUTH_EC, EVP_sha384, 48,
      NID_secp384r1 },
    { ngx_string("ES512"), NGX_HTTP_INFER_AUTH_EC, EVP_sha512, 66,
      NID_secp521r1 },
    { ngx_string("EdDSA"), NGX_HTTP_INFER_AUTH_EDDSA, NULL, 0, 0 },
    { ngx_null_string, 0, NULL, 0, 0 }
};


ngx_http_infer_auth_alg_t *
ngx_http_infer_auth_alg(ngx_str_t *name)
{
    ngx_http_infer_auth_alg_t  *a;

    for (a = ngx_http_infer_auth_algs; a->name.len; a++) {
        if (a->name.len == name->len
            && ngx_strncmp(a->name.data, name->data, name->len) == 0)
        {
            return a;
        }
    }

    return NULL;
}


/*
 * Splits and decodes a compact JWS: exactly three base64url parts, a JSON
 * object header with a known "alg" (so "none" is refused here) and no
 * "crit", and a JSON object payload.  The header and payload are parsed
 * with jansson; ngx_http_infer_auth_jwt_free() releases them.
 */

ngx_int_t
ngx_http_infer_auth_jwt_decode(u_char *p, size_t len,
    ngx_http_infer_auth_jwt_t *jwt, u_char *err)
{
    u_char      *dot1, *dot2, *last;
    json_t      *v;
    ngx_str_t    s;

    static u_char  buf[NGX_HTTP_INFER_AUTH_TOKEN_MAX];
    static u_char  sig[NGX_HTTP_INFER_AUTH_TOKEN_MAX];

    ngx_memzero(jwt, sizeof(ngx_http_infer_auth_jwt_t));

    if (len > NGX_HTTP_INFER_AUTH_TOKEN_MAX) {
        ngx_http_infer_auth_error(err, "token too long");
        return NGX_ERROR;
    }

    last = p + len;

    if (ngx_strlchr(p, last, '=') != NULL) {
        /*
         * base64url without padding only: nginx's decoder stops at "=",
         * so a token with "=anything" appended would verify as well
         */
        ngx_http_infer_auth_error(err, "padding in the token");
        return NGX_ERROR;
    }

    dot1 = ngx_strlchr(p, last, '.');
    dot2 = dot1 ? ngx_strlchr(dot1 + 1, last, '.') : NULL;

    if (dot2 == NULL || ngx_strlchr(dot2 + 1, last, '.') != NULL) {
        ngx_http_infer_auth_error(err, "not a JWS in compact form");
        return NGX_ERROR;
    }

    jwt->header = ngx_http_infer_auth_json(p, dot1 - p, buf, sizeof(buf));

    if (jwt->header == NULL) {
        ngx_http_infer_auth_error(err, "malformed token header");
        goto failed;
    }

    v = json_object_get(jwt->header, "alg");

    if (!json_is_string(v)) {
        ngx_http_infer_auth_error(err, "token header without \"alg\"");
        goto failed;
    }

    s.data = (u_char *) json_string_value(v);
    s.len = json_string_length(v);

    jwt->alg = ngx_http_infer_auth_alg(&s);

    if (jwt->alg == NULL) {
        ngx_http_infer_auth_error(err, "unsupported algorithm");
        goto failed;
    }

    if (json_object_get(jwt->header, "crit") != NULL) {
        ngx_http_infer_auth_error(err, "unsupported critical header");
        goto failed;
    }

    v = json_object_get(jwt->header, "kid");

    if (v != NULL) {
        if (!json_is_string(v)) {
            ngx_http_infer_auth_error(err, "malformed \"kid\"");
            goto failed;
        }

        jwt->kid.data = (u_char *) json_string_value(v);
        jwt->kid.len = json_string_length(v);
    }

    jwt->payload = ngx_http_infer_auth_json(dot1 + 1, dot2 - dot1 - 1, buf,
                                            sizeof(buf));
    if (jwt->payload == NULL) {
        ngx_http_infer_auth_error(err, "malformed token payload");
        goto failed;
    }

    if (ngx_http_infer_auth_b64_decode(dot2 + 1, last - dot2 - 1, sig,
                                       sizeof(sig), &jwt->signature)
        != NGX_OK
        || jwt->signature.len == 0)
    {
        ngx_http_infer_auth_error(err, "malformed token signature");
        goto failed;
    }

    jwt->input.data = p;
    jwt->input.len = dot2 - p;

    return NGX_OK;

failed:

    ngx_http_infer_auth_jwt_free(jwt);

    return NGX_ERROR;
}


void
ngx_http_infer_auth_jwt_free(ngx_http_infer_auth_jwt_t *jwt)
{
    if (jwt->header) {
        json_decref(jwt->header);
        jwt->header = NULL;
    }

    if (jwt->payload) {
        json_decref(jwt->payload);
        jwt->payload = NULL;
    }
}


/*
 * NGX_OK when key signed the token.  The caller chose key by kid; here the
 * key's pinned algorithm must be the token's, whatever the token says.
 */

ngx_int_t
ngx_http_infer_auth_jwt_verify(ngx_http_infer_auth_jwt_t *jwt,
    ngx_http_infer_auth_key_t *key)
{
    int            ok;
    u_char         mac[EVP_MAX_MD_SIZE];
    u_char         dgst[EVP_MAX_MD_SIZE];
    u_char         der[256];
    u_char        *sig;
    size_t         siglen;
    unsigned int   maclen, dlen;

    if (jwt->alg != key->alg) {
        return NGX_DECLINED;
    }

    if (key->alg->family == NGX_HTTP_INFER_AUTH_HMAC) {

        if (key->secret.len < key->alg->size) {
            /* never an empty or short secret, whatever set it */
            return NGX_DECLINED;
        }

        if (HMAC(ngx_http_infer_auth_md(key->alg), key->secret.data,
                 (int) key->secret.len,
                 jwt->input.data, jwt->input.len, mac, &maclen)
            == NULL)
        {
            return NGX_DECLINED;
        }

        return (maclen == jwt->signature.len
                && CRYPTO_memcmp(mac, jwt->signature.data, maclen) == 0)
               ? NGX_OK : NGX_DECLINED;
    }

    if (key->pkey == NULL) {
        return NGX_DECLINED;
    }

    sig = jwt->signature.data;
    siglen = jwt->signature.len;

    if (key->alg->family == NGX_HTTP_INFER_AUTH_EC) {
        /* JWS carries r and s as fixed-size big-endian; OpenSSL wants DER */
        siglen = sizeof(der);

        if (ngx_http_infer_auth_ec_der(jwt, der, &siglen) != NGX_OK) {
            return NGX_DECLINED;
        }

        sig = der;
    }

    if (key->alg->family == NGX_HTTP_INFER_AUTH_EDDSA) {
        /* Ed25519 signs the message itself: no digest first */
        return ngx_http_infer_auth_verify_eddsa(jwt, key);
    }

    if (key->vctx == NULL
        && ngx_http_infer_auth_verify_ctx(key) != NGX_OK)
    {
        ERR_clear_error();
        return NGX_DECLINED;
    }

    ok = EVP_Digest(jwt->input.data, jwt->input.len, dgst, &dlen,
                    ngx_http_infer_auth_md(key->alg), NULL) == 1
         && EVP_PKEY_verify(key->vctx, sig, siglen, dgst, dlen) == 1;

    /* a failed check leaves errors queued that nobody else would clear */
    ERR_clear_error();

    return ok ? NGX_OK : NGX_DECLINED;
}


/*
 * The digest of an algorithm, fetched from the provider once per worker:
 * EVP_sha256() and the like would fetch it again at every use.
 */

static const EVP_MD *
ngx_http_infer_auth_md(ngx_http_infer_auth_alg_t *alg)
{
    ngx_uint_t  i;

    static EVP_MD  *fetched[3];

    i = (alg->md == EVP_sha256) ? 0 : (alg->md == EVP_sha384) ? 1 : 2;

    if (fetched[i] == NULL) {
        fetched[i] = EVP_MD_fetch(NULL, (i == 0) ? "SHA256"
                                        : (i == 1) ? "SHA384" : "SHA512",
                                  NULL);
        if (fetched[i] == NULL) {
            ERR_clear_error();
            return alg->md();
        }
    }

    return fetched[i];
}


/*
 * A key's verification context, set up once (padding, digest) and used
 * for every token: RSA PKCS #1 v1.5, RSA-PSS with a salt as long as the
 * digest (RFC 7518), ECDSA.
 */

static ngx_int_t
ngx_http_infer_auth_verify_ctx(ngx_http_infer_auth_key_t *key)
{
    EVP_PKEY_CTX  *vctx;

    vctx = EVP_PKEY_CTX_new(key->pkey, NULL);
    if (vctx == NULL) {
        return NGX_ERROR;
    }

    if (EVP_PKEY_verify_init(vctx) != 1
        || EVP_PKEY_CTX_set_signature_md(vctx, ngx_http_infer_auth_md(key->alg))
           != 1)
    {
        goto failed;
    }

    if (key->alg->family == NGX_HTTP_INFER_AUTH_RSA
        && EVP_PKEY_CTX_set_rsa_padding(vctx, RSA_PKCS1_PADDING) != 1)
    {
        goto failed;
    }

    if (key->alg->family == NGX_HTTP_INFER_AUTH_PSS
        && (EVP_PKEY_CTX_set_rsa_padding(vctx, RSA_PKCS1_PSS_PADDING) != 1
            || EVP_PKEY_CTX_set_rsa_pss_saltlen(vctx, RSA_PSS_SALTLEN_DIGEST)
               != 1
            || EVP_PKEY_CTX_set_rsa_mgf1_md(vctx,
                                          ngx_http_infer_auth_md(key->alg))
               != 1))
    {
        goto failed;
    }

    key->vctx = vctx;

    return NGX_OK;

failed:

    EVP_PKEY_CTX_free(vctx);

    return NGX_ERROR;
}


static ngx_int_t
ngx_http_infer_auth_verify_eddsa(ngx_http_infer_auth_jwt_t *jwt,
    ngx_http_infer_auth_key_t *key)
{
    int          ok;
    EVP_MD_CTX  *md;

    md = EVP_MD_CTX_new();
    if (md == NULL) {
        return NGX_ERROR;
    }

    ok = EVP_DigestVerifyInit(md, NULL, NULL, NULL, key->pkey) == 1
         && EVP_DigestVerify(md, jwt->signature.data, jwt->signature.len,
                             jwt->input.data, jwt->input.len) == 1;

    EVP_MD_CTX_free(md);
    ERR_clear_error();

    return ok ? NGX_OK : NGX_DECLINED;
}


static ngx_int_t
ngx_http_infer_auth_ec_der(ngx_http_infer_auth_jwt_t *jwt, u_char *der,
    size_t *len)
{
    int         n;
    size_t      half;
    u_char     *p;
    BIGNUM     *r, *s;
    ECDSA_SIG  *es;

    half = jwt->alg->size;

    if (jwt->signature.len != 2 * half) {
        return NGX_DECLINED;
    }

    es = ECDSA_SIG_new();
    r = BN_bin2bn(jwt->signature.data, (int) half, NULL);
    s = BN_bin2bn(jwt->signature.data + half, (int) half, NULL);

    if (es == NULL || r == NULL || s == NULL
        || ECDSA_SIG_set0(es, r, s) != 1)
    {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(es);
        return NGX_ERROR;
    }

    n = i2d_ECDSA_SIG(es, NULL);

    if (n <= 0 || (size_t) n > *len) {
        ECDSA_SIG_free(es);
        return NGX_ERROR;
    }

    p = der;
    *len = i2d_ECDSA_SIG(es, &p);

    ECDSA_SIG_free(es);

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_auth_b64_decode(u_char *p, size_t len, u_char *buf,
    size_t size, ngx_str_t *out)
{
    ngx_str_t  src;

    if (ngx_base64_decoded_length(len) > size) {
        return NGX_ERROR;
    }

    src.data = p;
    src.len = len;
    out->data = buf;

    return ngx_decode_base64url(out, &src);
}


static json_t *
ngx_http_infer_auth_json(u_char *p, size_t len, u_char *buf, size_t size)
{
    json_t     *j;
    ngx_str_t   s;

    if (ngx_http_infer_auth_b64_decode(p, len, buf, size, &s) != NGX_OK) {
        return NULL;
    }

    j = json_loadb((char *) s.data, s.len, JSON_REJECT_DUPLICATES, NULL);

    if (j != NULL && !json_is_object(j)) {
        json_decref(j);
        return NULL;
    }

    return j;
}


ngx_http_infer_auth_keyset_t *
ngx_http_infer_auth_keyset_create(ngx_log_t *log)
{
    ngx_pool_t                    *pool;
    ngx_pool_cleanup_t            *cln;
    ngx_http_infer_auth_keyset_t  *ks;

    pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, log);
    if (pool == NULL) {
        return NULL;
    }

    ks = ngx_pcalloc(pool, sizeof(ngx_http_infer_auth_keyset_t));
    if (ks == NULL) {
        goto failed;
    }

    ks->pool = pool;

    if (ngx_array_init(&ks->keys, pool, 4, sizeof(ngx_http_infer_auth_key_t))
        != NGX_OK)
    {
        goto failed;
    }

    cln = ngx_pool_cleanup_add(pool, 0);
    if (cln == NULL) {
        goto failed;
    }

    cln->handler = ngx_http_infer_auth_keyset_cleanup;
    cln->data = ks;

    return ks;

failed:

    ngx_destroy_pool(pool);

    return NULL;
}


void
ngx_http_infer_auth_keyset_free(ngx_http_infer_auth_keyset_t *ks)
{
    if (ks) {
        ngx_destroy_pool(ks->pool);
    }
}


static void
ngx_http_infer_auth_keyset_cleanup(void *data)
{
    ngx_http_infer_auth_keyset_t  *ks = data;

    ngx_uint_t                  i;
    ngx_http_infer_auth_key_t  *k;

    k = ks->keys.elts;

    for (i = 0; i < ks->keys.nelts; i++) {
        EVP_PKEY_CTX_free(k[i].vctx);
        EVP_PKEY_free(k[i].pkey);

        if (k[i].secret.len) {
            OPENSSL_cleanse(k[i].secret.data, k[i].secret.len);
        }
    }
}


/*
 * A key from a file's contents: a PEM public key, or, when alg is HMAC,
 * the secret itself (less one trailing newline).  An empty alg takes the
 * key's own: RS256 for RSA, ES256/384/512 by curve, EdDSA for Ed25519.
 */

ngx_int_t
ngx_http_infer_auth_keyset_pem(ngx_http_infer_auth_keyset_t *ks,
    u_char *data, size_t len, ngx_str_t *alg, ngx_str_t *kid, u_char *err)
{
    BIO                        *bio;
    EVP_PKEY                   *pkey;
    ngx_str_t                   secret;
    ngx_http_infer_auth_alg_t  *a;

    a = NULL;

    if (alg->len) {
        a = ngx_http_infer_auth_alg(alg);

        if (a == NULL) {
            ngx_http_infer_auth_error(err, "unknown algorithm \"%V\"", alg);
            return NGX_ERROR;
        }
    }

    if (a && a->family == NGX_HTTP_INFER_AUTH_HMAC) {

        /*
         * A PEM file given as an HMAC secret would let anyone holding the
         * public key sign tokens: the HS/RS confusion, by configuration.
         */

        if (ngx_strlcasestrn(data, data + len, (u_char *) "-----BEGIN", 9)
            != NULL
            || ngx_http_infer_auth_is_pubkey(data, len))
        {
            ngx_http_infer_auth_error(err, "a public key (PEM, DER or JWK) "
                                      "cannot be an %V secret", &a->name);
            return NGX_ERROR;
        }

        secret.len = len;

        if (secret.len && data[secret.len - 1] == '\n') {
            secret.len--;
        }

        secret.data = ngx_pnalloc(ks->pool, secret.len + 1);
        if (secret.data == NULL) {
            return NGX_ERROR;
        }

        ngx_memcpy(secret.data, data, secret.len);

        return ngx_http_infer_auth_key_add(ks, NULL, &secret, a, kid, err);
    }

    if (len > INT_MAX) {
        ngx_http_infer_auth_error(err, "key file too large");
        return NGX_ERROR;
    }

    bio = BIO_new_mem_buf(data, (int) len);
    if (bio == NULL) {
        return NGX_ERROR;
    }

    pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);

    BIO_free(bio);
    ERR_clear_error();

    if (pkey == NULL) {
        ngx_http_infer_auth_error(err, "not a PEM public key%s",
                    a ? "" : " (an HMAC secret needs alg=HS256|HS384|HS512)");
        return NGX_ERROR;
    }

    if (a == NULL) {
        a = ngx_http_infer_auth_pkey_alg(pkey);
    }

    return ngx_http_infer_auth_key_add(ks, pkey, NULL, a, kid, err);
}


/* a DER public key, or a JSON key (a JWK, a JWKS) */

static ngx_uint_t
ngx_http_infer_auth_is_pubkey(u_char *data, size_t len)
{
    EVP_PKEY             *pkey;
    const unsigned char  *p;

    while (len && (*data == ' ' || *data == '\t' || *data == '\r'
                   || *data == '\n'))
    {
        data++;
        len--;
    }

    if (len && *data == '{') {
        return 1;
    }

    p = data;
    pkey = (len <= LONG_MAX) ? d2i_PUBKEY(NULL, &p, (long) len) : NULL;

    ERR_clear_error();

    if (pkey) {
        EVP_PKEY_free(pkey);
        return 1;
    }

    return 0;
}


/*
 * The keys of a JWKS document.  Keys for another use than signatures are
 * left out; a key this module cannot use (an unknown type, curve or
 * algorithm, too weak, malformed) is skipped and counted, err saying why
 * the first was: identity providers publish such keys beside good ones.
 * A document with no usable key at all fails, so that a rotation gone
 * wrong is noticed.
 */

ngx_int_t
ngx_http_infer_auth_keyset_jwks(ngx_http_infer_auth_keyset_t *ks,
    u_char *data, size_t len, u_char *err)
{
    u_char                      reason[NGX_HTTP_INFER_AUTH_ERRSTR];
    size_t                      i;
    json_t                     *root, *keys, *jwk, *v;
    ngx_int_t                   rc;
    ngx_str_t                   kty, kid, name, secret;
    EVP_PKEY                   *pkey;
    json_error_t                jerr;
    ngx_http_infer_auth_alg_t  *alg, *curve_alg;

    if (len > NGX_HTTP_INFER_AUTH_JWKS_MAX) {
        ngx_http_infer_auth_error(err, "JWKS larger than %d bytes",
                    NGX_HTTP_INFER_AUTH_JWKS_MAX);
        return NGX_ERROR;
    }

    root = json_loadb((char *) data, len, JSON_REJECT_DUPLICATES, &jerr);

    if (root == NULL) {
        ngx_http_infer_auth_error(err, "invalid JSON at line %d, column %d: %s",
                    jerr.line, jerr.column, jerr.text);
        return NGX_ERROR;
    }

    keys = json_object_get(root, "keys");

    if (!json_is_array(keys)) {
        ngx_http_infer_auth_error(err, "no \"keys\" array");
        json_decref(root);
        return NGX_ERROR;
    }

    json_array_foreach(keys, i, jwk) {

        v = json_object_get(jwk, "use");

        if (json_is_string(v) && ngx_strcmp(json_string_value(v), "sig") != 0)
        {
            continue;
        }

        v = json_object_get(jwk, "kty");

        if (!json_is_string(v)) {
            ngx_http_infer_auth_error(reason, "key %uz: no \"kty\"", i);
            goto skip;
        }

        kty.data = (u_char *) json_string_value(v);
        kty.len = json_string_length(v);

        ngx_str_null(&kid);

        v = json_object_get(jwk, "kid");

        if (json_is_string(v)) {
            kid.data = (u_char *) json_string_value(v);
            kid.len = json_string_length(v);
        }

        alg = NULL;
        v = json_object_get(jwk, "alg");

        if (json_is_string(v)) {
            name.data = (u_char *) json_string_value(v);
            name.len = json_string_length(v);

            alg = ngx_http_infer_auth_alg(&name);

            if (alg == NULL) {
                ngx_http_infer_auth_error(reason, "key %uz (\"%V\"): "
                                          "unsupported \"alg\"", i, &kid);
                goto skip;
            }
        }

        pkey = NULL;
        ngx_str_null(&secret);
        curve_alg = NULL;

        if (kty.len == 3 && ngx_strncmp(kty.data, "RSA", 3) == 0) {
            pkey = ngx_http_infer_auth_jwk_rsa(ks->pool, jwk);

        } else if (kty.len == 2 && ngx_strncmp(kty.data, "EC", 2) == 0) {
            pkey = ngx_http_infer_auth_jwk_ec(ks->pool, jwk, &curve_alg);

        } else if (kty.len == 3 && ngx_strncmp(kty.data, "OKP", 3) == 0) {
            pkey = ngx_http_infer_auth_jwk_okp(ks->pool, jwk);

        } else if (kty.len == 3 && ngx_strncmp(kty.data, "oct", 3) == 0) {
            if (ngx_http_infer_auth_b64(ks->pool, json_object_get(jwk, "k"),
                                        &secret)
                != NGX_OK)
            {
                ngx_http_infer_auth_error(reason, "key %uz (\"%V\"): "
                                          "malformed \"k\"", i, &kid);
                goto skip;
            }

            if (alg == NULL) {
                ngx_str_set(&name, "HS256");
                alg = ngx_http_infer_auth_alg(&name);
            }

        } else {
            ngx_http_infer_auth_error(reason, "key %uz (\"%V\"): "
                                      "unsupported \"kty\"", i, &kid);
            goto skip;
        }

        if (pkey == NULL && secret.data == NULL) {
            ngx_http_infer_auth_error(reason, "key %uz (\"%V\"): "
                                      "malformed %V key", i, &kid, &kty);
            goto skip;
        }

        if (alg == NULL) {
            alg = curve_alg ? curve_alg : ngx_http_infer_auth_pkey_alg(pkey);
        }

        if (ngx_http_infer_auth_key_add(ks, pkey, pkey ? NULL : &secret, alg,
                                        &kid, reason)
            == NGX_OK)
        {
            continue;
        }

    skip:

        /* the first reason is the one told */
        if (ks->skipped++ == 0) {
            ngx_memcpy(err, reason, NGX_HTTP_INFER_AUTH_ERRSTR);
        }
    }

    rc = NGX_OK;

    if (ks->keys.nelts == 0 && ks->skipped) {
        /* nothing usable: a rotation gone wrong must be noticed */
        rc = NGX_ERROR;
    }

    json_decref(root);

    return rc;
}


/*
 * Adds a key once it fits its algorithm; the set owns pkey from here on,
 * on every path.
 */

static ngx_int_t
ngx_http_infer_auth_key_add(ngx_http_infer_auth_keyset_t *ks, EVP_PKEY *pkey,
    ngx_str_t *secret, ngx_http_infer_auth_alg_t *alg, ngx_str_t *kid,
    u_char *err)
{
    ngx_http_infer_auth_key_t  *k;

    if (alg == NULL) {
        ngx_http_infer_auth_error(err, "key \"%V\": no algorithm fits it",
                                  kid);
        EVP_PKEY_free(pkey);
        return NGX_ERROR;
    }

    if (ngx_http_infer_auth_fits(alg, pkey, secret) != NGX_OK) {
        if (alg->family == NGX_HTTP_INFER_AUTH_HMAC && secret) {
            ngx_http_infer_auth_error(err, "key \"%V\": an %V secret must "
                                      "have at least %uz bytes, it has %uz",
                                      kid, &alg->name, alg->size,
                                      secret->len);

        } else if (alg->family == NGX_HTTP_INFER_AUTH_RSA
                   || alg->family == NGX_HTTP_INFER_AUTH_PSS)
        {
            ngx_http_infer_auth_error(err, "key \"%V\": %V needs an RSA "
                                      "key of at least %d bits", kid,
                                      &alg->name,
                                      NGX_HTTP_INFER_AUTH_RSA_MIN);

        } else {
            ngx_http_infer_auth_error(err, "key \"%V\": the key does not "
                                      "fit %V", kid, &alg->name);
        }

        EVP_PKEY_free(pkey);
        return NGX_ERROR;
    }

    k = ngx_array_push(&ks->keys);
    if (k == NULL) {
        EVP_PKEY_free(pkey);
        return NGX_ERROR;
    }

    ngx_memzero(k, sizeof(ngx_http_infer_auth_key_t));

    k->alg = alg;
    k->pkey = pkey;

    if (secret) {
        k->secret = *secret;
    }

    if (kid->len) {
        k->kid.data = ngx_pstrdup(ks->pool, kid);
        if (k->kid.data == NULL) {
            return NGX_ERROR;
        }

        k->kid.len = kid->len;
    }

    return NGX_OK;
}


/*
 * Whether a key can serve an algorithm at all: the pinning that keeps an
 * RSA or EC public key from ever being an HMAC secret.
 */

static ngx_int_t
ngx_http_infer_auth_fits(ngx_http_infer_auth_alg_t *alg, EVP_PKEY *pkey,
    ngx_str_t *secret)
{
    int  type;

    if (alg->family == NGX_HTTP_INFER_AUTH_HMAC) {
        return (pkey == NULL && secret && secret->len >= alg->size)
               ? NGX_OK : NGX_DECLINED;
    }

    if (pkey == NULL) {
        return NGX_DECLINED;
    }

    type = EVP_PKEY_get_base_id(pkey);

    switch (alg->family) {

    case NGX_HTTP_INFER_AUTH_RSA:
    case NGX_HTTP_INFER_AUTH_PSS:
        return ((type == EVP_PKEY_RSA || type == EVP_PKEY_RSA_PSS)
                && EVP_PKEY_get_bits(pkey) >= NGX_HTTP_INFER_AUTH_RSA_MIN)
               ? NGX_OK : NGX_DECLINED;

    case NGX_HTTP_INFER_AUTH_EC:
        return (type == EVP_PKEY_EC
                && ngx_http_infer_auth_ec_curve(pkey) == alg->curve)
               ? NGX_OK : NGX_DECLINED;

    default: /* NGX_HTTP_INFER_AUTH_EDDSA */
        return (type == EVP_PKEY_ED25519) ? NGX_OK : NGX_DECLINED;
    }
}


static ngx_http_infer_auth_alg_t *
ngx_http_infer_auth_pkey_alg(EVP_PKEY *pkey)
{
    int                         type, curve;
    ngx_http_infer_auth_alg_t  *a;

    type = EVP_PKEY_get_base_id(pkey);
    curve = (type == EVP_PKEY_EC) ? ngx_http_infer_auth_ec_curve(pkey) : 0;

    for (a = ngx_http_infer_auth_algs; a->name.len; a++) {

        if ((type == EVP_PKEY_RSA
             && a->family == NGX_HTTP_INFER_AUTH_RSA)
            || (type == EVP_PKEY_EC
                && a->family == NGX_HTTP_INFER_AUTH_EC && a->curve == curve)
            || (type == EVP_PKEY_ED25519
                && a->family == NGX_HTTP_INFER_AUTH_EDDSA))
        {
            return a;
        }
    }

    return NULL;
}


static int
ngx_http_infer_auth_ec_curve(EVP_PKEY *pkey)
{
    char    name[64];
    size_t  len;

    if (EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME,
                                       name, sizeof(name), &len)
        != 1)
    {
        return NID_undef;
    }

    return OBJ_sn2nid(name) != NID_undef ? OBJ_sn2nid(name)
                                         : EC_curve_nist2nid(name);
}


static ngx_int_t
ngx_http_infer_auth_b64(ngx_pool_t *pool, json_t *v, ngx_str_t *out)
{
    ngx_str_t  src;

    if (!json_is_string(v) || json_string_length(v) == 0) {
        return NGX_ERROR;
    }

    src.data = (u_char *) json_string_value(v);
    src.len = json_string_length(v);

    out->data = ngx_pnalloc(pool, ngx_base64_decoded_length(src.len) + 1);
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    if (ngx_decode_base64url(out, &src) != NGX_OK || out->len == 0) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static EVP_PKEY *
ngx_http_infer_auth_jwk_rsa(ngx_pool_t *pool, json_t *jwk)
{
    BIGNUM          *n, *e;
    EVP_PKEY        *pkey;
    ngx_str_t        nb, eb;
    OSSL_PARAM      *params;
    EVP_PKEY_CTX    *ctx;
    OSSL_PARAM_BLD  *bld;

    if (ngx_http_infer_auth_b64(pool, json_object_get(jwk, "n"), &nb)
        != NGX_OK
        || ngx_http_infer_auth_b64(pool, json_object_get(jwk, "e"), &eb)
           != NGX_OK)
    {
        return NULL;
    }

    pkey = NULL;
    params = NULL;
    ctx = NULL;

    n = BN_bin2bn(nb.data, (int) nb.len, NULL);
    e = BN_bin2bn(eb.data, (int) eb.len, NULL);
    bld = OSSL_PARAM_BLD_new();

    if (n == NULL || e == NULL || bld == NULL
        || OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) != 1
        || OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e) != 1)
    {
        goto done;
    }

    params = OSSL_PARAM_BLD_to_param(bld);
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);

    if (params == NULL || ctx == NULL
        || EVP_PKEY_fromdata_init(ctx) != 1
        || EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1)
    {
        pkey = NULL;
    }

done:

    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(n);
    BN_free(e);
    ERR_clear_error();

    return pkey;
}


static EVP_PKEY *
ngx_http_infer_auth_jwk_ec(ngx_pool_t *pool, json_t *jwk,
    ngx_http_infer_auth_alg_t **alg)
{
    char                       *group;
    u_char                      point[1 + 2 * 66];
    json_t                     *v;
    EVP_PKEY                   *pkey;
    ngx_str_t                   x, y, name;
    OSSL_PARAM                  params[3];
    EVP_PKEY_CTX               *ctx, *check;

    v = json_object_get(jwk, "crv");

    if (!json_is_string(v)) {
        return NULL;
    }

    if (ngx_strcmp(json_string_value(v), "P-256") == 0) {
        group = "prime256v1";
        ngx_str_set(&name, "ES256");

    } else if (ngx_strcmp(json_string_value(v), "P-384") == 0) {
        group = "secp384r1";
        ngx_str_set(&name, "ES384");

    } else if (ngx_strcmp(json_string_value(v), "P-521") == 0) {
        group = "secp521r1";
        ngx_str_set(&name, "ES512");

    } else {
        return NULL;
    }

    *alg = ngx_http_infer_auth_alg(&name);

    if (ngx_http_infer_auth_b64(pool, json_object_get(jwk, "x"), &x) != NGX_OK
        || ngx_http_infer_auth_b64(pool, json_object_get(jwk, "y"), &y)
           != NGX_OK
        || x.len != (*alg)->size || y.len != (*alg)->size)
    {
        return NULL;
    }

    /* an uncompressed point: 0x04, x, y */
    point[0] = 0x04;
    ngx_memcpy(point + 1, x.data, x.len);
    ngx_memcpy(point + 1 + x.len, y.data, y.len);

    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                                 group, 0);
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
                                                  point, 1 + x.len + y.len);
    params[2] = OSSL_PARAM_construct_end();

    pkey = NULL;

    ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);

    if (ctx == NULL
        || EVP_PKEY_fromdata_init(ctx) != 1
        || EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1)
    {
        pkey = NULL;
    }

    EVP_PKEY_CTX_free(ctx);

    if (pkey) {
        /* a point off the curve is refused here, not at every token */
        check = EVP_PKEY_CTX_new(pkey, NULL);

        if (check == NULL || EVP_PKEY_public_check(check) != 1) {
            EVP_PKEY_free(pkey);
            pkey = NULL;
        }

        EVP_PKEY_CTX_free(check);
    }

    ERR_clear_error();

    return pkey;
}


static EVP_PKEY *
ngx_http_infer_auth_jwk_okp(ngx_pool_t *pool, json_t *jwk)
{
    json_t     *v;
    EVP_PKEY   *pkey;
    ngx_str_t   x;

    v = json_object_get(jwk, "crv");

    if (!json_is_string(v) || ngx_strcmp(json_string_value(v), "Ed25519"))
    {
        return NULL;
    }

    if (ngx_http_infer_auth_b64(pool, json_object_get(jwk, "x"), &x) != NGX_OK
        || x.len != 32)
    {
        return NULL;
    }

    pkey = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, x.data, x.len);

    ERR_clear_error();

    return pkey;
}

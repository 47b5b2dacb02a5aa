
/*
 * Copyright (C) ngx_infer authors
 *
 * infer_auth_token_cache: the tokens whose signature a worker checked,
 * by the SHA-256 of the whole token, with their decoded payload, so that
 * a client sending the same token again costs a hash instead of decoding
 * and an RSA or EC verification (14 to 70 microseconds).  Only the
 * signature is remembered: the claims are checked on every request.  An
 * entry counts only while the key set that verified it is still one of
 * the location's and no key set of this worker was replaced since (the
 * epoch): a rotated key is never trusted from the cache.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/err.h>

#include "ngx_http_infer_auth.h"


static void ngx_http_infer_auth_cache_hash(ngx_str_t *token, u_char *hash);
static ngx_http_infer_auth_cache_node_t *ngx_http_infer_auth_cache_lookup(
    u_char *hash);
static void ngx_http_infer_auth_cache_drop(
    ngx_http_infer_auth_cache_node_t *cn);
static void ngx_http_infer_auth_cache_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);


/* bumped whenever a key set of this worker is replaced */
ngx_uint_t                          ngx_http_infer_auth_key_epoch;

static ngx_rbtree_t                 ngx_http_infer_auth_cache_tree;
static ngx_rbtree_node_t            ngx_http_infer_auth_cache_sentinel;
static ngx_queue_t                  ngx_http_infer_auth_cache_queue;
static ngx_uint_t                   ngx_http_infer_auth_cache_n;


/*
 * The entry of token when one of the key sets in sets verified it before
 * and nothing changed since; hash is the token's SHA-256 either way, for
 * ngx_http_infer_auth_cache_add().
 */

ngx_http_infer_auth_cache_node_t *
ngx_http_infer_auth_cache_find(ngx_str_t *token,
    ngx_http_infer_auth_keyset_t **sets, ngx_uint_t nsets, u_char *hash)
{
    ngx_uint_t                         i;
    ngx_http_infer_auth_cache_node_t  *cn;

    ngx_http_infer_auth_cache_hash(token, hash);

    if (ngx_http_infer_auth_cache_tree.root == NULL) {
        ngx_rbtree_init(&ngx_http_infer_auth_cache_tree,
                        &ngx_http_infer_auth_cache_sentinel,
                        ngx_http_infer_auth_cache_insert);
        ngx_queue_init(&ngx_http_infer_auth_cache_queue);
        return NULL;
    }

    cn = ngx_http_infer_auth_cache_lookup(hash);

    if (cn == NULL
        || cn->epoch != ngx_http_infer_auth_key_epoch
        || cn->expires < ngx_time())
    {
        return NULL;
    }

    for (i = 0; i < nsets; i++) {
        if (sets[i] && sets[i] == cn->keys) {
            ngx_queue_remove(&cn->queue);
            ngx_queue_insert_head(&ngx_http_infer_auth_cache_queue,
                                  &cn->queue);
            return cn;
        }
    }

    return NULL;
}


/*
 * SHA256() fetches the digest from the provider and makes a context at
 * every call, which cost more than hashing a token (~1 us against ~0.6
 * for 700 bytes): the digest is fetched once per worker and its context
 * reused.  Both live as long as the worker, as the verification digests
 * do (ngx_http_infer_auth_jwt.c).
 */

static void
ngx_http_infer_auth_cache_hash(ngx_str_t *token, u_char *hash)
{
    unsigned int        len;

    static ngx_uint_t   fetched;
    static EVP_MD      *md;
    static EVP_MD_CTX  *ctx;

    if (!fetched) {
        fetched = 1;

        md = EVP_MD_fetch(NULL, "SHA256", NULL);
        ctx = EVP_MD_CTX_new();

        if (md == NULL || ctx == NULL) {
            /* SHA256() then */
            EVP_MD_free(md);
            EVP_MD_CTX_free(ctx);
            md = NULL;
            ctx = NULL;
            ERR_clear_error();
        }
    }

    if (ctx
        && EVP_DigestInit_ex(ctx, md, NULL) == 1
        && EVP_DigestUpdate(ctx, token->data, token->len) == 1
        && EVP_DigestFinal_ex(ctx, hash, &len) == 1)
    {
        return;
    }

    ERR_clear_error();

    SHA256(token->data, token->len, hash);
}


/*
 * Remembers that keys verified the token with this hash, payload and
 * kid, until expires; at most max tokens, the least recently used going
 * first.
 */

void
ngx_http_infer_auth_cache_add(u_char *hash,
    ngx_http_infer_auth_keyset_t *keys, json_t *payload, ngx_str_t *kid,
    time_t expires, ngx_uint_t max, ngx_log_t *log)
{
    ngx_queue_t                       *q;
    ngx_http_infer_auth_cache_node_t  *cn;

    cn = ngx_http_infer_auth_cache_lookup(hash);

    if (cn) {
        ngx_http_infer_auth_cache_drop(cn);

    } else if (ngx_http_infer_auth_cache_n >= max) {
        q = ngx_queue_last(&ngx_http_infer_auth_cache_queue);
        ngx_http_infer_auth_cache_drop(
            ngx_queue_data(q, ngx_http_infer_auth_cache_node_t, queue));
    }

    cn = ngx_alloc(sizeof(ngx_http_infer_auth_cache_node_t) + kid->len, log);
    if (cn == NULL) {
        return;
    }

    ngx_http_infer_auth_cache_n++;

    ngx_memcpy(cn->hash, hash, SHA256_DIGEST_LENGTH);
    ngx_memcpy(&cn->node.key, hash, sizeof(ngx_rbtree_key_t));

    cn->keys = keys;
    cn->epoch = ngx_http_infer_auth_key_epoch;
    cn->expires = expires;
    cn->payload = json_incref(payload);

    cn->kid.len = kid->len;
    cn->kid.data = kid->len ? (u_char *) (cn + 1) : NULL;

    if (kid->len) {
        ngx_memcpy(cn->kid.data, kid->data, kid->len);
    }

    ngx_rbtree_insert(&ngx_http_infer_auth_cache_tree, &cn->node);
    ngx_queue_insert_head(&ngx_http_infer_auth_cache_queue, &cn->queue);
}


static void
ngx_http_infer_auth_cache_drop(ngx_http_infer_auth_cache_node_t *cn)
{
    ngx_queue_remove(&cn->queue);
    ngx_rbtree_delete(&ngx_http_infer_auth_cache_tree, &cn->node);

    json_decref(cn->payload);
    ngx_free(cn);

    ngx_http_infer_auth_cache_n--;
}


static ngx_http_infer_auth_cache_node_t *
ngx_http_infer_auth_cache_lookup(u_char *hash)
{
    ngx_int_t                          rc;
    ngx_rbtree_key_t                   key;
    ngx_rbtree_node_t                 *node, *sentinel;
    ngx_http_infer_auth_cache_node_t  *cn;

    ngx_memcpy(&key, hash, sizeof(ngx_rbtree_key_t));

    node = ngx_http_infer_auth_cache_tree.root;
    sentinel = ngx_http_infer_auth_cache_tree.sentinel;

    while (node != sentinel) {

        if (key != node->key) {
            node = (key < node->key) ? node->left : node->right;
            continue;
        }

        cn = (ngx_http_infer_auth_cache_node_t *) node;

        rc = ngx_memcmp(hash, cn->hash, SHA256_DIGEST_LENGTH);

        if (rc == 0) {
            return cn;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


/* ordered by the key, then by the whole hash, as limit_req does */

static void
ngx_http_infer_auth_cache_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t                 **p;
    ngx_http_infer_auth_cache_node_t   *cn, *cnt;

    for ( ;; ) {

        if (node->key != temp->key) {
            p = (node->key < temp->key) ? &temp->left : &temp->right;

        } else {
            cn = (ngx_http_infer_auth_cache_node_t *) node;
            cnt = (ngx_http_infer_auth_cache_node_t *) temp;

            p = (ngx_memcmp(cn->hash, cnt->hash, SHA256_DIGEST_LENGTH) < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}


/*
 * Copyright (C) ngx_infer authors
 *
 * Files that a worker follows without a reload: a model registry, an API
 * key file, a JWKS file.  A timer stat()s the file; it is read again only
 * when it changed, so that a broken file is reported once.  Static inline
 * only, as everything in ngx_infer_common.
 */


#ifndef _NGX_HTTP_INFER_FILE_H_INCLUDED_
#define _NGX_HTTP_INFER_FILE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


typedef struct {
    ngx_str_t         name;        /* null-terminated */
    ngx_file_uniq_t   uniq;
    off_t             size;
    struct timespec   mtim;
    struct timespec   ctim;
    ngx_err_t         stat_err;    /* reported already */
} ngx_http_infer_file_t;


static ngx_inline void
ngx_http_infer_file_times(ngx_file_info_t *fi, struct timespec *mtim,
    struct timespec *ctim)
{
#if (NGX_LINUX)
    *mtim = fi->st_mtim;
    *ctim = fi->st_ctim;
#else
    mtim->tv_sec = fi->st_mtime;
    mtim->tv_nsec = 0;
    ctim->tv_sec = fi->st_ctime;
    ctim->tv_nsec = 0;
#endif
}


static ngx_inline void
ngx_http_infer_file_seen(ngx_http_infer_file_t *f, ngx_file_info_t *fi)
{
    f->uniq = ngx_file_uniq(fi);
    f->size = ngx_file_size(fi);

    ngx_http_infer_file_times(fi, &f->mtim, &f->ctim);
}


/*
 * A new file (a ConfigMap's update swaps a symlink: a new inode), one
 * written again in place (a new mtime, to the nanosecond where the system
 * keeps it, or a new size), or one whose owner or mode changed (a new
 * ctime), which may make a file that could not be read readable.
 */

static ngx_inline ngx_uint_t
ngx_http_infer_file_changed(ngx_http_infer_file_t *f, ngx_file_info_t *fi)
{
    struct timespec  mtim, ctim;

    ngx_http_infer_file_times(fi, &mtim, &ctim);

    return f->uniq != ngx_file_uniq(fi)
           || f->size != ngx_file_size(fi)
           || f->mtim.tv_sec != mtim.tv_sec
           || f->mtim.tv_nsec != mtim.tv_nsec
           || f->ctim.tv_sec != ctim.tv_sec
           || f->ctim.tv_nsec != ctim.tv_nsec;
}


static ngx_inline void
ngx_http_infer_file_syserr(u_char *err, size_t size, ngx_err_t e,
    const char *what)
{
    u_char  *p, *last;

    last = err + size - 1;

    p = ngx_slprintf(err, last, "%s failed (%d: ", what, e);
    p = ngx_strerror(e, p, last - p);
    p = ngx_slprintf(p, last, ")");

    *p = '\0';
}


/*
 * NGX_OK when the file changed since it was last looked at (or never
 * was); NGX_DECLINED when not, or when it still cannot be stat()ed;
 * NGX_ERROR with err when it newly cannot be.
 */

static ngx_inline ngx_int_t
ngx_http_infer_file_check(ngx_http_infer_file_t *f, u_char *err,
    size_t size)
{
    ngx_err_t        e;
    ngx_file_info_t  fi;

    if (ngx_file_info(f->name.data, &fi) == NGX_FILE_ERROR) {
        e = ngx_errno;

        if (e == f->stat_err) {
            return NGX_DECLINED;
        }

        f->stat_err = e;
        ngx_http_infer_file_syserr(err, size, e, ngx_file_info_n);

        return NGX_ERROR;
    }

    f->stat_err = 0;

    if (!ngx_http_infer_file_changed(f, &fi)) {
        return NGX_DECLINED;
    }

    /* a file that cannot be opened or read is reported once too */
    ngx_http_infer_file_seen(f, &fi);

    return NGX_OK;
}


/*
 * The whole file, of at most max bytes, in a buffer from ngx_alloc() one
 * byte longer (never malloc(0)); NULL and err on an error.  What is read
 * is what the next check compares with.
 */

static ngx_inline u_char *
ngx_http_infer_file_read(ngx_http_infer_file_t *f, off_t max, size_t *len,
    ngx_log_t *log, u_char *err, size_t size)
{
    u_char           *buf;
    off_t             fsize;
    ssize_t           n;
    ngx_file_t        file;
    ngx_file_info_t   fi;

    buf = NULL;

    ngx_memzero(&file, sizeof(ngx_file_t));

    file.name = f->name;
    file.log = log;

    file.fd = ngx_open_file(f->name.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);

    if (file.fd == NGX_INVALID_FILE) {
        ngx_http_infer_file_syserr(err, size, ngx_errno, ngx_open_file_n);
        return NULL;
    }

    if (ngx_fd_info(file.fd, &fi) == NGX_FILE_ERROR) {
        ngx_http_infer_file_syserr(err, size, ngx_errno, ngx_fd_info_n);
        goto done;
    }

    ngx_http_infer_file_seen(f, &fi);

    if (!ngx_is_file(&fi)) {
        *ngx_snprintf(err, size - 1, "not a regular file") = '\0';
        goto done;
    }

    fsize = ngx_file_size(&fi);

    if (fsize > max) {
        *ngx_snprintf(err, size - 1, "the file has %O bytes, more than "
                      "the %O allowed", fsize, max) = '\0';
        goto done;
    }

    buf = ngx_alloc((size_t) fsize + 1, log);
    if (buf == NULL) {
        *ngx_snprintf(err, size - 1, "out of memory") = '\0';
        goto done;
    }

    n = ngx_read_file(&file, buf, (size_t) fsize, 0);

    if (n != (ssize_t) fsize) {
        if (n == NGX_ERROR) {
            ngx_http_infer_file_syserr(err, size, ngx_errno, "read()");

        } else {
            *ngx_snprintf(err, size - 1, "read %z of %O bytes", n, fsize)
                = '\0';
        }

        ngx_free(buf);
        buf = NULL;
        goto done;
    }

    *len = (size_t) fsize;

done:

    if (ngx_close_file(file.fd) == NGX_FILE_ERROR) {
        ngx_log_error(NGX_LOG_ALERT, log, ngx_errno,
                      ngx_close_file_n " \"%V\" failed", &f->name);
    }

    return buf;
}


#endif /* _NGX_HTTP_INFER_FILE_H_INCLUDED_ */


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
#include <ngx_event.h>


#define NGX_HTTP_INFER_WATCH_INTERVAL  5000
#define NGX_HTTP_INFER_WATCH_ERRSTR    256


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


/*
 * A watched file: each worker's timer checks it every interval and calls
 * changed() when it changed (rc NGX_OK: read it again) or newly cannot be
 * stat()ed (rc NGX_ERROR, err says why).  The module that owns it gives
 * it a name, an interval and the handler at configuration time, and
 * starts and stops it in the worker's init and exit.
 */

typedef struct ngx_http_infer_watch_s  ngx_http_infer_watch_t;

typedef void (*ngx_http_infer_watch_pt)(ngx_http_infer_watch_t *w,
    ngx_int_t rc, u_char *err, ngx_log_t *log);

struct ngx_http_infer_watch_s {
    ngx_http_infer_file_t     file;      /* as it was last read */
    ngx_msec_t                interval;
    ngx_http_infer_watch_pt   changed;
    void                     *data;      /* the owner's */
    ngx_event_t               event;     /* per worker */
};


/*
 * An "interval=time" parameter: NGX_DECLINED when value is no such
 * parameter, NGX_ERROR when its time is not a time above zero.
 */

static ngx_inline ngx_int_t
ngx_http_infer_watch_interval(ngx_http_infer_watch_t *w, ngx_str_t *value)
{
    ngx_str_t  s;

    if (value->len < sizeof("interval=") - 1
        || ngx_strncmp(value->data, "interval=", sizeof("interval=") - 1)
           != 0)
    {
        return NGX_DECLINED;
    }

    s.data = value->data + sizeof("interval=") - 1;
    s.len = value->len - (sizeof("interval=") - 1);

    w->interval = ngx_parse_time(&s, 0);

    if (w->interval == (ngx_msec_t) NGX_ERROR || w->interval == 0) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_inline void
ngx_http_infer_watch_timer(ngx_event_t *ev)
{
    u_char                   err[NGX_HTTP_INFER_WATCH_ERRSTR];
    ngx_int_t                rc;
    ngx_http_infer_watch_t  *w;

    if (ngx_exiting) {
        return;
    }

    w = ev->data;

    rc = ngx_http_infer_file_check(&w->file, err, sizeof(err));

    if (rc != NGX_DECLINED) {
        w->changed(w, rc, err, ev->log);
    }

    ngx_add_timer(ev, w->interval);
}


/* in a worker's init: the cycle's log lives as long as the timer */

static ngx_inline void
ngx_http_infer_watch_start(ngx_http_infer_watch_t *w, ngx_cycle_t *cycle)
{
    w->event.handler = ngx_http_infer_watch_timer;
    w->event.data = w;
    w->event.log = cycle->log;

    /* a graceful shutdown does not wait for it */
    w->event.cancelable = 1;

    ngx_add_timer(&w->event, w->interval);
}


static ngx_inline void
ngx_http_infer_watch_stop(ngx_http_infer_watch_t *w)
{
    if (w->event.timer_set) {
        ngx_del_timer(&w->event);
    }
}


#endif /* _NGX_HTTP_INFER_FILE_H_INCLUDED_ */

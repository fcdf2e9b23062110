// librados/librbd calls for the RBD image backend, one binding per library
// call. The libraries are opened with dlopen at first use, so vhostd builds
// and runs without Ceph installed and only --rbd needs librbd1.
//
// Asynchronous I/O completes on a librbd thread. Its callback takes the
// result, releases the completion (as QEMU's rbd driver does there) and writes
// one 8-byte record, the request's tag and result, into the fd the request
// named: a pipe the queue's own event loop watches. TypeScript reads records;
// no completion pointer ever reaches it.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);
typedef void (*rbd_update_callback_t)(void *arg);

static struct {
  int loaded;
  char error[256];
  int (*rados_create)(rados_t *, const char *);
  int (*rados_conf_read_file)(rados_t, const char *);
  int (*rados_conf_set)(rados_t, const char *, const char *);
  int (*rados_connect)(rados_t);
  void (*rados_shutdown)(rados_t);
  int (*rados_ioctx_create)(rados_t, const char *, rados_ioctx_t *);
  void (*rados_ioctx_destroy)(rados_ioctx_t);
  int (*rbd_open)(rados_ioctx_t, const char *, rbd_image_t *, const char *);
  int (*rbd_close)(rbd_image_t);
  int (*rbd_get_size)(rbd_image_t, uint64_t *);
  int (*rbd_aio_create_completion)(void *, rbd_callback_t, rbd_completion_t *);
  ssize_t (*rbd_aio_get_return_value)(rbd_completion_t);
  void (*rbd_aio_release)(rbd_completion_t);
  int (*rbd_aio_readv)(rbd_image_t, const struct iovec *, int, uint64_t, rbd_completion_t);
  int (*rbd_aio_writev)(rbd_image_t, const struct iovec *, int, uint64_t, rbd_completion_t);
  int (*rbd_aio_flush)(rbd_image_t, rbd_completion_t);
  int (*rbd_aio_discard)(rbd_image_t, uint64_t, uint64_t, rbd_completion_t);
  int (*rbd_aio_write_zeroes)(rbd_image_t, uint64_t, size_t, rbd_completion_t, int, int);
  int (*rbd_update_watch)(rbd_image_t, uint64_t *, rbd_update_callback_t, void *);
  int (*rbd_update_unwatch)(rbd_image_t, uint64_t);
} L;

static int load(void) {
  if (L.loaded) return L.loaded > 0 ? 0 : -1;
  void *rados = dlopen("librados.so.2", RTLD_NOW | RTLD_GLOBAL);
  void *rbd = rados ? dlopen("librbd.so.1", RTLD_NOW | RTLD_GLOBAL) : NULL;
  if (!rbd) {
    snprintf(L.error, sizeof L.error, "cannot load librbd (install librbd1): %s", dlerror());
    L.loaded = -1;
    return -1;
  }
#define SYM(lib, name)                                                                   \
  if (!(*(void **)&L.name = dlsym(lib, #name))) {                                        \
    snprintf(L.error, sizeof L.error, "librbd lacks %s: too old a Ceph?", #name);        \
    L.loaded = -1;                                                                       \
    return -1;                                                                           \
  }
  SYM(rados, rados_create) SYM(rados, rados_conf_read_file) SYM(rados, rados_conf_set) SYM(rados, rados_connect)
  SYM(rados, rados_shutdown) SYM(rados, rados_ioctx_create) SYM(rados, rados_ioctx_destroy)
  SYM(rbd, rbd_open) SYM(rbd, rbd_close) SYM(rbd, rbd_get_size) SYM(rbd, rbd_aio_create_completion)
  SYM(rbd, rbd_aio_get_return_value) SYM(rbd, rbd_aio_release) SYM(rbd, rbd_aio_readv) SYM(rbd, rbd_aio_writev)
  SYM(rbd, rbd_aio_flush) SYM(rbd, rbd_aio_discard) SYM(rbd, rbd_aio_write_zeroes) SYM(rbd, rbd_update_watch)
  SYM(rbd, rbd_update_unwatch)
#undef SYM
  L.loaded = 1;
  return 0;
}

static int args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "vhostd_native: missing arguments");
    return -1;
  }
  if (load()) {
    napi_throw_error(env, "ENOLIBRBD", L.error);
    return -1;
  }
  return 0;
}

static int ptr(napi_env env, napi_value v, void **out) {
  uint64_t u;
  bool lossless;
  if (napi_get_value_bigint_uint64(env, v, &u, &lossless) != napi_ok) {
    napi_throw_type_error(env, NULL, "vhostd_native: expected a BigInt handle");
    return -1;
  }
  *out = (void *)(uintptr_t)u;
  return 0;
}

static int u64(napi_env env, napi_value v, uint64_t *out) {
  bool lossless;
  if (napi_get_value_bigint_uint64(env, v, out, &lossless) == napi_ok) return 0;
  int64_t i;
  if (napi_get_value_int64(env, v, &i) == napi_ok && i >= 0) {
    *out = (uint64_t)i;
    return 0;
  }
  napi_throw_type_error(env, NULL, "vhostd_native: expected a non-negative number");
  return -1;
}

static int i32(napi_env env, napi_value v, int32_t *out) {
  if (napi_get_value_int32(env, v, out) == napi_ok) return 0;
  napi_throw_type_error(env, NULL, "vhostd_native: expected an integer");
  return -1;
}

/** A string argument, or NULL for null/undefined. */
static int str(napi_env env, napi_value v, char *buf, size_t size, char **out) {
  napi_valuetype t;
  napi_typeof(env, v, &t);
  if (t == napi_null || t == napi_undefined) {
    *out = NULL;
    return 0;
  }
  size_t n;
  if (napi_get_value_string_utf8(env, v, buf, size, &n) != napi_ok || n >= size - 1) {
    napi_throw_type_error(env, NULL, "vhostd_native: expected a string shorter than 4096 bytes");
    return -1;
  }
  *out = buf;
  return 0;
}

static napi_value num(napi_env env, int64_t v) {
  napi_value out;
  napi_create_int64(env, v, &out);
  return out;
}

static napi_value handle(napi_env env, void *p) {
  napi_value out;
  napi_create_bigint_uint64(env, (uint64_t)(uintptr_t)p, &out);
  return out;
}

// rbdLoadError() -> why librbd cannot be used, or "" when it can.
static napi_value js_rbd_load_error(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value out;
  napi_create_string_utf8(env, load() ? L.error : "", NAPI_AUTO_LENGTH, &out);
  return out;
}

// radosCreate(id) -> cluster handle, or -errno.
static napi_value js_rados_create(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  char b[4096], *id;
  if (args(env, info, 1, argv) || str(env, argv[0], b, sizeof b, &id)) return NULL;
  rados_t c;
  int rc = L.rados_create(&c, id);
  return rc < 0 ? num(env, rc) : handle(env, c);
}

// radosConfReadFile(cluster, path) / radosConfSet(cluster, option, value) -> 0 or -errno.
static napi_value js_rados_conf_read_file(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  void *c;
  char b[4096], *path;
  if (args(env, info, 2, argv) || ptr(env, argv[0], &c) || str(env, argv[1], b, sizeof b, &path)) return NULL;
  return num(env, L.rados_conf_read_file(c, path));
}

static napi_value js_rados_conf_set(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  void *c;
  char b1[4096], b2[4096], *opt, *val;
  if (args(env, info, 3, argv) || ptr(env, argv[0], &c) || str(env, argv[1], b1, sizeof b1, &opt) || str(env, argv[2], b2, sizeof b2, &val))
    return NULL;
  return num(env, L.rados_conf_set(c, opt, val));
}

// radosConnect(cluster) -> 0 or -errno. Blocks up to client_mount_timeout.
static napi_value js_rados_connect(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  void *c;
  if (args(env, info, 1, argv) || ptr(env, argv[0], &c)) return NULL;
  return num(env, L.rados_connect(c));
}

static napi_value js_rados_shutdown(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  void *c;
  if (args(env, info, 1, argv) || ptr(env, argv[0], &c)) return NULL;
  L.rados_shutdown(c);
  return NULL;
}

// radosIoctxCreate(cluster, pool) -> ioctx handle, or -errno.
static napi_value js_rados_ioctx_create(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  void *c;
  char b[4096], *pool;
  if (args(env, info, 2, argv) || ptr(env, argv[0], &c) || str(env, argv[1], b, sizeof b, &pool)) return NULL;
  rados_ioctx_t io;
  int rc = L.rados_ioctx_create(c, pool, &io);
  return rc < 0 ? num(env, rc) : handle(env, io);
}

static napi_value js_rados_ioctx_destroy(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  void *io;
  if (args(env, info, 1, argv) || ptr(env, argv[0], &io)) return NULL;
  L.rados_ioctx_destroy(io);
  return NULL;
}

// rbdOpen(ioctx, name) -> image handle, or -errno.
static napi_value js_rbd_open(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  void *io;
  char b[4096], *name;
  if (args(env, info, 2, argv) || ptr(env, argv[0], &io) || str(env, argv[1], b, sizeof b, &name)) return NULL;
  rbd_image_t img;
  int rc = L.rbd_open(io, name, &img, NULL);
  return rc < 0 ? num(env, rc) : handle(env, img);
}

static napi_value js_rbd_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  void *img;
  if (args(env, info, 1, argv) || ptr(env, argv[0], &img)) return NULL;
  return num(env, L.rbd_close(img));
}

// rbdGetSize(image) -> bytes (a number: images stay below 2^53), or -errno.
static napi_value js_rbd_get_size(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  void *img;
  if (args(env, info, 1, argv) || ptr(env, argv[0], &img)) return NULL;
  uint64_t size;
  int rc = L.rbd_get_size(img, &size);
  return num(env, rc < 0 ? rc : (int64_t)size);
}

// The callback's argument carries both: the fd in the high half, the tag in the low.
static void completed(rbd_completion_t c, void *arg) {
  uint64_t a = (uint64_t)(uintptr_t)arg;
  ssize_t rc = L.rbd_aio_get_return_value(c);
  L.rbd_aio_release(c);
  // A request moves at most seg_max * size_max bytes (126 MiB), so the result fits.
  int32_t rec[2] = {(int32_t)(uint32_t)a, rc > INT32_MAX ? INT32_MAX : rc < INT32_MIN ? INT32_MIN : (int32_t)rc};
  // An 8-byte write to a pipe is atomic. It cannot find the pipe full: RbdIo
  // starts no more requests than the pipe holds records.
  ssize_t n = write((int)(a >> 32), rec, sizeof rec);
  (void)n;
}

enum { OP_READV, OP_WRITEV, OP_FLUSH, OP_DISCARD, OP_WRITE_ZEROES };

// rbdAio(op, image, fd, tag, iov, iovcnt, offset, length) -> 0, or -errno.
// iov: the address of `iovcnt` struct iovec (readv/writev); length: discard and
// write-zeroes. When it completes, {tag, result} (two int32) is written to fd.
static napi_value js_rbd_aio(napi_env env, napi_callback_info info) {
  napi_value argv[8];
  int32_t op, fd, iovcnt;
  uint32_t tag;
  void *img;
  uint64_t iov, off, len;
  if (args(env, info, 8, argv) || i32(env, argv[0], &op) || ptr(env, argv[1], &img) || i32(env, argv[2], &fd) ||
      napi_get_value_uint32(env, argv[3], &tag) != napi_ok || u64(env, argv[4], &iov) || i32(env, argv[5], &iovcnt) ||
      u64(env, argv[6], &off) || u64(env, argv[7], &len))
    return NULL;
  if (fd < 0 || iovcnt < 0) return num(env, -EINVAL);
  rbd_completion_t c;
  int rc = L.rbd_aio_create_completion((void *)(uintptr_t)((uint64_t)(uint32_t)fd << 32 | tag), completed, &c);
  if (rc < 0) return num(env, rc);
  const struct iovec *v = (const struct iovec *)(uintptr_t)iov;
  switch (op) {
    case OP_READV: rc = L.rbd_aio_readv(img, v, iovcnt, off, c); break;
    case OP_WRITEV: rc = L.rbd_aio_writev(img, v, iovcnt, off, c); break;
    case OP_FLUSH: rc = L.rbd_aio_flush(img, c); break;
    case OP_DISCARD: rc = L.rbd_aio_discard(img, off, len, c); break;
    case OP_WRITE_ZEROES: rc = L.rbd_aio_write_zeroes(img, off, (size_t)len, c, 0, 0); break;
    default: rc = -EINVAL;
  }
  if (rc < 0) {
    L.rbd_aio_release(c);
    return num(env, rc);
  }
  return num(env, 0);
}

static void updated(void *arg) {
  uint64_t one = 1;
  ssize_t n = write((int)(intptr_t)arg, &one, sizeof one);
  (void)n;
}

// rbdUpdateWatch(image, eventfd) -> watch handle (BigInt), or -errno. The eventfd
// is written whenever the image header changes (a resize, say).
static napi_value js_rbd_update_watch(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  void *img;
  int32_t fd;
  if (args(env, info, 2, argv) || ptr(env, argv[0], &img) || i32(env, argv[1], &fd)) return NULL;
  uint64_t h;
  int rc = L.rbd_update_watch(img, &h, updated, (void *)(intptr_t)fd);
  if (rc < 0) return num(env, rc);
  napi_value out;
  napi_create_bigint_uint64(env, h, &out);
  return out;
}

static napi_value js_rbd_update_unwatch(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  void *img;
  uint64_t h;
  if (args(env, info, 2, argv) || ptr(env, argv[0], &img) || u64(env, argv[1], &h)) return NULL;
  return num(env, L.rbd_update_unwatch(img, h));
}

void vhostd_register_rbd(napi_env env, napi_value exports) {
  static const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"rbdLoadError", js_rbd_load_error}, {"radosCreate", js_rados_create}, {"radosConfReadFile", js_rados_conf_read_file},
      {"radosConfSet", js_rados_conf_set}, {"radosConnect", js_rados_connect}, {"radosShutdown", js_rados_shutdown},
      {"radosIoctxCreate", js_rados_ioctx_create}, {"radosIoctxDestroy", js_rados_ioctx_destroy}, {"rbdOpen", js_rbd_open},
      {"rbdClose", js_rbd_close}, {"rbdGetSize", js_rbd_get_size}, {"rbdAio", js_rbd_aio},
      {"rbdUpdateWatch", js_rbd_update_watch}, {"rbdUpdateUnwatch", js_rbd_update_unwatch},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value f;
    napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f);
    napi_set_named_property(env, exports, fns[i].name, f);
  }
}

// Thin N-API bindings for the syscalls Node has no API for. No logic lives
// here: every function maps to one syscall (or one libuv primitive), reports
// failure as a negative errno or a thrown Error with .code, and leaves policy
// to TypeScript. Context-aware, so workers can load it too. rbd.c adds the
// librados/librbd calls of the RBD backend, opened with dlopen.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <node_api.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#define MAX_FDS 8

void vhostd_register_rbd(napi_env env, napi_value exports);

#define CHECK(call)                                                  \
  do {                                                               \
    if ((call) != napi_ok) {                                         \
      napi_throw_error(env, NULL, "vhostd_native: " #call " failed"); \
      return NULL;                                                   \
    }                                                                \
  } while (0)

static napi_value throw_errno(napi_env env, const char *what, int err) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  napi_value code, message, error;
  napi_create_string_utf8(env, strerrorname_np(err) ? strerrorname_np(err) : "EUNKNOWN", NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message);
  napi_create_error(env, code, message, &error);
  napi_value errnum;
  napi_create_int32(env, err, &errnum);
  napi_set_named_property(env, error, "errno", errnum);
  napi_throw(env, error);
  return NULL;
}

static napi_value make_int(napi_env env, int64_t v) {
  napi_value out;
  napi_create_int64(env, v, &out);
  return out;
}

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "vhostd_native: missing arguments");
    return -1;
  }
  return 0;
}

static int get_i32(napi_env env, napi_value v, int32_t *out) {
  if (napi_get_value_int32(env, v, out) != napi_ok) {
    napi_throw_type_error(env, NULL, "vhostd_native: expected an integer");
    return -1;
  }
  return 0;
}

// 64-bit quantities arrive as BigInt or as a safe-integer Number.
static int get_u64(napi_env env, napi_value v, uint64_t *out) {
  napi_valuetype t;
  napi_typeof(env, v, &t);
  if (t == napi_bigint) {
    bool lossless;
    if (napi_get_value_bigint_uint64(env, v, out, &lossless) == napi_ok && lossless) return 0;
  } else if (t == napi_number) {
    double d;
    napi_get_value_double(env, v, &d);
    if (d >= 0 && d <= 9007199254740991.0 && d == (double)(uint64_t)d) {
      *out = (uint64_t)d;
      return 0;
    }
  }
  napi_throw_range_error(env, NULL, "vhostd_native: expected a non-negative 64-bit integer");
  return -1;
}

static int get_bytes(napi_env env, napi_value v, void **data, size_t *len) {
  bool is;
  napi_is_typedarray(env, v, &is);
  if (is) {
    napi_typedarray_type type;
    size_t length, offset;
    napi_value ab;
    if (napi_get_typedarray_info(env, v, &type, &length, data, &ab, &offset) != napi_ok) return -1;
    size_t elem = 1;
    switch (type) {
      case napi_int16_array: case napi_uint16_array: elem = 2; break;
      case napi_int32_array: case napi_uint32_array: case napi_float32_array: elem = 4; break;
      case napi_float64_array: case napi_bigint64_array: case napi_biguint64_array: elem = 8; break;
      default: break;
    }
    *len = length * elem;
    return 0;
  }
  napi_is_dataview(env, v, &is);
  if (is) {
    napi_value ab;
    size_t offset;
    return napi_get_dataview_info(env, v, len, data, &ab, &offset) == napi_ok ? 0 : -1;
  }
  napi_throw_type_error(env, NULL, "vhostd_native: expected a TypedArray or DataView");
  return -1;
}

static int fill_sun(napi_env env, napi_value v, struct sockaddr_un *sun) {
  size_t len;
  memset(sun, 0, sizeof *sun);
  sun->sun_family = AF_UNIX;
  if (napi_get_value_string_utf8(env, v, sun->sun_path, sizeof sun->sun_path, &len) != napi_ok) {
    napi_throw_type_error(env, NULL, "vhostd_native: socket path must be a string");
    return -1;
  }
  if (len == 0 || len >= sizeof sun->sun_path - 1) {
    napi_throw_range_error(env, NULL, "vhostd_native: socket path is empty or too long for AF_UNIX");
    return -1;
  }
  return 0;
}

// listen(path, backlog) -> fd. Non-blocking, close-on-exec.
static napi_value js_listen(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t backlog;
  struct sockaddr_un sun;
  if (get_args(env, info, 2, argv) || fill_sun(env, argv[0], &sun) || get_i32(env, argv[1], &backlog)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return throw_errno(env, "socket", errno);
  if (bind(fd, (struct sockaddr *)&sun, sizeof sun) < 0) {
    int e = errno;
    close(fd);
    return throw_errno(env, "bind", e);
  }
  if (listen(fd, backlog) < 0) {
    int e = errno;
    close(fd);
    return throw_errno(env, "listen", e);
  }
  return make_int(env, fd);
}

// accept(fd) -> new fd (non-blocking, close-on-exec) or -errno.
static napi_value js_accept(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (get_args(env, info, 1, argv) || get_i32(env, argv[0], &fd)) return NULL;
  int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  return make_int(env, c < 0 ? -errno : c);
}

// connect(path) -> fd or -errno. Blocks for the connect, then the fd is non-blocking.
static napi_value js_connect(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct sockaddr_un sun;
  if (get_args(env, info, 1, argv) || fill_sun(env, argv[0], &sun)) return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return make_int(env, -errno);
  if (connect(fd, (struct sockaddr *)&sun, sizeof sun) < 0) {
    int e = errno;
    close(fd);
    return make_int(env, -e);
  }
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  return make_int(env, fd);
}

// recvmsg(fd, buf, fdsOut: Int32Array(8)) -> [bytes, nfds, truncatedFlags] ; bytes < 0 is -errno.
// Received fds are close-on-exec. If control data was truncated the kernel
// already dropped the extra fds; the flag lets the caller reject the message.
static napi_value js_recvmsg(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd;
  void *data, *fdsdata;
  size_t len, fdslen;
  if (get_args(env, info, 3, argv) || get_i32(env, argv[0], &fd) || get_bytes(env, argv[1], &data, &len) ||
      get_bytes(env, argv[2], &fdsdata, &fdslen))
    return NULL;
  if (fdslen < MAX_FDS * sizeof(int)) {
    napi_throw_range_error(env, NULL, "vhostd_native: fd array must hold 8 entries");
    return NULL;
  }
  struct iovec iov = {data, len};
  union {
    char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
    struct cmsghdr align;
  } ctrl;
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = ctrl.buf;
  msg.msg_controllen = sizeof ctrl.buf;
  ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  int nfds = 0;
  if (n >= 0) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      int count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      int *p = (int *)CMSG_DATA(c);
      for (int i = 0; i < count; i++) {
        if (nfds < MAX_FDS) ((int *)fdsdata)[nfds++] = p[i];
        else close(p[i]);
      }
    }
  }
  napi_value out;
  napi_create_array_with_length(env, 3, &out);
  napi_set_element(env, out, 0, make_int(env, n < 0 ? -errno : n));
  napi_set_element(env, out, 1, make_int(env, nfds));
  napi_set_element(env, out, 2, make_int(env, msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)));
  return out;
}

// sendmsg(fd, buf, fds: number[]) -> bytes or -errno.
static napi_value js_sendmsg(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd;
  void *data;
  size_t len;
  if (get_args(env, info, 3, argv) || get_i32(env, argv[0], &fd) || get_bytes(env, argv[1], &data, &len)) return NULL;
  uint32_t nfds = 0;
  napi_get_array_length(env, argv[2], &nfds);
  if (nfds > MAX_FDS) {
    napi_throw_range_error(env, NULL, "vhostd_native: at most 8 fds per message");
    return NULL;
  }
  int fds[MAX_FDS];
  for (uint32_t i = 0; i < nfds; i++) {
    napi_value e;
    napi_get_element(env, argv[2], i, &e);
    if (get_i32(env, e, &fds[i])) return NULL;
  }
  struct iovec iov = {data, len};
  union {
    char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
    struct cmsghdr align;
  } ctrl;
  struct msghdr msg = {0};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (nfds) {
    msg.msg_control = ctrl.buf;
    msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
  }
  ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
  return make_int(env, n < 0 ? -errno : n);
}

// ---- fd readiness on the calling thread's libuv loop ----

// A watcher has two owners: libuv (until the close callback runs) and the JS
// handle (until it is garbage collected). Whichever lets go last frees it.
typedef struct {
  uv_poll_t poll;
  napi_env env;
  napi_ref callback;
  napi_async_context ctx;
  int closed;
  int close_done;
  int finalized;
} watcher_t;

static void watcher_free(uv_handle_t *h) {
  watcher_t *w = (watcher_t *)h->data;
  w->close_done = 1;
  if (w->finalized) free(w);
}

static void watcher_close(watcher_t *w) {
  if (w->closed) return;
  w->closed = 1;
  uv_poll_stop(&w->poll);
  napi_delete_reference(w->env, w->callback);
  napi_async_destroy(w->env, w->ctx);
  uv_close((uv_handle_t *)&w->poll, watcher_free);
}

static void watcher_env_cleanup(void *arg) { watcher_close((watcher_t *)arg); }

static void watcher_cb(uv_poll_t *h, int status, int events) {
  watcher_t *w = (watcher_t *)h->data;
  if (w->closed) return;
  napi_env env = w->env;
  napi_handle_scope scope;
  napi_open_handle_scope(env, &scope);
  napi_value cb, recv, args[2], result;
  napi_get_reference_value(env, w->callback, &cb);
  napi_get_global(env, &recv);
  napi_create_int32(env, status, &args[0]);
  napi_create_int32(env, events, &args[1]);
  if (napi_make_callback(env, w->ctx, recv, cb, 2, args, &result) == napi_pending_exception) {
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
  napi_close_handle_scope(env, scope);
}

static void watcher_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  watcher_t *w = (watcher_t *)data;
  w->finalized = 1;
  if (!w->closed) {
    napi_remove_env_cleanup_hook(env, watcher_env_cleanup, w);
    watcher_close(w);
  } else if (w->close_done) {
    free(w);
  }
}

// watch(fd, events /*1=readable,2=writable*/, cb(status, events)) -> handle.
// The handle keeps polling until unwatch(handle); it keeps the loop alive.
static napi_value js_watch(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd, events;
  if (get_args(env, info, 3, argv) || get_i32(env, argv[0], &fd) || get_i32(env, argv[1], &events)) return NULL;
  uv_loop_t *loop;
  CHECK(napi_get_uv_event_loop(env, &loop));
  watcher_t *w = calloc(1, sizeof *w);
  if (!w) return throw_errno(env, "watch", ENOMEM);
  w->env = env;
  int rc = uv_poll_init(loop, &w->poll, fd);
  if (rc < 0) {
    free(w);
    return throw_errno(env, "uv_poll_init", -rc);
  }
  w->poll.data = w;
  napi_value name;
  napi_create_string_utf8(env, "vhostd:fd", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, NULL, name, &w->ctx);
  napi_create_reference(env, argv[2], 1, &w->callback);
  rc = uv_poll_start(&w->poll, events, watcher_cb);
  if (rc < 0) {
    w->finalized = 1; // no JS handle will ever own it
    watcher_close(w);
    return throw_errno(env, "uv_poll_start", -rc);
  }
  napi_add_env_cleanup_hook(env, watcher_env_cleanup, w);
  napi_value handle;
  CHECK(napi_create_external(env, w, watcher_finalize, NULL, &handle));
  return handle;
}

// setEvents(handle, events): change what a watcher waits for; 0 pauses it.
static napi_value js_set_events(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t events;
  if (get_args(env, info, 2, argv) || get_i32(env, argv[1], &events)) return NULL;
  watcher_t *w;
  CHECK(napi_get_value_external(env, argv[0], (void **)&w));
  if (w->closed) return NULL;
  int rc = events ? uv_poll_start(&w->poll, events, watcher_cb) : uv_poll_stop(&w->poll);
  if (rc < 0) return throw_errno(env, "uv_poll_start", -rc);
  return NULL;
}

static napi_value js_unwatch(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  watcher_t *w;
  CHECK(napi_get_value_external(env, argv[0], (void **)&w));
  if (!w->closed) {
    napi_remove_env_cleanup_hook(env, watcher_env_cleanup, w);
    watcher_close(w);
  }
  return NULL;
}

// ---- plain fd syscalls ----

static napi_value js_eventfd(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t init, flags;
  if (get_args(env, info, 2, argv) || get_i32(env, argv[0], &init) || get_i32(env, argv[1], &flags)) return NULL;
  int fd = eventfd((unsigned)init, flags);
  if (fd < 0) return throw_errno(env, "eventfd", errno);
  return make_int(env, fd);
}

// pipe2(flags) -> [readFd, writeFd]; throws on failure.
static napi_value js_pipe2(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t flags;
  if (get_args(env, info, 1, argv) || get_i32(env, argv[0], &flags)) return NULL;
  int fds[2];
  if (pipe2(fds, flags) < 0) return throw_errno(env, "pipe2", errno);
  napi_value out, a, b;
  napi_create_array_with_length(env, 2, &out);
  napi_create_int32(env, fds[0], &a);
  napi_create_int32(env, fds[1], &b);
  napi_set_element(env, out, 0, a);
  napi_set_element(env, out, 1, b);
  return out;
}

static napi_value js_memfd_create(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  char name[250];
  size_t len;
  int32_t flags;
  if (get_args(env, info, 2, argv) || get_i32(env, argv[1], &flags)) return NULL;
  CHECK(napi_get_value_string_utf8(env, argv[0], name, sizeof name, &len));
  int fd = memfd_create(name, (unsigned)flags);
  if (fd < 0) return throw_errno(env, "memfd_create", errno);
  return make_int(env, fd);
}

// read(fd, buf) / write(fd, buf) -> bytes or -errno; never throws on I/O errors.
static napi_value js_read(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd;
  void *data;
  size_t len;
  if (get_args(env, info, 2, argv) || get_i32(env, argv[0], &fd) || get_bytes(env, argv[1], &data, &len)) return NULL;
  ssize_t n = read(fd, data, len);
  return make_int(env, n < 0 ? -errno : n);
}

static napi_value js_write(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t fd;
  void *data;
  size_t len;
  if (get_args(env, info, 2, argv) || get_i32(env, argv[0], &fd) || get_bytes(env, argv[1], &data, &len)) return NULL;
  ssize_t n = write(fd, data, len);
  return make_int(env, n < 0 ? -errno : n);
}

// readv(fd, views[]) / writev(fd, views[]) -> bytes or -errno. Synchronous:
// for non-blocking fds (taps) where a thread-pool round trip costs more than the call.
static napi_value vector_io(napi_env env, napi_callback_info info, int is_write) {
  napi_value argv[2];
  int32_t fd;
  if (get_args(env, info, 2, argv) || get_i32(env, argv[0], &fd)) return NULL;
  uint32_t n = 0;
  if (napi_get_array_length(env, argv[1], &n) != napi_ok || n > IOV_MAX) {
    napi_throw_range_error(env, NULL, "vhostd_native: expected an array of at most IOV_MAX views");
    return NULL;
  }
  struct iovec stack[64];
  struct iovec *iov = n <= 64 ? stack : malloc(n * sizeof *iov);
  if (!iov) return throw_errno(env, "readv/writev", ENOMEM);
  for (uint32_t i = 0; i < n; i++) {
    napi_value e;
    napi_get_element(env, argv[1], i, &e);
    if (get_bytes(env, e, &iov[i].iov_base, &iov[i].iov_len)) {
      if (iov != stack) free(iov);
      return NULL;
    }
  }
  ssize_t r = is_write ? writev(fd, iov, (int)n) : readv(fd, iov, (int)n);
  int err = errno;
  if (iov != stack) free(iov);
  return make_int(env, r < 0 ? -err : r);
}

static napi_value js_readv(napi_env env, napi_callback_info info) { return vector_io(env, info, 0); }
static napi_value js_writev(napi_env env, napi_callback_info info) { return vector_io(env, info, 1); }

// socket(domain, type, protocol) -> fd (close-on-exec), for interface ioctls.
static napi_value js_socket(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t domain, type, proto;
  if (get_args(env, info, 3, argv) || get_i32(env, argv[0], &domain) || get_i32(env, argv[1], &type) ||
      get_i32(env, argv[2], &proto))
    return NULL;
  int fd = socket(domain, type | SOCK_CLOEXEC, proto);
  if (fd < 0) return throw_errno(env, "socket", errno);
  return make_int(env, fd);
}

// dup(fd) -> a new close-on-exec fd for the same file, or -errno.
static napi_value js_dup(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (get_args(env, info, 1, argv) || get_i32(env, argv[0], &fd)) return NULL;
  int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  return make_int(env, nfd < 0 ? -errno : nfd);
}

static napi_value js_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int32_t fd;
  if (get_args(env, info, 1, argv) || get_i32(env, argv[0], &fd)) return NULL;
  return make_int(env, close(fd) < 0 ? -errno : 0);
}

// ioctl(fd, request, buf|integer) -> result or -errno.
static napi_value js_ioctl(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd;
  uint64_t req;
  if (get_args(env, info, 3, argv) || get_i32(env, argv[0], &fd) || get_u64(env, argv[1], &req)) return NULL;
  napi_valuetype t;
  napi_typeof(env, argv[2], &t);
  int rc;
  if (t == napi_number) {
    int64_t arg;
    napi_get_value_int64(env, argv[2], &arg);
    rc = ioctl(fd, (unsigned long)req, (unsigned long)arg);
  } else {
    void *data;
    size_t len;
    if (get_bytes(env, argv[2], &data, &len)) return NULL;
    rc = ioctl(fd, (unsigned long)req, data);
  }
  return make_int(env, rc < 0 ? -errno : rc);
}

// fallocate(fd, mode, offset, length) -> 0 or -errno.
static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int32_t fd, mode;
  uint64_t offset, length;
  if (get_args(env, info, 4, argv) || get_i32(env, argv[0], &fd) || get_i32(env, argv[1], &mode) ||
      get_u64(env, argv[2], &offset) || get_u64(env, argv[3], &length))
    return NULL;
  int rc = fallocate(fd, mode, (off_t)offset, (off_t)length);
  return make_int(env, rc < 0 ? -errno : 0);
}

// fallocateAsync(fd, mode, offset, length, cb(rc)): the same syscall on libuv's
// thread pool, so a long zero-fill never stalls the caller's loop. cb runs on
// the loop of the thread that called (napi async work is bound to its env, so
// this works on worker threads too), with 0 or -errno.
typedef struct {
  napi_async_work work;
  napi_ref callback;
  int fd, mode, rc;
  uint64_t offset, length;
} fallocate_req_t;

static void fallocate_execute(napi_env env, void *data) {
  (void)env;
  fallocate_req_t *r = data;
  r->rc = fallocate(r->fd, r->mode, (off_t)r->offset, (off_t)r->length) < 0 ? -errno : 0;
}

static void fallocate_complete(napi_env env, napi_status status, void *data) {
  fallocate_req_t *r = data;
  napi_value cb, recv, arg, result;
  if (status == napi_cancelled) r->rc = -ECANCELED;
  if (napi_get_reference_value(env, r->callback, &cb) == napi_ok && cb) {
    napi_get_global(env, &recv);
    napi_create_int32(env, r->rc, &arg);
    // An exception thrown by cb is reported by Node as uncaught, like any other callback's.
    napi_call_function(env, recv, cb, 1, &arg, &result);
  }
  napi_delete_reference(env, r->callback);
  napi_delete_async_work(env, r->work);
  free(r);
}

static napi_value js_fallocate_async(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int32_t fd, mode;
  uint64_t offset, length;
  if (get_args(env, info, 5, argv) || get_i32(env, argv[0], &fd) || get_i32(env, argv[1], &mode) ||
      get_u64(env, argv[2], &offset) || get_u64(env, argv[3], &length))
    return NULL;
  napi_valuetype t;
  napi_typeof(env, argv[4], &t);
  if (t != napi_function) {
    napi_throw_type_error(env, NULL, "vhostd_native: fallocateAsync needs a callback");
    return NULL;
  }
  fallocate_req_t *r = calloc(1, sizeof *r);
  if (!r) return throw_errno(env, "fallocateAsync", ENOMEM);
  r->fd = fd;
  r->mode = mode;
  r->offset = offset;
  r->length = length;
  napi_value name;
  napi_create_string_utf8(env, "vhostd:fallocate", NAPI_AUTO_LENGTH, &name);
  if (napi_create_reference(env, argv[4], 1, &r->callback) != napi_ok ||
      napi_create_async_work(env, NULL, name, fallocate_execute, fallocate_complete, r, &r->work) != napi_ok) {
    if (r->callback) napi_delete_reference(env, r->callback);
    free(r);
    napi_throw_error(env, NULL, "vhostd_native: cannot create async work for fallocate");
    return NULL;
  }
  if (napi_queue_async_work(env, r->work) != napi_ok) {
    napi_delete_async_work(env, r->work);
    napi_delete_reference(env, r->callback);
    free(r);
    napi_throw_error(env, NULL, "vhostd_native: cannot queue fallocate");
    return NULL;
  }
  return NULL;
}

// ---- memory mapping ----

// mmap(fd, length, offset, prot) -> address (BigInt). MAP_SHARED; 64-bit length and offset.
static napi_value js_mmap(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int32_t fd, prot;
  uint64_t length, offset;
  if (get_args(env, info, 4, argv) || get_i32(env, argv[0], &fd) || get_u64(env, argv[1], &length) ||
      get_u64(env, argv[2], &offset) || get_i32(env, argv[3], &prot))
    return NULL;
  void *p = mmap(NULL, (size_t)length, prot, MAP_SHARED, fd, (off_t)offset);
  if (p == MAP_FAILED) return throw_errno(env, "mmap", errno);
  napi_value out;
  CHECK(napi_create_bigint_uint64(env, (uint64_t)(uintptr_t)p, &out));
  return out;
}

static napi_value js_munmap(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  uint64_t addr, length;
  if (get_args(env, info, 2, argv) || get_u64(env, argv[0], &addr) || get_u64(env, argv[1], &length)) return NULL;
  if (munmap((void *)(uintptr_t)addr, (size_t)length) < 0) return throw_errno(env, "munmap", errno);
  return NULL;
}

// view(address, length) -> ArrayBuffer over mapped memory, owned by the mapping.
// The caller must detach() every view before munmap().
static napi_value js_view(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  uint64_t addr, length;
  if (get_args(env, info, 2, argv) || get_u64(env, argv[0], &addr) || get_u64(env, argv[1], &length)) return NULL;
  napi_value ab;
  CHECK(napi_create_external_arraybuffer(env, (void *)(uintptr_t)addr, (size_t)length, NULL, NULL, &ab));
  return ab;
}

static napi_value js_detach(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  CHECK(napi_detach_arraybuffer(env, argv[0]));
  return NULL;
}

// address(typedArray) -> BigInt start address of its bytes, for tests that
// need to hand a "front-end virtual address" to a peer.
static napi_value js_address(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  void *data;
  size_t len;
  if (get_args(env, info, 1, argv) || get_bytes(env, argv[0], &data, &len)) return NULL;
  napi_value out;
  CHECK(napi_create_bigint_uint64(env, (uint64_t)(uintptr_t)data, &out));
  return out;
}

static napi_value js_page_size(napi_env env, napi_callback_info info) {
  (void)info;
  return make_int(env, sysconf(_SC_PAGESIZE));
}

// fcntl(fd, cmd, arg) -> result or -errno, for commands with an int argument
// (F_GETFL/F_SETFL/F_GETFD/F_SETFD, F_GETPIPE_SZ/F_SETPIPE_SZ).
static napi_value js_fcntl(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd, cmd, arg;
  if (get_args(env, info, 3, argv) || get_i32(env, argv[0], &fd) || get_i32(env, argv[1], &cmd) || get_i32(env, argv[2], &arg))
    return NULL;
  int rc = fcntl(fd, cmd, arg);
  return make_int(env, rc < 0 ? -errno : rc);
}

// getsockoptInt(fd, level, name) -> the int option value, or -errno.
static napi_value js_getsockopt_int(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int32_t fd, level, name;
  if (get_args(env, info, 3, argv) || get_i32(env, argv[0], &fd) || get_i32(env, argv[1], &level) || get_i32(env, argv[2], &name))
    return NULL;
  int value = 0;
  socklen_t len = sizeof value;
  if (getsockopt(fd, level, name, &value, &len) < 0) return make_int(env, -errno);
  return make_int(env, value);
}

// sendDatagram(path, data) -> bytes sent or -errno. One AF_UNIX SOCK_DGRAM
// sendto on a fresh socket; a path starting with '@' names the abstract
// namespace (the '@' becomes the leading NUL, the address length ends at the name).
static napi_value js_send_datagram(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  struct sockaddr_un sun;
  void *data;
  size_t len;
  if (get_args(env, info, 2, argv) || fill_sun(env, argv[0], &sun) || get_bytes(env, argv[1], &data, &len)) return NULL;
  socklen_t alen = sizeof sun;
  if (sun.sun_path[0] == '@') {
    size_t n = strlen(sun.sun_path);
    sun.sun_path[0] = '\0';
    alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
  }
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return make_int(env, -errno);
  ssize_t n = sendto(fd, data, len, MSG_NOSIGNAL, (struct sockaddr *)&sun, alen);
  int e = errno;
  close(fd);
  return make_int(env, n < 0 ? -e : n);
}

// ---- io_uring: the three syscalls; the rings themselves are mmap()ed and driven from TypeScript ----

// ioUringSetup(entries, params) -> ring fd, or -errno. params: the 120-byte struct io_uring_params.
static napi_value js_io_uring_setup(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int32_t entries;
  void *params;
  size_t len;
  if (get_args(env, info, 2, argv) || get_i32(env, argv[0], &entries) || get_bytes(env, argv[1], &params, &len)) return NULL;
  if (len < 120) {
    napi_throw_range_error(env, NULL, "vhostd_native: io_uring_params needs 120 bytes");
    return NULL;
  }
  long rc = syscall(SYS_io_uring_setup, (unsigned)entries, params);
  return make_int(env, rc < 0 ? -errno : rc);
}

// ioUringEnter(fd, toSubmit, minComplete, flags) -> submitted count, or -errno.
static napi_value js_io_uring_enter(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int32_t fd, submit, complete, flags;
  if (get_args(env, info, 4, argv) || get_i32(env, argv[0], &fd) || get_i32(env, argv[1], &submit) ||
      get_i32(env, argv[2], &complete) || get_i32(env, argv[3], &flags))
    return NULL;
  long rc = syscall(SYS_io_uring_enter, fd, (unsigned)submit, (unsigned)complete, (unsigned)flags, NULL, 0);
  return make_int(env, rc < 0 ? -errno : rc);
}

// ioUringRegister(fd, opcode, arg, nrArgs) -> result, or -errno. arg: a typed array, or null.
static napi_value js_io_uring_register(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int32_t fd, opcode, nr;
  void *arg = NULL;
  size_t len;
  napi_valuetype t;
  if (get_args(env, info, 4, argv) || get_i32(env, argv[0], &fd) || get_i32(env, argv[1], &opcode) || get_i32(env, argv[3], &nr))
    return NULL;
  napi_typeof(env, argv[2], &t);
  if (t != napi_null && get_bytes(env, argv[2], &arg, &len)) return NULL;
  long rc = syscall(SYS_io_uring_register, fd, (unsigned)opcode, arg, (unsigned)nr);
  return make_int(env, rc < 0 ? -errno : rc);
}

NAPI_MODULE_INIT() {
  static const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"listen", js_listen},   {"accept", js_accept},   {"connect", js_connect},
      {"recvmsg", js_recvmsg}, {"sendmsg", js_sendmsg}, {"watch", js_watch},
      {"unwatch", js_unwatch}, {"eventfd", js_eventfd}, {"pipe2", js_pipe2}, {"memfdCreate", js_memfd_create},
      {"read", js_read},       {"write", js_write},     {"close", js_close},
      {"ioctl", js_ioctl},     {"mmap", js_mmap},       {"munmap", js_munmap},
      {"view", js_view},       {"detach", js_detach},   {"address", js_address},
      {"pageSize", js_page_size}, {"fallocate", js_fallocate}, {"fallocateAsync", js_fallocate_async},
      {"dup", js_dup},         {"readv", js_readv},     {"setEvents", js_set_events},     {"writev", js_writev},   {"socket", js_socket},
      {"fcntl", js_fcntl},     {"getsockoptInt", js_getsockopt_int}, {"sendDatagram", js_send_datagram},
      {"ioUringSetup", js_io_uring_setup}, {"ioUringEnter", js_io_uring_enter}, {"ioUringRegister", js_io_uring_register},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value f;
    napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f);
    napi_set_named_property(env, exports, fns[i].name, f);
  }
  vhostd_register_rbd(env, exports);
  return exports;
}

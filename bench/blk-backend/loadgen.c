/*
 * loadgen: a vhost-user-blk front-end that drives a back-end directly, with no
 * guest, to measure the back-end itself. Test tool for vhostd's benchmarks.
 *
 * One memfd is the "guest memory" (gpa 0 = offset 0, shared with the back-end
 * through SET_MEM_TABLE); each queue gets split rings in it and one thread
 * that keeps --qd requests in flight. A request is a direct chain of three
 * descriptors: 16-byte header, data (--bs bytes), status byte. Descriptors
 * are laid out once (slot i owns descriptors 3i..3i+2); only headers change.
 *
 * Notifications use the event index both ways, as Linux does:
 *  - kicks: after publishing a batch, a full fence, then kick only if
 *    vring_need_event(avail_event, new, old);
 *  - interrupts: used_event = last seen used idx (notify on the next
 *    completion), a full fence, re-check used->idx, and only then poll() the
 *    call eventfd, so a completion that raced the arming is never missed.
 *
 * Kicks, interrupts (the call eventfd's counts) and wake-ups are counted, like
 * I/Os and latencies, only inside the measured window (after the warm-up).
 *
 * Prints one JSON line on stdout. Any bad status, used length, data mismatch
 * or stall prints to stderr and exits non-zero.
 *
 * Build: cc -O2 -pthread -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- vhost-user ---- */
enum {
    GET_FEATURES = 1, SET_FEATURES = 2, SET_OWNER = 3, SET_MEM_TABLE = 5,
    SET_VRING_NUM = 8, SET_VRING_ADDR = 9, SET_VRING_BASE = 10, GET_VRING_BASE = 11,
    SET_VRING_KICK = 12, SET_VRING_CALL = 13, GET_PROTOCOL_FEATURES = 15,
    SET_PROTOCOL_FEATURES = 16, GET_QUEUE_NUM = 17, SET_VRING_ENABLE = 18, GET_CONFIG = 24,
};
#define FLAG_VERSION 1u
#define FLAG_REPLY 4u
#define FLAG_NEED_REPLY 8u

#define PF_MQ 0
#define PF_REPLY_ACK 3
#define PF_CONFIG 9

#define VF_BLK_SIZE_MAX 1
#define VF_BLK_SEG_MAX 2
#define VF_BLK_BLK_SIZE 6
#define VF_BLK_FLUSH 9
#define VF_BLK_TOPOLOGY 10
#define VF_BLK_MQ 12
#define VF_EVENT_IDX 29
#define VF_PROTOCOL_FEATURES 30
#define VF_VERSION_1 32
#define BIT(n) (1ull << (n))

#define CONFIG_SIZE 57

/* ---- virtio ---- */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define BLK_T_IN 0
#define BLK_T_OUT 1

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct vring_used_elem { uint32_t id; uint32_t len; };

static inline int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old) {
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* ---- options ---- */
static const char *opt_socket;
static int opt_rw_write, opt_rw_random = 1;
static uint32_t opt_bs = 4096, opt_qd = 1, opt_queues = 1;
static double opt_seconds = 5, opt_warmup = 1;
static uint64_t opt_size; /* 0: the device's capacity */
static uint64_t opt_mem = 256ull << 20;
static int opt_verify_write, opt_verify_read;
static uint64_t opt_seed;
static int opt_backend_pid;
static uint32_t opt_qsize; /* 0: chosen from qd */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- messages ---- */
static int sock_fd;
static int reply_ack;

struct msg_hdr { uint32_t request, flags, size; } __attribute__((packed));

static void send_msg(uint32_t req, uint32_t flags, const void *payload, uint32_t size, const int *fds, int nfds) {
    struct msg_hdr h = { req, FLAG_VERSION | flags, size };
    struct iovec iov[2] = { { &h, sizeof h }, { (void *)payload, size } };
    char cbuf[CMSG_SPACE(sizeof(int) * 8)];
    struct msghdr mh = { 0 };
    mh.msg_iov = iov;
    mh.msg_iovlen = size ? 2 : 1;
    if (nfds) {
        memset(cbuf, 0, sizeof cbuf);
        mh.msg_control = cbuf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t n;
    do n = sendmsg(sock_fd, &mh, MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
    if (n != (ssize_t)(sizeof h + size)) die("sendmsg request %u: %s", req, n < 0 ? strerror(errno) : "short write");
}

static void read_full(void *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(sock_fd, (char *)buf + got, len - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die("back-end closed the connection (%s)", n < 0 ? strerror(errno) : "EOF");
        got += (size_t)n;
    }
}

/* Reads one reply to req into body (up to cap bytes); returns its size. */
static uint32_t recv_reply(uint32_t req, void *body, uint32_t cap) {
    struct msg_hdr h;
    read_full(&h, sizeof h);
    if (h.request != req) die("reply to request %u names request %u", req, h.request);
    if ((h.flags & 3) != 1 || !(h.flags & FLAG_REPLY)) die("reply to request %u has flags 0x%x", req, h.flags);
    if (h.size > 4096) die("reply to request %u is %u bytes", req, h.size);
    char tmp[4096];
    read_full(tmp, h.size);
    if (h.size > cap) die("reply to request %u is %u bytes, expected at most %u", req, h.size, cap);
    memcpy(body, tmp, h.size);
    return h.size;
}

static uint64_t get_u64(uint32_t req) {
    uint64_t v = 0;
    send_msg(req, 0, NULL, 0, NULL, 0);
    if (recv_reply(req, &v, 8) != 8) die("reply to request %u is not a u64", req);
    return v;
}

/* A message without a reply body: with REPLY_ACK, ask for and check the ack. */
static void set_msg(uint32_t req, const void *payload, uint32_t size, const int *fds, int nfds) {
    send_msg(req, reply_ack ? FLAG_NEED_REPLY : 0, payload, size, fds, nfds);
    if (reply_ack) {
        uint64_t ack = 1;
        if (recv_reply(req, &ack, 8) != 8) die("ack to request %u is not a u64", req);
        if (ack != 0) die("back-end refused request %u (ack %" PRIu64 ")", req, ack);
    }
}

static void set_u64(uint32_t req, uint64_t v) { set_msg(req, &v, 8, NULL, 0); }

static void set_state(uint32_t req, uint32_t index, uint32_t num) {
    uint32_t s[2] = { index, num };
    set_msg(req, s, 8, NULL, 0);
}

/* ---- memory and queues ---- */
static uint8_t *mem;
static int mem_fd;
static uint64_t mem_used;

static uint64_t alloc_gpa(uint64_t size, uint64_t align) {
    uint64_t g = (mem_used + align - 1) & ~(align - 1);
    if (g + size > opt_mem) die("--mem %" PRIu64 " is too small for this queue depth and block size", opt_mem);
    mem_used = g + size;
    return g;
}

#define HIST_SUB 64
#define HIST_BUCKETS (HIST_SUB * 60)

struct slot {
    uint64_t submitted_ns;
    uint64_t offset;
    uint8_t *hdr, *data, *status;
};

struct queue {
    int index;
    uint32_t size;
    struct vring_desc *desc;
    volatile uint16_t *avail; /* flags, idx, ring[size], used_event */
    volatile uint16_t *used_hdr; /* flags, idx */
    volatile struct vring_used_elem *used_ring;
    volatile uint16_t *avail_event; /* used->ring[size] */
    uint64_t desc_gpa, avail_gpa, used_gpa;
    int kick_fd, call_fd;
    struct slot *slots;
    uint32_t *free_slots, nfree;
    uint16_t avail_idx, last_used, kicked_at;
    uint64_t seq_cursor;
    uint64_t rng;
    pthread_t thread;
    /* results */
    uint64_t ios, bytes, kicks, interrupts, wakeups, errors, verified;
    uint64_t hist[HIST_BUCKETS];
    uint64_t lat_max_ns, lat_sum_ns;
    const char *fail;
};

static struct queue *queues;
static uint64_t dev_bytes, range_bytes, nblocks;
static volatile int phase; /* 0 warm-up, 1 measuring, 2 stopping */
static uint64_t verify_next; /* next block for the one-pass verify modes */
static int verify_mode;

static inline uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The pattern of the 8-byte word at device byte offset off. */
static inline uint64_t pattern_word(uint64_t off) { return mix64(opt_seed * 0x2545f4914f6cdd1dull ^ off); }

static void fill_pattern(uint8_t *buf, uint64_t off, uint32_t len) {
    for (uint32_t i = 0; i + 8 <= len; i += 8) {
        uint64_t w = pattern_word(off + i);
        memcpy(buf + i, &w, 8);
    }
}

static int check_pattern(const uint8_t *buf, uint64_t off, uint32_t len, uint64_t *bad_at) {
    for (uint32_t i = 0; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, buf + i, 8);
        if (w != pattern_word(off + i)) {
            *bad_at = off + i;
            return 0;
        }
    }
    return 1;
}

static inline int hist_index(uint64_t v) {
    if (v < HIST_SUB) return (int)v;
    int e = 63 - __builtin_clzll(v); /* e >= 6 */
    int sub = (int)((v >> (e - 6)) & (HIST_SUB - 1));
    int idx = (e - 5) * HIST_SUB + sub;
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}

/* Midpoint of a bucket, in ns. */
static double hist_value(int idx) {
    if (idx < HIST_SUB) return idx;
    int e = idx / HIST_SUB + 5, sub = idx % HIST_SUB;
    double lo = (double)((uint64_t)(HIST_SUB + sub) << (e - 6));
    double width = (double)(1ull << (e - 6));
    return lo + width / 2;
}

static void setup_queue(struct queue *q, int index) {
    uint32_t n = q->size;
    q->index = index;
    q->desc_gpa = alloc_gpa(16ull * n, 4096);
    q->avail_gpa = alloc_gpa(6 + 2ull * n, 4096);
    q->used_gpa = alloc_gpa(6 + 8ull * n, 4096);
    q->desc = (struct vring_desc *)(mem + q->desc_gpa);
    q->avail = (volatile uint16_t *)(mem + q->avail_gpa);
    q->used_hdr = (volatile uint16_t *)(mem + q->used_gpa);
    q->used_ring = (volatile struct vring_used_elem *)(mem + q->used_gpa + 4);
    q->avail_event = (volatile uint16_t *)(mem + q->used_gpa + 4 + 8ull * n);
    memset(mem + q->desc_gpa, 0, 16ull * n);
    memset(mem + q->avail_gpa, 0, 6 + 2ull * n);
    memset(mem + q->used_gpa, 0, 6 + 8ull * n);

    q->slots = calloc(opt_qd, sizeof *q->slots);
    q->free_slots = calloc(opt_qd, sizeof *q->free_slots);
    for (uint32_t i = 0; i < opt_qd; i++) {
        struct slot *s = &q->slots[i];
        uint64_t hdr = alloc_gpa(64, 64); /* header at +0, status at +32 */
        uint64_t data = alloc_gpa(opt_bs, 4096);
        s->hdr = mem + hdr;
        s->status = mem + hdr + 32;
        s->data = mem + data;
        struct vring_desc *d = &q->desc[3 * i];
        d[0] = (struct vring_desc){ hdr, 16, VRING_DESC_F_NEXT, (uint16_t)(3 * i + 1) };
        d[1] = (struct vring_desc){ data, opt_bs,
                                    (uint16_t)(VRING_DESC_F_NEXT | (opt_rw_write ? 0 : VRING_DESC_F_WRITE)),
                                    (uint16_t)(3 * i + 2) };
        d[2] = (struct vring_desc){ hdr + 32, 1, VRING_DESC_F_WRITE, 0 };
        q->free_slots[q->nfree++] = i;
    }
    q->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    q->call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->kick_fd < 0 || q->call_fd < 0) die("eventfd: %s", strerror(errno));
    q->rng = mix64(0x1234567ull + (uint64_t)index * 7919 + opt_seed);
    q->seq_cursor = (range_bytes / opt_queues / opt_bs) * opt_bs * (uint64_t)index;
}

static inline uint64_t rng_next(struct queue *q) {
    q->rng ^= q->rng << 13;
    q->rng ^= q->rng >> 7;
    q->rng ^= q->rng << 17;
    return q->rng;
}

/* Picks the next offset; returns 0 when the one-pass verify modes are done. */
static int next_offset(struct queue *q, uint64_t *off) {
    if (verify_mode) {
        uint64_t b = __atomic_fetch_add(&verify_next, 1, __ATOMIC_RELAXED);
        if (b >= nblocks) return 0;
        *off = b * opt_bs;
        return 1;
    }
    if (opt_rw_random) {
        *off = (rng_next(q) % nblocks) * opt_bs;
    } else {
        *off = q->seq_cursor;
        q->seq_cursor += opt_bs;
        if (q->seq_cursor + opt_bs > range_bytes) q->seq_cursor = 0;
    }
    return 1;
}

/* Fills a free slot and puts it in the avail ring (idx published later). */
static int submit_one(struct queue *q) {
    uint64_t off;
    if (!q->nfree || !next_offset(q, &off)) return 0;
    uint32_t i = q->free_slots[--q->nfree];
    struct slot *s = &q->slots[i];
    uint32_t type = opt_rw_write ? BLK_T_OUT : BLK_T_IN;
    uint64_t sector = off / 512;
    memcpy(s->hdr, &type, 4);
    memset(s->hdr + 4, 0, 4);
    memcpy(s->hdr + 8, &sector, 8);
    *s->status = 0xff;
    if (opt_verify_write) fill_pattern(s->data, off, opt_bs);
    else if (opt_verify_read) memset(s->data, 0xa5, 16);
    s->offset = off;
    q->avail[2 + (q->avail_idx % q->size)] = (uint16_t)(3 * i);
    q->avail_idx++;
    s->submitted_ns = now_ns();
    return 1;
}

static void publish_and_kick(struct queue *q) {
    if (q->avail_idx == q->kicked_at) return;
    __atomic_store_n(&q->avail[1], q->avail_idx, __ATOMIC_RELEASE);
    /* Store avail->idx, then load avail_event: store-load order needs a full fence. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t event = *q->avail_event;
    if (vring_need_event(event, q->avail_idx, q->kicked_at)) {
        uint64_t one = 1;
        if (write(q->kick_fd, &one, 8) != 8) die("kick queue %d: %s", q->index, strerror(errno));
        if (phase == 1 || verify_mode) q->kicks++;
    }
    q->kicked_at = q->avail_idx;
}

static void fail_queue(struct queue *q, const char *fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    q->errors++;
    if (q->errors <= 5) fprintf(stderr, "loadgen: queue %d: %s\n", q->index, buf);
    if (!q->fail) q->fail = strdup(buf);
}

static void complete_one(struct queue *q, uint32_t id, uint32_t len, uint64_t t) {
    if (id % 3 || id / 3 >= opt_qd) {
        fail_queue(q, "used ring names descriptor %u, not a head this driver made", id);
        return;
    }
    uint32_t i = id / 3;
    struct slot *s = &q->slots[i];
    uint32_t want = opt_rw_write ? 1 : opt_bs + 1;
    uint8_t st = *s->status;
    if (st != 0) fail_queue(q, "request at offset %" PRIu64 " completed with status %u", s->offset, st);
    else if (len != want) fail_queue(q, "request at offset %" PRIu64 ": used len %u, expected %u", s->offset, len, want);
    else if (opt_verify_read) {
        uint64_t bad;
        if (!check_pattern(s->data, s->offset, opt_bs, &bad))
            fail_queue(q, "data mismatch at byte %" PRIu64 " (block at %" PRIu64 ")", bad, s->offset);
        else q->verified++;
    } else if (opt_verify_write) q->verified++;
    if (phase == 1 || verify_mode) {
        uint64_t lat = t - s->submitted_ns;
        q->hist[hist_index(lat)]++;
        q->lat_sum_ns += lat;
        if (lat > q->lat_max_ns) q->lat_max_ns = lat;
        q->ios++;
        q->bytes += opt_bs;
    }
    q->free_slots[q->nfree++] = i;
}

static void *queue_thread(void *arg) {
    struct queue *q = arg;
    uint64_t last_progress = now_ns();
    while (phase < 2 && submit_one(q)) {}
    publish_and_kick(q);
    for (;;) {
        int inflight = (int)(opt_qd - q->nfree);
        if (inflight == 0 && (phase == 2 || verify_mode || q->errors)) break;
        uint16_t used_idx = __atomic_load_n(&q->used_hdr[1], __ATOMIC_ACQUIRE);
        if (used_idx != q->last_used) {
            if ((uint16_t)(used_idx - q->last_used) > inflight) {
                fail_queue(q, "used idx moved %u entries with %d in flight", (uint16_t)(used_idx - q->last_used), inflight);
                break;
            }
            uint64_t t = now_ns();
            while (q->last_used != used_idx) {
                volatile struct vring_used_elem *e = &q->used_ring[q->last_used % q->size];
                complete_one(q, e->id, e->len, t);
                q->last_used++;
            }
            last_progress = t;
            if (phase < 2 && !q->errors) while (submit_one(q)) {}
            publish_and_kick(q);
            continue;
        }
        if (inflight == 0) {
            /* Nothing in flight but not stopping: only happens after errors. */
            break;
        }
        /* Arm: ask for a call on the next completion, then look again. */
        q->avail[2 + q->size] = q->last_used;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&q->used_hdr[1], __ATOMIC_ACQUIRE) != q->last_used) continue;
        struct pollfd p = { q->call_fd, POLLIN, 0 };
        int r = poll(&p, 1, 1000);
        if (r < 0 && errno != EINTR) die("poll: %s", strerror(errno));
        if (r > 0) {
            uint64_t v;
            if (read(q->call_fd, &v, 8) == 8 && (phase == 1 || verify_mode)) {
                q->interrupts += v;
                q->wakeups++;
            }
        } else if (now_ns() - last_progress > 10ull * 1000000000ull) {
            fail_queue(q, "no completion for 10 s with %d requests in flight (avail idx %u, used idx %u)",
                       inflight, q->avail_idx, q->last_used);
            break;
        }
    }
    return NULL;
}

static uint64_t rusage_us(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_sec * 1000000 +
           ru.ru_stime.tv_usec;
}

/* utime+stime of a process (all its threads) in µs, or -1. */
static double proc_cpu_us(int pid) {
    if (pid <= 0) return -1;
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    /* fields after comm: 3 state ... 14 utime 15 stime */
    unsigned long long ut = 0, st = 0;
    int field = 2;
    for (char *tok = strtok(p + 1, " "); tok; tok = strtok(NULL, " ")) {
        field++;
        if (field == 14) ut = strtoull(tok, NULL, 10);
        if (field == 15) { st = strtoull(tok, NULL, 10); break; }
    }
    return (double)(ut + st) * 1e6 / (double)sysconf(_SC_CLK_TCK);
}

static void sleep_until(uint64_t t) {
    for (;;) {
        uint64_t n = now_ns();
        if (n >= t) return;
        uint64_t d = t - n;
        struct timespec ts = { (time_t)(d / 1000000000ull), (long)(d % 1000000000ull) };
        nanosleep(&ts, NULL);
    }
}

static uint64_t parse_size(const char *s) {
    char *end;
    double v = strtod(s, &end);
    uint64_t m = 1;
    switch (*end) {
    case 'k': case 'K': m = 1ull << 10; break;
    case 'm': case 'M': m = 1ull << 20; break;
    case 'g': case 'G': m = 1ull << 30; break;
    case 0: break;
    default: die("bad size %s", s);
    }
    return (uint64_t)(v * (double)m);
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --socket PATH [--rw randread|randwrite|read|write] [--bs BYTES] [--qd N]\n"
            "               [--queues N] [--seconds S] [--warmup S] [--size BYTES] [--mem BYTES]\n"
            "               [--queue-size N] [--verify-write SEED | --verify-read SEED] [--backend-pid PID]\n"
            "  --verify-write SEED writes every block of --size once with a pattern of (SEED, offset);\n"
            "  --verify-read SEED reads every block once and checks it. Both ignore --rw and --seconds.\n");
    exit(2);
}

int main(int argc, char **argv) {
    static struct option longopts[] = {
        { "socket", required_argument, 0, 's' }, { "rw", required_argument, 0, 'r' },
        { "bs", required_argument, 0, 'b' },     { "qd", required_argument, 0, 'd' },
        { "queues", required_argument, 0, 'q' }, { "seconds", required_argument, 0, 't' },
        { "warmup", required_argument, 0, 'w' }, { "size", required_argument, 0, 'z' },
        { "mem", required_argument, 0, 'm' },    { "verify-write", required_argument, 0, 'W' },
        { "verify-read", required_argument, 0, 'R' }, { "backend-pid", required_argument, 0, 'p' },
        { "queue-size", required_argument, 0, 'Q' }, { "help", no_argument, 0, 'h' }, { 0, 0, 0, 0 },
    };
    const char *rw = "randread";
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 's': opt_socket = optarg; break;
        case 'r': rw = optarg; break;
        case 'b': opt_bs = (uint32_t)parse_size(optarg); break;
        case 'd': opt_qd = (uint32_t)atoi(optarg); break;
        case 'q': opt_queues = (uint32_t)atoi(optarg); break;
        case 't': opt_seconds = atof(optarg); break;
        case 'w': opt_warmup = atof(optarg); break;
        case 'z': opt_size = parse_size(optarg); break;
        case 'm': opt_mem = parse_size(optarg); break;
        case 'W': opt_verify_write = 1; opt_seed = strtoull(optarg, NULL, 0); break;
        case 'R': opt_verify_read = 1; opt_seed = strtoull(optarg, NULL, 0); break;
        case 'p': opt_backend_pid = atoi(optarg); break;
        case 'Q': opt_qsize = (uint32_t)atoi(optarg); break;
        default: usage();
        }
    }
    if (!opt_socket) usage();
    if (!strcmp(rw, "randread")) { opt_rw_write = 0; opt_rw_random = 1; }
    else if (!strcmp(rw, "randwrite")) { opt_rw_write = 1; opt_rw_random = 1; }
    else if (!strcmp(rw, "read")) { opt_rw_write = 0; opt_rw_random = 0; }
    else if (!strcmp(rw, "write")) { opt_rw_write = 1; opt_rw_random = 0; }
    else die("--rw must be randread, randwrite, read or write");
    if (opt_verify_write && opt_verify_read) die("--verify-write and --verify-read exclude each other");
    verify_mode = opt_verify_write || opt_verify_read;
    if (opt_verify_write) { opt_rw_write = 1; rw = "write"; }
    if (opt_verify_read) { opt_rw_write = 0; rw = "read"; }
    if (opt_bs < 512 || opt_bs % 512) die("--bs must be a multiple of 512");
    if (opt_qd < 1 || opt_qd > 341) die("--qd must be 1..341");
    if (opt_queues < 1 || opt_queues > 64) die("--queues must be 1..64");
    if (!opt_qsize) {
        opt_qsize = 128;
        while (opt_qsize < 3 * opt_qd) opt_qsize *= 2;
    }
    if (opt_qsize & (opt_qsize - 1) || opt_qsize < 3 * opt_qd) die("--queue-size must be a power of two >= 3 x qd");

    /* Connect. */
    sock_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(opt_socket) >= sizeof sa.sun_path) die("socket path too long");
    strcpy(sa.sun_path, opt_socket);
    for (int tries = 0;; tries++) {
        if (connect(sock_fd, (struct sockaddr *)&sa, sizeof sa) == 0) break;
        if ((errno != ENOENT && errno != ECONNREFUSED) || tries > 200) die("connect %s: %s", opt_socket, strerror(errno));
        usleep(20000);
    }

    /* Negotiate, in QEMU's order. */
    uint64_t offered = get_u64(GET_FEATURES);
    uint64_t need = BIT(VF_VERSION_1) | BIT(VF_EVENT_IDX) | BIT(VF_PROTOCOL_FEATURES);
    if ((offered & need) != need) die("back-end offers features 0x%" PRIx64 ", without VERSION_1, EVENT_IDX or PROTOCOL_FEATURES", offered);
    uint64_t pf_offered = get_u64(GET_PROTOCOL_FEATURES);
    uint64_t pf = pf_offered & (BIT(PF_MQ) | BIT(PF_REPLY_ACK) | BIT(PF_CONFIG));
    set_u64(SET_PROTOCOL_FEATURES, pf);
    reply_ack = !!(pf & BIT(PF_REPLY_ACK));
    uint64_t qnum = 1;
    if (pf & BIT(PF_MQ)) qnum = get_u64(GET_QUEUE_NUM);
    if (opt_queues > qnum) die("back-end has %" PRIu64 " queues, --queues is %u", qnum, opt_queues);
    set_msg(SET_OWNER, NULL, 0, NULL, 0);
    if (!(pf & BIT(PF_CONFIG))) die("back-end does not offer the CONFIG protocol feature");
    {
        uint8_t req[12 + CONFIG_SIZE] = { 0 }, rep[12 + CONFIG_SIZE];
        uint32_t hdr[3] = { 0, CONFIG_SIZE, 0 };
        memcpy(req, hdr, 12);
        send_msg(GET_CONFIG, 0, req, sizeof req, NULL, 0);
        uint32_t n = recv_reply(GET_CONFIG, rep, sizeof rep);
        if (n != sizeof rep) die("GET_CONFIG reply is %u bytes, expected %zu", n, sizeof rep);
        uint64_t cap;
        memcpy(&cap, rep + 12, 8);
        dev_bytes = cap * 512;
    }
    uint64_t want = need | BIT(VF_BLK_SEG_MAX) | BIT(VF_BLK_SIZE_MAX) | BIT(VF_BLK_BLK_SIZE) | BIT(VF_BLK_FLUSH) |
                    BIT(VF_BLK_TOPOLOGY) | BIT(VF_BLK_MQ);
    uint64_t features = offered & want;
    set_u64(SET_FEATURES, features);

    range_bytes = opt_size ? opt_size : dev_bytes;
    if (range_bytes > dev_bytes) die("--size %" PRIu64 " exceeds the device (%" PRIu64 " bytes)", range_bytes, dev_bytes);
    nblocks = range_bytes / opt_bs;
    if (nblocks < 1) die("--size is smaller than one block");
    range_bytes = nblocks * opt_bs;

    /* Guest memory. */
    uint64_t est = opt_queues * (3ull * 4096 + 24ull * opt_qsize + opt_qd * ((uint64_t)opt_bs + 8192)) + (1 << 20);
    if (est > opt_mem) opt_mem = (est + (2 << 20) - 1) & ~((2ull << 20) - 1);
    mem_fd = memfd_create("loadgen-guest", MFD_CLOEXEC);
    if (mem_fd < 0 || ftruncate(mem_fd, (off_t)opt_mem) < 0) die("memfd: %s", strerror(errno));
    mem = mmap(NULL, opt_mem, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    if (mem == MAP_FAILED) die("mmap: %s", strerror(errno));
    {
        uint64_t table[1 + 4] = { 1, opt_mem, opt_mem, (uint64_t)(uintptr_t)mem, 0 };
        table[0] = 1; /* n = 1, padding 0 */
        table[1] = 0; /* guest_phys_addr */
        table[2] = opt_mem; /* memory_size */
        table[3] = (uint64_t)(uintptr_t)mem; /* userspace_addr */
        table[4] = 0; /* mmap_offset */
        set_msg(SET_MEM_TABLE, table, sizeof table, &mem_fd, 1);
    }

    queues = calloc(opt_queues, sizeof *queues);
    for (uint32_t i = 0; i < opt_queues; i++) {
        struct queue *q = &queues[i];
        q->size = opt_qsize;
        setup_queue(q, (int)i);
        set_state(SET_VRING_NUM, i, q->size);
        set_state(SET_VRING_BASE, i, 0);
        struct { uint32_t index, flags; uint64_t desc, used, avail, log; } addr = {
            i, 0, (uint64_t)(uintptr_t)q->desc, (uint64_t)(uintptr_t)q->used_hdr, (uint64_t)(uintptr_t)q->avail, 0,
        };
        set_msg(SET_VRING_ADDR, &addr, sizeof addr, NULL, 0);
        uint64_t idx = i;
        set_msg(SET_VRING_KICK, &idx, 8, &q->kick_fd, 1);
        set_msg(SET_VRING_CALL, &idx, 8, &q->call_fd, 1);
    }
    for (uint32_t i = 0; i < opt_queues; i++) set_state(SET_VRING_ENABLE, i, 1);

    /* Run. */
    uint64_t t_start = now_ns();
    phase = verify_mode ? 1 : 0;
    for (uint32_t i = 0; i < opt_queues; i++)
        if (pthread_create(&queues[i].thread, NULL, queue_thread, &queues[i])) die("pthread_create");
    uint64_t t0, t1, cpu0, cpu1;
    double bcpu0, bcpu1;
    if (verify_mode) {
        t0 = t_start;
        cpu0 = rusage_us();
        bcpu0 = proc_cpu_us(opt_backend_pid);
        for (uint32_t i = 0; i < opt_queues; i++) pthread_join(queues[i].thread, NULL);
        t1 = now_ns();
        cpu1 = rusage_us();
        bcpu1 = proc_cpu_us(opt_backend_pid);
    } else {
        sleep_until(t_start + (uint64_t)(opt_warmup * 1e9));
        __atomic_store_n(&phase, 1, __ATOMIC_SEQ_CST);
        t0 = now_ns();
        cpu0 = rusage_us();
        bcpu0 = proc_cpu_us(opt_backend_pid);
        sleep_until(t0 + (uint64_t)(opt_seconds * 1e9));
        __atomic_store_n(&phase, 2, __ATOMIC_SEQ_CST);
        t1 = now_ns();
        cpu1 = rusage_us();
        bcpu1 = proc_cpu_us(opt_backend_pid);
        for (uint32_t i = 0; i < opt_queues; i++) pthread_join(queues[i].thread, NULL);
    }

    /* Stop, as QEMU does: disable every ring, then GET_VRING_BASE each. */
    for (uint32_t i = 0; i < opt_queues; i++) set_state(SET_VRING_ENABLE, i, 0);
    int base_errors = 0;
    for (uint32_t i = 0; i < opt_queues; i++) {
        uint32_t s[2] = { i, 0 }, r[2] = { 0, 0 };
        send_msg(GET_VRING_BASE, 0, s, 8, NULL, 0);
        if (recv_reply(GET_VRING_BASE, r, 8) != 8) die("GET_VRING_BASE reply is not a vring state");
        if (r[0] != i || (uint16_t)r[1] != queues[i].avail_idx) {
            fprintf(stderr, "loadgen: queue %u: GET_VRING_BASE says %u/%u, the driver made %u\n", i, r[0], r[1],
                    queues[i].avail_idx);
            base_errors++;
        }
    }
    close(sock_fd);

    /* Report. */
    uint64_t ios = 0, bytes = 0, kicks = 0, irqs = 0, wakeups = 0, errors = (uint64_t)base_errors, verified = 0;
    uint64_t lat_max = 0, lat_sum = 0;
    static uint64_t hist[HIST_BUCKETS];
    const char *fail = NULL;
    for (uint32_t i = 0; i < opt_queues; i++) {
        struct queue *q = &queues[i];
        ios += q->ios; bytes += q->bytes; kicks += q->kicks; irqs += q->interrupts; wakeups += q->wakeups;
        errors += q->errors; verified += q->verified;
        lat_sum += q->lat_sum_ns;
        if (q->lat_max_ns > lat_max) lat_max = q->lat_max_ns;
        for (int b = 0; b < HIST_BUCKETS; b++) hist[b] += q->hist[b];
        if (!fail && q->fail) fail = q->fail;
    }
    double pct[3] = { 0.50, 0.99, 0.999 }, pv[3] = { 0, 0, 0 };
    for (int k = 0; k < 3; k++) {
        uint64_t target = (uint64_t)((double)ios * pct[k]), acc = 0;
        if (target >= ios && ios) target = ios - 1;
        for (int b = 0; b < HIST_BUCKETS; b++) {
            acc += hist[b];
            if (acc > target) { pv[k] = hist_value(b) / 1000.0; break; }
        }
    }
    double secs = (double)(t1 - t0) / 1e9;
    double per = ios ? (double)ios : 1;
    double bcpu = (bcpu0 >= 0 && bcpu1 >= 0) ? (bcpu1 - bcpu0) / per : -1;
    printf("{\"rw\":\"%s\",\"bs\":%u,\"qd\":%u,\"queues\":%u,\"queue_size\":%u,\"seconds\":%.3f,\"ios\":%" PRIu64
           ",\"iops\":%.1f,\"mbps\":%.2f,\"lat_us\":{\"p50\":%.2f,\"p99\":%.2f,\"p999\":%.2f,\"mean\":%.2f,\"max\":%.2f}"
           ",\"cpu_us_per_io\":%.3f,\"backend_cpu_us_per_io\":%.3f,\"kicks_per_io\":%.4f,\"interrupts_per_io\":%.4f"
           ",\"wakeups_per_io\":%.4f,\"kicks\":%" PRIu64 ",\"interrupts\":%" PRIu64 ",\"features\":\"0x%" PRIx64
           "\",\"protocol_features\":\"0x%" PRIx64 "\",\"device_bytes\":%" PRIu64 ",\"verified\":%" PRIu64
           ",\"errors\":%" PRIu64,
           rw, opt_bs, opt_qd, opt_queues, opt_qsize, secs, ios, ios / secs, bytes / secs / 1e6, pv[0], pv[1], pv[2],
           lat_sum / per / 1000.0, lat_max / 1000.0, (double)(cpu1 - cpu0) / per, bcpu, kicks / per, irqs / per,
           wakeups / per, kicks, irqs, features, pf, dev_bytes, verified, errors);
    if (fail) {
        printf(",\"error\":\"");
        for (const char *p = fail; *p; p++) putchar(*p == '"' || *p == '\\' ? '\'' : *p);
        printf("\"");
    }
    printf("}\n");
    fflush(stdout);
    if (errors) return 1;
    if (verify_mode && verified != nblocks) {
        fprintf(stderr, "loadgen: verified %" PRIu64 " of %" PRIu64 " blocks\n", verified, nblocks);
        return 1;
    }
    if (!ios) {
        fprintf(stderr, "loadgen: no I/O completed in the measured window\n");
        return 1;
    }
    return 0;
}

/*
 * qsnap-agent: the workload of the qsnap "linux" guest.
 *
 * Driven by a line protocol on a serial port (argv[1], normally /dev/ttyS1);
 * every command is answered by exactly one line starting with "OK " or "ERR ".
 *
 *   ping                      OK pong
 *   fill MIB SEED             OK fill pages=N seed=S
 *   writer start PAGES_PER_SEC  OK writer running rate=R
 *   writer stop               OK writer stopped k=K g=G
 *   verify                    OK verify pages=N k=K g=G bad=0
 *                             ERR verify pages=N k=K g=G bad=B counts=REASON:COUNT,...
 *                                 first=I:REASON[=VALUE],...  (at most 8, lowest index first)
 *   digest                    OK digest=HEX pages=N k=K g=G
 *   touch random|reverse      OK touch order=O pages=N sum=HEX
 *   status                    OK status pages=N seed=S k=K g=G writer=on|off rate=R
 *
 * Memory design: a region of 4 KiB pages, each one self-checking. A page holds
 * a header (magic, index, generation, seed, checksum) and a body generated from
 * (seed, index, generation). The writer sweeps the region in index order,
 * rewriting page k with generation g + 1; when it wraps, g is incremented. Its
 * state (k, g) lives in guest memory, so at any frozen instant pages [0, k) hold
 * g + 1 and [k, N) hold g: one sweep boundary. A reverted snapshot brings the
 * state back with the pages, so "verify" (which pauses the writer at a page
 * boundary) must pass after any correct revert, with the writer still running.
 *
 * This file is part of qsnap. SPDX-License-Identifier: GPL-2.0-or-later
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION 1
#define PAGE_SIZE 4096u
#define PAGE_MAGIC UINT64_C(0x31475050414e5351) /* "QSNAPPG1" in memory order */
#define BODY_WORDS ((PAGE_SIZE - sizeof(struct page_header)) / sizeof(uint64_t))
#define MAX_LINE 256
#define MAX_REPORTED 8
#define MAX_REGION_MIB 65536u
#define MAX_RATE 10000000u
#define PACING_SLACK_NS 100000000u /* how far the writer may lag before it stops catching up */

struct page_header {
    uint64_t magic;
    uint32_t index;
    uint32_t generation;
    uint32_t seed;
    uint32_t checksum; /* over the whole page with this field zero */
};

struct page {
    struct page_header h;
    uint64_t body[(PAGE_SIZE - sizeof(struct page_header)) / sizeof(uint64_t)];
};

_Static_assert(sizeof(struct page) == PAGE_SIZE, "page layout");

/* Everything the writer and verify share; guarded by lock. */
static struct {
    pthread_mutex_t lock;
    struct page *pages;
    uint32_t npages;
    uint32_t seed;
    uint32_t k; /* pages [0, k) hold generation g + 1 */
    uint32_t g;
    atomic_uint rate;
    atomic_int running;
    atomic_int pause_request;
    pthread_t thread;
} st = { .lock = PTHREAD_MUTEX_INITIALIZER };

static int serial_fd = -1;

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static uint64_t body_seed(uint32_t seed, uint32_t index, uint32_t generation)
{
    uint64_t x = ((uint64_t)seed << 32) ^ index;
    uint64_t s = splitmix64(&x) ^ ((uint64_t)generation * UINT64_C(0xd6e8feb86659fd93));
    return splitmix64(&s);
}

static uint32_t page_checksum(const struct page *p)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    size_t i;

    for (i = 0; i < PAGE_SIZE / sizeof(uint64_t); i++) {
        uint64_t v = w[i];
        if (i == 2) {
            v &= UINT64_C(0x00000000ffffffff); /* seed kept, checksum zeroed */
        }
        h = (h ^ v) * UINT64_C(0x100000001b3);
        h ^= h >> 29;
    }
    return (uint32_t)(h ^ (h >> 32));
}

static void write_page(struct page *p, uint32_t seed, uint32_t index, uint32_t generation)
{
    uint64_t x = body_seed(seed, index, generation);
    size_t i;

    for (i = 0; i < BODY_WORDS; i++) {
        p->body[i] = splitmix64(&x);
    }
    p->h.magic = PAGE_MAGIC;
    p->h.index = index;
    p->h.generation = generation;
    p->h.seed = seed;
    p->h.checksum = 0;
    p->h.checksum = page_checksum(p);
}

static int page_is_zero(const struct page *p)
{
    const uint64_t *w = (const uint64_t *)p;
    size_t i;

    for (i = 0; i < PAGE_SIZE / sizeof(uint64_t); i++) {
        if (w[i]) {
            return 0;
        }
    }
    return 1;
}

enum fault {
    FAULT_ZERO,
    FAULT_BAD_MAGIC,
    FAULT_BAD_CHECKSUM,
    FAULT_WRONG_INDEX,
    FAULT_WRONG_SEED,
    FAULT_GEN_TOO_NEW,
    FAULT_GEN_TOO_OLD,
    FAULT_BAD_BODY,
    FAULT_COUNT,
    FAULT_NONE = FAULT_COUNT,
};

static const char *const fault_names[FAULT_COUNT] = {
    [FAULT_ZERO] = "zero",
    [FAULT_BAD_MAGIC] = "bad-magic",
    [FAULT_BAD_CHECKSUM] = "bad-checksum",
    [FAULT_WRONG_INDEX] = "wrong-index",
    [FAULT_WRONG_SEED] = "wrong-seed",
    [FAULT_GEN_TOO_NEW] = "gen-too-new",
    [FAULT_GEN_TOO_OLD] = "gen-too-old",
    [FAULT_BAD_BODY] = "bad-body",
};

/* Checks page i against the writer state (k, g); *value gets what was found instead. */
static enum fault check_page(const struct page *p, uint32_t i, uint64_t *value)
{
    uint32_t expected = i < st.k ? st.g + 1 : st.g;
    uint64_t x;
    size_t w;

    if (page_is_zero(p)) {
        return FAULT_ZERO;
    }
    if (p->h.magic != PAGE_MAGIC) {
        *value = p->h.magic;
        return FAULT_BAD_MAGIC;
    }
    if (page_checksum(p) != p->h.checksum) {
        *value = p->h.checksum;
        return FAULT_BAD_CHECKSUM;
    }
    if (p->h.index != i) {
        *value = p->h.index;
        return FAULT_WRONG_INDEX;
    }
    if (p->h.seed != st.seed) {
        *value = p->h.seed;
        return FAULT_WRONG_SEED;
    }
    if (p->h.generation != expected) {
        *value = p->h.generation;
        return (int32_t)(p->h.generation - expected) > 0 ? FAULT_GEN_TOO_NEW : FAULT_GEN_TOO_OLD;
    }
    x = body_seed(p->h.seed, i, p->h.generation);
    for (w = 0; w < BODY_WORDS; w++) {
        if (p->body[w] != splitmix64(&x)) {
            *value = w * sizeof(uint64_t) + sizeof(struct page_header);
            return FAULT_BAD_BODY;
        }
    }
    return FAULT_NONE;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = { .tv_sec = ns / 1000000000u, .tv_nsec = ns % 1000000000u };

    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
}

static void *writer_main(void *arg)
{
    uint64_t start = now_ns(), done = 0;

    (void)arg;
    while (st.running) {
        uint64_t due, now;

        if (st.pause_request) {
            sleep_ns(100000);
            continue;
        }
        pthread_mutex_lock(&st.lock);
        write_page(&st.pages[st.k], st.seed, st.k, st.g + 1);
        if (++st.k == st.npages) {
            st.k = 0;
            st.g++;
        }
        pthread_mutex_unlock(&st.lock);

        done++;
        due = start + done * 1000000000u / st.rate;
        now = now_ns();
        if (now + PACING_SLACK_NS < due || now > due + PACING_SLACK_NS) {
            /* Clock jump (e.g. a revert) or starved: restart pacing instead of bursting. */
            start = now;
            done = 0;
        } else if (now < due) {
            sleep_ns(due - now);
        }
    }
    return NULL;
}

static void reply(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    int n;
    size_t off = 0;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if ((size_t)n > sizeof(buf) - 2) {
        n = sizeof(buf) - 2;
    }
    buf[n++] = '\n';
    while (off < (size_t)n) {
        ssize_t r = write(serial_fd, buf + off, n - off);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return;
        }
        off += r;
    }
}

static void pause_writer(void)
{
    st.pause_request = 1;
    pthread_mutex_lock(&st.lock);
}

static void resume_writer(void)
{
    st.pause_request = 0;
    pthread_mutex_unlock(&st.lock);
}

static void stop_writer(void)
{
    if (st.running) {
        st.running = 0;
        pthread_join(st.thread, NULL);
    }
}

static int parse_u32(const char *s, uint32_t *out)
{
    char *end;
    unsigned long v;

    if (!s || !*s) {
        return -1;
    }
    errno = 0;
    v = strtoul(s, &end, 0);
    if (errno || *end || v > UINT32_MAX || *s == '-') {
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static void cmd_fill(char *mib_s, char *seed_s)
{
    uint32_t mib, seed, i;
    size_t len;
    void *mem;

    if (parse_u32(mib_s, &mib) || parse_u32(seed_s, &seed) || mib == 0 ||
        mib > MAX_REGION_MIB) {
        reply("ERR fill: usage: fill MIB SEED (1 <= MIB <= %u)", MAX_REGION_MIB);
        return;
    }
    if (st.running) {
        reply("ERR fill: writer running");
        return;
    }
    if (st.pages) {
        munmap(st.pages, (size_t)st.npages * PAGE_SIZE);
        st.pages = NULL;
        st.npages = 0;
    }
    len = (size_t)mib << 20;
    mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
               -1, 0);
    if (mem == MAP_FAILED) {
        reply("ERR fill: mmap %u MiB: %s", mib, strerror(errno));
        return;
    }
    if (mlock(mem, len)) {
        reply("ERR fill: mlock %u MiB: %s", mib, strerror(errno));
        munmap(mem, len);
        return;
    }
    st.pages = mem;
    st.npages = (uint32_t)(len / PAGE_SIZE);
    st.seed = seed;
    st.k = 0;
    st.g = 0;
    for (i = 0; i < st.npages; i++) {
        write_page(&st.pages[i], seed, i, 0);
    }
    reply("OK fill pages=%u seed=%u", st.npages, seed);
}

static void cmd_writer(char *what, char *rate_s)
{
    uint32_t rate;

    if (what && !strcmp(what, "stop") && !rate_s) {
        stop_writer();
        reply("OK writer stopped k=%u g=%u", st.k, st.g);
        return;
    }
    if (!what || strcmp(what, "start") || parse_u32(rate_s, &rate) || rate == 0 ||
        rate > MAX_RATE) {
        reply("ERR writer: usage: writer start PAGES_PER_SEC (1..%u) | writer stop", MAX_RATE);
        return;
    }
    if (!st.pages) {
        reply("ERR writer: no region (fill first)");
        return;
    }
    st.rate = rate;
    if (!st.running) {
        st.running = 1;
        if (pthread_create(&st.thread, NULL, writer_main, NULL)) {
            st.running = 0;
            reply("ERR writer: cannot start thread");
            return;
        }
    }
    reply("OK writer running rate=%u", rate);
}

static void cmd_verify(void)
{
    char first[MAX_REPORTED * 40] = "", counts[FAULT_COUNT * 24] = "";
    size_t used = 0, cused = 0;
    uint32_t i, bad = 0, per_fault[FAULT_COUNT] = { 0 };
    int f, n;

    if (!st.pages) {
        reply("ERR verify: no region (fill first)");
        return;
    }
    pause_writer();
    for (i = 0; i < st.npages; i++) {
        uint64_t value = 0;
        enum fault why = check_page(&st.pages[i], i, &value);

        if (why == FAULT_NONE) {
            continue;
        }
        per_fault[why]++;
        if (bad++ < MAX_REPORTED) {
            n = snprintf(first + used, sizeof(first) - used, "%s%u:%s", used ? "," : "", i,
                         fault_names[why]);
            if (n > 0 && (size_t)n < sizeof(first) - used) {
                used += n;
            }
            if (why != FAULT_ZERO) {
                n = snprintf(first + used, sizeof(first) - used, "=%" PRIu64, value);
                if (n > 0 && (size_t)n < sizeof(first) - used) {
                    used += n;
                }
            }
        }
    }
    for (f = 0; f < FAULT_COUNT; f++) {
        if (per_fault[f]) {
            n = snprintf(counts + cused, sizeof(counts) - cused, "%s%s:%u", cused ? "," : "",
                         fault_names[f], per_fault[f]);
            if (n > 0 && (size_t)n < sizeof(counts) - cused) {
                cused += n;
            }
        }
    }
    if (bad) {
        reply("ERR verify pages=%u k=%u g=%u bad=%u counts=%s first=%s", st.npages, st.k, st.g,
              bad, counts, first);
    } else {
        reply("OK verify pages=%u k=%u g=%u bad=0", st.npages, st.k, st.g);
    }
    resume_writer();
}

static void cmd_digest(void)
{
    const uint64_t *w;
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    size_t i, n;

    if (!st.pages) {
        reply("ERR digest: no region (fill first)");
        return;
    }
    pause_writer();
    w = (const uint64_t *)st.pages;
    n = (size_t)st.npages * (PAGE_SIZE / sizeof(uint64_t));
    for (i = 0; i < n; i++) {
        h = (h ^ w[i]) * UINT64_C(0x100000001b3);
    }
    reply("OK digest=%016" PRIx64 " pages=%u k=%u g=%u", h, st.npages, st.k, st.g);
    resume_writer();
}

static void cmd_touch(char *order)
{
    uint64_t sum = 0, x = now_ns();
    uint32_t *perm, i;
    int reverse = order && !strcmp(order, "reverse");

    if (!order || (!reverse && strcmp(order, "random"))) {
        reply("ERR touch: usage: touch random|reverse");
        return;
    }
    if (!st.pages) {
        reply("ERR touch: no region (fill first)");
        return;
    }
    perm = malloc((size_t)st.npages * sizeof(*perm));
    if (!perm) {
        reply("ERR touch: out of memory");
        return;
    }
    for (i = 0; i < st.npages; i++) {
        perm[i] = reverse ? st.npages - 1 - i : i;
    }
    if (!reverse) {
        for (i = st.npages - 1; i > 0; i--) {
            uint32_t j = (uint32_t)(splitmix64(&x) % (i + 1));
            uint32_t t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
    }
    for (i = 0; i < st.npages; i++) {
        sum += *(volatile uint64_t *)&st.pages[perm[i]].h.magic;
    }
    free(perm);
    reply("OK touch order=%s pages=%u sum=%016" PRIx64, order, st.npages, sum);
}

static void cmd_status(void)
{
    pthread_mutex_lock(&st.lock);
    reply("OK status pages=%u seed=%u k=%u g=%u writer=%s rate=%u", st.npages, st.seed, st.k,
          st.g, st.running ? "on" : "off", st.rate);
    pthread_mutex_unlock(&st.lock);
}

static void dispatch(char *line)
{
    char *argv[4] = { 0 };
    char *save = NULL, *tok;
    int argc = 0;

    for (tok = strtok_r(line, " \t\r", &save); tok; tok = strtok_r(NULL, " \t\r", &save)) {
        if (argc == 4) {
            reply("ERR too many arguments");
            return;
        }
        argv[argc++] = tok;
    }
    if (argc == 0) {
        reply("ERR empty command");
    } else if (!strcmp(argv[0], "ping") && argc == 1) {
        reply("OK pong");
    } else if (!strcmp(argv[0], "fill") && argc == 3) {
        cmd_fill(argv[1], argv[2]);
    } else if (!strcmp(argv[0], "writer") && argc <= 3) {
        cmd_writer(argv[1], argv[2]);
    } else if (!strcmp(argv[0], "verify") && argc == 1) {
        cmd_verify();
    } else if (!strcmp(argv[0], "digest") && argc == 1) {
        cmd_digest();
    } else if (!strcmp(argv[0], "touch") && argc == 2) {
        cmd_touch(argv[1]);
    } else if (!strcmp(argv[0], "status") && argc == 1) {
        cmd_status();
    } else {
        reply("ERR unknown command: %s (argc %d)", argv[0], argc);
    }
}

int main(int argc, char **argv)
{
    char line[MAX_LINE];
    size_t len = 0;
    int overflow = 0;
    struct termios tio;

    if (argc != 2) {
        fprintf(stderr, "usage: %s SERIAL-DEVICE\n", argv[0]);
        return 2;
    }
    serial_fd = open(argv[1], O_RDWR | O_NOCTTY);
    if (serial_fd < 0) {
        fprintf(stderr, "qsnap-agent: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    if (tcgetattr(serial_fd, &tio) == 0) {
        cfmakeraw(&tio);
        cfsetispeed(&tio, B115200);
        cfsetospeed(&tio, B115200);
        tio.c_cc[VMIN] = 1;
        tio.c_cc[VTIME] = 0;
        tcsetattr(serial_fd, TCSANOW, &tio);
    }
    reply("OK ready qsnap-agent %d pagesize=%u", AGENT_VERSION, PAGE_SIZE);
    for (;;) {
        char c;
        ssize_t r = read(serial_fd, &c, 1);

        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            fprintf(stderr, "qsnap-agent: read %s: %s\n", argv[1],
                    r ? strerror(errno) : "end of file");
            return 1;
        }
        if (c == '\n') {
            line[len] = '\0';
            if (overflow) {
                reply("ERR line longer than %d bytes", MAX_LINE - 1);
            } else {
                dispatch(line);
            }
            len = 0;
            overflow = 0;
        } else if (len < MAX_LINE - 1) {
            line[len++] = c;
        } else {
            overflow = 1;
        }
    }
}

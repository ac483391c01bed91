/*
 * vmf-contain: puts one container process in its own namespaces in the guest, the way runc does,
 * then waits for the agent's start byte and execs the program.
 *
 * The agent posix_spawn()s this with fd 0-2 = the process's stdio, fd 3 = status pipe (to the
 * agent), fd 4 = start pipe (from the agent), and with --terminal fd 5 = a Unix socket on which
 * the program sends the master of its terminal (SCM_RIGHTS) before it says "R". Status
 * messages, each one write(2) below PIPE_BUF:
 *   "C<pid>\n"  the container's init, as the guest sees it (exec'd processes join its namespaces)
 *   "R"         set up, waiting for the start byte
 *   "E<why>"    set-up failed; the process then exits 126 (found, not runnable) or 127 (not found)
 *   EOF         the program was exec'd (every copy of fd 3 is close-on-exec or closed)
 *
 * Processes, for a new container (--rootfs):
 *   outer  the agent's child, in the guest's namespaces. Unshares mount/PID/UTS/IPC, forks the
 *          init, forwards every signal it gets to it and exits as it exits (the same code, or by
 *          the same signal), so the agent's pid, kill and wait semantics are unchanged.
 *   init   PID 1 of the container: sets up the mounts, pivot_root()s into the rootfs, detaches
 *          the guest's root, sets the hostname, forks the program, forwards signals to it, reaps
 *          orphans, and exits with the program's status (PID 1 ignores signals it has no handler
 *          for, so the program itself must not be PID 1, or a plain `kill` would not end it).
 *   program  with --terminal: opens a pty in the container's own /dev/ptmx (as runc does, so
 *          `tty` names it inside), makes it its controlling terminal in a new session and its
 *          stdio, and sends the master to the agent; then sets rlimits, ids, capabilities,
 *          no_new_privs, waits for the start byte, execs.
 * For --join PID (an exec in a running container) the outer process enters the namespaces of
 * that init and forks the program directly. For --guest-root (host-trusted tests only) nothing is
 * unshared: the program runs in the guest's own root.
 *
 * Built static (no loader, no libc in the guest needed for it): see guest/BUILD.bazel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STATUS_FD 3
#define START_FD 4
#define CONSOLE_FD 5
/* The status pipe's error message stays one atomic write. */
#define MAX_ERROR 2048
/* Linux signal numbers run 1..64 (SIGRTMAX on every architecture we run on). */
#define MAX_SIGNAL 64
#define MAX_LIST 64

enum mode { MODE_GUEST_ROOT, MODE_NEW, MODE_JOIN };

struct mount_spec {
    const char *type, *source, *dest, *data;
    unsigned long flags;
    int tree_fd; /* "sharedbind": the source, detached by open_tree() before pivot_root */
};

/* <linux/mount.h>, Linux 5.2: new mount API, for binds whose source is outside the rootfs. */
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif
/* A bind whose source is a guest path (the host's share), not a path inside the rootfs. */
#define SHARED_BIND "sharedbind"

struct rlimit_spec {
    int resource;
    struct rlimit limit;
};

static struct {
    enum mode mode;
    const char *rootfs;
    pid_t join_pid;
    pid_t join_parent; /* the outer process of that container: the init's parent */
    const char *hostname;
    int readonly;
    struct mount_spec mounts[MAX_LIST];
    int n_mounts;
    const char *ro_paths[MAX_LIST];
    int n_ro_paths;
    const char *masked_paths[MAX_LIST];
    int n_masked_paths;
    const char *sysctl_paths[MAX_LIST], *sysctl_values[MAX_LIST]; /* /proc/sys/..., value */
    int n_sysctls;
    struct rlimit_spec rlimits[MAX_LIST];
    int n_rlimits;
    int set_ids;
    uid_t uid;
    gid_t gid;
    gid_t groups[MAX_LIST];
    int n_groups;
    int set_caps;
    uint64_t caps[5]; /* bounding, effective, permitted, inheritable, ambient */
    int no_new_privs;
    int terminal;
    int timing;
    const char *cwd;
    const char *exec_path;
    const char *search;    /* --search: PATH to find exec_path in, as execvp, inside the container */
    const char *root_name; /* the rootfs as the host named it, for messages */
    int exec_fd;           /* the program found by --search, open for execveat; else -1 */
    char **argv;
} cfg;

static volatile pid_t forward_to;

/* --timing: where the set-up's time goes (CLOCK_MONOTONIC, the agent's time.monotonic()). The
 * program writes the marks its parents made before forking it, and its own, to its stderr just
 * before it says "R": a measurement aid, never used by the runtime. */
#define MAX_MARKS 32
static struct { const char *what; struct timespec at; } marks[MAX_MARKS];
static int n_marks;

static void mark(const char *what) {
    if (!cfg.timing || n_marks == MAX_MARKS) return;
    marks[n_marks].what = what;
    clock_gettime(CLOCK_MONOTONIC, &marks[n_marks++].at);
}

static long long ns_of(const struct timespec *t) { return t->tv_sec * 1000000000LL + t->tv_nsec; }

static void write_marks(void) {
    if (!cfg.timing || !n_marks) return;
    char line[MAX_MARKS * 40 + 64];
    long long start = ns_of(&marks[0].at), last = start;
    int n = snprintf(line, sizeof line, "vmf-contain timing: %s=%lld.%06lld", marks[0].what, start / 1000000000LL,
                     start % 1000000000LL / 1000);
    for (int i = 1; i < n_marks && n < (int)sizeof line; i++) {
        long long at = ns_of(&marks[i].at);
        n += snprintf(line + n, sizeof line - n, " %s=+%lldus", marks[i].what, (at - last) / 1000);
        last = at;
    }
    if (n < (int)sizeof line) n += snprintf(line + n, sizeof line - n, " total=%lldus\n", (last - start) / 1000);
    if (n > (int)sizeof line - 1) n = sizeof line - 1;
    (void)!write(2, line, n);
}

/* Report a failure to the agent and end this process with `status`. */
static void vfail(int status, int err, const char *fmt, va_list ap) {
    char msg[MAX_ERROR];
    msg[0] = 'E';
    int n = vsnprintf(msg + 1, sizeof msg - 1, fmt, ap);
    if (n < 0) n = 0;
    if (n > (int)sizeof msg - 1) n = sizeof msg - 1;
    if (err) {
        int m = snprintf(msg + 1 + n, sizeof msg - 1 - n, ": %s", strerror(err));
        if (m > 0) n += m;
        if (n > (int)sizeof msg - 1) n = sizeof msg - 1;
    }
    (void)!write(STATUS_FD, msg, 1 + n);
    _exit(status);
}

/* ...with 127 for "not found", 126 otherwise. */
static void fail(int err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(err == ENOENT || err == ENOTDIR ? 127 : 126, err, fmt, ap);
    va_end(ap);
}

/* As fail, with the exit status given and no errno. */
static void fail_status(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(status, 0, fmt, ap);
    va_end(ap);
}

static void usage(const char *what) {
    fail(EINVAL, "vmf-contain: bad arguments near %s", what ? what : "(end)");
}

static unsigned long long number(const char *text, int base) {
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, base);
    if (errno || !*text || *end) usage(text);
    return value;
}

static void parse(int argc, char **argv) {
    int i = 1;
#define NEED(k) do { if (i + (k) >= argc) usage(argv[i]); } while (0)
    cfg.cwd = "/";
    cfg.exec_fd = -1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) { i++; break; }
        else if (!strcmp(a, "--rootfs")) { NEED(1); cfg.mode = MODE_NEW; cfg.rootfs = argv[++i]; }
        else if (!strcmp(a, "--join")) {
            NEED(2);
            cfg.mode = MODE_JOIN;
            cfg.join_pid = number(argv[++i], 10);
            cfg.join_parent = number(argv[++i], 10);
        }
        else if (!strcmp(a, "--guest-root")) cfg.mode = MODE_GUEST_ROOT;
        else if (!strcmp(a, "--hostname")) { NEED(1); cfg.hostname = argv[++i]; }
        else if (!strcmp(a, "--readonly")) cfg.readonly = 1;
        else if (!strcmp(a, "--mount")) {
            NEED(5);
            if (cfg.n_mounts == MAX_LIST) usage(a);
            struct mount_spec *m = &cfg.mounts[cfg.n_mounts++];
            m->type = argv[++i]; m->source = argv[++i]; m->dest = argv[++i];
            m->flags = number(argv[++i], 10); m->data = argv[++i];
        }
        else if (!strcmp(a, "--ro-path")) { NEED(1); if (cfg.n_ro_paths == MAX_LIST) usage(a); cfg.ro_paths[cfg.n_ro_paths++] = argv[++i]; }
        else if (!strcmp(a, "--sysctl")) {
            NEED(2);
            if (cfg.n_sysctls == MAX_LIST) usage(a);
            cfg.sysctl_paths[cfg.n_sysctls] = argv[++i];
            cfg.sysctl_values[cfg.n_sysctls++] = argv[++i];
        }
        else if (!strcmp(a, "--mask-path")) { NEED(1); if (cfg.n_masked_paths == MAX_LIST) usage(a); cfg.masked_paths[cfg.n_masked_paths++] = argv[++i]; }
        else if (!strcmp(a, "--rlimit")) {
            NEED(3);
            if (cfg.n_rlimits == MAX_LIST) usage(a);
            struct rlimit_spec *r = &cfg.rlimits[cfg.n_rlimits++];
            r->resource = number(argv[++i], 10);
            r->limit.rlim_cur = number(argv[++i], 10);
            r->limit.rlim_max = number(argv[++i], 10);
        }
        else if (!strcmp(a, "--user")) {
            NEED(3);
            cfg.set_ids = 1;
            cfg.uid = number(argv[++i], 10);
            cfg.gid = number(argv[++i], 10);
            char *list = argv[++i], *save = NULL;
            for (char *g = strtok_r(list, ",", &save); g; g = strtok_r(NULL, ",", &save)) {
                if (cfg.n_groups == MAX_LIST) usage(a);
                cfg.groups[cfg.n_groups++] = number(g, 10);
            }
        }
        else if (!strcmp(a, "--caps")) {
            NEED(5);
            cfg.set_caps = 1;
            for (int k = 0; k < 5; k++) cfg.caps[k] = number(argv[++i], 16);
        }
        else if (!strcmp(a, "--no-new-privs")) cfg.no_new_privs = 1;
        else if (!strcmp(a, "--terminal")) cfg.terminal = 1;
        else if (!strcmp(a, "--timing")) cfg.timing = 1;
        else if (!strcmp(a, "--cwd")) { NEED(1); cfg.cwd = argv[++i]; }
        else if (!strcmp(a, "--exec")) { NEED(1); cfg.exec_path = argv[++i]; }
        else if (!strcmp(a, "--search")) { NEED(2); cfg.search = argv[++i]; cfg.root_name = argv[++i]; }
        else usage(a);
    }
    if (!cfg.exec_path || i >= argc) usage("--exec/--");
    cfg.argv = argv + i;
#undef NEED
}

/* --- signals ----------------------------------------------------------------------------------- */

static void forward(int sig) {
    if (forward_to > 0) kill(forward_to, sig);
}

static void block_all(sigset_t *old) {
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, old);
}

/* Forward every catchable signal but SIGCHLD to `pid`; then unblock. */
static void forward_signals_to(pid_t pid) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    sa.sa_flags = SA_RESTART;
    sigfillset(&sa.sa_mask);
    forward_to = pid;
    for (int sig = 1; sig <= MAX_SIGNAL; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP || sig == SIGCHLD) continue;
        sigaction(sig, &sa, NULL); /* fails harmlessly for glibc's internal signals 32, 33 */
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Defaults for the program: the agent's Python ignores SIGPIPE and SIGXFSZ, and an ignored
 * signal survives exec (a shell pipeline relies on SIGPIPE). */
static void default_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int sig = 1; sig <= MAX_SIGNAL; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP) continue;
        sigaction(sig, &sa, NULL);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* Wait for `child` (reaping any other child meanwhile: init adopts orphans); its shell status. */
static int wait_for(pid_t child, int *raw) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR) continue;
            return 255;
        }
        if (pid != child) continue;
        *raw = status;
        if (WIFEXITED(status)) return WEXITSTATUS(status);
        if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    }
}

/* --- the container's filesystem -------------------------------------------------------------- */

static void make_dir(const char *path, mode_t mode) {
    if (mkdir(path, mode) == 0 || errno == EEXIST) return;
    if (errno == EROFS)
        fail(EROFS, "mount point %s is missing in the rootfs, which is read-only here: create it in the image", path);
    fail(errno, "mkdir %s", path);
}

static void mkdirs(const char *path, mode_t mode) {
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) fail(ENAMETOOLONG, "mkdir %s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        make_dir(buf, mode);
        *p = '/';
    }
    make_dir(buf, mode);
}

/* The directory `path` (made if missing), held open so that its dentry stays cached until the
 * caller closes the fd: on the 9p rootfs (cache=mmap) an unused dentry is dropped at once, and
 * each lookup of it is then a walk to the host (~1 ms under TCG); held, the mount on it that
 * follows finds it in the cache. */
static int mount_point(const char *path, mode_t mode) {
    int fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        mkdirs(path, mode);
        fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    }
    if (fd < 0) fail(errno, "mount point %s", path);
    return fd;
}

static void do_mount(const char *source, const char *target, const char *type, unsigned long flags, const char *data) {
    if (mount(source, target, type, flags, data && *data ? data : NULL))
        fail(errno, "mount -t %s %s %s", type ? type : "(bind)", source ? source : "none", target);
}

/* A bind mount takes its flags from its source; read-only (and nosuid...) needs a remount. */
static void remount_bind(const char *target, unsigned long flags) {
    do_mount(NULL, target, NULL, MS_BIND | MS_REMOUNT | flags, NULL);
}

struct device { const char *name; mode_t mode; unsigned major, minor; };
/* The OCI default devices. The guest's real console is its serial port, which the host logs:
 * a container's /dev/console is a null device, as runc gives a container without a terminal
 * (with one, its pty is bind-mounted there: see setup_terminal). */
static const struct device DEVICES[] = {
    {"null", 0666, 1, 3}, {"zero", 0666, 1, 5}, {"full", 0666, 1, 7},
    {"random", 0666, 1, 8}, {"urandom", 0666, 1, 9}, {"tty", 0666, 5, 0}, {"console", 0620, 1, 3},
};

static void setup_dev(void) {
    do_mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=755,size=65536k");
    mode_t old = umask(0);
    for (size_t i = 0; i < sizeof DEVICES / sizeof DEVICES[0]; i++) {
        char path[64];
        snprintf(path, sizeof path, "/dev/%s", DEVICES[i].name);
        if (mknod(path, S_IFCHR | DEVICES[i].mode, makedev(DEVICES[i].major, DEVICES[i].minor)))
            fail(errno, "mknod %s", path);
    }
    umask(old);
    mkdirs("/dev/pts", 0755);
    mkdirs("/dev/shm", 01777);
    mkdirs("/dev/mqueue", 0755);
    do_mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5");
    if (symlink("pts/ptmx", "/dev/ptmx")) fail(errno, "symlink /dev/ptmx");
    if (symlink("/proc/self/fd", "/dev/fd") || symlink("/proc/self/fd/0", "/dev/stdin") ||
        symlink("/proc/self/fd/1", "/dev/stdout") || symlink("/proc/self/fd/2", "/dev/stderr"))
        fail(errno, "symlinks in /dev");
    do_mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k");
    do_mount("mqueue", "/dev/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    /* Read-only /dev: a node made later (CAP_MKNOD) cannot land anywhere it could be opened
     * (every other writable mount is nodev). Writing to the device nodes still works. */
    remount_bind("/dev", MS_RDONLY | MS_NOSUID);
}

/* Before pivot_root: each shared bind's source as a detached copy of its mount, which stays
 * reachable through the fd after the guest's root is gone (a path there would not be). */
static void take_shared_sources(void) {
    for (int i = 0; i < cfg.n_mounts; i++) {
        struct mount_spec *m = &cfg.mounts[i];
        if (strcmp(m->type, SHARED_BIND)) continue;
        unsigned recursive = m->flags & MS_REC ? AT_RECURSIVE : 0;
        m->tree_fd = syscall(SYS_open_tree, AT_FDCWD, m->source, OPEN_TREE_CLONE | O_CLOEXEC | recursive);
        if (m->tree_fd < 0) fail(errno, "open_tree %s (bind source of %s)", m->source, m->dest);
    }
}

static void apply_oci_mount(const struct mount_spec *m) {
    int shared = !strcmp(m->type, SHARED_BIND);
    int bind = shared || !strcmp(m->type, "bind");
    struct stat st;
    int stat_ok = shared ? fstat(m->tree_fd, &st) == 0 : stat(m->source, &st) == 0;
    if (bind && stat_ok && !S_ISDIR(st.st_mode)) {
        /* A file bind: its target must be a file. */
        int fd = open(m->dest, O_CREAT | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd < 0 && errno != EISDIR) fail(errno, "create mount target %s", m->dest);
        if (fd >= 0) close(fd);
    } else {
        mkdirs(m->dest, 0755);
    }
    if (shared) {
        /* dest resolves inside the rootfs (we are pivoted into it) like every other target. */
        if (syscall(SYS_move_mount, m->tree_fd, "", AT_FDCWD, m->dest, MOVE_MOUNT_F_EMPTY_PATH))
            fail(errno, "move_mount %s onto %s", m->source, m->dest);
        close(m->tree_fd);
        remount_bind(m->dest, (m->flags & ~(MS_BIND | MS_REC)) | MS_NODEV);
    } else if (bind) {
        /* source is a path inside the rootfs: we are already pivoted into it, so it cannot
         * name anything outside. */
        do_mount(m->source, m->dest, NULL, MS_BIND | (m->flags & MS_REC), NULL);
        remount_bind(m->dest, (m->flags & ~(MS_BIND | MS_REC)) | MS_NODEV);
    } else {
        do_mount(m->source, m->dest, m->type, m->flags | MS_NODEV, m->data);
    }
}

static void setup_mounts(void) {
    /* Nothing done here may reach the guest's own mounts. */
    do_mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
    /* Held until pivot_root: the rootfs's dentry and its parents stay cached, so the bind and
     * the chdir below find them without walking the 9p share again (see mount_point). */
    int rootfs = open(cfg.rootfs, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfs < 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            fail(errno, "rootfs %s is not a directory in the guest (was the share mounted?)", cfg.rootfs);
        fail(errno, "open the rootfs %s", cfg.rootfs);
    }
    do_mount(cfg.rootfs, cfg.rootfs, NULL, MS_BIND | MS_REC, NULL);
    take_shared_sources();
    int oldroot = open("/", O_DIRECTORY | O_RDONLY | O_CLOEXEC);
    if (oldroot < 0) fail(errno, "open /");
    if (chdir(cfg.rootfs)) fail(errno, "chdir %s", cfg.rootfs);
    if (syscall(SYS_pivot_root, ".", ".")) fail(errno, "pivot_root %s", cfg.rootfs);
    /* The old root is now stacked on top of the new one: detach it and everything below it
     * (the 9p share, the agent's /dev with its virtio port). */
    if (fchdir(oldroot)) fail(errno, "fchdir old root");
    close(oldroot);
    do_mount(NULL, ".", NULL, MS_REC | MS_SLAVE, NULL);
    if (umount2(".", MNT_DETACH)) fail(errno, "detach the guest's root");
    if (chdir("/")) fail(errno, "chdir / in the rootfs");
    close(rootfs);
    mark("pivot_root");

    int pin = mount_point("/proc", 0555);
    do_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    close(pin);
    /* Sysctls, before /proc/sys turns read-only below: the agent let through only those in the
     * container's own IPC/UTS namespaces or its VM's network namespace. */
    for (int i = 0; i < cfg.n_sysctls; i++) {
        int fd = open(cfg.sysctl_paths[i], O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) fail(errno, "sysctl %s", cfg.sysctl_paths[i]);
        size_t len = strlen(cfg.sysctl_values[i]);
        if (write(fd, cfg.sysctl_values[i], len) != (ssize_t)len) fail(errno, "sysctl %s = %s", cfg.sysctl_paths[i], cfg.sysctl_values[i]);
        close(fd);
    }
    mark("proc");
    pin = mount_point("/dev", 0755);
    setup_dev();
    close(pin);
    mark("dev");
    pin = mount_point("/sys", 0555);
    do_mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    close(pin);
    mark("sys");
    for (int i = 0; i < cfg.n_mounts; i++) apply_oci_mount(&cfg.mounts[i]);
    mark("oci_mounts");
    for (int i = 0; i < cfg.n_ro_paths; i++) {
        const char *p = cfg.ro_paths[i];
        if (mount(p, p, NULL, MS_BIND | MS_REC, NULL)) {
            if (errno == ENOENT) continue;
            fail(errno, "bind %s", p);
        }
        remount_bind(p, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC);
    }
    mark("ro_paths");
    for (int i = 0; i < cfg.n_masked_paths; i++) {
        const char *p = cfg.masked_paths[i];
        struct stat st;
        if (lstat(p, &st)) continue;
        if (S_ISDIR(st.st_mode)) do_mount("tmpfs", p, "tmpfs", MS_RDONLY, "size=0");
        else do_mount("/dev/null", p, NULL, MS_BIND, NULL);
    }
    mark("masked");
    /* nodev on the rootfs: a device node planted in it (through the host's share) is inert. */
    remount_bind("/", MS_NODEV | (cfg.readonly ? MS_RDONLY : 0));
    mark("remount_root");
}

/* --- the program ------------------------------------------------------------------------------ */

/* Send `fd` to the agent on the console socket, one message with one fd (runc's SendFd). */
static void send_master(int fd) {
    static const char name[] = "/dev/ptmx"; /* the payload runc sends: the master's path */
    char control[CMSG_SPACE(sizeof(int))];
    memset(control, 0, sizeof control);
    struct iovec iov = {(void *)name, sizeof name - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    ssize_t sent;
    do sent = sendmsg(CONSOLE_FD, &msg, MSG_NOSIGNAL); while (sent < 0 && errno == EINTR);
    if (sent < 0) fail(errno, "send the terminal's master to the agent");
}

/* The terminal: a pty of this mount namespace's /dev/ptmx (the container's own devpts), its
 * slave our controlling terminal in a session of our own and our stdio; the master goes to the
 * agent. Done before anything that could limit it (rlimits) or drop the right to chown it. */
static void setup_terminal(void) {
    int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0) fail(errno, "open /dev/ptmx for the process's terminal");
    if (unlockpt(master)) fail(errno, "unlock the terminal's pty");
    /* The peer by the master itself, not by a /dev/pts path lookup. */
    int slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY);
    if (slave < 0) fail(errno, "open the terminal's pty slave");
    /* As runc's fixStdioPermissions: the process's user owns its terminal (the group stays
     * devpts's tty group), so it can still reopen it after dropping privileges. */
    struct stat st;
    if (cfg.set_ids && fstat(slave, &st) == 0 && st.st_uid != cfg.uid && fchown(slave, cfg.uid, -1))
        fail(errno, "chown the terminal to uid %u", cfg.uid);
    /* The forked program leads no group, so setsid works; a --guest-root helper was spawned as a
     * session leader already. */
    if (getsid(0) != getpid() && setsid() < 0) fail(errno, "setsid for the terminal");
    if (ioctl(slave, TIOCSCTTY, 0)) fail(errno, "make the pty the controlling terminal");
    if (cfg.mode == MODE_NEW) {
        /* As runc: the container's /dev/console is its terminal (else a null device). */
        unsigned int number;
        char path[64];
        if (ioctl(master, TIOCGPTN, &number)) fail(errno, "number of the terminal's pty");
        snprintf(path, sizeof path, "/dev/pts/%u", number);
        do_mount(path, "/dev/console", NULL, MS_BIND, NULL);
    }
    for (int fd = 0; fd < 3; fd++)
        if (dup2(slave, fd) < 0) fail(errno, "dup the terminal onto fd %d", fd);
    if (slave > 2) close(slave);
    send_master(master);
    close(master);
    close(CONSOLE_FD);
}

static int cap_last(void) {
    int last = 40; /* CAP_CHECKPOINT_RESTORE on 6.1; refined from /proc when readable */
    FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
    if (f) {
        if (fscanf(f, "%d", &last) != 1) last = 40;
        fclose(f);
    }
    return last;
}

static void set_credentials(void) {
    int last = cfg.set_caps ? cap_last() : 0;
    if (cfg.set_caps) {
        for (int cap = 0; cap <= last; cap++)
            if (!(cfg.caps[0] >> cap & 1) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) && errno != EINVAL)
                fail(errno, "drop capability %d from the bounding set", cap);
        if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)) fail(errno, "PR_SET_KEEPCAPS");
    }
    if (cfg.set_ids) {
        /* Only what differs is changed: the same ids need no privilege (host-side tests). */
        gid_t current[MAX_LIST + 1];
        int n = getgroups(MAX_LIST + 1, current);
        int same = n == cfg.n_groups;
        for (int i = 0; same && i < n; i++) {
            int found = 0;
            for (int j = 0; j < cfg.n_groups; j++) found |= current[i] == cfg.groups[j];
            same = found;
        }
        if (!same && setgroups(cfg.n_groups, cfg.groups)) fail(errno, "setgroups");
        gid_t rg, eg, sg;
        getresgid(&rg, &eg, &sg);
        if ((rg != cfg.gid || eg != cfg.gid || sg != cfg.gid) && setresgid(cfg.gid, cfg.gid, cfg.gid))
            fail(errno, "setgid %u", cfg.gid);
        uid_t ru, eu, su;
        getresuid(&ru, &eu, &su);
        if ((ru != cfg.uid || eu != cfg.uid || su != cfg.uid) && setresuid(cfg.uid, cfg.uid, cfg.uid))
            fail(errno, "setuid %u", cfg.uid);
    }
    if (cfg.set_caps) {
        struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct data[2];
        for (int w = 0; w < 2; w++) {
            data[w].effective = cfg.caps[1] >> (32 * w);
            data[w].permitted = cfg.caps[2] >> (32 * w);
            data[w].inheritable = cfg.caps[3] >> (32 * w);
        }
        if (syscall(SYS_capset, &header, data)) fail(errno, "capset");
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
        for (int cap = 0; cap <= last; cap++)
            if ((cfg.caps[4] >> cap & 1) && prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0))
                fail(errno, "raise ambient capability %d (it must be permitted and inheritable too)", cap);
    }
}

/* An executable regular file at `path`, opened (O_PATH) for the exec; -1 if none. Sets
 * *exists when something is there. */
static int open_executable(const char *path, int *exists) {
    int fd = open(path, O_PATH | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) {
        if (fd >= 0) close(fd);
        return -1;
    }
    *exists = 1;
    if (S_ISREG(st.st_mode) && st.st_mode & 0111) return fd;
    close(fd);
    return -1;
}

/* execvp's search, done here, inside the container, as its user, with its root and cwd: the
 * lookup sees what the exec will see (symlinks resolve inside the rootfs), and on the host's 9p
 * share each path walk starts from the container's root instead of the share's. The file found
 * stays open for the exec (no second walk at start, and what was checked is what runs). A
 * program missing or not executable fails CreateProcess (exit 127 / 126), as runc's create does. */
static void find_executable(void) {
    static char found[PATH_MAX];
    const char *program = cfg.exec_path;
    int exists = 0;
    if (!*program) fail_status(127, "args[0] is empty");
    if (strchr(program, '/')) {
        if ((cfg.exec_fd = open_executable(program, &exists)) >= 0) return;
        if (exists)
            fail_status(126, "executable '%s' in rootfs %s: %s is not an executable file", program, cfg.root_name,
                        program);
        fail_status(127, "executable '%s' not found in rootfs %s", program, cfg.root_name);
    }
    char not_executable[PATH_MAX] = "";
    for (const char *dir = cfg.search;; dir++) {
        const char *end = strchrnul(dir, ':');
        int len = end - dir;
        /* An empty entry is the cwd (POSIX). */
        int n = len ? snprintf(found, sizeof found, "%.*s/%s", len, dir, program)
                    : snprintf(found, sizeof found, "%s", program);
        if (n > 0 && n < (int)sizeof found) {
            exists = 0;
            if ((cfg.exec_fd = open_executable(found, &exists)) >= 0) {
                cfg.exec_path = found;
                return;
            }
            if (exists && !*not_executable) snprintf(not_executable, sizeof not_executable, "%s", found);
        }
        if (!*end) break;
        dir = end;
    }
    if (*not_executable)
        fail_status(126, "executable '%s' in rootfs %s: %s is not an executable file (PATH=%s)", program,
                    cfg.root_name, not_executable, cfg.search);
    fail_status(127, "executable '%s' not found in rootfs %s (PATH=%s)", program, cfg.root_name, cfg.search);
}

static void run_program(void) {
    if (cfg.terminal) setup_terminal();
    for (int i = 0; i < cfg.n_rlimits; i++)
        if (setrlimit(cfg.rlimits[i].resource, &cfg.rlimits[i].limit))
            fail(errno, "setrlimit %d", cfg.rlimits[i].resource);
    if (chdir(cfg.cwd)) fail(errno, "chdir %s", cfg.cwd);
    mark("rlimits_cwd");
    set_credentials();
    mark("credentials");
    if (cfg.search) find_executable();
    mark("executable");
    /* A uid change cleared the parent-death signal an exec'd process needs (see main). */
    if (cfg.mode == MODE_JOIN && prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)) fail(errno, "PR_SET_PDEATHSIG");
    if (cfg.no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) fail(errno, "no_new_privs");
    default_signals(); /* a created process that is killed before its start ends as it would */
    mark("ready");
    write_marks();
    if (write(STATUS_FD, "R", 1) != 1) _exit(1);
    char start;
    ssize_t got;
    do got = read(START_FD, &start, 1); while (got < 0 && errno == EINTR);
    if (got != 1 || start != 'S') _exit(1); /* the agent went away without starting us */
    close(START_FD);
    if (cfg.exec_fd >= 0) {
        syscall(SYS_execveat, cfg.exec_fd, "", cfg.argv, environ, AT_EMPTY_PATH);
        /* ENOENT: a "#!" script, whose interpreter cannot open a close-on-exec fd: by path. */
        if (errno != ENOENT) fail(errno, "exec %s", cfg.exec_path);
    }
    execve(cfg.exec_path, cfg.argv, environ);
    fail(errno, "exec %s", cfg.exec_path);
}

/* The init keeps nothing the program lacks: the program's ids and no capabilities at all. So
 * ptracing it gains the container nothing, and the container can read /proc/1/root and the rest
 * of its init's /proc entries as it could with runc, where PID 1 is the program itself. */
static void drop_to_program_credentials(void) {
    /* The bounding set too: a root process regains its whole bounding set at execve, so an exec
     * forced on the init (it can be ptraced) must not get more than the program could. */
    if (cfg.set_caps) {
        int last = cap_last();
        for (int cap = 0; cap <= last; cap++)
            if (!(cfg.caps[0] >> cap & 1) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) && errno != EINVAL) _exit(126);
    }
    if (cfg.no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) _exit(126);
    if (cfg.set_ids) {
        if (setgroups(cfg.n_groups, cfg.groups) || setresgid(cfg.gid, cfg.gid, cfg.gid) ||
            setresuid(cfg.uid, cfg.uid, cfg.uid))
            _exit(126);
    }
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct none[2];
    memset(none, 0, sizeof none);
    if (syscall(SYS_capset, &header, none)) _exit(126);
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0); /* a uid change cleared it */
    /* ...and the parent-death signal: the container must still end with the outer process. */
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
}

/* PID 1 of a new container: mounts, hostname, then the program as its child. */
static void container_init(void) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)) fail(errno, "PR_SET_PDEATHSIG");
    setup_mounts();
    if (cfg.hostname && sethostname(cfg.hostname, strlen(cfg.hostname)))
        fail(errno, "sethostname %s", cfg.hostname);
    pid_t program = fork();
    if (program < 0) fail(errno, "fork");
    if (program == 0) {
        mark("program");
        run_program();
    }
    close(STATUS_FD);
    close(START_FD);
    if (cfg.terminal) close(CONSOLE_FD);
    drop_to_program_credentials();
    forward_signals_to(program);
    int raw;
    _exit(wait_for(program, &raw)); /* PID 1 cannot die by a signal it does not handle */
}

static void join_namespaces(pid_t pid) {
    /* mnt last: the /proc paths of the others are the guest's. */
    static const char *const kinds[] = {"ipc", "uts", "pid", "mnt"};
    int fds[4];
    for (int i = 0; i < 4; i++) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/ns/%s", (int)pid, kinds[i]);
        fds[i] = open(path, O_RDONLY | O_CLOEXEC);
        if (fds[i] < 0) fail(errno, "open %s (is the container running?)", path);
    }
    /* The pid still names that container's init only if its parent is still that container's
     * outer process (it has no other child): checked after the opens, so the namespaces opened
     * are the init's, not those of a process that reused its pid. */
    char path[64], stat[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, stat, sizeof stat - 1);
    if (fd >= 0) close(fd);
    if (n <= 0) fail(ESRCH, "container init %d is gone", (int)pid);
    stat[n] = 0;
    char *after_comm = strrchr(stat, ')');
    int ppid = 0;
    if (!after_comm || sscanf(after_comm + 1, " %*c %d", &ppid) != 1 || ppid != cfg.join_parent)
        fail(ESRCH, "pid %d is no longer the init of the container (its parent is %d, not %d)", (int)pid, ppid,
             (int)cfg.join_parent);
    for (int i = 0; i < 4; i++) {
        if (setns(fds[i], 0)) fail(errno, "setns %s of pid %d", kinds[i], (int)pid);
        close(fds[i]);
    }
}

int main(int argc, char **argv) {
    struct timespec entered;
    clock_gettime(CLOCK_MONOTONIC, &entered);
    /* The agent's warm-up container runs this binary as its program: an exec that does nothing. */
    if (argc == 2 && !strcmp(argv[1], "--warm-up")) _exit(0);
    parse(argc, argv);
    if (cfg.timing) {
        marks[0].what = "start";
        marks[0].at = entered;
        n_marks = 1;
        mark("parsed");
    }
    /* Only stdio, the status and the start pipe (and the console socket): no descriptor of the
     * agent's may reach the container. */
    int last = cfg.terminal ? CONSOLE_FD : START_FD;
    if (syscall(SYS_close_range, last + 1, ~0U, 0)) {
        for (int fd = last + 1; fd < 1024; fd++) close(fd);
    }
    fcntl(STATUS_FD, F_SETFD, FD_CLOEXEC);
    fcntl(START_FD, F_SETFD, FD_CLOEXEC);
    if (cfg.terminal) fcntl(CONSOLE_FD, F_SETFD, FD_CLOEXEC);
    if (cfg.mode == MODE_GUEST_ROOT) run_program();

    sigset_t saved;
    block_all(&saved); /* until the child to forward to exists */
    if (cfg.mode == MODE_NEW && unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC))
        fail(errno, "unshare the container's namespaces");
    if (cfg.mode == MODE_JOIN) join_namespaces(cfg.join_pid);
    mark("namespaces");
    pid_t child = fork();
    if (child < 0) fail(errno, "fork");
    if (child == 0) {
        mark("forked");
        if (cfg.mode == MODE_NEW) container_init();
        /* Joining: ends with us, whatever signal ends us (SIGKILL included). */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)) fail(errno, "PR_SET_PDEATHSIG");
        run_program();
    }
    if (cfg.mode == MODE_NEW) {
        char msg[32];
        int n = snprintf(msg, sizeof msg, "C%d\n", (int)child);
        (void)!write(STATUS_FD, msg, n);
    }
    close(STATUS_FD);
    close(START_FD);
    if (cfg.terminal) close(CONSOLE_FD);
    forward_signals_to(child);
    int raw;
    int code = wait_for(child, &raw);
    if (WIFSIGNALED(raw)) {
        /* Die the same way, so the agent sees exactly what happened. */
        signal(WTERMSIG(raw), SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        raise(WTERMSIG(raw));
    }
    _exit(code);
}

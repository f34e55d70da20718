/* emulab's SIGBUS guard: guest memory that vanishes under the device must not kill the process.
 *
 * A client hands the server an fd for guest RAM (DMA_MAP) and the server mmaps it. If the client
 * later shrinks that file (ftruncate on an unsealed memfd), any access to the pages past the new
 * end raises SIGBUS -- in Python's memcpy or in a numba kernel alike -- and the default action
 * ends the process: the user's notebook kernel. This handler, for faults inside a registered
 * guest mapping only, maps a private zero page over the faulting page and counts the fault; the
 * access then completes (reading zeros, or writing into memory nobody sees) and the Python side,
 * woken through a pipe the handler writes to, puts the device into an error state. A fault
 * anywhere else is handed to the handler that was installed before (faulthandler's, or the
 * default: the process dies as it would have without us).
 *
 * Built by emulab/pci/guard.py with the system C compiler on first use. Our own code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SLOTS 4096

static volatile uintptr_t slot_lo[SLOTS], slot_hi[SLOTS];
static volatile long slot_faults[SLOTS];
long emulab_guard_total; /* faults fixed up, all slots: what the watcher polls */
static struct sigaction previous;
static long page_size = 4096;
static volatile int notify_fd = -1; /* a pipe's write end: a byte per fault wakes the watcher */

static void on_sigbus(int sig, siginfo_t *si, void *ctx) {
    (void)ctx;
    if (si->si_code > 0) { /* from the kernel: a real fault with an address */
        uintptr_t a = (uintptr_t)si->si_addr;
        for (int i = 0; i < SLOTS; i++) {
            uintptr_t hi = __atomic_load_n(&slot_hi[i], __ATOMIC_ACQUIRE);
            if (hi && a >= slot_lo[i] && a < hi) {
                void *p = (void *)(a & ~(uintptr_t)(page_size - 1));
                if (mmap(p, (size_t)page_size, PROT_READ | PROT_WRITE,
                         MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) != MAP_FAILED) {
                    __atomic_add_fetch(&slot_faults[i], 1, __ATOMIC_SEQ_CST);
                    __atomic_add_fetch(&emulab_guard_total, 1, __ATOMIC_SEQ_CST);
                    int fd = notify_fd;
                    if (fd >= 0) { /* write(2) is async-signal-safe; errno is the thread's */
                        int saved = errno;
                        char one = 1;
                        (void)!write(fd, &one, 1); /* non-blocking: a full pipe wakes already */
                        errno = saved;
                    }
                    return; /* the access is retried on the zero page */
                }
                break;
            }
        }
    }
    /* not ours: the previous disposition takes over; the retried access faults again under it */
    sigaction(sig, &previous, NULL);
    if (si->si_code <= 0) raise(sig);
}

/* Install (or re-install, if someone replaced it) the handler. Returns 0 on success. */
int emulab_guard_install(void) {
    struct sigaction sa, current;
    page_size = sysconf(_SC_PAGESIZE);
    if (sigaction(SIGBUS, NULL, &current) != 0) return -1;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus) return 0;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, &previous);
}

/* The fd the handler writes a byte to after each fault it fixed up (-1: none). */
void emulab_guard_notify(int fd) { notify_fd = fd; }

/* Guard [start, end). Returns the slot, or -1 when every slot is taken. */
int emulab_guard_add(uintptr_t start, uintptr_t end) {
    for (int i = 0; i < SLOTS; i++) {
        uintptr_t expected = 0;
        if (__atomic_load_n(&slot_hi[i], __ATOMIC_ACQUIRE) == 0 && slot_lo[i] == 0) {
            slot_faults[i] = 0;
            slot_lo[i] = start;
            if (__atomic_compare_exchange_n(&slot_hi[i], &expected, end, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
                return i;
            slot_lo[i] = 0;
        }
    }
    return -1;
}

void emulab_guard_remove(int slot) {
    if (slot < 0 || slot >= SLOTS) return;
    __atomic_store_n(&slot_hi[slot], 0, __ATOMIC_SEQ_CST);
    slot_lo[slot] = 0;
}

long emulab_guard_faults(int slot) {
    return (slot < 0 || slot >= SLOTS) ? 0 : slot_faults[slot];
}

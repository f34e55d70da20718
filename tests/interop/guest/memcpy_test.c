/* Guest-side test for emulab's memcpy device, run inside a QEMU guest.
 *
 * The device is bound to uio_pci_generic. We map BAR0 and BAR2 through sysfs, take two locked
 * pages of our own memory, find their physical addresses in /proc/self/pagemap, ask the device
 * to copy one to the other, and wait for its interrupt on /dev/uioN (INTx: uio_pci_generic's
 * handler masks it with the command register's Interrupt Disable bit; userspace unmasks by
 * clearing that bit through the sysfs config file, as the uio HOWTO describes).
 * Prints KEY=VALUE lines for the host test to check. Usage: memcpy_test PCI_SYSFS_DIR UIO_DEV
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define REG(o) (*(volatile uint32_t *)((char *)bar0 + (o)))
static void *bar0;

static uint64_t phys(void *p) {
    int fd = open("/proc/self/pagemap", O_RDONLY);
    uint64_t e = 0;
    if (fd < 0 || pread(fd, &e, 8, ((uintptr_t)p / 4096) * 8) != 8) { perror("pagemap"); exit(2); }
    close(fd);
    if (!(e & (1ULL << 63))) { fprintf(stderr, "page not present\n"); exit(2); }
    return (e & ((1ULL << 55) - 1)) * 4096 + ((uintptr_t)p & 4095);
}

static void *map_bar(const char *dev, int n, size_t len) {
    char path[256];
    snprintf(path, sizeof path, "%s/resource%d", dev, n);
    int fd = open(path, O_RDWR | O_SYNC);
    if (fd < 0) { perror(path); exit(2); }
    void *p = mmap(0, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { perror("mmap bar"); exit(2); }
    return p;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s SYSFS_DIR /dev/uioN\n", argv[0]); return 2; }
    const char *dev = argv[1];
    char path[256];
    /* bus master on (uio_pci_generic enables the device but leaves DMA to userspace) */
    snprintf(path, sizeof path, "%s/config", dev);
    int cfg = open(path, O_RDWR);
    uint16_t cmd;
    if (cfg < 0 || pread(cfg, &cmd, 2, 4) != 2) { perror("config"); return 2; }
    cmd |= 0x6; /* memory space + bus master */
    if (pwrite(cfg, &cmd, 2, 4) != 2) { perror("config write"); return 2; }

    bar0 = map_bar(dev, 0, 4096);
    volatile uint8_t *bar2 = map_bar(dev, 2, 4096);
    printf("ID=%08x\n", REG(0x00));

    /* BAR accesses that the host checks on its side */
    REG(0x18) = 0x5a5a1234;
    printf("LEN_READBACK=%08x\n", REG(0x18));
    memcpy((void *)(bar2 + 0x100), "written-by-guest", 16);   /* sparse-mmapped: no message */

    uint8_t *buf = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
    if (buf == MAP_FAILED) { perror("mmap buf"); return 2; }
    for (int i = 0; i < 4096; i++) { buf[i] = (uint8_t)(i * 7 + 3); buf[4096 + i] = 0; }
    uint64_t src = phys(buf), dst = phys(buf + 4096);
    const uint32_t len = 4096;
    printf("SRC=%llx\nDST=%llx\nLENGTH=%u\n", (unsigned long long)src, (unsigned long long)dst, len);

    int uio = open(argv[2], O_RDONLY);
    if (uio < 0) { perror(argv[2]); return 2; }

    REG(0x08) = (uint32_t)src; REG(0x0c) = (uint32_t)(src >> 32);
    REG(0x10) = (uint32_t)dst; REG(0x14) = (uint32_t)(dst >> 32);
    REG(0x18) = len;
    REG(0x1c) = 1;

    struct pollfd pfd = {.fd = uio, .events = POLLIN};
    int r = poll(&pfd, 1, 20000);
    uint32_t irqs = 0;
    if (r == 1 && read(uio, &irqs, 4) == 4) printf("IRQ=%u\n", irqs);
    else printf("IRQ=none (poll=%d errno=%d)\n", r, errno);

    uint32_t status = REG(0x20);
    printf("STATUS=%x\nCOPIES=%u\n", status, REG(0x28));
    printf("COPY=%s\n", memcmp(buf, buf + 4096, len) ? "MISMATCH" : "OK");
    printf("SRC_HEAD=");
    for (int i = 0; i < 16; i++) printf("%02x", buf[i]);
    printf("\nDST_HEAD=");
    for (int i = 0; i < 16; i++) printf("%02x", buf[4096 + i]);
    printf("\n");
    if (pread(cfg, &cmd, 2, 4) == 2) printf("INTX_DISABLED_BY_HANDLER=%d\n", !!(cmd & 0x400));
    REG(0x20) = 2;                      /* clear DONE: INTx deasserts */
    cmd &= ~0x400;                      /* unmask INTx again */
    if (pwrite(cfg, &cmd, 2, 4) != 2) perror("config unmask");
    printf("STATUS_AFTER_CLEAR=%x\n", REG(0x20));
    return memcmp(buf, buf + 4096, len) ? 1 : 0;
}

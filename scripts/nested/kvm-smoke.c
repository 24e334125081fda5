// Smallest proof that /dev/kvm runs guest code: ask the API version, then run four real-mode
// instructions in a one-vCPU VM (write 'K' to the serial port 0x3f8, then hlt) and check the
// two exits KVM reports. Exit status 0 when all of that happened.
//   gcc -static -O2 -o kvm-smoke scripts/nested/kvm-smoke.c
//   scripts/nested-kvm.sh --payload DIR_WITH_kvm-smoke -- kvm-smoke
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define GUEST_ADDR 0x1000
#define GUEST_SIZE 0x1000

static int fail(const char *what) {
    fprintf(stderr, "kvm-smoke: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(void) {
    // mov dx, 0x3f8; mov al, 'K'; out dx, al; hlt
    static const uint8_t code[] = {0xba, 0xf8, 0x03, 0xb0, 'K', 0xee, 0xf4};

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return fail("open /dev/kvm");
    int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
    printf("KVM_GET_API_VERSION %d\n", api);
    if (api != KVM_API_VERSION) {
        fprintf(stderr, "kvm-smoke: expected API version %d\n", KVM_API_VERSION);
        return 1;
    }
    printf("KVM_CAP_IRQCHIP %d, KVM_CAP_XCRS %d, KVM_CAP_NR_VCPUS %d\n",
           ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_IRQCHIP),
           ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_XCRS),
           ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS));

    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        return fail("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, GUEST_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return fail("mmap guest memory");
    memcpy(mem, code, sizeof(code));
    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = GUEST_ADDR,
        .memory_size = GUEST_SIZE,
        .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        return fail("KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        return fail("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run))
        return fail("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        return fail("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        return fail("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        return fail("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = GUEST_ADDR, .rflags = 0x2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        return fail("KVM_SET_REGS");

    int wrote = 0;
    for (int exits = 0; exits < 16; exits++) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0)
            return fail("KVM_RUN");
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0x3f8 && run->io.size == 1) {
                char c = *((char *)run + run->io.data_offset);
                printf("guest wrote '%c' to port 0x3f8\n", c);
                wrote = c == 'K';
                continue;
            }
            fprintf(stderr, "kvm-smoke: unexpected port I/O at 0x%x\n", run->io.port);
            return 1;
        case KVM_EXIT_HLT:
            printf("guest halted\n");
            return wrote ? 0 : 1;
        default:
            fprintf(stderr, "kvm-smoke: unexpected exit reason %u\n", run->exit_reason);
            return 1;
        }
    }
    fprintf(stderr, "kvm-smoke: the guest never halted\n");
    return 1;
}

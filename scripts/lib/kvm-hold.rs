//! Started by scripts/nested-kvm.sh in its L1 before the command: makes one KVM VM (no vCPU, no
//! memory), touches `/run/kvm-hold` to say so, and holds the VM until L1 powers off.
//!
//! Why: every KVM VM takes a reference on the kernel's `preempt_notifier_key`, a static key
//! with a jump label inside `__schedule()`. When the count goes 0 → 1 or 1 → 0 (the first VM
//! made, the last one gone) the kernel rewrites that jump with text_poke_bp(): an int3 first,
//! then the new instruction. Under QEMU TCG the other vCPU, which runs `__schedule()` all the
//! time, can keep executing a stale translation that still holds the int3; the kernel's int3
//! handler sees no int3 in memory and restarts the instruction, for ever. Both vCPUs of L1
//! were caught in that loop (RIPs at `asm_exc_int3` and `__schedule+0x2ab`, the key's jump
//! label) after a microVM backend had made and dropped many VMs. With this VM held, the count
//! never goes back to 0 while the command runs, so the code is never patched then.
//!
//! Built with plain rustc (std only) so the script needs no cargo project:
//!   rustc --edition 2021 -O -C target-feature=+crt-static -C strip=symbols scripts/lib/kvm-hold.rs

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

/// `_IO(KVMIO, 0x01)`: make a VM; the argument is the machine type, 0 on x86.
const KVM_CREATE_VM: std::ffi::c_ulong = 0xAE01;

extern "C" {
    fn ioctl(fd: std::ffi::c_int, request: std::ffi::c_ulong, ...) -> std::ffi::c_int;
}

fn main() -> ExitCode {
    let kvm = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("kvm-hold: cannot open /dev/kvm: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: KVM_CREATE_VM reads only its integer argument (the machine type, 0) and returns
    // a new file descriptor or -1; no memory of this process is handed to the kernel.
    let vm = unsafe { ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0 as std::ffi::c_ulong) };
    if vm < 0 {
        eprintln!("kvm-hold: KVM_CREATE_VM failed: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    if let Err(e) = File::create("/run/kvm-hold") {
        eprintln!("kvm-hold: cannot write /run/kvm-hold: {e}");
        return ExitCode::FAILURE;
    }
    // The VM's descriptor stays open, and with it the VM, until L1 powers off.
    loop {
        std::thread::park();
    }
}

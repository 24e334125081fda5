//! The two `bpf(2)` commands cgroup v2 device rules need: load a `BPF_PROG_TYPE_CGROUP_DEVICE`
//! program and attach it to a cgroup directory. The kernel keeps an attached program for as
//! long as the cgroup exists, so the descriptors are closed right after.
//!
//! Programs are attached with `BPF_F_ALLOW_MULTI`, as runc and crun do: programs that a manager
//! above (systemd) attached to the parents still run, every one of them must allow an access,
//! and a container that runs its own containers can attach programs below.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::CgroupError;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD` (Linux 4.15 has them all).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The fields of `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// Loads `insns` as a cgroup device program and attaches it to the cgroup v2 directory `dir`.
pub(super) fn attach_device_program(dir: &Path, insns: &[u64]) -> Result<(), CgroupError> {
    let prog = load(insns).map_err(|(source, log)| CgroupError::DeviceProgram {
        path: dir.to_path_buf(),
        op: "load the device program",
        source,
        verifier: log,
    })?;
    let cgroup = nix::fcntl::open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|source| CgroupError::DeviceProgram {
            path: dir.to_path_buf(),
            op: "open the cgroup",
            source,
            verifier: String::new(),
        })?;
    let attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    // SAFETY: BPF_PROG_ATTACH reads `size_of::<ProgAttachAttr>()` bytes of `attr`, a live,
    // fully initialised repr(C) value laid out as the kernel's attach fields; both descriptors
    // are open for the duration of the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_ATTACH, &attr as *const ProgAttachAttr, size_of::<ProgAttachAttr>())
    };
    Errno::result(rc).map_err(|source| CgroupError::DeviceProgram {
        path: dir.to_path_buf(),
        op: "attach the device program",
        source,
        verifier: String::new(),
    })?;
    tracing::debug!(path = %dir.display(), instructions = insns.len(), "cgroup device program attached");
    Ok(())
}

/// `BPF_PROG_LOAD`; on failure the errno and, when the verifier refused the program, its log.
fn load(insns: &[u64]) -> Result<OwnedFd, (Errno, String)> {
    let license = c"Apache-2.0";
    let mut name = [0u8; 16];
    name[..14].copy_from_slice(b"twinbox_device");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    let call = |attr: &ProgLoadAttr| {
        // SAFETY: BPF_PROG_LOAD reads `attr` (a live, initialised repr(C) value laid out as the
        // kernel's load fields), `insn_cnt` 8-byte instructions at `insns` and the
        // NUL-terminated license, all of which outlive the call, and writes at most `log_size`
        // bytes to `log_buf` when one is given. The descriptor it returns is new and ours.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr as *const ProgLoadAttr, size_of::<ProgLoadAttr>())
        };
        Errno::result(rc).map(|fd| {
            // SAFETY: a successful BPF_PROG_LOAD returns a new descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        })
    };
    match call(&attr) {
        Ok(fd) => Ok(fd),
        Err(e @ (Errno::EINVAL | Errno::EACCES)) => {
            // Once more with the verifier's log, to say why.
            let mut log = vec![0u8; 64 * 1024];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let again = call(&attr);
            let text =
                String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)]).trim().to_string();
            match again {
                Ok(fd) => Ok(fd),
                Err(_) => Err((e, text)),
            }
        }
        Err(e) => Err((e, String::new())),
    }
}

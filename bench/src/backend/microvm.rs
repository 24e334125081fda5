//! The microVM backends. None can run yet on this project's hosts; each says why, and the
//! report lists it with that reason.

use std::process::Command;

use super::{Backend, BackendError, Instance, Isolation, PreparedImage, Unavailable, Workload};
use crate::host::{detect_virtualization, which, VirtKind};

/// Why KVM guests cannot be measured on this host, if they cannot.
fn kvm_problem() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    match detect_virtualization(std::path::Path::new("/"), &cpuinfo).kind {
        VirtKind::HardwareKvm | VirtKind::NestedTcg => None,
        VirtKind::Pvm => Some(
            "no hardware KVM: /dev/kvm is PVM (kvm_pvm loaded); microVM figures need the nested L1 (issue 4)".into(),
        ),
        VirtKind::None => Some("no /dev/kvm on this host".into()),
    }
}

fn reasons(mut r: Vec<String>) -> Result<(), Unavailable> {
    r.extend(kvm_problem());
    if r.is_empty() {
        Ok(())
    } else {
        Err(Unavailable::new(r.join("; ")))
    }
}

fn never() -> BackendError {
    BackendError::Failed {
        what: "a microVM backend".into(),
        status: "unavailable".into(),
        stderr: "not implemented yet".into(),
    }
}

macro_rules! unavailable_backend {
    ($ty:ident, $name:literal, $reasons:expr) => {
        #[derive(Debug, Default)]
        pub struct $ty;

        impl Backend for $ty {
            fn name(&self) -> &'static str {
                $name
            }
            fn isolation(&self) -> Isolation {
                Isolation::MicroVm
            }
            fn available(&self) -> Result<(), Unavailable> {
                reasons($reasons)
            }
            fn prepare(&mut self, _image: &PreparedImage) -> Result<(), BackendError> {
                Err(never())
            }
            fn run_command(&self, _w: &Workload, _id: &str) -> Result<Command, BackendError> {
                Err(never())
            }
            fn launch(&self, _w: &Workload, _id: &str) -> Result<Instance, BackendError> {
                Err(never())
            }
            fn teardown(&self, _i: &mut Instance) -> Result<(), BackendError> {
                Ok(())
            }
        }
    };
}

unavailable_backend!(
    TwinboxMicrovm,
    "twinbox-microvm",
    vec!["twinbox microVM cannot boot Linux guests yet (no guest kernel, initramfs or agent; issue 4)".to_owned()]
);

unavailable_backend!(QemuMicrovm, "qemu-microvm", {
    let mut r = Vec::new();
    if which("qemu-system-x86_64").is_none() {
        r.push("qemu-system-x86_64 not on PATH".to_owned());
    }
    r.push("no guest kernel and initramfs for the image yet (issue 4)".to_owned());
    r
});

unavailable_backend!(Firecracker, "firecracker", {
    let mut r = Vec::new();
    if which("firecracker").is_none() {
        r.push("firecracker not on PATH".to_owned());
    }
    r.push("no guest kernel and root disk for the image yet (issue 4)".to_owned());
    r
});

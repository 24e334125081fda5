//! Architecture set-up: what a vCPU and guest memory must hold before the first KVM_RUN. The
//! VMM runs x86_64 guests only.

pub mod x86_64;

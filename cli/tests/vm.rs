//! `twinbox vm`: clear errors for bad input (booting a Linux guest needs hardware KVM or the
//! nested L1; the VMM itself is tested with stub guests in the microvm crate).

mod common;

use common::Env;

#[test]
fn bad_kernels_and_sizes_are_user_errors() {
    let env = Env::new();
    for (args, needle) in [
        (vec!["vm", "--kernel", "/nonexistent/vmlinux"], "kernel /nonexistent/vmlinux does not exist"),
        (vec!["vm", "--kernel", "/etc/hostname"], "is not a kernel"),
        (vec!["vm", "--kernel", "/bin/sh", "--memory", "100000g"], "more than the host"),
        (vec!["vm", "--kernel", "/bin/sh", "--cpus", "0"], "vcpu"),
    ] {
        let o = env.run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.to_lowercase().contains(needle), "{args:?}: {err}");
    }
}

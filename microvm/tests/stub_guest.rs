//! Tiny hand-assembled guests under real KVM (PVM here): exit handling and devices.
//!
//! Needs /dev/kvm. Without it each test prints "SKIPPED: …" and passes, except under CI=true,
//! where a missing /dev/kvm fails the test.

use std::time::{Duration, Instant};

use twinbox_microvm::stub::StubAsm;
use twinbox_microvm::vstate::vcpu::VcpuError;
use twinbox_microvm::{ExitReason, VmBuilder, VmConfig, VmError, VmExit};

fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => twinbox_testutil::require(false, test, &format!("/dev/kvm is not usable: {e}")),
    }
}

fn run(code: Vec<u8>, timeout_ms: Option<u64>) -> (Result<VmExit, VmError>, String) {
    let config = VmConfig { memory_mib: 16, timeout_ms, ..VmConfig::default() };
    let mut console = Vec::new();
    let result =
        VmBuilder::new(config).start_time(Instant::now()).stub(code).build().and_then(|mut vm| vm.run(&mut console));
    (result, String::from_utf8_lossy(&console).into_owned())
}

#[test]
fn hello_boot_timer_and_reset() {
    if !kvm_available("hello_boot_timer_and_reset") {
        return;
    }
    let code = StubAsm::new().serial_print(b"Hello").boot_timer().i8042_reset().spin().finish();
    let (result, console) = run(code, Some(10_000));
    let exit = result.expect("the stub resets cleanly");
    assert_eq!(console, "Hello");
    assert_eq!(exit.reason, ExitReason::Reset);
    assert_eq!(exit.exit_code(), 0);
    assert_eq!(exit.boot_signals, 1);
    let boot = exit.boot_time.expect("boot timer recorded");
    assert!(boot > Duration::ZERO && boot < Duration::from_secs(5), "{boot:?}");
}

#[test]
fn exit_port_status_is_returned() {
    if !kvm_available("exit_port_status_is_returned") {
        return;
    }
    let (result, _) = run(StubAsm::new().exit_status(3).spin().finish(), Some(10_000));
    let exit = result.unwrap();
    assert_eq!(exit.reason, ExitReason::Exited(3));
    assert_eq!(exit.exit_code(), 3);
    assert_eq!(exit.boot_time, None);
}

#[test]
fn halt_with_interrupts_off_is_reported() {
    if !kvm_available("halt_with_interrupts_off_is_reported") {
        return;
    }
    let t = Instant::now();
    let (result, console) = run(StubAsm::new().serial_print(b"bye").cli_hlt().finish(), Some(10_000));
    let exit = result.unwrap();
    assert!(matches!(exit.reason, ExitReason::Halted { .. }), "{exit:?}");
    assert!(exit.reason.to_string().contains("halted"));
    assert_eq!(console, "bye");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_hang_ends_at_the_timeout() {
    if !kvm_available("a_hang_ends_at_the_timeout") {
        return;
    }
    let t = Instant::now();
    let (result, _) = run(StubAsm::new().spin().finish(), Some(300));
    let err = result.unwrap_err();
    assert!(matches!(err, VmError::Vcpu(VcpuError::Timeout(d)) if d == Duration::from_millis(300)), "{err:?}");
    let elapsed = t.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let chain = error_chain(&err);
    assert!(chain.contains("timeout"), "{chain}");
}

#[test]
fn triple_fault_is_an_error() {
    if !kvm_available("triple_fault_is_an_error") {
        return;
    }
    let (result, _) = run(StubAsm::new().triple_fault().finish(), Some(10_000));
    let err = result.unwrap_err();
    assert!(matches!(err, VmError::Vcpu(VcpuError::TripleFault { .. })), "{err:?}");
    assert!(error_chain(&err).contains("triple fault"));
}

#[test]
fn idle_guest_with_interrupts_on_keeps_running_until_timeout() {
    if !kvm_available("idle_guest_with_interrupts_on_keeps_running_until_timeout") {
        return;
    }
    let (result, _) = run(StubAsm::new().idle().finish(), Some(200));
    let err = result.unwrap_err();
    assert!(matches!(err, VmError::Vcpu(VcpuError::Timeout(_))), "{err:?}");
}

#[test]
fn run_stub_entry_point() {
    if !kvm_available("run_stub_entry_point") {
        return;
    }
    let exit = twinbox_microvm::run_stub(&twinbox_microvm::stub::floor_stub(), 128).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset);
    assert_eq!(exit.boot_signals, 1);
}

#[test]
fn missing_kernel_is_a_clear_error() {
    if !kvm_available("missing_kernel_is_a_clear_error") {
        return;
    }
    let config = VmConfig { kernel: "/nonexistent/vmlinux".into(), ..VmConfig::default() };
    let err = twinbox_microvm::run(config, &mut std::io::sink()).unwrap_err();
    assert!(error_chain(&err).contains("kernel /nonexistent/vmlinux does not exist"));
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

fn run_without_irqchip(code: Vec<u8>) -> (Result<VmExit, VmError>, String) {
    let config = VmConfig { memory_mib: 16, timeout_ms: Some(10_000), ..VmConfig::default() };
    let mut console = Vec::new();
    let result = VmBuilder::new(config).interrupts(false).stub(code).build().and_then(|mut vm| vm.run(&mut console));
    (result, String::from_utf8_lossy(&console).into_owned())
}

#[test]
fn without_irqchip_hello_reset_and_hlt() {
    if !kvm_available("without_irqchip_hello_reset_and_hlt") {
        return;
    }
    let code = StubAsm::new().serial_print(b"Hello").boot_timer().i8042_reset().finish();
    let (result, console) = run_without_irqchip(code);
    let exit = result.unwrap();
    assert_eq!((exit.reason, exit.boot_signals), (ExitReason::Reset, 1));
    assert_eq!(console, "Hello");
    // Without an interrupt controller even `sti; hlt` can never wake up.
    let (result, _) = run_without_irqchip(StubAsm::new().idle().finish());
    assert!(matches!(result.unwrap().reason, ExitReason::Halted { .. }));
}

#[test]
fn application_processors_stop_with_the_vm() {
    if !kvm_available("application_processors_stop_with_the_vm") {
        return;
    }
    // Two more vCPUs on their own threads, parked in wait-for-SIPI; the boot vCPU's status
    // ends the VM and the run returns (the AP threads were stopped and joined).
    let config = VmConfig { memory_mib: 16, vcpus: 3, timeout_ms: Some(10_000), ..VmConfig::default() };
    let code = StubAsm::new().serial_print(b"smp").exit_status(4).spin().finish();
    let t = Instant::now();
    let mut console = Vec::new();
    let exit = VmBuilder::new(config).stub(code).build().and_then(|mut vm| vm.run(&mut console)).unwrap();
    assert_eq!(exit.reason, ExitReason::Exited(4));
    assert_eq!(console, b"smp");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_signal_stops_the_guest_with_the_signal_named() {
    if !kvm_available("a_signal_stops_the_guest_with_the_signal_named") {
        return;
    }
    // In a child process: the handlers are process-wide.
    if std::env::var_os("TWINBOX_STUB_SIGNAL_CHILD").is_some() {
        twinbox_microvm::vstate::watchdog::stop_on_signals().unwrap();
        let pid = std::process::id() as i32;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: kill(2) on our own pid with a handled signal.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        });
        let (result, _) = run(StubAsm::new().spin().finish(), Some(20_000));
        match result {
            Err(VmError::Vcpu(VcpuError::Interrupted(s))) if s == libc::SIGTERM => std::process::exit(0),
            other => panic!("expected an interruption, got {other:?}"),
        }
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_signal_stops_the_guest_with_the_signal_named", "--nocapture"])
        .env("TWINBOX_STUB_SIGNAL_CHILD", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A VM with a network card runs its receive thread and ends cleanly; the tap it made exists
/// while the VM does and is gone once it ends (in a network namespace of the test's own).
#[test]
fn a_network_card_tap_lives_as_long_as_the_vm() {
    let test = "a_network_card_tap_lives_as_long_as_the_vm";
    if !kvm_available(test) || !twinbox_testutil::require_root(test, "a tap in a network namespace") {
        return;
    }
    std::thread::spawn(|| {
        // SAFETY: unshare changes only this thread's network namespace; it takes no pointers.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let exists = || tap_exists("tbstub0");
        let config = VmConfig {
            memory_mib: 16,
            timeout_ms: Some(10_000),
            nets: vec![twinbox_microvm::NetConfig { tap: "tbstub0".into(), mac: Some("02:00:00:00:00:09".into()) }],
            ..VmConfig::default()
        };
        let mut vm = VmBuilder::new(config)
            .start_time(Instant::now())
            .stub(StubAsm::new().exit_status(0).spin().finish())
            .build()
            .unwrap();
        assert!(exists(), "the tap is made with the VM");
        let exit = vm.run(&mut Vec::new()).unwrap();
        assert_eq!(exit.reason, ExitReason::Exited(0));
        drop(vm);
        assert!(!exists(), "the tap is gone with the VM");
    })
    .join()
    .unwrap();
}

/// Whether this thread's network namespace has a link named `name` (netlink through `ip`,
/// which runs in the namespace of the thread that starts it).
fn tap_exists(name: &str) -> bool {
    std::process::Command::new("ip").args(["link", "show", name]).output().is_ok_and(|o| o.status.success())
}

/// A VM with a vsock device listens on its UNIX socket while it exists, takes a host process's
/// connection there (which waits for a guest that never answers), and removes the socket when
/// it ends.
#[test]
fn a_vsock_socket_lives_as_long_as_the_vm() {
    if !kvm_available("a_vsock_socket_lives_as_long_as_the_vm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.sock");
    let config = VmConfig {
        memory_mib: 16,
        timeout_ms: Some(10_000),
        vsock: Some(twinbox_microvm::VsockConfig { guest_cid: 3, uds_path: uds.clone() }),
        ..VmConfig::default()
    };
    let mut vm = VmBuilder::new(config)
        .start_time(Instant::now())
        .stub(StubAsm::new().exit_status(0).spin().finish())
        .build()
        .unwrap();
    let mut host = std::os::unix::net::UnixStream::connect(&uds).expect("the VMM listens");
    std::io::Write::write_all(&mut host, b"CONNECT 52\n").unwrap();
    assert_eq!(vm.run(&mut Vec::new()).unwrap().reason, ExitReason::Exited(0));
    drop(vm);
    assert!(!uds.exists(), "the socket is gone with the VM");
    let taken = VmConfig {
        memory_mib: 16,
        vsock: Some(twinbox_microvm::VsockConfig { guest_cid: 3, uds_path: dir.path().to_owned() }),
        ..VmConfig::default()
    };
    let err = VmBuilder::new(taken).stub(vec![0xf4]).build().unwrap_err();
    assert!(err.to_string().contains("vsock"), "{err}");
}

//! The jailed VMM (issue 21), with stub guests under real KVM: each case runs a child process
//! (this binary again, with TWINBOX_JAIL_CHILD set) that builds a VM and confines itself, and
//! checks it from outside.
//!
//! No libtest harness: a jail is only entered by a single-threaded process, and libtest runs
//! each test on a thread of its own. Needs root and /dev/kvm (SKIPPED without, a failure under
//! CI=true).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use twinbox_microvm::jail::{JailConfig, ThreadKind, FORBIDDEN_CALL_EXIT, VMM_ID_BASE};
use twinbox_microvm::stub::{floor_stub, StubAsm};
use twinbox_microvm::{ExitReason, IrqChip, VmBuilder, VmConfig};

const CHILD: &str = "TWINBOX_JAIL_CHILD";
const ROOT: &str = "TWINBOX_JAIL_ROOT";
const BIND: &str = "TWINBOX_JAIL_BIND";

fn main() {
    if let Ok(mode) = std::env::var(CHILD) {
        std::process::exit(child(&mode));
    }
    let tests: [(&str, fn()); 5] = [
        (
            "a_jailed_vmm_has_no_privilege_and_sees_only_its_binds",
            a_jailed_vmm_has_no_privilege_and_sees_only_its_binds,
        ),
        ("a_jailed_vm_runs_to_its_end", a_jailed_vm_runs_to_its_end),
        ("a_forbidden_call_ends_the_vmm_and_is_named", a_forbidden_call_ends_the_vmm_and_is_named),
        ("a_jailed_vmm_starts_threads_but_no_process", a_jailed_vmm_starts_threads_but_no_process),
        ("a_probe_in_the_jail_finds_each_thread_kind_narrower", a_probe_in_the_jail_finds_each_thread_kind_narrower),
    ];
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    // The shared network namespace the jailed VMMs below make is unpinned again at the end,
    // unless it was there before.
    let shared = Path::new(twinbox_microvm::jail::SHARED_NETNS);
    let pinned_before =
        std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().contains(shared.to_str().unwrap());
    let mut ran = 0;
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        test();
        println!("test {name} ... ok");
        ran += 1;
    }
    if !pinned_before {
        let _ = twinbox_microvm::jail::remove_shared_netns(shared);
    }
    println!("\ntest result: ok. {ran} passed; 0 failed; 0 ignored; 0 measured; {} filtered out", tests.len() - ran);
}

fn jail_config() -> JailConfig {
    JailConfig {
        root: PathBuf::from(std::env::var_os(ROOT).expect("the parent names the jail's root")),
        binds: std::env::var_os(BIND).map(PathBuf::from).into_iter().collect(),
        ..JailConfig::default()
    }
}

fn child(mode: &str) -> i32 {
    match mode {
        // An idle guest in a jail; says "jailed" once confined, then runs until killed.
        "idle" => {
            let config = VmConfig { memory_mib: 16, timeout_ms: Some(60_000), ..VmConfig::default() };
            let code = StubAsm::new().boot_timer().idle().finish();
            let mut vm = match VmBuilder::new(config).stub(code).jail(Some(jail_config())).build() {
                Ok(vm) => vm,
                Err(e) => {
                    eprintln!("build: {e:?}");
                    return 1;
                }
            };
            println!("jailed");
            match vm.run(&mut std::io::sink()) {
                Ok(exit) => eprintln!("unexpected end: {}", exit.reason),
                Err(e) => eprintln!("run: {e:?}"),
            }
            1
        }
        // The floor guest (boot timer, i8042 reset) start to end in a jail with a network
        // namespace of its own.
        "floor" => {
            let config = VmConfig { memory_mib: 128, irqchip: IrqChip::Split, ..VmConfig::default() };
            let jail = JailConfig { netns: twinbox_microvm::jail::NetNs::New, ..jail_config() };
            let result = VmBuilder::new(config)
                .stub(floor_stub())
                .jail(Some(jail))
                .build()
                .and_then(|mut vm| vm.run(&mut std::io::sink()));
            match result {
                Ok(exit) if exit.reason == ExitReason::Reset && exit.boot_time.is_some() => 0,
                Ok(exit) => {
                    eprintln!("unexpected end: {} (boot time {:?})", exit.reason, exit.boot_time);
                    1
                }
                Err(e) => {
                    eprintln!("{e:?}");
                    1
                }
            }
        }
        // What the jail leaves reachable, per thread kind (`twinbox microvm-vmm --probe`).
        "probe" => {
            let jail = JailConfig { netns: twinbox_microvm::jail::NetNs::New, ..jail_config() };
            match jail.probe() {
                Ok(kinds) => {
                    for (kind, s) in kinds {
                        println!("{} {}", kind.key(), s.to_json());
                    }
                    0
                }
                Err(e) => {
                    eprintln!("probe: {e:?}");
                    1
                }
            }
        }
        // A thread confined as a vCPU opens a file, which no vCPU thread may.
        "forbidden" => {
            if let Err(e) = jail_config().enter(None) {
                eprintln!("enter: {e:?}");
                return 1;
            }
            let thread = std::thread::spawn(|| {
                twinbox_microvm::jail::seccomp::confine_thread(ThreadKind::Vcpu).expect("confined as a vCPU");
                let _ = std::fs::File::open("/");
            });
            let _ = thread.join();
            eprintln!("the forbidden call returned");
            1
        }
        // The VMM thread starts a thread (clone3 refused with ENOSYS, clone with CLONE_THREAD
        // allowed), then forks, which no VMM thread may: no new process from a jail.
        "fork" => {
            if let Err(e) = jail_config().enter(None) {
                eprintln!("enter: {e:?}");
                return 1;
            }
            match std::thread::spawn(|| 7).join() {
                Ok(7) => println!("a thread ran"),
                other => eprintln!("the thread: {other:?}"),
            }
            // SAFETY: the child (if any) only exits at once.
            if unsafe { libc::fork() } == 0 {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(0) };
            }
            eprintln!("the fork returned");
            1
        }
        _ => 2,
    }
}

fn usable(test: &str) -> bool {
    twinbox_testutil::require_root(test, "confine a VMM (namespaces, uid change)")
        && twinbox_testutil::require(
            std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok(),
            test,
            "/dev/kvm is not usable",
        )
}

fn spawn(mode: &str, root: &Path, bind: Option<&Path>) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(CHILD, mode).env(ROOT, root).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(b) = bind {
        cmd.env(BIND, b);
    }
    cmd.spawn().unwrap()
}

/// The `Name:` line of a /proc status file, its fields split.
fn field(status: &str, name: &str) -> Vec<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn a_jailed_vmm_has_no_privilege_and_sees_only_its_binds() {
    let test = "a_jailed_vmm_has_no_privilege_and_sees_only_its_binds";
    if !usable(test) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("marker"), "visible").unwrap();
    let mut vmm = spawn("idle", root.path(), Some(shared.path()));
    let pid = vmm.id();
    let mut line = String::new();
    BufReader::new(vmm.stdout.take().unwrap()).read_line(&mut line).unwrap();
    if line.trim() != "jailed" {
        let _ = vmm.kill();
        let mut err = String::new();
        vmm.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        panic!("the VMM did not confine itself: {err}");
    }
    // Its threads start once it runs: the vCPU and the watchdog.
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let names = || -> Vec<String> {
        std::fs::read_dir(proc_dir.join("task"))
            .map(|d| {
                d.flatten()
                    .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    while !names().iter().any(|n| n == "vcpu0") || !names().iter().any(|n| n == "vcpu-watchdog") {
        assert!(Instant::now() < deadline, "the VMM's threads did not start: {:?}", names());
        std::thread::sleep(Duration::from_millis(10));
    }

    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    let id = (VMM_ID_BASE + pid).to_string();
    assert_eq!(field(&status, "Uid"), vec![id.clone(); 4], "{status}");
    assert_eq!(field(&status, "Gid"), vec![id.clone(); 4], "{status}");
    assert_eq!(field(&status, "Groups"), Vec::<String>::new());
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&status, caps), vec!["0000000000000000"], "{caps}");
    }
    assert_eq!(field(&status, "NoNewPrivs"), vec!["1"]);
    // Every thread filtered; a vCPU's and the watchdog's list stacked on the VMM's.
    for task in std::fs::read_dir(proc_dir.join("task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap().trim().to_owned();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        assert_eq!(field(&status, "Seccomp"), vec!["2"], "thread {comm}");
        let filters = field(&status, "Seccomp_filters");
        if task.file_name().to_str() == Some(pid.to_string().as_str()) {
            assert_eq!(filters, vec!["1"], "the main thread has the VMM's list");
        } else if comm.starts_with("vcpu") {
            assert_eq!(filters, vec!["2"], "thread {comm}");
        }
    }
    // Its root: a tmpfs of its own holding only the bound directory; its own network.
    let inside: Vec<_> = std::fs::read_dir(proc_dir.join("root")).unwrap().flatten().map(|e| e.file_name()).collect();
    let first = shared.path().components().nth(1).unwrap().as_os_str().to_owned();
    assert_eq!(inside, vec![first], "the jail's root holds only the path to its bind");
    let marker = proc_dir.join("root").join(shared.path().strip_prefix("/").unwrap()).join("marker");
    assert_eq!(std::fs::read_to_string(marker).unwrap(), "visible");
    let mounts = std::fs::read_to_string(proc_dir.join("mountinfo")).unwrap();
    let root_mount = mounts.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).expect("a root mount");
    assert!(
        root_mount.contains(" - tmpfs ") && root_mount.split_whitespace().nth(5).unwrap().starts_with("ro"),
        "{root_mount}"
    );
    assert_eq!(mounts.lines().count(), 2, "the root and the bind only:\n{mounts}");
    // The namespace jailed VMMs share (not the host's), pinned where the jail says.
    let ns = |p: &Path| std::fs::read_link(p.join("ns/net")).unwrap();
    assert_ne!(ns(&proc_dir), ns(Path::new("/proc/self")), "not the host's network namespace");
    let pinned = std::fs::metadata(twinbox_microvm::jail::SHARED_NETNS).unwrap();
    let own = std::fs::metadata(proc_dir.join("ns/net")).unwrap();
    assert_eq!((pinned.dev(), pinned.ino()), (own.dev(), own.ino()), "the shared one");

    vmm.kill().unwrap();
    vmm.wait().unwrap();
    // On the host the jail's root stays as it was: nothing was mounted there.
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

fn a_jailed_vm_runs_to_its_end() {
    let test = "a_jailed_vm_runs_to_its_end";
    if !usable(test) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = spawn("floor", root.path(), None).wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn a_forbidden_call_ends_the_vmm_and_is_named() {
    let test = "a_forbidden_call_ends_the_vmm_and_is_named";
    if !usable(test) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = spawn("forbidden", root.path(), None).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(FORBIDDEN_CALL_EXIT), "{stderr}");
    assert!(
        stderr.contains("the vCPU thread made system call 257 (openat), which its seccomp filter forbids"),
        "{stderr}"
    );
}

fn a_jailed_vmm_starts_threads_but_no_process() {
    let test = "a_jailed_vmm_starts_threads_but_no_process";
    if !usable(test) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = spawn("fork", root.path(), None).wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("a thread ran"), "{stdout} {stderr}");
    assert_eq!(out.status.code(), Some(FORBIDDEN_CALL_EXIT), "{stderr}");
    assert!(stderr.contains("the VMM thread made system call 56 (clone)"), "{stderr}");
}

fn a_probe_in_the_jail_finds_each_thread_kind_narrower() {
    let test = "a_probe_in_the_jail_finds_each_thread_kind_narrower";
    if !usable(test) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = spawn("probe", root.path(), None).wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let figure = |kind: &str, key: &str| -> u64 {
        let line = stdout.lines().find(|l| l.starts_with(&format!("{kind} "))).unwrap_or_else(|| panic!("{stdout}"));
        let at = line.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("{line}")) + key.len() + 3;
        line[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    // The unconfined probe, for comparison: this (root) test process's own thread.
    let (host, probed) = twinbox_probe::syscalls(&|| false);
    let (vmm, vcpu, io, watchdog) = (
        figure("vmm", "syscalls"),
        figure("vcpu", "syscalls"),
        figure("io", "syscalls"),
        figure("watchdog", "syscalls"),
    );
    assert_eq!(figure("vcpu", "probed"), u64::from(probed));
    assert!(u64::from(host) > 3 * vmm, "the jail's widest list is a fraction of the host's: {host} vs {vmm}");
    assert!(vmm > vcpu && vcpu > io && io > watchdog && watchdog > 10, "{stdout}");
    for kind in ["vmm", "vcpu", "io", "watchdog"] {
        for key in ["capabilities", "devices", "proc_sys", "sys_class"] {
            assert_eq!(figure(kind, key), 0, "{kind} {key}: {stdout}");
        }
    }
}

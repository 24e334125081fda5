//! Snapshots of stub guests under real KVM (PVM here): a guest paused where its agent would
//! wait for a workload, written to a snapshot, goes on from there in every VM restored from
//! it; a damaged snapshot, or one of another shape or VMM build, is refused with the reason.
//!
//! Needs /dev/kvm. Without it each test prints "SKIPPED: …" and passes, except under CI=true.

use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};
use twinbox_microvm::snapshot::{SnapshotError, CHECKSUMS_FILE, MEMORY_FILE, STATE_FILE};
use twinbox_microvm::stub::StubAsm;
use twinbox_microvm::{ExitReason, VmBuilder, VmConfig, VmError};

fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => twinbox_testutil::require(false, test, &format!("/dev/kvm is not usable: {e}")),
    }
}

/// COM1's scratch register.
const SCRATCH: [u8; 2] = 0x3ffu16.to_le_bytes();

/// Puts 0x5a in the UART's scratch register, prints "1", says it is ready; then counts ecx to
/// 100000 (from 0: `xor ecx, ecx; 1: inc ecx; cmp ecx, 100000; jne 1b`), prints "2", and
/// reports the scratch register's value as its exit status: 90 only where the UART's state came
/// through.
fn template_stub() -> Vec<u8> {
    let [s0, s1] = SCRATCH;
    StubAsm::new()
        .raw(&[0x66, 0xba, s0, s1, 0xb0, 0x5a, 0xee])
        .serial_print(b"1")
        .ready()
        .raw(&[0x31, 0xc9, 0x41, 0x81, 0xf9, 0xa0, 0x86, 0x01, 0x00, 0x75, 0xf7])
        .serial_print(b"2")
        // mov dx, 0x3ff; in al, dx; movzx eax, al; mov dx, 0x501; out dx, eax
        .raw(&[0x66, 0xba, s0, s1, 0xec, 0x0f, 0xb6, 0xc0, 0x66, 0xba, 0x01, 0x05, 0xef])
        .cli_hlt()
        .finish()
}

fn config() -> VmConfig {
    VmConfig { memory_mib: 16, timeout_ms: Some(20_000), ..VmConfig::default() }
}

/// Runs the template stub to its ready signal and snapshots it into `dir`.
fn make_template(dir: &Path) {
    let mut vm = VmBuilder::new(config()).stub(template_stub()).pause_when_ready(true).build().unwrap();
    let mut console = Vec::new();
    let exit = vm.run(&mut console).unwrap();
    assert_eq!(exit.reason, ExitReason::Ready);
    assert_eq!(console, b"1");
    vm.snapshot(dir).unwrap();
}

fn restore(dir: &Path, config: VmConfig) -> Result<(ExitReason, String), VmError> {
    let mut vm = VmBuilder::new(config).restore(dir).build()?;
    let mut console = Vec::new();
    let exit = vm.run(&mut console)?;
    Ok((exit.reason, String::from_utf8_lossy(&console).into_owned()))
}

#[test]
fn a_guest_paused_when_ready_goes_on_from_there_in_every_restored_vm() {
    if !kvm_available("a_guest_paused_when_ready_goes_on_from_there_in_every_restored_vm") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    make_template(&dir);
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, [CHECKSUMS_FILE, MEMORY_FILE, STATE_FILE, "verified"]);
    // Holes where the guest's pages are zero: 16 MiB of RAM, a few pages written.
    let meta = std::fs::metadata(dir.join(MEMORY_FILE)).unwrap();
    assert_eq!(meta.len(), 16 << 20);
    assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 1 << 20, "the memory file is sparse");
    // Two at once from one snapshot, each from where the template paused: "2" only (it did
    // not start over), the UART's scratch register as the status.
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2).map(|_| s.spawn(|| restore(&dir, config()))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for run in runs {
        let (reason, console) = run.unwrap();
        assert_eq!(reason, ExitReason::Exited(0x5a));
        assert_eq!(console, "2");
    }
    // A snapshot is written to a new directory only.
    let mut vm = VmBuilder::new(config()).stub(template_stub()).pause_when_ready(true).build().unwrap();
    vm.run(&mut Vec::new()).unwrap();
    let err = vm.snapshot(&dir).unwrap_err();
    assert!(matches!(err, VmError::Snapshot(SnapshotError::Exists(_))), "{err}");
}

fn rewrite_state(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(STATE_FILE)).unwrap()).unwrap();
    edit(&mut state);
    let json = serde_json::to_vec(&state).unwrap();
    std::fs::write(dir.join(STATE_FILE), &json).unwrap();
    let sums = std::fs::read_to_string(dir.join(CHECKSUMS_FILE)).unwrap();
    let memory_line = sums.lines().find(|l| l.ends_with(MEMORY_FILE)).unwrap();
    let sums = format!("{}  {STATE_FILE}\n{memory_line}\n", hex::encode(Sha256::digest(&json)));
    std::fs::write(dir.join(CHECKSUMS_FILE), sums).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for f in [CHECKSUMS_FILE, MEMORY_FILE, STATE_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn damaged_snapshots_and_snapshots_of_another_vm_build_or_cpu_are_refused_with_the_reason() {
    if !kvm_available("damaged_snapshots_and_snapshots_of_another_vm_build_or_cpu_are_refused_with_the_reason") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    make_template(&good);
    let refused = |dir: &Path, config: VmConfig| -> String {
        let err = restore(dir, config).unwrap_err();
        assert_eq!(twinbox_exit::ExitCode::exit_code(&err), 1, "{err}");
        err.to_string()
    };

    // One byte of guest memory altered after a restore checked (and stamped) it, and one
    // altered in the snapshot that was stamped when it was made.
    let altered = tmp.path().join("altered");
    copy_dir(&good, &altered);
    restore(&altered, config()).unwrap();
    let memory = std::fs::OpenOptions::new().write(true).open(good.join(MEMORY_FILE)).unwrap();
    memory.write_all_at(&[0xcc], 0x10_0000).unwrap();
    let e = refused(&good, config());
    assert!(e.contains("memory does not match its checksum"), "{e}");
    std::fs::remove_dir_all(&good).unwrap();
    copy_dir(&altered, &good);
    let memory = std::fs::OpenOptions::new().write(true).open(altered.join(MEMORY_FILE)).unwrap();
    memory.write_all_at(&[0xcc], 0x10_0000).unwrap();
    let e = refused(&altered, config());
    assert!(e.contains("memory does not match its checksum") && e.contains("damaged"), "{e}");

    // Truncated.
    let short = tmp.path().join("short");
    copy_dir(&good, &short);
    std::fs::OpenOptions::new().write(true).open(short.join(MEMORY_FILE)).unwrap().set_len(4096).unwrap();
    let e = refused(&short, config());
    assert!(e.contains("memory has 4096 bytes where the state says 16777216"), "{e}");

    // The state edited without its checksum.
    let edited = tmp.path().join("edited");
    copy_dir(&good, &edited);
    let mut json = std::fs::read(edited.join(STATE_FILE)).unwrap();
    json.truncate(json.len() - 10);
    std::fs::write(edited.join(STATE_FILE), json).unwrap();
    assert!(refused(&edited, config()).contains("state.json does not match its checksum"));

    // Another shape.
    let e = refused(&good, VmConfig { memory_mib: 32, ..config() });
    assert!(e.contains("made of a VM of 16 MiB") && e.contains("this VM has 32 MiB"), "{e}");

    // Another VMM build, checksums made to match.
    let other = tmp.path().join("other-build");
    copy_dir(&good, &other);
    rewrite_state(&other, |s| s["vmm"] = "0.0.1+0123456789abcdef".into());
    let e = refused(&other, config());
    assert!(e.contains("made by twinbox VMM 0.0.1+0123456789abcdef") && e.contains("make the snapshot again"), "{e}");

    // Another CPU.
    let cpu = tmp.path().join("other-cpu");
    copy_dir(&good, &cpu);
    rewrite_state(&cpu, |s| {
        s["cpu"]["model"] = "GenuineIntel, family 6 model 85 stepping 7".into();
        s["cpu"]["cpuid_sha256"] = "0".repeat(64).into();
    });
    let e = refused(&cpu, config());
    assert!(e.contains("made on another CPU (GenuineIntel, family 6 model 85 stepping 7)"), "{e}");

    // A missing file.
    std::fs::remove_file(short.join(STATE_FILE)).unwrap();
    assert!(refused(&short, config()).contains("state.json is missing"));

    // The good one still restores.
    assert_eq!(restore(&good, config()).unwrap().0, ExitReason::Exited(0x5a));
}

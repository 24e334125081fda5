//! The VMM floor: process start → the guest's first boot-timer write → clean exit, for a stub
//! guest that writes 123 at 0xc000_0000 and resets through the i8042, measured as a child
//! process from spawn to exit, interleaved with QEMU `-M microvm` booting the same stub as a
//! PVH ELF. Then the VMM's RSS/PSS with an idle (halted, interrupts on) 128 MiB guest.
//!
//! `cargo bench -p twinbox-microvm --bench floor` (needs /dev/kvm; QEMU optional).
//! Env: FLOOR_ROUNDS (default 30), FLOOR_WARMUP (default 3).
//!
//! The same floor guest also runs in a jailed VMM (`floor-jail`: see `twinbox_microvm::jail`),
//! interleaved with the others; the difference of the medians is what the jail costs.
//!
//! QEMU gets the stub through `-kernel stub.elf`: an ELF64 with a Xen PHYS32_ENTRY note, which
//! QEMU's microvm firmware enters through PVH in flat 32-bit protected mode, the same state
//! twinbox gives the raw stub. QEMU microvm has no i8042, so the stub falls through to the
//! exit port 0x501, where `-device isa-debug-exit,iobase=0x501` ends QEMU with status 1.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{median, percentile, smaps_rollup_kib};
use twinbox_microvm::stub::{floor_stub, pvh_elf, StubAsm};
use twinbox_microvm::{ExitReason, IrqChip, VmBuilder, VmConfig};

const CHILD_ENV: &str = "TWINBOX_FLOOR_CHILD";

fn main() {
    // Child modes first: the boot timer counts from here.
    let start = Instant::now();
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        std::process::exit(child(&mode, start));
    }
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to do.
        println!("floor: run with `cargo bench -p twinbox-microvm --bench floor`");
        return;
    }
    if !twinbox_testutil::require(std::path::Path::new("/dev/kvm").exists(), "floor benchmark", "/dev/kvm is missing") {
        return;
    }
    parent();
}

fn child(mode: &str, start: Instant) -> i32 {
    let jail = mode.ends_with("-jail").then(twinbox_microvm::jail::JailConfig::default);
    let mode = mode.trim_end_matches("-jail");
    let (code, timeout_ms, irqchip) = match mode {
        "floor" => (floor_stub(), None, Some(IrqChip::Split)),
        "floor-kernel-irqchip" => (floor_stub(), None, Some(IrqChip::Kernel)),
        "floor-noirqchip" => (floor_stub(), None, None),
        "idle" => (StubAsm::new().boot_timer().idle().finish(), Some(30_000), Some(IrqChip::Split)),
        _ => return 2,
    };
    let config = VmConfig { memory_mib: 128, timeout_ms, irqchip: irqchip.unwrap_or_default(), ..VmConfig::default() };
    let result =
        VmBuilder::new(config).start_time(start).interrupts(irqchip.is_some()).stub(code).jail(jail).build().and_then(
            |mut vm| {
                let exit = vm.run(&mut std::io::sink())?;
                Ok((exit, start.elapsed()))
            },
        );
    match result {
        Ok((exit, ran)) if exit.reason == ExitReason::Reset => {
            let us = exit.boot_time.map_or(0, |d| d.as_micros());
            // Boot timer, and the end of the run (before the VM is torn down), in µs.
            println!("{us} {}", ran.as_micros());
            0
        }
        Ok((exit, _)) => {
            eprintln!("unexpected end: {}", exit.reason);
            1
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn qemu_command(elf: &std::path::Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-m",
        "128M",
        "-device",
        "isa-debug-exit,iobase=0x501,iosize=4",
        "-kernel",
    ])
    .arg(elf)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

fn twinbox_command(mode: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.env(CHILD_ENV, mode).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd
}

/// Spawn → exit of `cmd`; checks its status.
fn time_run(mut cmd: Command, want_status: i32) -> (Duration, String) {
    let t = Instant::now();
    let out = cmd.output().expect("spawn");
    let elapsed = t.elapsed();
    assert_eq!(out.status.code(), Some(want_status), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    (elapsed, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// RSS/PSS of a process running an idle guest, read after it settled.
fn idle_memory(mut cmd: Command) -> (u64, u64) {
    let mut child = cmd.stdout(Stdio::null()).spawn().expect("spawn");
    std::thread::sleep(Duration::from_millis(700));
    let mem = smaps_rollup_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    mem
}

fn context() -> String {
    let rev = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "PVM (kvm_pvm)"
    } else if std::path::Path::new("/sys/module/kvm_intel").exists()
        || std::path::Path::new("/sys/module/kvm_amd").exists()
    {
        "hardware KVM"
    } else {
        "unknown KVM"
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("rev {rev}, host {}, kernel {}, {kvm}", host.trim(), kernel.trim())
}

fn parent() {
    let rounds: usize = std::env::var("FLOOR_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let warmup: usize = std::env::var("FLOOR_WARMUP").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let floor_elf = dir.path().join("floor.elf");
    std::fs::write(&floor_elf, pvh_elf(&floor_stub())).unwrap();
    let idle_elf = dir.path().join("idle.elf");
    std::fs::write(&idle_elf, pvh_elf(&StubAsm::new().boot_timer().idle().finish())).unwrap();
    let have_qemu =
        Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());

    println!("floor benchmark: {}", context());
    println!("{rounds} rounds after {warmup} warm-up rounds, interleaved, order alternating");
    let (mut tb, mut tb_boot, mut tb_ran, mut qemu) = (vec![], vec![], vec![], vec![]);
    let (mut bare, mut bare_boot) = (vec![], vec![]);
    let (mut kern, mut kern_boot) = (vec![], vec![]);
    let (mut jailed, mut jailed_boot) = (vec![], vec![]);
    let inner = |out: &str, i: usize| {
        out.split_whitespace().nth(i).and_then(|s| s.parse::<f64>().ok()).map_or(f64::NAN, |us| us / 1e3)
    };
    for round in 0..warmup + rounds {
        // Rotate the order each round so no runner always goes first after the others.
        let mut t = None;
        let mut b = None;
        let mut k_ = None;
        let mut q = None;
        let mut j = None;
        for k in 0..5 {
            match (round + k) % 5 {
                0 => t = Some(time_run(twinbox_command("floor"), 0)),
                1 => b = Some(time_run(twinbox_command("floor-noirqchip"), 0)),
                2 => k_ = Some(time_run(twinbox_command("floor-kernel-irqchip"), 0)),
                3 => j = Some(time_run(twinbox_command("floor-jail"), 0)),
                _ => q = have_qemu.then(|| time_run(qemu_command(&floor_elf), 1).0),
            }
        }
        if round < warmup {
            continue;
        }
        let (t, b, k_, j) = (t.unwrap(), b.unwrap(), k_.unwrap(), j.unwrap());
        jailed.push(j.0.as_secs_f64() * 1e3);
        jailed_boot.push(inner(&j.1, 0));
        kern.push(k_.0.as_secs_f64() * 1e3);
        kern_boot.push(inner(&k_.1, 0));
        tb.push(t.0.as_secs_f64() * 1e3);
        tb_boot.push(inner(&t.1, 0));
        tb_ran.push(inner(&t.1, 1));
        bare.push(b.0.as_secs_f64() * 1e3);
        bare_boot.push(inner(&b.1, 0));
        if let Some(q) = q {
            qemu.push(q.as_secs_f64() * 1e3);
        }
    }
    let line = |name: &str, v: &[f64]| {
        println!(
            "{name:<34} median {:7.2} ms  p10 {:7.2}  p90 {:7.2}  (n={})",
            median(v),
            percentile(v, 0.1),
            percentile(v, 0.9),
            v.len()
        )
    };
    line("twinbox (split irqchip) spawn→exit", &tb);
    line("  start→boot timer (in the VMM)", &tb_boot);
    line("  start→run returned (pre-teardown)", &tb_ran);
    line("twinbox jailed (split) spawn→exit", &jailed);
    line("  start→boot timer (in the VMM)", &jailed_boot);
    line("twinbox in-kernel irqchip+PIT", &kern);
    line("  start→boot timer (in the VMM)", &kern_boot);
    line("twinbox no irqchip/PIT spawn→exit", &bare);
    line("  start→boot timer (in the VMM)", &bare_boot);
    if !qemu.is_empty() {
        line("qemu -M microvm spawn→exit", &qemu);
        println!(
            "twinbox / qemu = {:.3} (goal ≤ 0.2); in-kernel irqchip+PIT {:.3}, no irqchip {:.3}",
            median(&tb) / median(&qemu),
            median(&kern) / median(&qemu),
            median(&bare) / median(&qemu)
        );
    } else {
        println!("qemu-system-x86_64 not installed: no comparison");
    }
    println!(
        "the jail adds {:.3} ms spawn→exit, {:.3} ms start→boot timer (medians; goal ≤ 1 ms)",
        median(&jailed) - median(&tb),
        median(&jailed_boot) - median(&tb_boot)
    );

    let (rss, pss) = idle_memory(twinbox_command("idle"));
    println!(
        "twinbox VMM, idle 128 MiB guest: RSS {:.2} MiB, PSS {:.2} MiB (goal RSS ≤ 3 MiB)",
        rss as f64 / 1024.0,
        pss as f64 / 1024.0
    );
    let (rss, pss) = idle_memory(twinbox_command("idle-jail"));
    println!(
        "twinbox VMM jailed, idle 128 MiB guest: RSS {:.2} MiB, PSS {:.2} MiB",
        rss as f64 / 1024.0,
        pss as f64 / 1024.0
    );
    if have_qemu {
        let (rss, pss) = idle_memory(qemu_command(&idle_elf));
        println!(
            "qemu -M microvm, idle 128 MiB guest: RSS {:.2} MiB, PSS {:.2} MiB",
            rss as f64 / 1024.0,
            pss as f64 / 1024.0
        );
    }

    // The network namespace the jailed runs shared, unpinned again.
    let _ = twinbox_microvm::jail::remove_shared_netns(std::path::Path::new(twinbox_microvm::jail::SHARED_NETNS));

    let raw = format!(
        "{{\"context\":{:?},\"twinbox_ms\":{tb:?},\"twinbox_boot_timer_ms\":{tb_boot:?},\"twinbox_run_end_ms\":{tb_ran:?},\"twinbox_kernel_irqchip_ms\":{kern:?},\"twinbox_jailed_ms\":{jailed:?},\"twinbox_jailed_boot_timer_ms\":{jailed_boot:?},\"twinbox_noirqchip_ms\":{bare:?},\"twinbox_noirqchip_boot_timer_ms\":{bare_boot:?},\"qemu_ms\":{qemu:?}}}\n",
        context()
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/microvm-floor.json");
    if std::fs::write(&out, raw).is_ok() {
        println!("raw samples: {}", out.display());
    }
}

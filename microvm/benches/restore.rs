//! Restore against boot, for a stub guest that builds 32 MiB of state before it is ready (it
//! fills the memory from 2 MiB on), the way a Linux guest has its kernel and agent in memory
//! when its agent waits for a workload. Each round, interleaved and in alternating order:
//!
//! - boot: a VMM process boots the stub, which fills its 32 MiB, reads a word of every page,
//!   writes the boot timer and resets;
//! - restore: a VMM process restores the stub's snapshot taken at its ready signal (after the
//!   fill), which reads a word of every page, writes the boot timer and resets.
//!
//! Spawn → exit of the process, and the VMM's start → boot-timer write. Then the PSS and RSS
//! of idle guests (the same stubs ending in `sti; hlt`): one booted, and three restored from
//! one snapshot at once, whose untouched-since-restore pages are the snapshot file's page
//! cache, shared.
//!
//! `cargo bench -p twinbox-microvm --bench restore` (needs /dev/kvm). Env: RESTORE_ROUNDS
//! (default 30), RESTORE_WARMUP (default 3).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{median, smaps_rollup_kib};
use twinbox_microvm::stub::StubAsm;
use twinbox_microvm::{ExitReason, VmBuilder, VmConfig};

const CHILD_ENV: &str = "TWINBOX_RESTORE_CHILD";
const DIR_ENV: &str = "TWINBOX_RESTORE_DIR";
const MEMORY_MIB: u32 = 128;
/// Where the fill starts and how many 4 KiB pages it covers (32 MiB).
const FILL_AT: u32 = 0x20_0000;
const PAGES: u32 = 8192;

/// `mov edi, FILL_AT; mov ecx, PAGES*1024; mov eax, 0x5a5a5a5a; rep stosd`.
fn fill() -> Vec<u8> {
    let mut c = vec![0xbf];
    c.extend(FILL_AT.to_le_bytes());
    c.push(0xb9);
    c.extend((PAGES * 1024).to_le_bytes());
    c.extend([0xb8, 0x5a, 0x5a, 0x5a, 0x5a, 0xf3, 0xab]);
    c
}

/// `mov esi, FILL_AT; mov ecx, PAGES; 1: mov eax, [esi]; add esi, 4096; loop 1b`.
fn touch() -> Vec<u8> {
    let mut c = vec![0xbe];
    c.extend(FILL_AT.to_le_bytes());
    c.push(0xb9);
    c.extend(PAGES.to_le_bytes());
    c.extend([0x8b, 0x06, 0x81, 0xc6, 0x00, 0x10, 0x00, 0x00, 0xe2, 0xf6]);
    c
}

/// The stub: fill, ready (a pause point only for a template), touch, boot timer, then reset
/// (`idle`: halt with interrupts on, for the memory figures).
fn stub(idle: bool) -> Vec<u8> {
    let asm = StubAsm::new().raw(&fill()).ready().raw(&touch()).boot_timer();
    if idle {
        asm.idle().finish()
    } else {
        asm.i8042_reset().finish()
    }
}

fn config() -> VmConfig {
    VmConfig { memory_mib: MEMORY_MIB, timeout_ms: Some(30_000), ..VmConfig::default() }
}

fn main() {
    let start = Instant::now();
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        std::process::exit(child(&mode, start));
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("restore: run with `cargo bench -p twinbox-microvm --bench restore`");
        return;
    }
    if !twinbox_testutil::require(Path::new("/dev/kvm").exists(), "restore benchmark", "/dev/kvm is missing") {
        return;
    }
    parent();
}

fn child(mode: &str, start: Instant) -> i32 {
    let dir = std::env::var_os(DIR_ENV).map(std::path::PathBuf::from).unwrap_or_default();
    let builder = match mode {
        "boot" => VmBuilder::new(config()).stub(stub(false)),
        "boot-idle" => VmBuilder::new(config()).stub(stub(true)),
        "restore" => VmBuilder::new(config()).restore(dir.join("reset")),
        "restore-idle" => VmBuilder::new(config()).restore(dir.join("idle")),
        _ => return 2,
    };
    let result = builder.start_time(start).build().and_then(|mut vm| vm.run(&mut std::io::sink()));
    match result {
        Ok(exit) if exit.reason == ExitReason::Reset => {
            println!("{}", exit.boot_time.map_or(0, |d| d.as_micros()));
            0
        }
        Ok(exit) => {
            eprintln!("unexpected end: {}", exit.reason);
            1
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// Snapshots the stub at its ready signal into `dir`.
fn make_template(idle: bool, dir: &Path) {
    let mut vm = VmBuilder::new(config()).stub(stub(idle)).pause_when_ready(true).build().expect("template VM");
    let exit = vm.run(&mut std::io::sink()).expect("template run");
    assert_eq!(exit.reason, ExitReason::Ready);
    vm.snapshot(dir).expect("snapshot");
}

fn command(mode: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.env(CHILD_ENV, mode).env(DIR_ENV, dir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd
}

/// Spawn → exit (ms), and the boot-timer figure the child printed (ms).
fn time_run(mut cmd: Command) -> (f64, f64) {
    let t = Instant::now();
    let out = cmd.output().expect("spawn");
    let elapsed = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(out.status.code(), Some(0), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    let us: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(f64::NAN);
    (elapsed, us / 1e3)
}

/// RSS and PSS (KiB) of each of `n` idle guests of `mode` running at once, once settled.
fn idle_memory(mode: &str, dir: &Path, n: usize) -> Vec<(u64, u64)> {
    let mut children: Vec<_> =
        (0..n).map(|_| command(mode, dir).stdout(Stdio::null()).spawn().expect("spawn")).collect();
    // Settled once no guest's RSS grew for a second (a booted one first fills its 32 MiB,
    // which under PVM's shadow paging takes seconds), at most 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last: Vec<(u64, u64)> = Vec::new();
    let mem = loop {
        std::thread::sleep(Duration::from_secs(1));
        let now: Vec<(u64, u64)> = children.iter().map(|c| smaps_rollup_kib(c.id())).collect();
        let grew = now.iter().zip(&last).any(|(n, l)| n.0 > l.0) || last.is_empty();
        if !grew || Instant::now() >= deadline {
            break now;
        }
        last = now;
    };
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    mem
}

fn parent() {
    let rounds: usize = std::env::var("RESTORE_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let warmup: usize = std::env::var("RESTORE_WARMUP").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    make_template(false, &dir.join("reset"));
    make_template(true, &dir.join("idle"));
    println!("restore benchmark: {MEMORY_MIB} MiB guest, {} MiB of it written before the snapshot", PAGES / 256);
    println!("{rounds} rounds after {warmup} warm-up rounds, interleaved, order alternating");
    let (mut boot, mut boot_timer, mut restore, mut restore_timer) = (vec![], vec![], vec![], vec![]);
    for round in 0..warmup + rounds {
        let order = if round % 2 == 0 { ["boot", "restore"] } else { ["restore", "boot"] };
        for mode in order {
            let (total, timer) = time_run(command(mode, dir));
            if round < warmup {
                continue;
            }
            if mode == "boot" {
                boot.push(total);
                boot_timer.push(timer);
            } else {
                restore.push(total);
                restore_timer.push(timer);
            }
        }
    }
    println!("boot    spawn→exit median {:7.2} ms, start→boot timer {:7.2} ms", median(&boot), median(&boot_timer));
    println!(
        "restore spawn→exit median {:7.2} ms, start→boot timer {:7.2} ms",
        median(&restore),
        median(&restore_timer)
    );
    println!(
        "restore / boot: spawn→exit {:.3}, start→boot timer {:.3}",
        median(&restore) / median(&boot),
        median(&restore_timer) / median(&boot_timer)
    );
    let booted = idle_memory("boot-idle", dir, 1);
    let restored = idle_memory("restore-idle", dir, 3);
    let mib = |k: u64| k as f64 / 1024.0;
    println!("idle booted VMM: RSS {:.1} MiB, PSS {:.1} MiB", mib(booted[0].0), mib(booted[0].1));
    let pss: Vec<String> = restored.iter().map(|m| format!("{:.1}", mib(m.1))).collect();
    let rss: Vec<String> = restored.iter().map(|m| format!("{:.1}", mib(m.0))).collect();
    println!("three idle restored VMMs at once: RSS {} MiB, PSS {} MiB", rss.join(" / "), pss.join(" / "));
    let mean_pss = restored.iter().map(|m| m.1 as f64).sum::<f64>() / restored.len() as f64;
    println!("restored / booted PSS: {:.3}", mean_pss / booted[0].1 as f64);
}

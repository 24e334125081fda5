//! Container start cost, twinbox against runc and crun on one busybox bundle, with
//! `unshare --pid --fork --mount --uts --ipc --net /bin/true` as the floor, and
//! `twinbox run --rm hello true` end to end. Backends are interleaved round by round (order
//! rotated each round), warm-up rounds dropped, medians reported; then memory per idle
//! container (N detached `sleep`s: PSS of every process left + kernel Slab/PageTables/
//! KernelStack growth, per container, each reading once the kernel has finished freeing).
//!
//! `cargo bench -p twinbox-runc --bench start` as root. `TWINBOX_BENCH_ROUNDS` (default 60),
//! `TWINBOX_BENCH_IDLE` (default 50; 0 skips the memory part). The statically linked build of
//! scripts/build-static-runc.sh is measured too when it is there. crun refuses this host's
//! cgroup v1/v2 hybrid, so it runs with a private mount namespace in which a tmpfs hides
//! /sys/fs/cgroup/unified (set up in the forked child before exec, so crun pays no extra exec).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Backend {
    name: &'static str,
    argv: Vec<String>,
    hide_unified: bool,
}

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

fn hybrid() -> bool {
    Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() && Path::new("/sys/fs/cgroup/memory").exists()
}

fn bundle(dir: &Path, args: &[&str]) -> PathBuf {
    let b = dir.join(format!("bundle-{}", args.join("-").replace('/', "_")));
    let bin = b.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for a in ["sh", "true", "sleep"] {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(a));
    }
    for d in ["proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(b.join("rootfs").join(d)).unwrap();
    }
    let mut spec = oci_spec::runtime::Spec::default();
    let mut p = spec.process().clone().unwrap();
    p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    p.set_terminal(Some(false));
    spec.set_process(Some(p));
    spec.set_hostname(Some("bench".into()));
    let mut root = spec.root().clone().unwrap();
    root.set_path("rootfs".into());
    spec.set_root(Some(root));
    std::fs::write(b.join("config.json"), serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    b
}

/// Run `cmd` in its own mount namespace with a tmpfs over /sys/fs/cgroup/unified, so crun
/// sees a plain cgroup v1 host instead of the hybrid it refuses. Done in the forked child
/// before exec, so it costs an unshare, not another program start.
fn hide_unified_cgroup2(cmd: &mut Command) {
    use nix::mount::{mount, MsFlags};
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)?;
            mount(Some("tmpfs"), "/sys/fs/cgroup/unified", Some("tmpfs"), MsFlags::empty(), None::<&str>)?;
            Ok(())
        });
    }
}

/// Wall time and CPU time (user+sys of the whole process tree) of one run.
fn measure(b: &Backend, id: &str) -> Option<(Duration, Duration)> {
    let mut argv: Vec<String> = b.argv.iter().map(|a| a.replace("{id}", id)).collect();
    let prog = argv.remove(0);
    let mut cmd = Command::new(prog);
    cmd.args(&argv).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    if b.hide_unified {
        hide_unified_cgroup2(&mut cmd);
    }
    let before = children_cpu();
    let t = Instant::now();
    let status = cmd.status().ok()?;
    let wall = t.elapsed();
    let cpu = children_cpu().saturating_sub(before);
    status.success().then_some((wall, cpu))
}

fn children_cpu() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let tv = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(u.user_time()) + tv(u.system_time())
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Slab + PageTables + KernelStack + Percpu, in KiB.
fn kernel_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .filter(|l| ["Slab:", "PageTables:", "KernelStack:", "Percpu:"].iter().any(|k| l.starts_with(k)))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// [`kernel_kib`] once it stops moving (the kernel frees exited containers' namespaces and
/// tasks some time after they exit: two readings 200 ms apart within 256 KiB, at most 5 s),
/// after asking every slab cache to give back its empty slabs, so that `Slab` counts live
/// objects' pages (without that, one set of 50 containers read 150 or 320 KiB each).
fn settled_kernel_kib() -> u64 {
    let start = Instant::now();
    let mut last = kernel_kib();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = kernel_kib();
        if now.abs_diff(last) < 256 || start.elapsed() >= Duration::from_secs(5) {
            break;
        }
        last = now;
    }
    for e in std::fs::read_dir("/sys/kernel/slab").into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::write(e.path().join("shrink"), "1");
        }
    }
    kernel_kib()
}

/// Sum of PSS (KiB) of every process whose command line contains `marker`, and how many.
fn pss_kib(marker: &str) -> (u64, usize) {
    let mut total = 0;
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        if !String::from_utf8_lossy(&cmd).contains(marker) {
            continue;
        }
        if let Ok(r) = std::fs::read_to_string(e.path().join("smaps_rollup")) {
            if let Some(kb) =
                r.lines().find(|l| l.starts_with("Pss:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            {
                total += kb;
                n += 1;
            }
        }
    }
    (total, n)
}

/// Memory per idle container: start `n` detached `sleep` containers with `runtime`, measure,
/// remove them. Returns (KiB per container: PSS, kernel) and the processes found.
fn idle_memory(name: &str, argv0: &[String], hide_unified: bool, dir: &Path, n: usize) -> Option<(f64, f64, usize)> {
    let marker = format!("{}", 424_242 + n);
    let b = bundle(dir, &["/bin/sleep", &marker]);
    let state = dir.join(format!("idle-{}", name.replace(' ', "_")));
    let run = |args: &[&str]| -> bool {
        let mut cmd = Command::new(&argv0[0]);
        cmd.args(&argv0[1..])
            .arg("--root")
            .arg(&state)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if hide_unified {
            hide_unified_cgroup2(&mut cmd);
        }
        cmd.status().is_ok_and(|s| s.success())
    };
    let k0 = settled_kernel_kib();
    let mut ok = true;
    for i in 0..n {
        ok &= run(&["run", "-d", "-b", b.to_str().unwrap(), &format!("idle-{i}")]);
    }
    let k1 = settled_kernel_kib();
    let (pss, procs) = pss_kib(&marker);
    for i in 0..n {
        run(&["kill", &format!("idle-{i}"), "KILL"]);
    }
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..n {
        run(&["delete", "--force", &format!("idle-{i}")]);
    }
    ok.then(|| (pss as f64 / n as f64, k1.saturating_sub(k0) as f64 / n as f64, procs))
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("start bench: needs root (namespaces, cgroups); skipped");
        return;
    }
    let rounds: usize = std::env::var("TWINBOX_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let warmup = 5;
    let dir = tempfile::tempdir().unwrap();
    let b = bundle(dir.path(), &["/bin/true"]);
    let bs = b.to_str().unwrap().to_owned();
    let state = dir.path().join("state");
    let st = state.to_str().unwrap().to_owned();
    // An OCI runtime's `run` of the bundle, with its own state root.
    let oci = |name: &'static str, bin: &str, hide_unified: bool| Backend {
        name,
        argv: [bin, "--root", &format!("{st}/{}", name.replace(' ', "_")), "run", "-b", &bs, "{id}"]
            .map(String::from)
            .to_vec(),
        hide_unified,
    };
    let mut backends = vec![oci("twinbox-runc", env!("CARGO_BIN_EXE_twinbox-runc"), false)];
    // The same runtime linked statically (scripts/build-static-runc.sh), when built.
    let static_runc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/runc-static/twinbox-runc");
    if static_runc.exists() {
        backends.push(oci("twinbox-runc (static)", &static_runc.display().to_string(), false));
    } else {
        println!("twinbox-runc (static): not built (scripts/build-static-runc.sh)");
    }
    for (peer, hide_unified) in [("runc", false), ("crun", hybrid())] {
        if have(peer) {
            backends.push(oci(peer, peer, hide_unified));
        } else {
            println!("{peer}: not installed (apt-get install {peer})");
        }
    }
    backends.push(Backend {
        name: "unshare (floor)",
        argv: ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net", "/bin/true"]
            .map(String::from)
            .to_vec(),
        hide_unified: false,
    });
    let twinbox = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/twinbox");
    if twinbox.exists() {
        backends.push(Backend {
            name: "twinbox run --rm hello true",
            // Loopback only, as the bundles above.
            argv: vec![
                twinbox.display().to_string(),
                "run".into(),
                "--rm".into(),
                "--network".into(),
                "none".into(),
                "hello".into(),
                "true".into(),
            ],
            hide_unified: false,
        });
    } else {
        println!("twinbox run: target/release/twinbox not built (cargo build --release)");
    }

    let mut wall: Vec<Vec<Duration>> = vec![Vec::new(); backends.len()];
    let mut cpu: Vec<Vec<Duration>> = vec![Vec::new(); backends.len()];
    let mut failures = vec![0usize; backends.len()];
    for round in 0..rounds + warmup {
        for k in 0..backends.len() {
            let i = (k + round) % backends.len();
            match measure(&backends[i], &format!("bench-{round}-{i}")) {
                Some((w, c)) if round >= warmup => {
                    wall[i].push(w);
                    cpu[i].push(c);
                }
                Some(_) => {}
                None => failures[i] += 1,
            }
        }
    }
    println!("start of /bin/true, {rounds} rounds interleaved ({warmup} warm-up dropped), medians:");
    let crun = backends.iter().position(|b| b.name == "crun");
    let floor = backends.iter().position(|b| b.name.starts_with("unshare"));
    let med: Vec<(f64, f64)> = (0..backends.len())
        .map(|i| {
            if wall[i].is_empty() {
                (f64::NAN, f64::NAN)
            } else {
                (ms(median(&mut wall[i])), ms(median(&mut cpu[i])))
            }
        })
        .collect();
    for (i, b) in backends.iter().enumerate() {
        let (w, c) = med[i];
        let vs = |j: Option<usize>| j.map(|j| format!("{:.2}x", w / med[j].0)).unwrap_or_else(|| "-".into());
        println!(
            "  {:<30} wall {:>7.2} ms  cpu {:>7.2} ms  vs crun {:>6}  vs floor {:>6}  failures {}",
            b.name,
            w,
            c,
            vs(crun),
            vs(floor),
            failures[i]
        );
    }

    let n: usize = std::env::var("TWINBOX_BENCH_IDLE").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    if n == 0 {
        return;
    }
    println!(
        "memory per idle container ({n} detached `sleep`s; PSS of what is left running + kernel Slab/PageTables/KernelStack/\
         Percpu growth; one unmeasured warm-up round, then 5 rounds in rotated order, medians):"
    );
    let peers: Vec<&Backend> = backends.iter().filter(|b| matches!(b.name, "twinbox-runc" | "runc" | "crun")).collect();
    // Slab caches grow on first use and keep partly empty pages afterwards: warm every backend
    // up once so none pays for the others' growth.
    for b in &peers {
        idle_memory(b.name, std::slice::from_ref(&b.argv[0]), b.hide_unified, dir.path(), n);
    }
    let mut per: Vec<Vec<(f64, f64, usize)>> = vec![Vec::new(); peers.len()];
    for round in 0..5 {
        for k in 0..peers.len() {
            let i = (k + round) % peers.len();
            let b = peers[i];
            if let Some(m) = idle_memory(b.name, std::slice::from_ref(&b.argv[0]), b.hide_unified, dir.path(), n) {
                per[i].push(m);
            }
        }
    }
    for (b, ms) in peers.iter().zip(per.iter_mut()) {
        if ms.is_empty() {
            println!("  {:<30} failed to start {n} containers", b.name);
            continue;
        }
        let mid = |f: fn(&(f64, f64, usize)) -> f64, v: &[(f64, f64, usize)]| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let (pss, kern) = (mid(|m| m.0, ms), mid(|m| m.1, ms));
        println!(
            "  {:<30} PSS {:>7.0} KiB  kernel {:>7.0} KiB  total {:>7.0} KiB  ({} processes)",
            b.name,
            pss,
            kern,
            pss + kern,
            ms[0].2
        );
    }
}

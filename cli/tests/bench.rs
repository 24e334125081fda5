//! `twinbox bench`: compare's exit codes on synthetic results, the missing-image hint, and one
//! real `--quick` run (root, the default image built into a temporary store).

mod common;

use std::path::Path;

use common::{hello_context, require_root, Env};
use serde_json::{json, Value};

/// A results.json with one metric whose samples are `center` ± 5%.
fn results(center: f64, seed: u64) -> Value {
    let mut x = seed | 1;
    let samples: Vec<f64> = (0..30)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            center * (0.95 + 0.1 * (x % 1000) as f64 / 1000.0)
        })
        .collect();
    let context = json!({
        "rev": "abc1234", "dirty": false, "date": "2025-01-01T00:00:00+00:00", "host": "h", "kernel": "k",
        "cpus": 2, "cpu_model": "cpu", "mem_total_kib": 1, "cgroup_layout": "cgroup v2",
        "virtualization": {"kind": "pvm", "detail": "test"}
    });
    json!({
        "schema": "twinbox-bench/1",
        "context": context,
        "settings": {"image": "hello:latest", "scenarios": ["start"], "backends": [], "quick": true,
                     "start_runs": 30, "cpu_runs": 3, "warmup": 2, "instances": 10, "max": 10, "cpu_target_ms": 150},
        "interrupted": false,
        "backends": [{"name": "crun", "isolation": "container", "available": true}],
        "records": [{
            "backend": "crun", "scenario": "start", "metric": "end_to_end", "unit": "ms", "better": "lower",
            "description": "d", "samples": samples, "warmup_dropped": 2, "failures": 0, "summary": null,
            "context": context
        }],
        "notes": []
    })
}

fn write(env: &Env, name: &str, v: &Value) -> String {
    let p = env.path(name);
    std::fs::write(&p, serde_json::to_vec(v).unwrap()).unwrap();
    p.display().to_string()
}

#[test]
fn compare_exits_non_zero_on_a_significant_regression_only() {
    let env = Env::new();
    let base = write(&env, "base.json", &results(10.0, 1));
    let same = write(&env, "same.json", &results(10.0, 7));
    let slow = write(&env, "slow.json", &results(12.0, 9));
    let a_a = env.run(&["bench", "compare", &base, &same]);
    assert_eq!(a_a.status.code(), Some(0), "{}", String::from_utf8_lossy(&a_a.stdout));
    let reg = env.run(&["bench", "compare", &base, &slow, "--max-regression", "10%"]);
    assert_eq!(reg.status.code(), Some(2), "{}", String::from_utf8_lossy(&reg.stdout));
    assert!(String::from_utf8_lossy(&reg.stdout).contains("REGRESSED"));
    // A 20% slowdown under a 25% threshold passes.
    let lenient = env.run(&["bench", "compare", &base, &slow, "--max-regression", "25%"]);
    assert_eq!(lenient.status.code(), Some(0));
    // Not a results file: a user error.
    std::fs::write(env.path("junk.json"), "{}").unwrap();
    let junk = env.run(&["bench", "compare", &base, &env.path("junk.json").display().to_string()]);
    assert_eq!(junk.status.code(), Some(1), "{}", String::from_utf8_lossy(&junk.stderr));
}

/// A gate that compares nothing, or misses what the base measured, fails (it used to pass on an
/// empty results file).
#[test]
fn compare_fails_when_the_new_run_misses_what_the_base_measured() {
    let env = Env::new();
    let base = write(&env, "base.json", &results(10.0, 1));
    let mut empty = results(10.0, 3);
    empty["records"] = json!([]);
    let empty = write(&env, "empty.json", &empty);
    let o = env.run(&["bench", "compare", &base, &empty]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(out.contains("MISSING from the new results: crun/start/end_to_end"), "{out}");
    assert!(out.contains("NOTHING was compared"), "{out}");
    // The same metric with no samples (a backend that failed every round) is missing too.
    let mut hollow = results(10.0, 5);
    hollow["records"][0]["samples"] = json!([]);
    let hollow = write(&env, "hollow.json", &hollow);
    assert_eq!(env.run(&["bench", "compare", &base, &hollow]).status.code(), Some(2));
    // A new run that measured more than the base still passes on what both have.
    let more = write(&env, "more.json", &with(results(10.0, 7), "runc", "end_to_end", 30.0, 11));
    let o = env.run(&["bench", "compare", &base, &more]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
}

/// `results(..)` with one more start record, `backend`'s `metric` centred on `center`.
fn with(mut v: Value, backend: &str, metric: &str, center: f64, seed: u64) -> Value {
    let mut extra = results(center, seed)["records"][0].clone();
    extra["backend"] = json!(backend);
    extra["metric"] = json!(metric);
    v["records"].as_array_mut().unwrap().push(extra);
    v
}

/// `results(center, seed)` with a second metric, start/launch_cpu, centred on `cpu`.
fn with_launch_cpu(v: Value, cpu: f64, seed: u64) -> Value {
    with(v, "crun", "launch_cpu", cpu, seed)
}

#[test]
fn compare_and_spread_look_only_at_the_selected_metrics() {
    let env = Env::new();
    // end_to_end 20 % slower, launch_cpu the same.
    let base = write(&env, "base.json", &with_launch_cpu(results(10.0, 1), 5.0, 3));
    let slow = write(&env, "slow.json", &with_launch_cpu(results(12.0, 9), 5.0, 11));
    let code = |args: &[&str]| {
        let o = env.run(&[&["bench", "compare", &base, &slow][..], args].concat());
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(code(&[]).0, Some(2), "unfiltered, the end_to_end regression counts");
    let (c, out, _) = code(&["--metrics", "launch_cpu"]);
    assert_eq!(c, Some(0), "{out}");
    assert!(out.contains("launch_cpu") && !out.contains("end_to_end"), "{out}");
    assert_eq!(code(&["--metrics", "start/end_to_end", "--backends", "crun"]).0, Some(2));
    assert_eq!(code(&["--metrics", "memory/end_to_end"]).0, Some(1), "scenario and metric must both match");
    // A name that selects nothing is an error that lists what there is, not a silent pass.
    let (c, _, err) = code(&["--metrics", "lunch_cpu"]);
    assert_eq!(c, Some(1));
    assert!(err.contains("\"lunch_cpu\"") && err.contains("start/launch_cpu"), "{err}");
    let (c, _, err) = code(&["--backends", "runc"]);
    assert_eq!(c, Some(1));
    assert!(err.contains("\"runc\"") && err.contains("crun"), "{err}");
    // spread: only the selected metric's row.
    let o = env.run(&["bench", "spread", &base, &slow, "--metrics", "launch_cpu"]);
    assert_eq!(o.status.code(), Some(0));
    let rows = String::from_utf8_lossy(&o.stdout);
    assert!(rows.contains("launch_cpu") && !rows.contains("end_to_end"), "{rows}");
}

#[test]
fn compare_relative_to_the_process_takes_out_a_host_that_got_slower() {
    let env = Env::new();
    // Everything 20 % slower in the second run, the bare process too: the host, not crun.
    let base =
        write(&env, "base.json", &with_launch_cpu(with(results(10.0, 1), "process", "end_to_end", 0.5, 2), 5.0, 3));
    let slow =
        write(&env, "slow.json", &with_launch_cpu(with(results(12.0, 9), "process", "end_to_end", 0.6, 4), 5.0, 11));
    let o = env.run(&["bench", "compare", &base, &slow]);
    assert_eq!(o.status.code(), Some(2), "absolute: a regression");
    for extra in [&[][..], &["--backends", "crun"][..]] {
        let o = env.run(&[&["bench", "compare", &base, &slow, "--relative-to", "process"][..], extra].concat());
        let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.status.code(), Some(0), "{out}{err}");
        assert!(out.contains("x process") && out.contains("end_to_end"), "{out}");
        // crun's launch_cpu has no process figure to divide by: named, not silently dropped.
        assert!(err.contains("crun/start/launch_cpu"), "{err}");
    }
    let o = env.run(&["bench", "compare", &base, &slow, "--relative-to", "runc"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("\"runc\""));
}

#[test]
fn a_missing_default_image_says_how_to_build_it() {
    let env = Env::new();
    let o = env.run(&["bench", "--quick", "--out", &env.path("r").display().to_string()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("hello:latest") && err.contains("scripts/default-images.sh"), "{err}");
    assert!(!env.path("r").exists(), "no report without an image");
}

/// The samples of backend `b`'s metric `m` (in scenario `s`, when given) in results `r`; a
/// missing record fails the test with the run's notes.
fn record_samples(r: &Value, b: &str, s: Option<&str>, m: &str) -> Vec<f64> {
    r["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["backend"] == b && x["metric"] == m && s.is_none_or(|s| x["scenario"] == s))
        .unwrap_or_else(|| {
            panic!("no {b} {}{m} record; notes: {}", s.map(|s| format!("{s}/")).unwrap_or_default(), r["notes"])
        })["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn hello_processes() -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else { return 0 };
    rd.flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            c.split(|b| *b == 0).next().is_some_and(|a| Path::new(&*String::from_utf8_lossy(a)).ends_with("hello"))
        })
        .count()
}

/// The tests that run the harness count the `hello` processes on the host and look at its
/// networks: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// As root, a temporary store, and the harness to itself while the guard lives; None (skip)
/// otherwise.
fn root_store() -> Option<(std::sync::MutexGuard<'static, ()>, Env)> {
    if !require_root() {
        return None;
    }
    Some((SERIAL.lock().unwrap_or_else(|e| e.into_inner()), Env::new()))
}

/// [`root_store`] with the default image built in it.
fn hello_store() -> Option<(std::sync::MutexGuard<'static, ()>, Env)> {
    let (serial, env) = root_store()?;
    let ctx = env.path("hello");
    if !hello_context(&ctx) {
        return None;
    }
    env.ok(&["build", "-q", "-t", "hello:latest", &ctx.display().to_string()]);
    Some((serial, env))
}

#[test]
fn quick_start_run_end_to_end() {
    let Some((_serial, env)) = hello_store() else { return };
    let before = hello_processes();
    let out = env.path("report");
    let o = env.run(&[
        "bench",
        "--quick",
        "--scenario",
        "start",
        "--backends",
        "process,twinbox-container,firecracker",
        "--runs",
        "5",
        "--out",
        &out.display().to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "bench failed: {}", String::from_utf8_lossy(&o.stderr));
    let printed: Value = serde_json::from_slice(&o.stdout).expect("--json prints results.json");
    let written: Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(printed["records"], written["records"]);
    for f in ["report.md", "report.html"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(written["schema"], "twinbox-bench/1");
    for b in ["process", "twinbox-container"] {
        for m in ["time_to_workload", "end_to_end", "launch_cpu"] {
            let rec = written["records"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["backend"] == b && r["metric"] == m)
                .unwrap_or_else(|| panic!("no {b} {m} record"));
            assert_eq!(rec["samples"].as_array().unwrap().len(), 5, "{b} {m}: 5 measured runs");
            assert_eq!(rec["warmup_dropped"], 2);
            for k in ["rev", "date", "host", "kernel", "cgroup_layout", "virtualization"] {
                assert!(!rec["context"][k].is_null(), "{b} {m}: context.{k} missing");
            }
        }
    }
    // The image store's filesystem is recorded: it changes launch times (journal-less ext4).
    let fs = &written["context"]["store_fs"];
    assert!(fs["fs_type"].as_str().is_some_and(|t| !t.is_empty()), "context.store_fs: {fs}");
    let fc = written["backends"].as_array().unwrap().iter().find(|b| b["name"] == "firecracker").unwrap();
    assert_eq!(fc["available"], false);
    assert!(!fc["reason"].as_str().unwrap().is_empty());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("firecracker") && md.contains(fc["reason"].as_str().unwrap()));
    // Nothing left running, no container left behind.
    assert!(hello_processes() <= before, "hello processes left behind");
    let ps = env.ok(&["ps", "-a"]);
    assert_eq!(ps.lines().count(), 1, "containers left: {ps}");
}

/// The net scenario through each backend's published port, and nothing of the networks left:
/// no container, no CNI namespace or bridge, no port forwarding table.
#[test]
fn net_scenario_end_to_end() {
    let Some((_serial, env)) = hello_store() else { return };
    if !common::require(
        std::path::Path::new("/usr/lib/cni/portmap").exists(),
        "the CNI plugins are not installed (apt-get install containernetworking-plugins)",
    ) || !common::require_tool("runc")
    {
        return;
    }
    let before = hello_processes();
    let out = env.path("report");
    let o = env.run(&[
        "bench",
        "--quick",
        "--scenario",
        "net",
        "--backends",
        "process,twinbox-container,runc",
        "--out",
        &out.display().to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "bench failed: {}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let samples = |b: &str, m: &str| record_samples(&r, b, None, m);
    for b in ["process", "twinbox-container", "runc"] {
        assert_eq!(samples(b, "time_to_ready").len(), 3, "{b}: one per round");
        assert_eq!(samples(b, "latency_keepalive").len(), 900, "{b}");
        assert_eq!(samples(b, "latency_new_connection").len(), 300, "{b}");
        assert!(samples(b, "throughput").iter().all(|&t| t > 0.0), "{b}");
    }
    for b in ["twinbox-container", "runc"] {
        assert_eq!(samples(b, "network_start_cost").len(), 9, "{b}: 3 pairs × 3 rounds");
        assert_eq!(samples(b, "start_published").len(), 9, "{b}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Network through a published port") && md.contains("**Network.**"), "{md}");
    assert!(hello_processes() <= before, "hello processes left behind");
    assert_eq!(env.ok(&["ps", "-aq"]).trim(), "", "no container left");
    assert!(!std::path::Path::new("/sys/class/net/tb-bench-cni").exists(), "the CNI bridge is removed");
    let mut nft = twinbox_engine::network::nft::Nft::open().unwrap();
    let tables: Vec<String> = nft.tables().unwrap().into_iter().map(|(n, _)| n).collect();
    assert!(!tables.iter().any(|t| t.starts_with("twinbox-c-")), "{tables:?}");
    env.ok(&["network", "prune"]);
}

/// The disk scenario in the root and in a volume of each backend, and the volumes gone after.
#[test]
fn disk_scenario_end_to_end() {
    let Some((_serial, env)) = hello_store() else { return };
    if !common::require_tool("runc") {
        return;
    }
    let out = env.path("report");
    let o = env.run(&[
        "bench",
        "--quick",
        "--scenario",
        "disk",
        "--backends",
        "process,twinbox-container,runc",
        "--runs",
        "2",
        "--out",
        &out.display().to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "bench failed: {}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let samples = |b: &str, m: &str| record_samples(&r, b, None, m);
    for b in ["process", "twinbox-container", "runc"] {
        for place in ["root", "volume"] {
            for m in ["seq_write", "seq_read", "rand_write_iops", "rand_write_p99", "rand_read_iops", "rand_read_p99"] {
                let s = samples(b, &format!("{place}_{m}"));
                assert_eq!(s.len(), 2, "{b} {place}_{m}: one per round");
                assert!(s.iter().all(|&v| v > 0.0), "{b} {place}_{m}: {s:?}");
            }
        }
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Disk I/O") && md.contains("**Disk.**"), "{md}");
    assert_eq!(env.ok(&["volume", "ls", "-q"]).trim(), "", "the bench's volume is removed");
    assert_eq!(env.ok(&["ps", "-aq"]).trim(), "", "no container left");
}

/// Where this host's KVM cannot boot Linux (PVM here; on a hardware-KVM host /dev/kvm is hidden
/// in a private mount namespace first), `twinbox bench` measures the microVMs in the nested L1
/// by itself, and the report's first table has both models.
#[test]
fn bench_measures_microvms_in_a_nested_l1_by_itself() {
    let Some((_serial, env)) = hello_store() else { return };
    // scripts/nested-bench.sh builds (or finds cached) the guest kernel and the L1's.
    if !common::require_tool("qemu-system-x86_64") {
        return;
    }
    let out = env.path("report");
    let r = bench_without_kvm(
        &env,
        "--quick --scenario start --backends process,twinbox-container,twinbox-microvm --runs 3",
        &out,
    );
    let nested = &r["nested"];
    assert_eq!(nested["context"]["virtualization"]["kind"], "nested-tcg", "{}", r["notes"]);
    let vm_start = nested["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["backend"] == "twinbox-microvm" && x["metric"] == "time_to_workload")
        .unwrap_or_else(|| panic!("no nested microVM start figure: {}", nested["notes"]));
    assert!(!vm_start["samples"].as_array().unwrap().is_empty());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let first_table = md.lines().find(|l| l.starts_with('|')).unwrap();
    assert!(
        first_table.contains("twinbox-container") && first_table.contains("twinbox-microvm (nested, emulated)"),
        "{first_table}"
    );
}

/// `twinbox bench ARGS --out OUT --json` on a host whose KVM cannot boot Linux: this one if it
/// is PVM (or has none), else the same in a private mount namespace with a /dev of its own
/// without kvm, as a host without it has. Its results.
fn bench_without_kvm(env: &Env, args: &str, out: &Path) -> Value {
    let pvm = Path::new("/sys/module/kvm_pvm").exists() || !Path::new("/dev/kvm").exists();
    let bench = format!(
        "exec {} --root {} bench {args} --out {} --json",
        env!("CARGO_BIN_EXE_twinbox"),
        env.root().display(),
        out.display()
    );
    let hide = "mount --make-rprivate / && mount -t tmpfs -o mode=755 tmpfs /dev && \
                for n in 'null 1 3' 'zero 1 5' 'full 1 7' 'random 1 8' 'urandom 1 9' 'tty 5 0'; do \
                set -- $n; mknod -m 666 /dev/$1 c $2 $3; done && ";
    let script = if pvm { bench } else { format!("{hide}{bench}") };
    let o = std::process::Command::new("unshare").args(["-m", "bash", "-c", &script]).output().unwrap();
    assert!(o.status.success(), "bench failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// busybox:latest as scripts/default-images.sh makes it (with the applets given), then the web
/// image from its Dockerfile in examples/web; false (skipped) without busybox.
fn web_image(env: &Env, applets: &[&str]) -> bool {
    let bb = env.path("busybox");
    if !common::busybox_rootfs(&bb, applets) {
        return false;
    }
    let examples = common::workspace().join("examples");
    std::fs::copy(examples.join("busybox/Dockerfile"), bb.join("Dockerfile")).unwrap();
    env.ok(&["build", "-q", "-t", "busybox:latest", &bb.display().to_string()]);
    env.ok(&["build", "-q", "-t", "web", &examples.join("web").display().to_string()]);
    true
}

#[test]
fn own_image_in_both_models_with_the_microvms_in_a_nested_l1() {
    let Some((_serial, env)) = root_store() else { return };
    if !common::require_tool("qemu-system-x86_64") || !web_image(&env, &["httpd", "sh"]) {
        return;
    }
    let out = env.path("report");
    let r = bench_without_kvm(
        &env,
        "--quick --image web --ready http://:8080/ --scenario start --backends twinbox-container,twinbox-microvm \
         --runs 2",
        &out,
    );
    let ready = record_samples(&r, "twinbox-container", Some("start"), "time_to_ready");
    assert_eq!(ready.len(), 2, "{}", r["notes"]);
    let nested = &r["nested"];
    assert_eq!(nested["context"]["virtualization"]["kind"], "nested-tcg", "{}", r["notes"]);
    assert_eq!(nested["settings"]["image"], "web");
    for b in ["twinbox-container", "twinbox-microvm"] {
        let ready = record_samples(nested, b, Some("start"), "time_to_ready");
        assert_eq!(ready.len(), 2, "{b} in the L1: {}", nested["notes"]);
        assert!(ready.iter().all(|&t| t > 0.0), "{b}: {ready:?}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let first_table = md.lines().find(|l| l.starts_with('|')).unwrap();
    assert!(first_table.contains("twinbox-microvm (nested, emulated)"), "{first_table}");
}

#[test]
fn density_stops_at_the_memory_budget() {
    let Some((_serial, env)) = hello_store() else { return };
    let before = hello_processes();
    let out = env.path("report");
    let o = env.run(&[
        "bench",
        "--scenario",
        "density",
        "--backends",
        "process,twinbox-container",
        "--max",
        "200",
        "--memory-budget",
        "6m",
        "--out",
        &out.display().to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "bench failed: {}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let memory = r["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["backend"] == "process" && x["metric"] == "host_memory")
        .expect("a host_memory record");
    let samples: Vec<f64> = memory["samples"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(samples.len() < 200, "the budget stopped it before --max: {} instances", samples.len());
    assert!(*samples.last().unwrap() >= 6.0, "it stopped because the budget was reached: {samples:?}");
    assert!(samples[..samples.len() - 1].iter().all(|&m| m < 6.0), "not before: {samples:?}");
    // The CPU a launch cost: for a launcher that exits (twinbox run -d), one sample per
    // instance; none for the bare process, whose cost stays with the instance it is.
    let record = |b: &str, m: &str| {
        r["records"].as_array().unwrap().iter().find(|x| x["backend"] == b && x["metric"] == m).cloned()
    };
    let launched = record("twinbox-container", "launch_latency").expect("twinbox-container launch_latency");
    let cpu = record("twinbox-container", "launch_cpu").expect("twinbox-container launch_cpu");
    let cpu: Vec<f64> = cpu["samples"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(cpu.len(), launched["samples"].as_array().unwrap().len(), "one launch_cpu per launch");
    assert!(cpu.iter().all(|&c| c > 0.0), "every launch costs CPU: {cpu:?}");
    assert!(record("process", "launch_cpu").is_none(), "no launch_cpu for the bare process");
    let notes = r["notes"].to_string();
    assert!(notes.contains("of the 6 MiB budget"), "{notes}");
    assert_eq!(r["settings"]["memory_budget_mib"], 6);
    assert!(hello_processes() <= before, "hello processes left behind");
    let ps = env.ok(&["ps", "-a"]);
    assert_eq!(ps.lines().count(), 1, "containers left: {ps}");
}

/// scripts/journaled-state.sh: the bench inside it records the containers' files on a
/// journaled ext4 (so its report has no journal-less caveat), and nothing is left after it.
#[test]
fn journaled_state_moves_container_files_to_a_journaled_ext4() {
    let Some((_serial, env)) = hello_store() else { return };
    if !common::require_tool("mkfs.ext4")
        || !common::require(Path::new("/dev/loop-control").exists(), "no loop devices")
    {
        return;
    }
    let leftovers = || -> Vec<String> {
        let tmp = std::fs::read_dir("/var/tmp").map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("twinbox-journaled."))
                .collect::<Vec<_>>()
        });
        let loops = std::process::Command::new("losetup").arg("-a").output().map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("twinbox-journaled."))
                .map(String::from)
                .collect()
        });
        [tmp.unwrap_or_default(), loops.unwrap_or_default()].concat()
    };
    let before = leftovers();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/journaled-state.sh");
    let out = env.path("report");
    let o = std::process::Command::new(&script)
        .args(["--size", "256M", "--"])
        .arg(env!("CARGO_BIN_EXE_twinbox"))
        .args(["bench", "--quick", "--scenario", "start", "--backends", "twinbox-container", "--runs", "3", "--out"])
        .arg(&out)
        .env("TWINBOX_ROOT", env.root())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let written: Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let fs = &written["context"]["store_fs"];
    assert_eq!((&fs["fs_type"], &fs["journal"]), (&json!("ext4"), &json!(true)), "{fs}");
    assert!(fs["path"].as_str().unwrap().ends_with("/store/containers"), "{fs}");
    assert!(fs["source"].as_str().unwrap().starts_with("/dev/loop"), "{fs}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(!md.contains("This host's filesystem"), "a journaled ext4 needs no caveat");
    assert_eq!(leftovers(), before, "temporary image or loop device left behind");
    // Outside the namespace the store's containers/ is where it was, and empty.
    assert_eq!(std::fs::read_dir(env.root().join("containers")).unwrap().count(), 0);
}

/// Processes of busybox httpd on the host that run (zombies left for pid 1 to reap do not).
fn httpd_processes() -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else { return 0 };
    rd.flatten()
        .filter(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            comm.trim() == "httpd" && state.is_some_and(|s| s != 'Z')
        })
        .count()
}

/// The user's own image, not hello: examples/web (busybox httpd serving a page, `FROM busybox`)
/// built in the test's store and measured with `--ready http://:8080/`: time to ready, memory
/// per ready instance and request latency for each container backend; the bare process, cpu,
/// disk and hello's own metrics listed as not applicable with the reason; nothing left running.
#[test]
fn own_image_with_a_readiness_check_end_to_end() {
    let Some((_serial, env)) = root_store() else { return };
    if !common::require(
        Path::new("/usr/lib/cni/portmap").exists(),
        "the CNI plugins are not installed (apt-get install containernetworking-plugins)",
    ) || !common::require_tool("runc")
    {
        return;
    }
    if !web_image(&env, &["httpd", "sh"]) {
        return;
    }

    // Without --ready, an image that is not hello is refused, saying what to give.
    let o = env.run(&["bench", "--quick", "--image", "web", "--out", &env.path("refused").display().to_string()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("is not the hello image") && err.contains("--ready http://:PORT/PATH, tcp:PORT or log:TEXT"));
    let o = env.run(&["bench", "--quick", "--image", "web", "--ready", "http://localhost:8080/"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("give none (http://:PORT/PATH)"));

    let mut backends = vec!["twinbox-container", "runc"];
    if common::have_tool("crun") {
        backends.push("crun");
    }
    let listed = format!("process,{}", backends.join(","));
    let before = httpd_processes();
    let out = env.path("report");
    let o = env.run(&[
        "bench",
        "--quick",
        "--image",
        "web",
        "--ready",
        "http://:8080/",
        "--scenario",
        "start,memory,net",
        "--backends",
        &listed,
        "--out",
        &out.display().to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "bench failed: {}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let samples = |b: &str, s: &str, m: &str| record_samples(&r, b, Some(s), m);
    for b in &backends {
        let ready = samples(b, "start", "time_to_ready");
        assert_eq!(ready.len(), 10, "{b}: the quick run's rounds: {ready:?}");
        assert!(ready.iter().all(|&t| t > 0.0 && t < 60_000.0), "{b}: {ready:?}");
        let pss = samples(b, "memory", "pss_per_instance");
        assert_eq!(pss.len(), 20, "{b}: 10 instances × 2 rounds");
        assert!(pss.iter().all(|&k| k > 0.0), "{b}: every ready instance holds memory: {pss:?}");
        assert!(samples(b, "memory", "processes_per_instance").iter().all(|&n| n >= 1.0), "{b}");
        assert_eq!(samples(b, "memory", "total_per_instance").len(), 2, "{b}");
        assert_eq!(samples(b, "net", "time_to_ready").len(), 3, "{b}");
        let latency = samples(b, "net", "latency_new_connection");
        assert_eq!(latency.len(), 300, "{b}");
        assert!(latency.iter().all(|&us| us > 0.0), "{b}");
        // hello's own metrics are not there, not made up.
        for (s, m) in [("start", "end_to_end"), ("net", "throughput"), ("net", "exec_latency")] {
            assert!(
                !r["records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["backend"] == *b && x["scenario"] == s && x["metric"] == m),
                "{b}: no {s}/{m} for a foreign image"
            );
        }
    }
    // What does not apply, with the reason, cpu and disk included though not asked for.
    let na = r["not_applicable"].as_array().expect("a not_applicable list");
    let whole = |s: &str| na.iter().find(|n| n["scenario"] == s && n["metrics"].is_null() && n["backend"].is_null());
    for s in ["cpu", "disk"] {
        let n = whole(s).unwrap_or_else(|| panic!("{s} is not listed as not applicable: {na:?}"));
        assert!(n["reason"].as_str().is_some_and(|why| why.contains("hello")), "{n}");
    }
    let start = na.iter().find(|n| n["scenario"] == "start").expect("start's hello metrics listed");
    assert!(start["metrics"].as_array().unwrap().contains(&json!("end_to_end")), "{start}");
    assert!(na.iter().any(|n| n["backend"] == "process"), "{na:?}");
    let process = r["backends"].as_array().unwrap().iter().find(|b| b["name"] == "process").unwrap();
    assert_eq!(process["available"], false);
    assert!(process["reason"].as_str().unwrap().starts_with("not applicable to web: "), "{process}");
    assert_eq!(r["settings"]["ready"], "http://:8080/");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Not applicable to this image") && md.contains("- scenario cpu: "), "{md}");
    assert!(md.contains("**Time to ready.**") && md.contains("--image web --ready 'http://:8080/'"), "{md}");
    // Summary figures for the lead's report.
    for b in &backends {
        let med = |s: &str, m: &str| {
            let mut v = samples(b, s, m);
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        eprintln!(
            "{b}: time_to_ready {:.1} ms, memory total_per_instance {:.0} KiB (pss {:.0} KiB), net time_to_ready {:.1} ms, \
             latency_new_connection {:.0} µs",
            med("start", "time_to_ready"),
            med("memory", "total_per_instance"),
            med("memory", "pss_per_instance"),
            med("net", "time_to_ready"),
            med("net", "latency_new_connection")
        );
    }
    // Nothing left: no server, no container, no CNI bridge or per-container forwarding table.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while httpd_processes() > before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(httpd_processes() <= before, "httpd processes left behind");
    assert_eq!(env.ok(&["ps", "-aq"]).trim(), "", "no container left");
    assert!(!Path::new("/sys/class/net/tb-bench-cni").exists(), "the CNI bridge is removed");
    let mut nft = twinbox_engine::network::nft::Nft::open().unwrap();
    let tables: Vec<String> = nft.tables().unwrap().into_iter().map(|(n, _)| n).collect();
    assert!(!tables.iter().any(|t| t.starts_with("twinbox-c-")), "{tables:?}");
    env.ok(&["network", "prune"]);
}

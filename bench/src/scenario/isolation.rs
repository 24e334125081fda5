//! Isolation: what an instance of each backend can reach of the host kernel, probed from
//! inside (see `twinbox_probe`), once per backend.
//!
//! - A process or a container: `hello isolation` runs as the instance's workload, under the
//!   backend's own namespaces, capabilities and seccomp profile (twinbox's default one; the
//!   bench's runc and crun bundles have none).
//! - A microVM: its workload sees only its guest kernel. What reaches the host kernel is its
//!   VMM: for twinbox, `twinbox microvm-vmm --probe` enters the jail every twinbox VMM enters
//!   and probes as each of its thread kinds (the vCPU thread, which serves the guest's exits,
//!   is the headline); for QEMU, which runs here unconfined as root, the probe run as a root
//!   process.
//!
//! A VM's emulated device types are the device models the backend gives its guest.

use serde_json::Value;

use super::{run_once, Run, Scenario};
use crate::backend::{Backend, Isolation, Workload};
use crate::results::Better;

/// The figures of one probe's JSON object, in record order: (metric, unit, JSON key, what).
const FIGURES: [(&str, &str, &str, &str); 5] = [
    ("syscalls", "calls", "syscalls", "system calls of the host kernel that run when called"),
    ("capabilities", "caps", "capabilities", "capabilities in the effective set"),
    ("device_nodes", "nodes", "devices", "host device nodes visible under /dev"),
    ("proc_sys_files", "files", "proc_sys", "kernel tunables under /proc/sys that open for reading"),
    ("sys_class_entries", "entries", "sys_class", "host devices listed under /sys/class/*"),
];

/// Probes every backend once; records each figure.
pub fn run(run: &mut Run) {
    let bar = run.progress(run.backends.len() as u64, "isolation");
    let scratch = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            run.note(format!("isolation: no scratch directory: {e}"));
            return;
        }
    };
    for b in run.backends {
        bar.set_message(b.name());
        match probe(b.as_ref(), &format!("{}-iso", run.tag), scratch.path()) {
            Ok(json) => record(run, b.as_ref(), &json),
            Err(e) => run.note(format!("isolation: {} could not be probed: {e}", b.name())),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
}

/// The probe's JSON: the instance's own view, or what [`Backend::host_surface_probe`] prints.
fn probe(b: &dyn Backend, id: &str, scratch: &std::path::Path) -> Result<Value, String> {
    let stdout = match b.host_surface_probe() {
        Some(cmd) => {
            let out = cmd.map_err(|e| e.to_string())?.output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "the probe failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
        None => run_once(b, &Workload::Isolation, id, scratch).map_err(|e| e.to_string())?.stdout,
    };
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).ok_or("the probe printed no JSON")?;
    serde_json::from_str(line.trim()).map_err(|e| format!("the probe's JSON: {e}"))
}

/// One figure to record.
#[derive(Debug, Clone, PartialEq)]
struct Figure {
    metric: &'static str,
    unit: &'static str,
    value: f64,
    description: String,
}

/// The figures of `json`: for a jailed VMM (an object per thread kind) the vCPU thread's, with
/// the widest thread's system calls beside them; whether the workload shares the host kernel;
/// a VM's device models.
fn figures(json: &Value, isolation: Isolation, devices: &[&str]) -> Vec<Figure> {
    let (surface, widest, whose) = match json.get("vcpu") {
        Some(vcpu) => {
            let widest = json.as_object().map(|kinds| {
                kinds.values().filter_map(|k| k.get("syscalls").and_then(Value::as_f64)).fold(0.0, f64::max)
            });
            (vcpu, widest, "the VMM's vCPU thread (where the guest's exits are served)")
        }
        None if isolation == Isolation::MicroVm => (json, None, "the VMM process"),
        None => (json, None, "the workload"),
    };
    let probed = surface.get("probed").and_then(Value::as_f64).unwrap_or(0.0);
    let mut out = Vec::new();
    for (metric, unit, key, what) in FIGURES {
        let Some(value) = surface.get(key).and_then(Value::as_f64) else { continue };
        let description = if metric == "syscalls" {
            format!(
                "{what}, for {whose}: each x86_64 number (of {probed}) called with every argument −1; ENOSYS, EPERM \
                 or a seccomp trap count as not reached"
            )
        } else {
            format!("{what}, for {whose}")
        };
        out.push(Figure { metric, unit, value, description });
    }
    if let Some(value) = widest {
        out.push(Figure {
            metric: "syscalls_widest_thread",
            unit: "calls",
            value,
            description: "system calls of the host kernel that run when called, for the VMM thread that may make \
                          the most"
                .into(),
        });
    }
    out.push(Figure {
        metric: "host_kernel_shared",
        unit: "yes=1",
        value: if isolation == Isolation::MicroVm { 0.0 } else { 1.0 },
        description: "1 when the workload's own system calls go to the host kernel, 0 when they go to a guest kernel"
            .into(),
    });
    if !devices.is_empty() {
        out.push(Figure {
            metric: "emulated_device_types",
            unit: "types",
            value: devices.len() as f64,
            description: format!("device models the guest sees ({})", devices.join(", ")),
        });
    }
    out
}

fn record(run: &mut Run, b: &dyn Backend, json: &Value) {
    for f in figures(json, b.isolation(), b.emulated_devices()) {
        run.record(b.name(), Scenario::Isolation, f.metric, f.unit, Better::Lower, &f.description, vec![f.value], 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(figures: &[Figure], metric: &str) -> Option<f64> {
        figures.iter().find(|f| f.metric == metric).map(|f| f.value)
    }

    #[test]
    fn a_jailed_vmm_counts_its_vcpu_thread_and_names_the_widest() {
        let json: Value = serde_json::from_str(
            r#"{"vmm":{"syscalls":70,"probed":380,"capabilities":0,"devices":0,"proc_sys":0,"sys_class":0},
                "vcpu":{"syscalls":40,"probed":380,"capabilities":0,"devices":0,"proc_sys":0,"sys_class":0},
                "io":{"syscalls":30,"probed":380,"capabilities":0,"devices":0,"proc_sys":0,"sys_class":0},
                "watchdog":{"syscalls":20,"probed":380,"capabilities":0,"devices":0,"proc_sys":0,"sys_class":0}}"#,
        )
        .unwrap();
        let f = figures(&json, Isolation::MicroVm, &["a", "b"]);
        assert_eq!(value(&f, "syscalls"), Some(40.0));
        assert_eq!(value(&f, "syscalls_widest_thread"), Some(70.0));
        assert_eq!(value(&f, "host_kernel_shared"), Some(0.0));
        assert_eq!(value(&f, "emulated_device_types"), Some(2.0));
        assert!(f[0].description.contains("vCPU thread") && f[0].description.contains("of 380"));
    }

    #[test]
    fn a_container_counts_its_workload() {
        let json: Value = serde_json::from_str(
            r#"{"syscalls":300,"probed":380,"capabilities":14,"devices":12,"proc_sys":900,"sys_class":40}"#,
        )
        .unwrap();
        let f = figures(&json, Isolation::Container, &[]);
        assert_eq!(value(&f, "syscalls"), Some(300.0));
        assert_eq!(value(&f, "capabilities"), Some(14.0));
        assert_eq!(value(&f, "device_nodes"), Some(12.0));
        assert_eq!(value(&f, "proc_sys_files"), Some(900.0));
        assert_eq!(value(&f, "sys_class_entries"), Some(40.0));
        assert_eq!(value(&f, "host_kernel_shared"), Some(1.0));
        assert_eq!(value(&f, "syscalls_widest_thread"), None);
        assert_eq!(value(&f, "emulated_device_types"), None);
        assert!(f[0].description.contains("for the workload"));
    }
}

//! The network, as a service sees it: `hello serve 8080` in each backend that can have a
//! network, published the way that backend's users publish a port, and a client on the host
//! connecting to 127.0.0.1:PORT:
//!
//! - the bare process listens on the port itself (the floor: loopback);
//! - twinbox-container: `twinbox run -d -p 127.0.0.1:PORT:8080` (DNAT to the container on
//!   twinbox's default bridge);
//! - runc and crun: a network namespace attached by the CNI `bridge` and `portmap` plugins
//!   (see `backend::cni`), the same for both.
//!
//! Per backend and round: `time_to_ready` (launch → first HTTP response through the port),
//! request latency over one kept-alive connection and with a new connection per request (µs),
//! and the throughput of one large response (MB/s), measured with the client and the server on
//! one CPU (see [`Pinned`]); and what attaching the network and publishing a port adds to a
//! foreground start (`network_start_cost`, in pairs with and without). Rounds interleave the
//! backends, the order reversed on odd rounds.
//!
//! The user's own image with `--ready http://:PORT/PATH`: its own entrypoint and cmd, PORT
//! published the same way; `time_to_ready` (launch → the first answer to `GET PATH`, any
//! status) and the two request latencies against PATH (a success or redirect wanted), the
//! kept-alive one only where the server keeps connections open. Throughput (`/bytes/N`), exec
//! (`/hello`) and the start costs (`hello true`) need hello: listed as not applicable.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::net_client;
use super::{free_port, Run, Scenario};
use crate::results::Better;

/// How long an instance may take to answer its first request.
const READY_DEADLINE: Duration = Duration::from_secs(20);

struct Sizes {
    rounds: usize,
    keepalive: usize,
    new_connections: usize,
    bytes: u64,
    /// Foreground starts per round and backend without a network and with one, in pairs.
    start_pairs: usize,
    /// `exec`s into the server per round, where the backend has one.
    execs: usize,
}

#[derive(Default)]
struct Samples {
    ready_ms: Vec<f64>,
    keepalive_us: Vec<f64>,
    new_connection_us: Vec<f64>,
    throughput: Vec<f64>,
    start_none_ms: Vec<f64>,
    start_published_ms: Vec<f64>,
    network_cost_ms: Vec<f64>,
    exec_ms: Vec<f64>,
}

pub fn run(r: &mut Run<'_>) {
    let (q, lean) = (r.settings.quick, r.settings.lean);
    let sizes = if lean && q {
        Sizes { rounds: 1, keepalive: 200, new_connections: 50, bytes: 64 << 20, start_pairs: 1, execs: 2 }
    } else if lean {
        Sizes { rounds: 2, keepalive: 300, new_connections: 100, bytes: 128 << 20, start_pairs: 2, execs: 3 }
    } else if q {
        Sizes { rounds: 3, keepalive: 300, new_connections: 100, bytes: 256 << 20, start_pairs: 3, execs: 5 }
    } else {
        Sizes { rounds: 5, keepalive: 1000, new_connections: 300, bytes: 1 << 30, start_pairs: 5, execs: 5 }
    };
    let servers: Vec<usize> = (0..r.backends.len()).filter(|&k| r.backends[k].serves()).collect();
    if servers.is_empty() {
        return;
    }
    // The user's own image: its check and the path its requests ask for (only HTTP has one).
    let own = match r.image.foreign.as_ref().map(|f| &f.ready) {
        Some(spec @ crate::ready::ReadySpec::Http { path, .. }) => Some((spec.clone(), path.clone())),
        Some(_) => return,
        None => None,
    };
    let bar = r.progress((servers.len() * sizes.rounds) as u64, "net");
    let mut samples: Vec<Option<Samples>> = r.backends.iter().map(|_| Some(Samples::default())).collect();
    let mut closes = vec![false; r.backends.len()];
    'rounds: for round in 0..sizes.rounds {
        let mut order = servers.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for k in order {
            if crate::signal::interrupted() {
                break 'rounds;
            }
            if samples[k].is_none() {
                continue;
            }
            let b = r.backends[k].as_ref();
            bar.set_message(b.name());
            let id = format!("{}-n{}-{round}", r.tag, b.name());
            let measured = match &own {
                Some((spec, path)) => one_round_own(b, spec, path, &id, &sizes).map(|(s, closed)| {
                    closes[k] |= closed;
                    (s, Samples::default())
                }),
                None => one_round(b, &id, &sizes)
                    .and_then(|s| starts(b, &id, &r.image.work, sizes.start_pairs).map(|t| (s, t))),
            };
            match measured {
                Ok((s, t)) => {
                    let acc = samples[k].as_mut().expect("checked above");
                    acc.ready_ms.push(s.ready_ms[0]);
                    acc.keepalive_us.extend(s.keepalive_us);
                    acc.new_connection_us.extend(s.new_connection_us);
                    acc.throughput.extend(s.throughput);
                    acc.start_none_ms.extend(t.start_none_ms);
                    acc.start_published_ms.extend(t.start_published_ms);
                    acc.network_cost_ms.extend(t.network_cost_ms);
                    acc.exec_ms.extend(s.exec_ms);
                }
                Err(e) => {
                    r.note(format!("net: {}: {e}", b.name()));
                    samples[k] = None;
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    for &k in &servers {
        r.backends[k].net_cleanup();
    }
    let (launched, path) = match &own {
        Some((spec, path)) => (
            format!("{}'s own entrypoint and cmd (its port {})", r.image.reference, spec.port().unwrap_or_default()),
            path.clone(),
        ),
        None => ("`hello serve`".to_owned(), "/".to_owned()),
    };
    for (k, s) in samples.into_iter().enumerate() {
        let Some(s) = s.filter(|s| !s.ready_ms.is_empty()) else { continue };
        let name = r.backends[k].name();
        let how = r.backends[k].serve_note();
        let rounds = s.ready_ms.len();
        if closes[k] {
            r.note(format!(
                "net: {name}: the server closes the connection after each answer to GET {path}: no kept-alive latency"
            ));
        }
        r.record(
            name,
            Scenario::Net,
            "time_to_ready",
            "ms",
            Better::Lower,
            &format!("launch of {launched} → first HTTP response to GET {path} through the published port ({how}); one per round"),
            s.ready_ms,
            0,
            0,
        );
        if !s.keepalive_us.is_empty() {
            r.record(
                name,
                Scenario::Net,
                "latency_keepalive",
                "µs",
                Better::Lower,
                &format!(
                    "GET {path} round trip over one kept-alive connection, {} per round, {rounds} rounds",
                    sizes.keepalive
                ),
                s.keepalive_us,
                0,
                0,
            );
        }
        r.record(
            name,
            Scenario::Net,
            "latency_new_connection",
            "µs",
            Better::Lower,
            &format!("connect + GET {path} + close, {} per round, {rounds} rounds", sizes.new_connections),
            s.new_connection_us,
            0,
            0,
        );
        if !s.network_cost_ms.is_empty() {
            let pairs = s.network_cost_ms.len();
            r.record(
                name,
                Scenario::Net,
                "start_without_network",
                "ms",
                Better::Lower,
                &format!("foreground `hello true`, launch → instance removed, loopback only; {pairs} runs"),
                s.start_none_ms,
                0,
                0,
            );
            r.record(
                name,
                Scenario::Net,
                "start_published",
                "ms",
                Better::Lower,
                &format!("the same with the network attached and a port published ({how}); {pairs} runs"),
                s.start_published_ms,
                0,
                0,
            );
            r.record(
                name,
                Scenario::Net,
                "network_start_cost",
                "ms",
                Better::Lower,
                &format!("what attaching the network and publishing a port adds to a start: each published run minus the run without network just before it; {pairs} pairs"),
                s.network_cost_ms,
                0,
                0,
            );
        }
        if !s.throughput.is_empty() {
            r.record(
                name,
                Scenario::Net,
                "throughput",
                "MB/s",
                Better::Higher,
                &format!("one {} MiB response through the port, one per round", sizes.bytes >> 20),
                s.throughput,
                0,
                0,
            );
        }
        if !s.exec_ms.is_empty() {
            r.record(
                name,
                Scenario::Net,
                "exec_latency",
                "ms",
                Better::Lower,
                &format!(
                    "`exec` of `/hello exit 0` in the running server, command start → its exit; {} per round",
                    sizes.execs
                ),
                s.exec_ms,
                0,
                0,
            );
        }
    }
}

/// The server's threads (every `hello serve` process; one instance runs at a time) and the
/// calling thread on one CPU while it lives; the caller's own CPUs back after. Where the
/// scheduler puts a client and its server otherwise decides the latency more than the path
/// between them does: on this project's 2-CPU PVM host a request takes 19 µs with both on one
/// CPU and 57 µs across two (the cross-CPU wake-up is an IPI through the hypervisor), and
/// which of the two a backend gets changes from run to run.
struct Pinned {
    before: Option<nix::sched::CpuSet>,
}

impl Pinned {
    /// The processes of `hello serve` (found by their arguments) and the caller.
    fn hello_and_client() -> Pinned {
        let servers: Vec<u32> = crate::host::scan()
            .into_iter()
            .filter(|p| p.args.len() >= 2 && p.args[0].ends_with("hello") && p.args[1] == "serve")
            .map(|p| p.pid)
            .collect();
        Pinned::server_and_client(&servers)
    }

    /// The threads of the `servers` processes and the caller.
    fn server_and_client(servers: &[u32]) -> Pinned {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        let Ok(before) = sched_getaffinity(Pid::from_raw(0)) else { return Pinned { before: None } };
        let Some(cpu) = (0..CpuSet::count()).find(|&c| before.is_set(c).unwrap_or(false)) else {
            return Pinned { before: None };
        };
        let mut one = CpuSet::new();
        if one.set(cpu).is_err() {
            return Pinned { before: None };
        }
        for pid in servers {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
            for t in tasks {
                if let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) {
                    let _ = sched_setaffinity(Pid::from_raw(tid), &one);
                }
            }
        }
        let _ = sched_setaffinity(Pid::from_raw(0), &one);
        Pinned { before: Some(before) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), before);
        }
    }
}

/// `pairs` foreground starts without a network then with one published port, in pairs;
/// nothing for a backend with no network to attach (the process).
fn starts(
    b: &dyn crate::backend::Backend,
    id: &str,
    scratch: &std::path::Path,
    pairs: usize,
) -> Result<Samples, String> {
    let mut s = Samples::default();
    for i in 0..pairs {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let t0 = Instant::now();
        super::run_once(b, &crate::backend::Workload::True, &format!("{id}-a{i}"), scratch)
            .map_err(|e| super::error_chain(&e))?;
        let none = t0.elapsed();
        let Some(published) = b.run_published(&format!("{id}-b{i}"), port).map_err(|e| super::error_chain(&e))? else {
            return Ok(Samples::default());
        };
        s.start_none_ms.push(none.as_secs_f64() * 1e3);
        s.start_published_ms.push(published.as_secs_f64() * 1e3);
        s.network_cost_ms.push((published.as_secs_f64() - none.as_secs_f64()) * 1e3);
    }
    Ok(s)
}

fn one_round(b: &dyn crate::backend::Backend, id: &str, sizes: &Sizes) -> Result<Samples, String> {
    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let t0 = Instant::now();
    let mut inst = match b.launch_server(id, port) {
        Ok(Some(i)) => i,
        Ok(None) => return Err("cannot serve".into()),
        Err(e) => return Err(super::error_chain(&e)),
    };
    let measured = (|| -> Result<Samples, String> {
        let left = READY_DEADLINE.saturating_sub(t0.elapsed());
        net_client::wait_ready(addr, left).ok_or(format!("no answer on {addr} within {READY_DEADLINE:?}"))?;
        let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
        let _pinned = Pinned::hello_and_client();
        let io = |what: &'static str| move |e: std::io::Error| format!("{what} on {addr}: {e}");
        let keepalive_us =
            net_client::latency_keepalive(addr, "/", sizes.keepalive).map_err(io("kept-alive requests"))?;
        let new_connection_us =
            net_client::latency_new_connection(addr, "/", sizes.new_connections).map_err(io("new connections"))?;
        let throughput = net_client::throughput(addr, sizes.bytes).map_err(io("bulk transfer"))?;
        drop(_pinned);
        let mut exec_ms = Vec::new();
        for _ in 0..sizes.execs {
            let Some(cmd) = b.exec_command(id) else { break };
            let took = crate::backend::timed(cmd, "exec").map_err(|e| super::error_chain(&e))?;
            exec_ms.push(took.as_secs_f64() * 1e3);
        }
        Ok(Samples {
            ready_ms: vec![ready_ms],
            keepalive_us,
            new_connection_us,
            throughput: vec![throughput],
            exec_ms,
            ..Samples::default()
        })
    })();
    let down = b.teardown(&mut inst).map_err(|e| super::error_chain(&e));
    let s = measured?;
    down?;
    Ok(s)
}

/// One round for the user's own image: an instance launched and waited for until it answers
/// `GET path` ([`super::launch_ready`]), then the request latencies against `path`; and whether
/// the server closed the connection after an answer (then there is no kept-alive figure).
fn one_round_own(
    b: &dyn crate::backend::Backend,
    spec: &crate::ready::ReadySpec,
    path: &str,
    id: &str,
    sizes: &Sizes,
) -> Result<(Samples, bool), String> {
    let ready = super::launch_ready(b, spec, id)?;
    let mut inst = ready.instance;
    let addr = ready.addr.expect("an http check publishes a port");
    let measured = (|| -> Result<(Samples, bool), String> {
        // The instance's processes on the client's CPU, as `hello serve`'s are: a container's
        // (a microVM's server runs in its guest, as hello's does).
        let servers = match b.isolation() {
            crate::backend::Isolation::MicroVm => Vec::new(),
            _ => crate::host::tree(&crate::host::scan(), &b.instance_pids(&inst)),
        };
        let _pinned = Pinned::server_and_client(&servers);
        let io = |what: &'static str| move |e: std::io::Error| format!("{what} to GET {path} on {addr}: {e}");
        let kept = net_client::keeps_alive(addr, path).map_err(io("a request"))?;
        let keepalive_us = if kept {
            net_client::latency_keepalive(addr, path, sizes.keepalive).map_err(io("kept-alive requests"))?
        } else {
            Vec::new()
        };
        let new_connection_us =
            net_client::latency_new_connection(addr, path, sizes.new_connections).map_err(io("new connections"))?;
        let s =
            Samples { ready_ms: vec![super::ms(ready.took)], keepalive_us, new_connection_us, ..Samples::default() };
        Ok((s, !kept))
    })();
    let down = b.teardown(&mut inst).map_err(|e| super::error_chain(&e));
    let s = measured?;
    down?;
    Ok(s)
}

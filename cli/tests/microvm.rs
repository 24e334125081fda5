//! `twinbox run --isolation microvm`: flag errors on any host, and the end-to-end comparison
//! with the container run of the same image.
//!
//! A stock Linux guest needs hardware virtualization. Where /dev/kvm is PVM (this project's CI
//! host) the end-to-end cases run inside the nested L1 of scripts/nested-kvm.sh (QEMU TCG with
//! an emulated AMD SVM, KVM loaded inside): the twinbox binary under test, the guest kernel
//! (TWINBOX_KERNEL, else the one scripts/build-guest-kernel.sh built) and a store whose root
//! disks were made on the host (L1 has no mkfs.ext4) go in as a payload. The container side of
//! each comparison runs on the host in the same test. Timings inside L1 show the mechanics,
//! not representative speed. The VMs join the default bridge network (L1 loads the tap, bridge
//! and nftables modules): a service published from one VM is reached from L1 through the port
//! and at the VM's address, and from a second VM by name.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{busybox_rootfs, hello_context, require, require_root, sh, workspace, Env};

#[test]
fn container_only_flags_are_refused_by_name_and_nothing_is_left() {
    let env = Env::new();
    for (args, needle) in [
        (vec!["--pids-limit", "5"], "--pids-limit is not supported"),
        (vec!["--security-opt", "seccomp=unconfined"], "--security-opt is not supported"),
        (vec!["--cpus", "1.5"], "whole number of vCPUs"),
        (vec!["--timeout", "0"], "positive number of seconds"),
        (vec!["--kernel", "/nonexistent/vmlinux"], "no such image"),
    ] {
        let mut all = vec!["run", "--isolation", "microvm"];
        all.extend(&args);
        all.push("missing-image");
        let o = env.run(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "the user's mistake is 1: {args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    for flags in [&["--kernel", "/k"][..], &["--irqchip", "kernel"], &["--snapshot"], &["--no-jail"]] {
        let o = env.run(&[&["run"][..], flags, &["x"]].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--kernel, --timeout, --irqchip, --snapshot and --no-jail are for --isolation microvm"),
            "{flags:?}: {err}"
        );
    }
    for (flags, needle) in [
        (&["--snapshot", "-v", "vol:/data"][..], "--snapshot with -v: a template VM has no volume disks"),
        (&["--snapshot", "--irqchip", "kernel"], "--snapshot needs the split irqchip"),
    ] {
        let o = env.run(&[&["run", "--isolation", "microvm"][..], flags, &["x"]].concat());
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains(needle), "{flags:?}");
    }
    let o = env.run(&["snapshot", "rm", "nothing"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no template for nothing"));
    assert_eq!(env.run(&["snapshot", "ls", "-q"]).stdout, b"");
    let o = env.run(&["run", "--isolation", "microvm", "--irqchip", "pic", "x"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("use split or kernel"));
}

#[test]
fn missing_kernel_is_named_and_the_image_hold_released() {
    let env = Env::new();
    let ctx = env.path("hello");
    if !hello_context(&ctx) {
        return;
    }
    env.ok(&["build", "-q", "-t", "hello:latest", ctx.to_str().unwrap()]);
    let o = env.run(&["run", "--isolation", "microvm", "--kernel", "/nonexistent/vmlinux", "hello"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no guest kernel at /nonexistent/vmlinux") && err.contains("build-guest-kernel.sh"), "{err}");
    assert!(env.store().holds().unwrap().is_empty(), "the run's hold on the image was released");
    // rmi works: nothing holds the image.
    env.ok(&["rmi", "hello"]);
}

/// One case run both ways.
struct Case {
    name: &'static str,
    /// `twinbox run` arguments after `run` (no --isolation, no --rm).
    args: Vec<&'static str>,
    /// Compare stdout and the exit code with the container run (false: checked by hand below).
    same_as_container: bool,
    /// `args` are the whole `twinbox` command line, not a `run --isolation microvm`.
    raw: bool,
}

fn case(name: &'static str, args: &[&'static str], same: bool) -> Case {
    Case { name, args: args.to_vec(), same_as_container: same, raw: false }
}

/// What a case gave: exit code, stdout, stderr.
#[derive(Debug, Default, Clone)]
struct Outcome {
    code: i32,
    out: String,
    err: String,
}

/// Whether this host's /dev/kvm can boot Linux itself (hardware KVM, or already inside the
/// nested L1), rather than PVM or none.
fn kvm_boots_linux() -> bool {
    use twinbox_bench::host::{detect_virtualization, VirtKind};
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    matches!(detect_virtualization(Path::new("/"), &cpuinfo).kind, VirtKind::HardwareKvm | VirtKind::NestedTcg)
}

/// Copies the dynamically linked binary `bin` with its libraries into `dir` and writes a
/// wrapper `dir/name` that links its loader where the binary names it and its libraries into
/// /lib (L1 has busybox and nothing else; its root is a throwaway), so the binary runs as itself
/// and can start itself again with any environment (detached VMs and containers, port
/// proxies).
fn pack_binary(bin: &Path, dir: &Path, name: &str) {
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    let real = dir.join(format!("{name}.bin"));
    sh(Command::new("objcopy").arg("--strip-debug").arg(bin).arg(&real));
    let ldd = sh(Command::new("ldd").arg(bin));
    let mut interpreter = None;
    for line in ldd.lines() {
        let path = match line.split("=>").nth(1) {
            Some(rest) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else { continue };
        let file = Path::new(path).file_name().unwrap().to_owned();
        std::fs::copy(path, lib.join(&file)).unwrap();
        if file.to_string_lossy().starts_with("ld-linux") {
            interpreter = Some(path.to_owned());
        }
    }
    let interpreter = interpreter.expect("ldd names the dynamic loader");
    let loader = Path::new(&interpreter).file_name().unwrap().to_string_lossy().into_owned();
    let wrapper = format!(
        "#!/bin/sh\nd=$(cd \"$(dirname \"$0\")\" && pwd)\n\
         [ -e {interpreter} ] || {{ mkdir -p \"$(dirname {interpreter})\" && ln -sf \"$d/lib/{loader}\" {interpreter}; }}\n\
         for f in \"$d\"/lib/*; do [ -e \"/lib/${{f##*/}}\" ] || ln -sf \"$f\" /lib/; done\n\
         LD_LIBRARY_PATH=\"$d/lib\" exec \"$d/{name}.bin\" \"$@\"\n"
    );
    std::fs::write(dir.join(name), wrapper).unwrap();
    sh(Command::new("chmod").arg("755").arg(dir.join(name)));
}

fn shell_quote(w: &str) -> String {
    format!("'{}'", w.replace('\'', "'\\''"))
}

/// Parses the L1 script's output: `@@CASE name@@`, stdout lines, `@@ERR@@`, stderr lines,
/// `@@CODE n@@`.
fn parse(output: &str) -> BTreeMap<String, Outcome> {
    let mut cases = BTreeMap::new();
    let mut current: Option<(String, Outcome, bool)> = None;
    for line in output.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        if let Some(name) = bare.strip_prefix("@@CASE ").and_then(|r| r.strip_suffix("@@")) {
            current = Some((name.to_owned(), Outcome::default(), false));
        } else if bare == "@@ERR@@" {
            if let Some(c) = current.as_mut() {
                c.2 = true;
            }
        } else if let Some(code) = bare.strip_prefix("@@CODE ").and_then(|r| r.strip_suffix("@@")) {
            if let Some((name, mut o, _)) = current.take() {
                o.code = code.parse().unwrap_or(-1);
                cases.insert(name, o);
            }
        } else if let Some((_, o, in_err)) = current.as_mut() {
            if *in_err {
                o.err.push_str(line);
            } else {
                o.out.push_str(line);
            }
        }
    }
    cases
}

#[test]
fn microvm_run_matches_the_container_run() {
    if !require_root() {
        return;
    }
    let kernel = twinbox_engine::microvm::default_kernel();
    if !require(kernel.is_file(), &format!("no guest kernel at {} (scripts/test.sh builds it)", kernel.display())) {
        return;
    }
    let nested = !kvm_boots_linux();
    if nested && !require(common::have_tool("qemu-system-x86_64"), "qemu-system-x86_64 is needed for the nested L1") {
        return;
    }

    let env = Env::new();
    let hello = env.path("hello");
    let bb = env.path("busybox");
    let applets = [
        "sh", "echo", "cat", "id", "pwd", "kill", "sleep", "true", "grep", "nc", "printf", "tail", "ping", "ip", "sed",
        "httpd", "head", "readlink", "od", "tr", "hostname",
    ];
    if !hello_context(&hello) || !busybox_rootfs(&bb, &applets) {
        return;
    }
    std::fs::create_dir_all(bb.join("rootfs/etc")).unwrap();
    std::fs::write(bb.join("rootfs/etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        .unwrap();
    std::fs::write(bb.join("rootfs/etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    std::fs::write(bb.join("Dockerfile"), "FROM scratch\nCOPY rootfs /\nCMD [\"sh\"]\n").unwrap();
    env.ok(&["build", "-q", "-t", "hello:latest", hello.to_str().unwrap()]);
    env.ok(&["build", "-q", "-t", "busybox:latest", bb.to_str().unwrap()]);

    let cases = [
        case("spin", &["hello", "spin", "1000"], true),
        case("exit3", &["hello", "exit", "3"], true),
        case("signal", &["hello", "crash"], true),
        case("streams", &["busybox", "sh", "-c", "echo out; echo err >&2; exit 5"], true),
        case(
            "config",
            &["-e", "A=1", "-w", "/work", "-u", "nobody", "busybox", "sh", "-c", "echo $A $(pwd) $(id -u)"],
            true,
        ),
        case("write", &["busybox", "sh", "-c", "echo x > /f && cat /f"], true),
        case("fresh", &["busybox", "cat", "/f"], true),
        case("readonly", &["--read-only", "busybox", "sh", "-c", "echo x > /f"], false),
        case("notfound", &["busybox", "nope"], false),
        case("greet", &["--hostname", "demo", "hello"], false),
        case("hang", &["--timeout", "3", "hello", "sleep", "1000"], false),
        case("smp", &["--cpus", "2", "busybox", "grep", "-c", "^processor", "/proc/cpuinfo"], false),
        case("small", &["--memory", "12m", "hello"], false),
        // The default split irqchip: the disk's interrupts come through twinbox's IOAPIC, and
        // there is no PIT (no IRQ 0).
        case("interrupts", &["busybox", "cat", "/proc/interrupts"], false),
        // Firecracker's model: PIC, IOAPIC and PIT in KVM; two vCPUs.
        case(
            "kernel-irqchip",
            &["--irqchip", "kernel", "--cpus", "2", "busybox", "sh", "-c", "echo out; echo err >&2; exit 5"],
            false,
        ),
        // No initramfs and no root disk: the kernel cannot find a root and panics.
        Case { raw: true, ..case("panic", &["vm", "--kernel", "vmlinux", "--timeout", "300"], false) },
    ];

    // The container side, on the host.
    let mut container = BTreeMap::new();
    for c in &cases {
        if c.raw || ["--timeout", "--memory", "--irqchip"].iter().any(|f| c.args.contains(f)) {
            continue;
        }
        let mut args = vec!["run", "--rm"];
        args.extend(&c.args);
        let o = env.run(&args);
        container.insert(
            c.name,
            Outcome {
                code: o.status.code().unwrap_or(-1),
                out: String::from_utf8_lossy(&o.stdout).into_owned(),
                err: String::from_utf8_lossy(&o.stderr).into_owned(),
            },
        );
    }

    // The microVM side: root disks made here, the runs where KVM can boot Linux.
    let store = env.store();
    for image in ["hello:latest", "busybox:latest"] {
        twinbox_image::disk::root_disk(&store, &store.resolve(image).unwrap()).unwrap();
    }
    // The L1 has no mkfs.ext4: the VMs' disk volume is made here, in the store it gets.
    env.ok(&["volume", "create", "--driver", "disk", "--size", "64m", "vdata"]);
    // A case still running after 240 s (a stall, as seen now and then in the nested L1) gets
    // its threads' kernel stacks appended to its stderr and is killed, so the failure says
    // where it stood instead of the whole run running into its limit.
    let mut script = String::from(
        "#!/bin/sh\n\
         run_case() {\n\
         \x20 \"$@\" 2>/tmp/err &\n\
         \x20 pid=$!\n\
         \x20 ( sleep 240; [ -d /proc/$pid ] || exit 0\n\
         \x20   echo \"stalled: still running after 240 s; where its threads stood:\"\n\
         \x20   for t in /proc/$pid/task/*; do echo \"${t##*/} $(cat $t/comm) wchan $(cat $t/wchan)\"; cat $t/stack; done\n\
         \x20   kill -9 $pid ) >>/tmp/err 2>&1 &\n\
         \x20 watcher=$!\n\
         \x20 wait $pid\n\
         \x20 code=$?\n\
         \x20 kill $watcher 2>/dev/null\n\
         }\n",
    );
    for c in &cases {
        let mut words: Vec<String> = Vec::new();
        if !c.raw {
            words.extend(["run", "--rm", "--isolation", "microvm"].map(String::from));
        }
        words.extend(c.args.iter().map(|a| a.to_string()));
        let cmd: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
        script.push_str(&format!(
            "echo '@@CASE {}@@'\nrun_case twinbox {}\necho '@@ERR@@'\ncat /tmp/err\necho \"@@CODE $code@@\"\n",
            c.name,
            cmd.join(" ")
        ));
    }
    // A service in a VM on the default network, published on port 18080 and reached from
    // the L1 host through the port and at the VM's own address (both made by this test); a
    // second VM reaches it by name and pings its gateway; `stop` ends it and leaves nothing.
    // HTTP by busybox nc: Debian's static busybox wget crashes.
    let peer = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 web 8080 | tail -n 1; grep -cw web /etc/hosts; cat /sys/class/net/eth0/mtu; \
                ip route | grep default; gw=$(ip route | sed -n 's/^default via \\([0-9.]*\\).*/\\1/p'); \
                ping -c 1 -W 5 \"$gw\" >/dev/null && echo gateway-answers";
    script.push_str(&format!(
        "get() {{ printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 \"$1\" \"$2\" 2>/dev/null | tail -n 1; }}\n\
         echo '@@CASE web@@'\n\
         twinbox run --rm --isolation microvm -p 18080:8080 --name web hello serve 8080 >/tmp/web.out 2>/tmp/web.err &\n\
         web=$!\n\
         i=0\n\
         while [ $i -lt 120 ] && ! get 127.0.0.1 18080 | grep -q twinbox; do i=$((i+1)); sleep 1; done\n\
         echo \"local: $(get 127.0.0.1 18080)\"\n\
         wid=$(twinbox ps | grep -w web | cut -c1-12)\n\
         vmip=$(twinbox network inspect twinbox0 | grep \"$wid\" | sed -n 's/^ *\"\\([0-9.]*\\)\": \".*/\\1/p' | head -n1)\n\
         echo \"direct: $(get $vmip 8080)\"\n\
         echo \"port: $(twinbox port web)\"\n\
         echo \"ps: $(twinbox ps | grep -w web)\"\n\
         echo \"taps: $(ls /sys/class/net | grep -c '^tbt')\"\n\
         echo \"exec: $(twinbox exec web /hello | tail -n 1)\"\n\
         twinbox exec web /hello exit 7\n\
         echo \"exec-code: $?\"\n\
         twinbox exec web nope 2>/tmp/x\n\
         echo \"exec-missing: $? $(cat /tmp/x)\"\n\
         echo '@@ERR@@'\ncat /tmp/web.err\necho '@@CODE 0@@'\n\
         echo '@@CASE peer@@'\nrun_case twinbox run --rm --isolation microvm busybox sh -c {}\n\
         echo '@@ERR@@'\ncat /tmp/err\necho \"@@CODE $code@@\"\n\
         echo '@@CASE web-stop@@'\ntwinbox stop -t 2 web >/dev/null 2>/tmp/err\nwait $web\ncode=$?\n\
         echo \"left: $(twinbox ps -aq | wc -l) taps $(ls /sys/class/net | grep -c '^tbt') addresses $(twinbox network inspect twinbox0 | grep -c '\"[0-9.]*\": \"[0-9a-f]\\{{64\\}}\"')\"\n\
         echo '@@ERR@@'\ncat /tmp/err /tmp/web.out /tmp/web.err\necho \"@@CODE $code@@\"\n\
         echo '@@CASE detached@@'\n\
         twinbox run -d --isolation microvm --name bg hello serve 8081 >/tmp/id 2>/tmp/err\n\
         i=0\n\
         while [ $i -lt 120 ] && ! twinbox logs bg 2>/dev/null | grep -q listening; do i=$((i+1)); sleep 1; done\n\
         echo \"logs: $(twinbox logs bg)\"\n\
         twinbox exec bg /hello exit 4\n\
         echo \"exec: $?\"\n\
         twinbox stop -t 2 bg >/dev/null\n\
         echo \"ps: $(twinbox ps -a | grep -w bg | grep -o 'Exited ([0-9]*)')\"\n\
         twinbox rm bg >/dev/null\n\
         echo \"rm: $? $(twinbox ps -aq | wc -l) $(ls /run/twinbox/vm | wc -l)\"\n\
         twinbox run -d --isolation microvm --name trapper busybox sh -c {} >/dev/null\n\
         i=0\n\
         while [ $i -lt 120 ] && ! twinbox logs trapper 2>/dev/null | grep -q ready; do i=$((i+1)); sleep 1; done\n\
         twinbox stop -t 10 trapper >/dev/null\n\
         echo \"trap: $(twinbox ps -a | grep -w trapper | grep -o 'Exited ([0-9]*)') $(twinbox logs trapper | tr '\\n' ' ')\"\n\
         twinbox rm trapper >/dev/null\n\
         echo '@@ERR@@'\ncat /tmp/err\necho '@@CODE 0@@'\n\
         echo '@@CASE agent@@'\n\
         twinbox run -d --isolation microvm --name svc busybox sh -c {} >/dev/null 2>/tmp/err\n\
         echo \"at-once: $(timeout 120 twinbox exec svc echo up 2>&1)\"\n\
         echo \"stdin-none: [$(echo hi | timeout 120 twinbox exec svc cat 2>&1)]\"\n\
         echo \"stdin: [$(echo hi | timeout 120 twinbox exec -i svc cat 2>&1)]\"\n\
         echo \"tty: $(timeout 120 twinbox exec -t svc readlink /proc/self/fd/0 2>&1 | tr -d '\\r')\"\n\
         echo \"user: $(timeout 120 twinbox exec -u nobody svc id 2>&1)\"\n\
         (timeout 120 twinbox exec svc head -c 3000000 /dev/zero | (sleep 3; wc -c) >/tmp/slow) &\n\
         slow=$!\n\
         sleep 1\n\
         echo \"parallel: $(timeout 120 twinbox exec svc echo ok 2>&1)\"\n\
         wait $slow\n\
         echo \"slow: $(tr -d ' ' </tmp/slow)\"\n\
         twinbox run -d --name late busybox sleep 1000 >/dev/null 2>>/tmp/err\n\
         echo \"hosts: $(timeout 120 twinbox exec svc grep -c late /etc/hosts 2>&1)\"\n\
         twinbox rm -f late svc >/dev/null\n\
         TWINBOX_AGENT_TIMEOUT=0 twinbox run -d --isolation microvm --name never hello serve 8080 >/dev/null 2>/tmp/never\n\
         echo \"never: $? $(tr '\\n' ' ' </tmp/never)\"\n\
         echo \"left: $(twinbox ps -aq | wc -l) taps $(ls /sys/class/net | grep -c '^tbt') sockets $(ls /run/twinbox/vm | wc -l) vmms $(ps -o args | grep -c '[m]icrovm-launch')\"\n\
         echo '@@ERR@@'\ncat /tmp/err\necho '@@CODE 0@@'\n\
         echo '@@CASE volumes@@'\n\
         timeout 120 twinbox run --rm --isolation microvm -v vdata:/data busybox sh -c 'echo kept > /data/f' 2>/tmp/err\n\
         twinbox run -d --isolation microvm --name holder -v vdata:/data busybox sleep 1000 >/dev/null 2>>/tmp/err\n\
         echo \"read: $(timeout 120 twinbox exec holder cat /data/f 2>&1)\"\n\
         timeout 120 twinbox run --rm --isolation microvm -v vdata:/data busybox true 2>/tmp/busy\n\
         echo \"busy: $? $(cat /tmp/busy)\"\n\
         twinbox rm -f holder >/dev/null\n\
         echo \"ro: $(timeout 120 twinbox run --rm --isolation microvm -v vdata:/data:ro busybox sh -c 'cat /data/f; echo x > /data/g' 2>&1)\"\n\
         echo \"ls: $(twinbox volume ls | grep vdata | tr -s ' ')\"\n\
         twinbox volume rm vdata >/dev/null\n\
         echo \"rm: $? $(twinbox volume ls -q | wc -l) $(twinbox ps -aq | wc -l)\"\n\
         echo '@@ERR@@'\ncat /tmp/err\necho '@@CODE 0@@'\n\
         echo '@@CASE mixed@@'\n\
         twinbox network create vnet >/dev/null\n\
         twinbox run -d --network vnet --name c1 busybox httpd -f -p 80 >/dev/null 2>/tmp/err\n\
         twinbox run -d --isolation microvm --network vnet --name vm1 busybox httpd -f -p 8080 >/dev/null 2>>/tmp/err\n\
         echo \"container-to-vm: $(twinbox run --rm --network vnet busybox sh -c {} 2>&1)\"\n\
         echo \"vm-to-container: $(twinbox exec vm1 sh -c {} 2>&1)\"\n\
         twinbox rm -f c1 vm1 >/dev/null\n\
         for n in 1 2 3 4 5; do twinbox run -d --isolation microvm --name many$n hello serve 8080 >/dev/null 2>>/tmp/err; done\n\
         echo \"five: $(twinbox ps | grep -c many) taps $(ls /sys/class/net | grep -c '^tbt')\"\n\
         for n in 1 2 3 4 5; do twinbox ps -a | grep -w many$n | grep -q Exited && {{ twinbox ps -a | grep -w many$n; twinbox logs many$n | tail -n 3; }} >>/tmp/err; done\n\
         twinbox rm -f many1 many2 many3 many4 many5 >/dev/null\n\
         twinbox network rm vnet >/dev/null\n\
         echo \"left: $(twinbox ps -aq | wc -l) taps $(ls /sys/class/net | grep -c '^tbt') sockets $(ls /run/twinbox/vm | wc -l) vmms $(ps -o args | grep -c '[m]icrovm-launch')\"\n\
         echo '@@ERR@@'\ncat /tmp/err\necho '@@CODE 0@@'\n",
        shell_quote(peer),
        shell_quote("trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 1; done"),
        shell_quote("exec >&- 2>&-; exec sleep 1000"),
        shell_quote("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 vm1 8080 | head -n 1"),
        shell_quote("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 c1 80 | head -n 1"),
    ));
    // Warm templates: the first --snapshot run makes the image's template, ten runs restored
    // from it print what the cold-booted "streams" case printed (their start in the guest's
    // mailbox); a start too large for it (an env var of 70 000 bytes) comes on the control port;
    // a program that is not there exits 127 as in a cold boot; two restored VMs differ in
    // randomness, hostname, MAC and address; a tampered template is refused; rm removes it.
    let probe =
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; cat /sys/class/net/eth0/address; \
                 ip -4 -o addr show eth0 | tr -s ' ' | cut -d' ' -f4";
    script.push_str(&format!(
        "echo '@@CASE snapshot@@'\n\
         : >/tmp/err\n\
         for i in 1 2 3 4 5 6 7 8 9 10; do\n\
         \x20 o=$(timeout 240 twinbox run --rm --isolation microvm --snapshot busybox sh -c {} 2>/tmp/serr); c=$?\n\
         \x20 echo \"run: $o|$c|$(tr '\\n' ' ' </tmp/serr)\"\n\
         done\n\
         echo \"templates: $(twinbox snapshot ls -q | wc -l)\"\n\
         big=$(head -c 70000 /dev/zero | tr '\\0' x)\n\
         o=$(timeout 240 twinbox run --rm --isolation microvm --snapshot -e BIG=$big busybox sh -c {} 2>&1); echo \"big: $o|$?\"\n\
         o=$(timeout 240 twinbox run --rm --isolation microvm --snapshot busybox nosuchcmd 2>&1); echo \"missing: $?|$o\" | tr '\\n' ' '; echo\n\
         twinbox run -d --isolation microvm --snapshot --name s1 busybox sleep 1000 >/dev/null 2>>/tmp/err\n\
         twinbox run -d --isolation microvm --snapshot --name s2 busybox sleep 1000 >/dev/null 2>>/tmp/err\n\
         echo \"s1: $(timeout 120 twinbox exec s1 sh -c {} 2>&1 | tr '\\n' ' ')\"\n\
         echo \"s2: $(timeout 120 twinbox exec s2 sh -c {} 2>&1 | tr '\\n' ' ')\"\n\
         twinbox rm -f s1 s2 >/dev/null\n\
         key=$(twinbox snapshot ls -q | head -n 1)\n\
         printf 'X' | dd of=\"$TWINBOX_ROOT/snapshots/$key/memory\" bs=1 seek=1048576 conv=notrunc 2>/dev/null\n\
         timeout 240 twinbox run --rm --isolation microvm --snapshot busybox true 2>/tmp/tamper\n\
         echo \"tampered: $? $(tr '\\n' ' ' </tmp/tamper)\"\n\
         twinbox snapshot rm \"$key\" >/dev/null\n\
         echo \"snapshot-rm: $? $(twinbox snapshot ls -q | wc -l) $(ls \"$TWINBOX_ROOT/snapshots\" | wc -l)\"\n\
         echo \"left: $(twinbox ps -aq | wc -l) taps $(ls /sys/class/net | grep -c '^tb[ts]') sockets $(ls /run/twinbox/vm | wc -l)\"\n\
         echo '@@ERR@@'\ncat /tmp/err\necho '@@CODE 0@@'\n",
        shell_quote("echo out; echo err >&2; exit 5"),
        shell_quote("echo ${#BIG}"),
        shell_quote(probe),
        shell_quote(probe),
    ));
    // The VMM of a running microVM, seen from the L1: confined (its own root with nothing in
    // it, another network namespace, an unprivileged uid without capabilities, every thread
    // under seccomp, in a cgroup of its own sized for the guest), unless --no-jail; its cgroup
    // gone with it.
    script.push_str(
        "echo '@@CASE jail@@'\n\
         vmm_of() { for c in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <$c | grep -q 'twinbox[^ ]* microvm-vmm *$' && { p=${c%/cmdline}; echo ${p#/proc/}; }; done; }\n\
         look() {\n\
         \x20 p=$(vmm_of | head -n 1)\n\
         \x20 s=/proc/$p/status\n\
         \x20 echo \"$1 uid: $(grep '^Uid:' $s | tr -s '\\t ' ' ' | cut -d' ' -f2) caps: $(grep '^CapEff:' $s | cut -f2) bnd: $(grep '^CapBnd:' $s | cut -f2) seccomp: $(grep '^Seccomp:' $s | cut -f2)\"\n\
         \x20 echo \"$1 filtered: $(grep -l '^Seccomp:.2' /proc/$p/task/*/status | wc -l) of $(ls /proc/$p/task | wc -l)\"\n\
         \x20 echo \"$1 root: $(ls -A /proc/$p/root | wc -l) netns: $([ $(readlink /proc/$p/ns/net) = $(readlink /proc/self/ns/net) ] && echo host || echo own)\"\n\
         \x20 echo \"$1 cgroup: $(cut -d: -f3 /proc/$p/cgroup | cut -d/ -f2,3) limit: $(cat /sys/fs/cgroup/twinbox/vmm/*/memory.max 2>/dev/null)\"\n\
         }\n\
         twinbox run -d --isolation microvm --memory 64m --name jailed hello serve 8083 >/dev/null 2>/tmp/err\n\
         look jailed\n\
         twinbox rm -f jailed >/dev/null\n\
         echo \"after: $(ls /sys/fs/cgroup/twinbox 2>/dev/null | wc -l) vmms $(vmm_of | wc -l)\"\n\
         twinbox run -d --isolation microvm --no-jail --name free hello serve 8083 >/dev/null 2>>/tmp/err\n\
         look free\n\
         twinbox rm -f free >/dev/null\n\
         echo '@@ERR@@'\ncat /tmp/err\necho '@@CODE 0@@'\n",
    );
    script.push_str("echo '@@CASE holds@@'\nls \"$TWINBOX_ROOT/holds\"\necho '@@CODE 0@@'\n");

    let started = std::time::Instant::now();
    let output = if nested {
        let payload = env.path("tb");
        std::fs::create_dir_all(&payload).unwrap();
        pack_binary(Path::new(env!("CARGO_BIN_EXE_twinbox")), &payload, "twinbox");
        std::fs::copy(&kernel, payload.join("vmlinux")).unwrap();
        sh(Command::new("cp").arg("-a").arg(env.root()).arg(payload.join("store")));
        // Containers in L1 (beside the VMs on one network) need a cgroup file system.
        let l1_script = format!(
            "export TWINBOX_ROOT=/payload/tb/store TWINBOX_KERNEL=/payload/tb/vmlinux\ncd /payload/tb\n\
             mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup\n{script}"
        );
        std::fs::write(payload.join("e2e.sh"), l1_script).unwrap();
        // A stalled L1 under TCG is tried again: a boot that does not finish (nested-kvm.sh
        // gives up on it after 180 s), or a whole L1 that stops printing (every case prints
        // within its 240 s watcher, so 300 s of nothing is L1 itself; the vCPUs' registers go
        // to the log).
        let mut attempt = 0;
        let o = loop {
            attempt += 1;
            let o = Command::new(workspace().join("scripts/nested-kvm.sh"))
                .args(["--timeout", "900", "--silence", "300", "--payload"])
                .arg(&payload)
                .args(["--", "sh", "/payload/tb/e2e.sh"])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr);
            if attempt < 3 && (stderr.contains("L1 did not finish booting") || stderr.contains("L1 stalled")) {
                eprintln!("attempt {attempt}: L1 did not boot or stalled; trying again:\n{}", stderr.trim());
                continue;
            }
            // A guest that triple-faulted in the L1 (about 1 in 60 cold boots, 5 at a time, in
            // one session; as often with --no-jail) met a fault of the emulated nested paging
            // under it, not of twinbox: issue 20 traced one to a #PF on a kernel-text fetch right
            // after L1's KVM mapped that page. L1 now runs its guests on shadow pages (npt=0),
            // and none faulted in about 1100 boots since, with or without it; should one, the
            // cases run once more, said here, and a second fault fails the test.
            if attempt < 2 && String::from_utf8_lossy(&o.stdout).contains("guest triple fault") {
                eprintln!("attempt {attempt}: a guest triple-faulted in the nested L1; running the cases once more");
                continue;
            }
            break o;
        };
        let stderr = String::from_utf8_lossy(&o.stderr);
        eprintln!("nested-kvm.sh: {}", stderr.trim());
        assert_eq!(o.status.code(), Some(0), "the L1 run failed:\n{stderr}\n{}", String::from_utf8_lossy(&o.stdout));
        String::from_utf8_lossy(&o.stdout).into_owned()
    } else {
        // The raw `vm` case names ./vmlinux.
        std::os::unix::fs::symlink(&kernel, env.path("vmlinux")).unwrap();
        let o = Command::new("sh")
            .current_dir(env.dir.path())
            .arg("-c")
            .arg(&script)
            .env(
                "PATH",
                format!(
                    "{}:/usr/sbin:/usr/bin:/sbin:/bin",
                    Path::new(env!("CARGO_BIN_EXE_twinbox")).parent().unwrap().display()
                ),
            )
            .env("TWINBOX_ROOT", env.root())
            .env("TWINBOX_KERNEL", &kernel)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    eprintln!(
        "microVM cases ran in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        if nested { "nested TCG L1" } else { "hardware KVM" }
    );
    let vm = parse(&output);
    for (name, o) in &vm {
        let cut = |t: &str| t.chars().take(400).collect::<String>();
        eprintln!("{name}: code {}, stdout {:?}, stderr {:?}", o.code, cut(&o.out), cut(&o.err));
    }
    let get = |name: &str| vm.get(name).unwrap_or_else(|| panic!("case {name} did not run; output:\n{output}")).clone();

    for c in cases.iter().filter(|c| c.same_as_container) {
        let (v, k) = (get(c.name), &container[c.name]);
        assert_eq!((v.code, &v.out), (k.code, &k.out), "{}: microVM {v:?} vs container {k:?}", c.name);
    }
    assert_eq!(get("exit3").code, 3);
    assert_eq!(get("signal").code, 128 + 4, "killed by SIGILL");
    let streams = get("streams");
    assert_eq!((streams.out.as_str(), streams.err.as_str()), ("out\n", "err\n"), "stdout and stderr stay apart");
    assert_eq!(get("config").out, "1 /work 65534\n");
    assert_eq!(get("write").out, "x\n");
    assert_ne!(get("fresh").code, 0, "a file written by one run is gone in the next");

    let ro = get("readonly");
    assert_ne!(ro.code, 0);
    assert!(ro.err.contains("Read-only file system"), "{ro:?}");
    let nf = get("notfound");
    assert_eq!(nf.code, 127, "{nf:?}");
    assert_eq!(container["notfound"].code, 127);
    assert!(nf.err.contains("nope"), "{nf:?}");

    // Same workload, same image, different kernels: the whole point of the two models.
    let greet = get("greet");
    let host = &container["greet"];
    assert_eq!(greet.code, 0, "{greet:?}");
    assert_eq!(greet.out.lines().next(), Some("Hello from twinbox!"));
    let vm_line = greet.out.lines().nth(1).unwrap_or_default().to_owned();
    let host_line = host.out.lines().nth(1).unwrap_or_default().to_owned();
    assert!(vm_line.starts_with("pid 1 on kernel 6.1.") && vm_line.ends_with(" as host demo"), "{vm_line}");
    assert!(host_line.starts_with("pid 1 on kernel ") && host_line.ends_with(" as host demo"), "{host_line}");
    assert_ne!(vm_line, host_line, "the VM runs its own kernel");

    // Two vCPUs: the MP table lists both and the application processor came up.
    assert_eq!(get("smp").out, "2\n", "{:?}", get("smp"));

    let irqs = get("interrupts");
    assert_eq!(irqs.code, 0, "{irqs:?}");
    assert!(irqs.out.lines().any(|l| l.contains("IO-APIC") && l.contains("virtio0")), "{}", irqs.out);
    assert!(!irqs.out.lines().any(|l| l.trim_start().starts_with("0:")), "no PIT interrupt:\n{}", irqs.out);
    let kernel_chip = get("kernel-irqchip");
    assert_eq!(
        (kernel_chip.code, kernel_chip.out.as_str(), kernel_chip.err.as_str()),
        (5, "out\n", "err\n"),
        "{kernel_chip:?}"
    );

    let hang = get("hang");
    assert_eq!(hang.code, 125, "{hang:?}");
    assert!(hang.err.contains("still running after") && hang.err.contains("--timeout"), "{hang:?}");
    let small = get("small");
    assert_eq!(small.code, 1, "a --memory too small for the kernel is the user's mistake: {small:?}");
    assert!(small.err.contains("does not fit 12 MiB of guest memory; give the VM more memory"), "{small:?}");
    let panic = get("panic");
    assert_eq!(panic.code, 125, "{panic:?}");
    assert!(panic.err.contains("the guest kernel panicked: Kernel panic - not syncing"), "{panic:?}");
    assert!(panic.out.contains("Kernel panic"), "the console shows it: {panic:?}");

    let web = get("web");
    assert!(web.out.contains("local: hello from twinbox"), "through the published port: {web:?}");
    assert!(web.out.contains("direct: hello from twinbox"), "at the VM's address: {web:?}");
    assert!(web.out.contains("port: 8080/tcp -> 0.0.0.0:18080"), "{web:?}");
    assert!(web.out.contains("microvm") && web.out.contains("taps: 1"), "{web:?}");
    // exec through the agent's vsock channel: in the workload's pid namespace (not its pid 1),
    // on the guest's kernel, with the exit code and a missing program's 127.
    let exec_line = web.out.lines().find_map(|l| l.strip_prefix("exec: ")).unwrap_or_default();
    assert!(
        exec_line.starts_with("pid ") && !exec_line.starts_with("pid 1 ") && exec_line.contains("on kernel 6.1."),
        "{web:?}"
    );
    assert!(web.out.contains("exec-code: 7"), "{web:?}");
    assert!(web.out.contains("exec-missing: 127 twinbox: exec: \"nope\": executable file not found"), "{web:?}");
    let peer = get("peer");
    assert_eq!(peer.code, 0, "{peer:?}");
    assert!(peer.out.starts_with("hello from twinbox\n1\n65520\ndefault via "), "by name, MTU, route: {peer:?}");
    assert!(peer.out.contains("gateway-answers"), "{peer:?}");
    let stopped = get("web-stop");
    // `hello serve` is pid 1 of its namespace without a SIGTERM handler: SIGTERM through the
    // agent does nothing, SIGKILL after the timeout ends it, as for a container (137).
    assert_eq!(stopped.code, 137, "{stopped:?}");
    assert!(stopped.out.contains("left: 0 taps 0 addresses 0"), "nothing left: {stopped:?}");
    // Detached: its VMM runs on, its output in the log; exec, stop and rm.
    let bg = get("detached");
    assert!(bg.out.contains("logs: listening on 8081"), "{bg:?}");
    assert!(bg.out.contains("exec: 4") && bg.out.contains("ps: Exited (137)"), "{bg:?}");
    assert!(bg.out.contains("rm: 0 0 0"), "nothing left: {bg:?}");
    // A workload that handles SIGTERM gets it from `stop`, through the agent, and ends its way.
    assert!(bg.out.contains("trap: Exited (3) ready got-term"), "{bg:?}");
    // A container and a VM on one user network reach each other by name; five detached VMs,
    // removed, leave no instance, tap, socket or VMM.
    let mixed = get("mixed");
    assert!(mixed.out.contains("container-to-vm: HTTP/1."), "{mixed:?}");
    // `run -d` returns once the agent answers; a workload that closed its output still takes
    // exec; -i, -t and -u as for a container; a reader that stops reading holds up only its
    // own exec; a container started later is in the VM's /etc/hosts; an agent that does not
    // answer in time fails `run -d` with the console's tail and leaves nothing behind.
    let agent = get("agent");
    for line in [
        "at-once: up",
        "stdin-none: []",
        "stdin: [hi]",
        "tty: /dev/pts/0",
        "user: uid=65534(nobody) gid=65534(nogroup)",
        "parallel: ok",
        "slow: 3000000",
        "hosts: 1",
        "left: 0 taps 0 sockets 0 vmms 0",
    ] {
        assert!(agent.out.lines().any(|l| l.starts_with(line)), "{line}: {agent:?}");
    }
    // A named volume is a disk of the VM: what one VM wrote, the next reads; one VM at a time.
    let volumes = get("volumes");
    for line in [
        "read: kept",
        "ro: kept",
        "busy: 1 twinbox: volume vdata is in use by another microVM",
        "ls: disk 64M ",
        "rm: 0 0 0",
    ] {
        assert!(volumes.out.lines().any(|l| l.starts_with(line)), "{line}: {volumes:?}");
    }
    assert!(volumes.out.contains("/data/g: Read-only file system"), ":ro refuses writes: {volumes:?}");
    let never = agent.out.lines().find(|l| l.starts_with("never: ")).unwrap_or_default();
    assert!(never.starts_with("never: 125 ") && never.contains("did not answer within"), "{agent:?}");
    assert!(never.contains("console's last lines"), "{agent:?}");
    assert!(mixed.out.contains("vm-to-container: HTTP/1."), "{mixed:?}");
    assert!(mixed.out.contains("five: 5 taps 5"), "{mixed:?}");
    assert!(mixed.out.contains("left: 0 taps 0 sockets 0 vmms 0"), "{mixed:?}");

    let snap = get("snapshot");
    let cold = get("streams");
    let cold_line = format!("run: {}|{}|{}", cold.out.trim_end(), cold.code, cold.err.replace('\n', " "));
    let runs: Vec<&str> = snap.out.lines().filter(|l| l.starts_with("run: ")).collect();
    assert_eq!(runs.len(), 10, "{snap:?}");
    for run in &runs {
        assert_eq!(*run, cold_line, "a restored run prints what the cold-booted one did: {snap:?}");
    }
    assert!(snap.out.contains("templates: 1\n"), "{snap:?}");
    assert!(snap.out.contains("big: 70000|0\n"), "a start larger than the mailbox: {snap:?}");
    let missing = snap.out.lines().find(|l| l.starts_with("missing: ")).unwrap_or_default();
    assert!(missing.starts_with("missing: 127|") && missing.contains("nosuchcmd"), "{snap:?}");
    let probe = |name: &str| -> Vec<String> {
        let line = snap.out.lines().find(|l| l.starts_with(name)).unwrap_or_default();
        line[name.len()..].split_whitespace().map(String::from).collect()
    };
    let (s1, s2) = (probe("s1: "), probe("s2: "));
    assert_eq!((s1.len(), s2.len()), (4, 4), "random bytes, hostname, MAC, address each: {snap:?}");
    for (i, what) in ["random bytes", "hostname", "MAC address", "IP address"].iter().enumerate() {
        assert_ne!(s1[i], s2[i], "two VMs restored from one template differ in their {what}: {snap:?}");
    }
    assert_eq!(s1[0].len(), 32, "16 random bytes in hex: {snap:?}");
    let tampered = snap.out.lines().find(|l| l.starts_with("tampered: ")).unwrap_or_default();
    assert!(
        tampered.starts_with("tampered: 1 ") && tampered.contains("memory does not match its checksum"),
        "{snap:?}"
    );
    assert!(snap.out.contains("snapshot-rm: 0 0 0"), "{snap:?}");
    assert!(snap.out.contains("left: 0 taps 0 sockets 0"), "{snap:?}");

    let jail = get("jail");
    let line = |prefix: &str| jail.out.lines().find(|l| l.starts_with(prefix)).unwrap_or_default().to_owned();
    let uid: u64 = line("jailed uid: ").split_whitespace().nth(2).and_then(|u| u.parse().ok()).unwrap_or(0);
    assert!(uid >= u64::from(twinbox_microvm::jail::VMM_ID_BASE), "an unprivileged uid of its own: {jail:?}");
    assert!(
        line("jailed uid: ").ends_with("caps: 0000000000000000 bnd: 0000000000000000 seccomp: 2"),
        "no capability, seccomp: {jail:?}"
    );
    let filtered: Vec<String> = line("jailed filtered: ").split_whitespace().map(String::from).collect();
    assert!(filtered.len() == 5 && filtered[2] == filtered[4] && filtered[2] != "0", "every thread: {jail:?}");
    assert_eq!(line("jailed root: "), "jailed root: 0 netns: own", "{jail:?}");
    assert_eq!(line("jailed cgroup: "), format!("jailed cgroup: twinbox/vmm limit: {}", (64 + 64) << 20), "{jail:?}");
    assert_eq!(line("after: "), "after: 0 vmms 0", "the VMM and its cgroup are gone: {jail:?}");
    assert!(line("free uid: ").starts_with("free uid: 0 ") && line("free uid: ").ends_with("seccomp: 0"), "{jail:?}");
    assert!(line("free root: ").ends_with("netns: host"), "{jail:?}");

    assert_eq!(get("holds").out, "", "every run released its image hold");
}

//! `linux.seccomp` from the OCI spec, compiled to a classic BPF program for the host
//! architecture and installed with seccomp(2).
//!
//! The program is built here rather than with [`seccompiler::SeccompFilter`], whose model is one
//! match action per filter: an OCI profile gives every rule its own action and errno. The
//! argument comparisons are still seccompiler's ([`SeccompRule`] → BPF), wrapped in our own
//! dispatch:
//!
//! ```text
//! load arch;  arch != host            → KILL_PROCESS
//! load nr;    nr is an x32 syscall    → KILL_PROCESS        (x86_64 only)
//!             nr > newest known nr    → ERRNO(ENOSYS)       (unless the default allows)
//! binary search over the syscalls that have rules:
//!     each rule with arguments, in profile order:  all conditions hold → its action
//!     then the syscall's rule without arguments, if any → its action
//!     otherwise                                         → default action
//! any other syscall                                     → default action
//! ```
//!
//! Semantics follow runc with libseccomp where they differ from a literal reading: names the
//! host does not know are skipped (Docker's profile lists syscalls of every architecture); several
//! comparisons on the same argument in one rule are OR-ed, one rule each (runc does this because
//! libseccomp rejects them); `SCMP_CMP_MASKED_EQ` is `(arg & value) == valueTwo`; `errnoRet`
//! defaults to EPERM for `SCMP_ACT_ERRNO` and `SCMP_ACT_TRACE`. Only the host architecture is
//! compiled; other entries of `architectures` are ignored and their syscalls are killed.

use std::collections::BTreeMap;
use std::str::FromStr;

use nix::errno::Errno;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator, LinuxSyscall,
};
use seccompiler::{
    sock_filter, BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
};
use twinbox_exit::ExitCode;

/// The kernel's limit on a filter's length (BPF_MAXINSNS).
pub const MAX_INSTRUCTIONS: usize = 4096;

// Classic BPF opcodes (linux/bpf_common.h) and seccomp_data offsets (linux/seccomp.h).
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x05 | 0x10;
const JMP_JGT_K: u16 = 0x05 | 0x20;
const JMP_JGE_K: u16 = 0x05 | 0x30;
const RET_K: u16 = 0x06;
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// x32 syscalls run with AUDIT_ARCH_X86_64 and this bit set in the number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_KILL_PROCESS: u32 = 0x8000_0000;

/// Errors from compiling or installing a seccomp profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: syscall {name} unknown on {arch}")]
    UnknownSyscall { name: String, arch: &'static str },
    #[error("seccomp: {what} not supported")]
    Unsupported { what: &'static str },
    #[error("seccomp: host architecture {0} not supported")]
    UnsupportedArch(&'static str),
    #[error("seccomp: errnoRet {errno} of {action} out of range (0..=65535)")]
    ErrnoRange { action: String, errno: u32 },
    #[error("seccomp: syscall {syscalls}: argument index {index} out of range (0..=5)")]
    ArgIndex { syscalls: String, index: usize },
    #[error("seccomp: rule for {syscalls}")]
    Rule {
        syscalls: String,
        #[source]
        source: BackendError,
    },
    #[error("seccomp: filter has {0} instructions, the kernel takes at most {MAX_INSTRUCTIONS}")]
    TooLarge(usize),
    #[error("seccomp: install filter (flags {flags:#x})")]
    Install {
        flags: u64,
        #[source]
        source: Errno,
    },
    #[error("seccomp: install filter: thread {0} could not be synchronised (TSYNC)")]
    ThreadSync(i64),
}

impl ExitCode for SeccompError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            // The spec's seccomp profile.
            SeccompError::UnknownSyscall { .. }
            | SeccompError::Unsupported { .. }
            | SeccompError::ErrnoRange { .. }
            | SeccompError::ArgIndex { .. }
            | SeccompError::Rule { .. }
            | SeccompError::TooLarge(_) => USER_ERROR,
            SeccompError::UnsupportedArch(_) | SeccompError::Install { .. } | SeccompError::ThreadSync(_) => INTERNAL,
        }
    }
}

/// A compiled filter, ready to be installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    program: BpfProgram,
    /// `SECCOMP_FILTER_FLAG_*` (c_ulong, which is u64 on every architecture compiled for).
    flags: u64,
}

impl Filter {
    /// The BPF program.
    pub fn program(&self) -> &[sock_filter] {
        &self.program
    }

    /// seccomp(2) flags (`SECCOMP_FILTER_FLAG_*`) from the profile's `flags`.
    pub fn flags(&self) -> u64 {
        self.flags
    }

    /// Install the filter on the calling thread (all threads with `SECCOMP_FILTER_FLAG_TSYNC`).
    ///
    /// Does not set no_new_privs: without it the caller needs CAP_SYS_ADMIN. Allocation free.
    pub fn install(&self) -> Result<(), SeccompError> {
        let prog = libc::sock_fprog {
            // compile() refuses programs longer than MAX_INSTRUCTIONS, so this fits.
            len: self.program.len() as libc::c_ushort,
            // seccompiler's sock_filter is #[repr(C)] with the same fields as the kernel's.
            filter: self.program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) only reads `prog` and the `len` instructions
        // it points to, which `self.program` owns and keeps alive for the whole call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                self.flags,
                &prog as *const libc::sock_fprog,
            )
        };
        match rc {
            0 => Ok(()),
            rc if rc < 0 => Err(SeccompError::Install { flags: self.flags, source: Errno::last() }),
            // With TSYNC, the id of a thread that could not be synchronised.
            tid => Err(SeccompError::ThreadSync(tid)),
        }
    }
}

/// The syscall number of `name` on the host architecture.
pub fn syscall_number(name: &str) -> Result<u32, SeccompError> {
    syscalls::Sysno::from_str(name)
        .map(|sysno| sysno.id() as u32)
        .map_err(|()| SeccompError::UnknownSyscall { name: name.to_owned(), arch: std::env::consts::ARCH })
}

/// Compile `profile` for the host architecture.
pub fn compile(profile: &LinuxSeccomp) -> Result<Filter, SeccompError> {
    let audit_arch = host_audit_arch()?;
    if profile.listener_path().is_some() {
        return Err(SeccompError::Unsupported { what: "listenerPath (SCMP_ACT_NOTIFY)" });
    }
    for arch in profile.architectures().iter().flatten() {
        if !matches!(arch, Arch::ScmpArchNative) && *arch as u32 != audit_arch {
            tracing::debug!(?arch, "seccomp: architecture not compiled, its syscalls are killed");
        }
    }
    let flags = filter_flags(profile.flags().as_deref().unwrap_or_default());
    let default = Action::new(profile.default_action(), profile.default_errno_ret())?;

    let mut table: BTreeMap<u32, SyscallRules> = BTreeMap::new();
    for rule in profile.syscalls().iter().flatten() {
        add_rule(&mut table, rule)?;
    }

    let mut entries = Vec::with_capacity(table.len());
    for (nr, rules) in table {
        let fallthrough = rules.unconditional.map_or(default.ret, |action| action.ret);
        if rules.conditional.is_empty() && fallthrough == default.ret {
            continue;
        }
        let mut body = Vec::new();
        for (rule, ret) in rules.conditional {
            // A rule's BPF falls through when all its conditions hold and otherwise skips exactly
            // one instruction: the return that follows it.
            body.extend(BpfProgram::from(rule));
            body.push(ret_k(ret));
        }
        body.push(ret_k(fallthrough));
        entries.push((nr, body));
    }

    let mut program = vec![
        stmt(LD_W_ABS, DATA_ARCH),
        jump(JMP_JEQ_K, audit_arch, 1, 0),
        ret_k(RET_KILL_PROCESS),
        stmt(LD_W_ABS, DATA_NR),
    ];
    if audit_arch == Arch::ScmpArchX86_64 as u32 {
        program.push(jump(JMP_JGE_K, X32_SYSCALL_BIT, 0, 1));
        program.push(ret_k(RET_KILL_PROCESS));
    }
    if !default.allows() {
        // Like runc: a syscall newer than anything the profile could name gets ENOSYS, so libc
        // falls back to an older one (clone3 → clone) instead of failing with EPERM.
        program.push(jump(JMP_JGT_K, syscalls::Sysno::last().id() as u32, 0, 1));
        program.push(ret_k(u32::from(SeccompAction::Errno(libc::ENOSYS as u32))));
    }
    program.extend(dispatch(&entries, default.ret));
    if program.len() > MAX_INSTRUCTIONS {
        return Err(SeccompError::TooLarge(program.len()));
    }
    Ok(Filter { program, flags })
}

/// An action with its BPF return value and its OCI name for messages.
#[derive(Debug, Clone, Copy)]
struct Action {
    ret: u32,
    oci: LinuxSeccompAction,
}

impl Action {
    fn new(action: LinuxSeccompAction, errno_ret: Option<u32>) -> Result<Self, SeccompError> {
        let data = |default: i32| match errno_ret {
            None => Ok(default as u32),
            Some(errno) if errno <= 0xffff => Ok(errno),
            Some(errno) => Err(SeccompError::ErrnoRange { action: action.to_string(), errno }),
        };
        let compiled = match action {
            LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
            LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(data(libc::EPERM)?),
            // libseccomp's SCMP_ACT_KILL is KILL_THREAD.
            LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => SeccompAction::KillThread,
            LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
            LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
            LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
            LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(data(libc::EPERM)?),
            LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::Unsupported { what: "SCMP_ACT_NOTIFY" }),
        };
        Ok(Self { ret: u32::from(compiled), oci: action })
    }

    fn allows(&self) -> bool {
        matches!(self.oci, LinuxSeccompAction::ScmpActAllow | LinuxSeccompAction::ScmpActLog)
    }
}

#[derive(Default)]
struct SyscallRules {
    /// Rules with argument conditions, in profile order, each with its return value.
    conditional: Vec<(SeccompRule, u32)>,
    /// The action of the rule without conditions, if any.
    unconditional: Option<Action>,
}

fn add_rule(table: &mut BTreeMap<u32, SyscallRules>, rule: &LinuxSyscall) -> Result<(), SeccompError> {
    let action = Action::new(rule.action(), rule.errno_ret())?;
    let alternatives = conditions(rule)?;
    for name in rule.names() {
        let nr = match syscall_number(name) {
            Ok(nr) => nr,
            Err(error) => {
                tracing::debug!(%error, "seccomp: skipped");
                continue;
            }
        };
        let entry = table.entry(nr).or_default();
        match &alternatives {
            None => match &entry.unconditional {
                None => entry.unconditional = Some(action),
                Some(first) if first.ret == action.ret => {}
                // Two unconditional rules with different actions (podman's default profile
                // lists setns both as ALLOW and as ERRNO(1)): the first one wins, as runc with
                // libseccomp behaves on the same profile.
                Some(first) => {
                    tracing::debug!(syscall = %name, kept = %describe(first), ignored = %describe(&action), "seccomp: later conflicting rule ignored");
                }
            },
            Some(alternatives) => {
                for conditions in alternatives {
                    let compiled = SeccompRule::new(conditions.clone())
                        .map_err(|source| SeccompError::Rule { syscalls: rule.names().join(","), source })?;
                    entry.conditional.push((compiled, action.ret));
                }
            }
        }
    }
    Ok(())
}

fn describe(action: &Action) -> String {
    match action.oci {
        LinuxSeccompAction::ScmpActErrno | LinuxSeccompAction::ScmpActTrace => {
            format!("{}({})", action.oci, action.ret & 0xffff)
        }
        _ => action.oci.to_string(),
    }
}

/// The rule's conditions as alternatives (OR) of condition lists (AND); `None` when the rule has
/// no conditions. Conditions that can never hold drop their alternative.
fn conditions(rule: &LinuxSyscall) -> Result<Option<Vec<Vec<SeccompCondition>>>, SeccompError> {
    let args = match rule.args() {
        Some(args) if !args.is_empty() => args,
        _ => return Ok(None),
    };
    let mut per_index = [0usize; 6];
    let mut compiled = Vec::with_capacity(args.len());
    for arg in args {
        let index = arg.index();
        if index > 5 {
            return Err(SeccompError::ArgIndex { syscalls: rule.names().join(","), index });
        }
        per_index[index] += 1;
        compiled
            .push(condition(arg).map_err(|source| SeccompError::Rule { syscalls: rule.names().join(","), source })?);
    }
    let alternatives = if per_index.iter().any(|&count| count > 1) {
        compiled.into_iter().flatten().map(|c| vec![c]).collect()
    } else {
        compiled.into_iter().collect::<Option<Vec<_>>>().into_iter().collect()
    };
    Ok(Some(alternatives))
}

/// One comparison; `None` if it can never hold.
fn condition(arg: &LinuxSeccompArg) -> Result<Option<SeccompCondition>, BackendError> {
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let (mask, datum) = (arg.value(), arg.value_two().unwrap_or(0));
            if datum & !mask != 0 {
                tracing::debug!(mask, datum, "seccomp: SCMP_CMP_MASKED_EQ can never match");
                return Ok(None);
            }
            (SeccompCmpOp::MaskedEq(mask), datum)
        }
    };
    // The index was checked by the caller, so it fits a u8.
    SeccompCondition::new(arg.index() as u8, SeccompCmpArgLen::Qword, op, value).map(Some)
}

fn filter_flags(flags: &[LinuxSeccompFilterFlag]) -> u64 {
    let mut bits = 0;
    for flag in flags {
        bits |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            // Only meaningful with a notification listener, which is not supported.
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                tracing::debug!("seccomp: SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV ignored");
                0
            }
        };
    }
    bits
}

fn host_audit_arch() -> Result<u32, SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(Arch::ScmpArchX86_64 as u32),
        "aarch64" => Ok(Arch::ScmpArchAarch64 as u32),
        "riscv64" => Ok(Arch::ScmpArchRiscv64 as u32),
        other => Err(SeccompError::UnsupportedArch(other)),
    }
}

/// Syscalls at most this many are tested one after the other rather than by bisection.
const LINEAR: usize = 3;

/// Code that, with the syscall number in the accumulator, runs the body of the matching entry or
/// returns `default`. Every path ends in a return.
fn dispatch(entries: &[(u32, Vec<sock_filter>)], default: u32) -> Vec<sock_filter> {
    let mut out = Vec::new();
    if entries.len() <= LINEAR {
        for (nr, body) in entries {
            out.extend(skip_if(JMP_JEQ_K, *nr, false, body.len()));
            out.extend_from_slice(body);
        }
        out.push(ret_k(default));
    } else {
        let (low, high) = entries.split_at(entries.len() / 2);
        let low_code = dispatch(low, default);
        out.extend(skip_if(JMP_JGE_K, high[0].0, true, low_code.len()));
        out.extend(low_code);
        out.extend(dispatch(high, default));
    }
    out
}

/// Instructions that skip the `skip` instructions following them when `(A op k) == when`, and
/// otherwise fall through to them.
fn skip_if(op: u16, k: u32, when: bool, skip: usize) -> Vec<sock_filter> {
    match u8::try_from(skip) {
        Ok(skip) => {
            let (jt, jf) = if when { (skip, 0) } else { (0, skip) };
            vec![jump(op, k, jt, jf)]
        }
        Err(_) => {
            // Too far for a conditional jump: branch over an unconditional one.
            let (jt, jf) = if when { (0, 1) } else { (1, 0) };
            vec![jump(op, k, jt, jf), stmt(JMP_JA, skip as u32)]
        }
    }
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn ret_k(ret: u32) -> sock_filter {
    stmt(RET_K, ret)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW: u32 = 0x7fff_0000;
    const ERRNO: u32 = 0x0005_0000;
    const TRAP: u32 = 0x0003_0000;
    const KILL_THREAD: u32 = 0;

    /// Runs a seccomp BPF program on `(arch, nr, args)` the way the kernel does, restricted to
    /// the instructions this module emits.
    fn run(program: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, arg) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_ne_bytes());
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let insn = &program[pc];
            pc += 1;
            match insn.code {
                LD_W_ABS => {
                    let at = insn.k as usize;
                    a = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                }
                0x54 => a &= insn.k, // BPF_ALU | BPF_AND | BPF_K
                JMP_JA => pc += insn.k as usize,
                JMP_JEQ_K | JMP_JGT_K | JMP_JGE_K => {
                    let taken = match insn.code {
                        JMP_JEQ_K => a == insn.k,
                        JMP_JGT_K => a > insn.k,
                        _ => a >= insn.k,
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                RET_K => return insn.k,
                other => panic!("unexpected BPF opcode {other:#x}"),
            }
        }
    }

    fn host() -> u32 {
        host_audit_arch().unwrap()
    }

    fn nr(name: &str) -> u32 {
        syscall_number(name).unwrap()
    }

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    fn call(filter: &Filter, name: &str, args: [u64; 6]) -> u32 {
        run(filter.program(), host(), nr(name), args)
    }

    #[test]
    fn default_allow_with_deny_rules_and_own_errnos() {
        let filter = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["mkdirat", "fchmodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["unlinkat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"names": ["getppid"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["reboot"], "action": "SCMP_ACT_KILL"},
                {"names": ["swapon"], "action": "SCMP_ACT_TRAP"}
            ]}"#,
        ))
        .unwrap();
        assert_eq!(call(&filter, "mkdirat", [0; 6]), ERRNO | 1);
        assert_eq!(call(&filter, "fchmodat", [0; 6]), ERRNO | 1);
        assert_eq!(call(&filter, "unlinkat", [0; 6]), ERRNO | 13);
        assert_eq!(call(&filter, "getppid", [0; 6]), ERRNO | libc::EPERM as u32);
        assert_eq!(call(&filter, "reboot", [0; 6]), KILL_THREAD);
        assert_eq!(call(&filter, "swapon", [0; 6]), TRAP);
        assert_eq!(call(&filter, "getpid", [0; 6]), ALLOW);
        assert_eq!(call(&filter, "renameat2", [0; 6]), ALLOW);
        // Newer than any known syscall: the default applies when it allows.
        assert_eq!(run(filter.program(), host(), 1020, [0; 6]), ALLOW);
    }

    /// The shape of Docker's default profile: deny by default, a long allow list, a few rules on
    /// arguments, names from other architectures.
    #[test]
    fn docker_like_default_errno_allow_list() {
        let names: Vec<&str> = syscalls::Sysno::iter()
            .map(|s| s.name())
            .filter(|n| !matches!(*n, "mount" | "reboot" | "personality" | "clone" | "clone3" | "ptrace"))
            .collect();
        let mut allow = serde_json::json!(names);
        allow
            .as_array_mut()
            .unwrap()
            .extend(["arm_fadvise64_64", "sync_file_range2", "no_such_syscall"].map(Into::into));
        let json = serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": allow, "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 4294967295u64, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288u64, "valueTwo": 0,
                           "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
            ]
        });
        let filter = compile(&serde_json::from_value(json).unwrap()).unwrap();
        assert!(filter.program().len() < MAX_INSTRUCTIONS);
        assert_eq!(call(&filter, "read", [0; 6]), ALLOW);
        assert_eq!(call(&filter, "openat", [0; 6]), ALLOW);
        assert_eq!(call(&filter, "exit_group", [0; 6]), ALLOW);
        assert_eq!(call(&filter, "mount", [0; 6]), ERRNO | 1);
        assert_eq!(call(&filter, "reboot", [0; 6]), ERRNO | 1);
        assert_eq!(call(&filter, "clone3", [0; 6]), ERRNO | 38);
        assert_eq!(call(&filter, "personality", [0; 6]), ALLOW);
        assert_eq!(call(&filter, "personality", [8, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&filter, "personality", [0xffff_ffff, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&filter, "personality", [1, 0, 0, 0, 0, 0]), ERRNO | 1);
        // 64-bit comparison: the upper half matters.
        assert_eq!(call(&filter, "personality", [1 << 32, 0, 0, 0, 0, 0]), ERRNO | 1);
        let thread_flags = (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_THREAD) as u64;
        assert_eq!(call(&filter, "clone", [thread_flags, 0, 0, 0, 0, 0]), ALLOW);
        let newuser = libc::CLONE_NEWUSER as u64;
        assert_eq!(call(&filter, "clone", [newuser, 0, 0, 0, 0, 0]), ERRNO | 1);
        // Newer than anything known: ENOSYS so libc falls back.
        assert_eq!(run(filter.program(), host(), 1020, [0; 6]), ERRNO | 38);
        // Another architecture, or x32 on x86_64: killed.
        assert_eq!(run(filter.program(), 0x4000_0003, 20, [0; 6]), RET_KILL_PROCESS);
        if std::env::consts::ARCH == "x86_64" {
            let x32_read = X32_SYSCALL_BIT;
            assert_eq!(run(filter.program(), host(), x32_read, [0; 6]), RET_KILL_PROCESS);
        }
        // Every listed syscall is reachable through the bisection.
        for name in &names {
            assert_eq!(call(&filter, name, [0; 6]), ALLOW, "{name}");
        }
    }

    #[test]
    fn argument_comparisons() {
        let rule = |op: &str, value: u64, value_two: u64| {
            serde_json::json!({"names": ["getpriority"], "action": "SCMP_ACT_ERRNO",
                "errnoRet": 18, "args": [{"index": 1, "value": value, "valueTwo": value_two,
                "op": op}]})
        };
        type Case<'a> = (&'a str, u64, u64, &'a [(u64, bool)]);
        let cases: [Case; 7] = [
            ("SCMP_CMP_EQ", 5, 0, &[(5, true), (4, false), (5 | 1 << 32, false)]),
            ("SCMP_CMP_NE", 5, 0, &[(5, false), (4, true), (5 | 1 << 32, true)]),
            ("SCMP_CMP_LT", 5, 0, &[(4, true), (5, false), (1 << 32, false)]),
            ("SCMP_CMP_LE", 5, 0, &[(5, true), (6, false), (0, true)]),
            ("SCMP_CMP_GT", 1 << 32, 0, &[(1 << 32, false), ((1 << 32) + 1, true), (7, false)]),
            ("SCMP_CMP_GE", 1 << 32, 0, &[(1 << 32, true), (u64::MAX, true), (7, false)]),
            ("SCMP_CMP_MASKED_EQ", 0xf0, 0x30, &[(0x35, true), (0x135, true), (0x45, false)]),
        ];
        for (op, value, value_two, checks) in cases {
            let json = serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [rule(op, value, value_two)]});
            let filter = compile(&serde_json::from_value(json).unwrap()).unwrap();
            for &(arg, denied) in checks {
                let expected = if denied { ERRNO | 18 } else { ALLOW };
                assert_eq!(call(&filter, "getpriority", [0, arg, 0, 0, 0, 0]), expected, "{op} {arg:#x}");
            }
        }
    }

    #[test]
    fn conditions_and_or_and_precedence() {
        let filter = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
                {"names": ["kill"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 3,
                 "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                          {"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]},
                {"names": ["tgkill"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 2, "value": 10, "op": "SCMP_CMP_EQ"},
                          {"index": 2, "value": 12, "op": "SCMP_CMP_EQ"}]},
                {"names": ["setns"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 1, "value": 1, "valueTwo": 2, "op": "SCMP_CMP_MASKED_EQ"}]}
            ]}"#,
        ))
        .unwrap();
        // AND of different arguments; the more specific rule wins over the plain one.
        assert_eq!(call(&filter, "kill", [1, 9, 0, 0, 0, 0]), ERRNO | 3);
        assert_eq!(call(&filter, "kill", [1, 15, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(&filter, "kill", [2, 9, 0, 0, 0, 0]), ALLOW);
        // Several comparisons on one argument are alternatives (runc).
        assert_eq!(call(&filter, "tgkill", [0, 0, 10, 0, 0, 0]), ALLOW);
        assert_eq!(call(&filter, "tgkill", [0, 0, 12, 0, 0, 0]), ALLOW);
        assert_eq!(call(&filter, "tgkill", [0, 0, 11, 0, 0, 0]), ERRNO | 1);
        // valueTwo outside the mask never matches.
        assert_eq!(call(&filter, "setns", [0, 2, 0, 0, 0, 0]), ERRNO | 1);
        assert_eq!(call(&filter, "setns", [0, 0, 0, 0, 0, 0]), ERRNO | 1);
    }

    #[test]
    fn actions_and_flags() {
        let filter = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_LOG",
                "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG"],
                "syscalls": [
                {"names": ["acct"], "action": "SCMP_ACT_KILL_PROCESS"},
                {"names": ["quotactl"], "action": "SCMP_ACT_KILL_THREAD"},
                {"names": ["ptrace"], "action": "SCMP_ACT_TRACE"},
                {"names": ["vhangup"], "action": "SCMP_ACT_TRACE", "errnoRet": 7},
                {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}
            ]}"#,
        ))
        .unwrap();
        assert_eq!(filter.flags(), 3);
        assert_eq!(call(&filter, "acct", [0; 6]), RET_KILL_PROCESS);
        assert_eq!(call(&filter, "quotactl", [0; 6]), KILL_THREAD);
        assert_eq!(call(&filter, "ptrace", [0; 6]), 0x7ff0_0000 | 1);
        assert_eq!(call(&filter, "vhangup", [0; 6]), 0x7ff0_0000 | 7);
        assert_eq!(call(&filter, "getpid", [0; 6]), ALLOW);
        assert_eq!(call(&filter, "read", [0; 6]), 0x7ffc_0000);
    }

    #[test]
    fn many_conditional_rules_need_long_jumps() {
        // Enough rules on one syscall that the bisection jumps exceed 255 instructions.
        let rules: Vec<_> = (0..60u64)
            .map(|i| {
                serde_json::json!({"names": ["getpriority"], "action": "SCMP_ACT_ERRNO",
                    "errnoRet": 100 + i, "args": [{"index": 0, "value": i, "op": "SCMP_CMP_EQ"}]})
            })
            .chain(std::iter::once(serde_json::json!(
                {"names": ["read", "write", "close", "openat", "getpid"], "action": "SCMP_ACT_ALLOW"})))
            .collect();
        let json = serde_json::json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": rules});
        let filter = compile(&serde_json::from_value(json).unwrap()).unwrap();
        assert!(filter.program().len() > 300);
        for i in 0..60u64 {
            assert_eq!(call(&filter, "getpriority", [i, 0, 0, 0, 0, 0]), ERRNO | (100 + i as u32));
        }
        assert_eq!(call(&filter, "getpriority", [61, 0, 0, 0, 0, 0]), ERRNO | 1);
        for name in ["read", "write", "close", "openat", "getpid"] {
            assert_eq!(call(&filter, name, [0; 6]), ALLOW, "{name}");
        }
        assert_eq!(call(&filter, "mkdirat", [0; 6]), ERRNO | 1);
    }

    #[test]
    fn errors() {
        let err = |json: &str| compile(&profile(json)).unwrap_err().to_string();
        assert_eq!(err(r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#), "seccomp: SCMP_ACT_NOTIFY not supported");
        assert!(err(r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["mkdirat"], "action": "SCMP_ACT_NOTIFY"}]}"#)
        .contains("SCMP_ACT_NOTIFY not supported"));
        assert!(err(r#"{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/l.sock"}"#).contains("listenerPath"));
        assert_eq!(
            err(r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ERRNO",
                 "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}"#),
            "seccomp: syscall read: argument index 6 out of range (0..=5)"
        );
        // Conflicting unconditional rules: the first wins (as runc + libseccomp on podman's profile).
        let first_wins = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["mkdirat"], "action": "SCMP_ACT_KILL"}]}"#,
        ))
        .unwrap();
        assert_eq!(call(&first_wins, "mkdirat", [0; 6]), ERRNO | 1);
        assert!(err(r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}"#).contains("errnoRet 70000"));
        assert_eq!(
            syscall_number("foo_bar").unwrap_err().to_string(),
            format!("seccomp: syscall foo_bar unknown on {}", std::env::consts::ARCH)
        );
    }

    #[test]
    fn unknown_names_are_skipped() {
        let filter = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["no_such_call", "mkdirat"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["only_unknown"], "action": "SCMP_ACT_KILL"}]}"#,
        ))
        .unwrap();
        assert_eq!(call(&filter, "mkdirat", [0; 6]), ERRNO | 1);
        assert_eq!(call(&filter, "unlinkat", [0; 6]), ALLOW);
    }
}

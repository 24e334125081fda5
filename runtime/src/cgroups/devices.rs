//! Device access rules: the spec's `linux.resources.devices` followed by the devices every
//! container gets, written to the v1 devices controller as they are, and on cgroup v2 turned
//! into the policy the v1 controller would have ended up with and compiled to a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program (what runc and crun attach; see [`super::bpf`]).

use std::fmt;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

use super::CgroupError;

/// Access bits, as both the v1 controller and `struct bpf_cgroup_dev_ctx` number them.
pub(super) const MKNOD: u8 = 1;
pub(super) const READ: u8 = 2;
pub(super) const WRITE: u8 = 4;
const ALL_ACCESS: u8 = MKNOD | READ | WRITE;

/// Which devices a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Every device (`a`): a rule of this kind resets the policy.
    All,
    Block,
    Char,
}

/// One rule: allow or deny `access` to the devices of `kind` with `major`:`minor` (`None`:
/// any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rule {
    pub allow: bool,
    pub kind: Kind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u8,
}

const fn allow_char(major: u32, minor: Option<u32>, access: u8) -> Rule {
    Rule { allow: true, kind: Kind::Char, major: Some(major), minor, access }
}

/// Rules appended after the spec's own device rules (runc does the same): `mknod` of any device
/// (opening what was made is still checked), and the devices every container gets: the OCI
/// runtime-spec "Default Devices" (null, zero, full, random, urandom, tty, console, ptmx),
/// `/dev/pts/*` and `/dev/net/tun`.
pub(super) const DEFAULT_RULES: &[Rule] = &[
    Rule { allow: true, kind: Kind::Char, major: None, minor: None, access: MKNOD },
    Rule { allow: true, kind: Kind::Block, major: None, minor: None, access: MKNOD },
    allow_char(1, Some(3), ALL_ACCESS),
    allow_char(1, Some(5), ALL_ACCESS),
    allow_char(1, Some(7), ALL_ACCESS),
    allow_char(1, Some(8), ALL_ACCESS),
    allow_char(1, Some(9), ALL_ACCESS),
    allow_char(5, Some(0), ALL_ACCESS),
    allow_char(5, Some(1), ALL_ACCESS),
    allow_char(5, Some(2), ALL_ACCESS),
    allow_char(136, None, ALL_ACCESS),
    allow_char(10, Some(200), ALL_ACCESS),
];

impl Rule {
    /// The spec's rule; `None` for one the device controller cannot express (FIFOs are not
    /// device-controlled).
    pub(super) fn from_spec(rule: &LinuxDeviceCgroup) -> Result<Option<Rule>, CgroupError> {
        let kind = match rule.typ().unwrap_or_default() {
            LinuxDeviceType::A => Kind::All,
            LinuxDeviceType::B => Kind::Block,
            LinuxDeviceType::C | LinuxDeviceType::U => Kind::Char,
            LinuxDeviceType::P => {
                tracing::debug!("device rule for FIFOs has no devices-cgroup equivalent; skipped");
                return Ok(None);
            }
        };
        let letters = rule.access().as_deref().filter(|a| !a.is_empty()).unwrap_or("rwm");
        let mut access = 0;
        for c in letters.chars() {
            access |= match c {
                'r' => READ,
                'w' => WRITE,
                'm' => MKNOD,
                _ => {
                    return Err(CgroupError::InvalidValue {
                        field: "devices[].access",
                        value: letters.to_string(),
                        expected: "letters from \"rwm\"",
                    })
                }
            };
        }
        // Device numbers are 12-bit majors and 20-bit minors; i32 keeps them exact as the
        // immediates of the cgroup v2 program.
        let number = |n: Option<i64>| match n {
            None | Some(-1) => Ok(None),
            Some(n) if (0..=i64::from(i32::MAX)).contains(&n) => Ok(Some(n as u32)),
            Some(n) => Err(CgroupError::InvalidValue {
                field: "devices[].major/minor",
                value: n.to_string(),
                expected: "a device number, or -1/absent for any",
            }),
        };
        Ok(Some(Rule { allow: rule.allow(), kind, major: number(rule.major())?, minor: number(rule.minor())?, access }))
    }

    fn same_devices(&self, other: &Rule) -> bool {
        self.kind == other.kind && self.major == other.major && self.minor == other.minor
    }
}

/// `type major:minor access`, as the v1 devices controller reads it.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::All => "a",
            Kind::Block => "b",
            Kind::Char => "c",
        };
        let number = |n: Option<u32>| n.map_or_else(|| "*".to_string(), |n| n.to_string());
        let mut access = String::new();
        for (bit, letter) in [(READ, 'r'), (WRITE, 'w'), (MKNOD, 'm')] {
            if self.access & bit != 0 {
                access.push(letter);
            }
        }
        write!(f, "{kind} {}:{} {access}", number(self.major), number(self.minor))
    }
}

/// The spec's rules in order, then [`DEFAULT_RULES`].
pub(super) fn rules(spec: &[LinuxDeviceCgroup]) -> Result<Vec<Rule>, CgroupError> {
    let mut out = Vec::with_capacity(spec.len() + DEFAULT_RULES.len());
    for rule in spec {
        out.extend(Rule::from_spec(rule)?);
    }
    out.extend_from_slice(DEFAULT_RULES);
    Ok(out)
}

/// Where a list of rules leaves a v1 devices cgroup that started allowing everything: a default
/// and the exceptions to it (all of the opposite kind).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Policy {
    pub default_allow: bool,
    pub exceptions: Vec<Rule>,
}

impl Policy {
    /// Applies `rules` as the v1 controller does, one write at a time: an `a` rule sets the
    /// default and clears the exceptions; a rule that agrees with the default takes its access
    /// away from an exception for exactly those devices; any other rule adds its access to the
    /// exception for those devices (a new one if there is none).
    pub(super) fn from_rules(rules: &[Rule]) -> Policy {
        let mut p = Policy { default_allow: true, exceptions: Vec::new() };
        for rule in rules {
            if rule.kind == Kind::All {
                p = Policy { default_allow: rule.allow, exceptions: Vec::new() };
            } else if rule.allow == p.default_allow {
                for e in p.exceptions.iter_mut().filter(|e| e.same_devices(rule)) {
                    e.access &= !rule.access;
                }
                p.exceptions.retain(|e| e.access != 0);
            } else if let Some(e) = p.exceptions.iter_mut().find(|e| e.same_devices(rule)) {
                e.access |= rule.access;
            } else {
                p.exceptions.push(*rule);
            }
        }
        p
    }

    /// The v1 controller's decision for `access` to a device, for tests and for the program's
    /// specification: under a deny default, allowed when one exception matches the device and
    /// holds every bit asked for; under an allow default, denied when one matches the device
    /// and holds any of them.
    #[cfg(test)]
    pub(super) fn allows(&self, kind: Kind, major: u32, minor: u32, access: u8) -> bool {
        let hit = |e: &&Rule| {
            e.kind == kind
                && !matches!(e.major, Some(m) if m != major)
                && !matches!(e.minor, Some(m) if m != minor)
                && {
                    if self.default_allow {
                        access & e.access != 0
                    } else {
                        access & !e.access == 0
                    }
                }
        };
        if self.exceptions.iter().any(|e| hit(&e)) {
            !self.default_allow
        } else {
            self.default_allow
        }
    }

    /// The policy as a cgroup device program: `r1` points at `struct bpf_cgroup_dev_ctx`
    /// (`access_type` = access << 16 | type, `major`, `minor`, each a u32); the program returns
    /// 1 to allow and 0 to deny. One block per exception, each jumping to the next on the first
    /// field that does not match.
    pub(super) fn program(&self) -> Vec<u64> {
        use insn::*;
        let mut prog =
            vec![ldx_w(R2, R1, 0), mov_x(R3, R2), and_k(R3, 0xffff), rsh_k(R2, 16), ldx_w(R4, R1, 4), ldx_w(R5, R1, 8)];
        for e in &self.exceptions {
            // Each check: a few instructions, the last a jump past the block when it fails.
            let mut checks: Vec<Vec<(u64, bool)>> = Vec::new();
            let dev_type = if e.kind == Kind::Block { DEV_BLOCK } else { DEV_CHAR };
            checks.push(vec![(jne_k(R3, dev_type, 0), true)]);
            if self.default_allow {
                // A deny exception: it applies when any bit asked for is in it.
                if e.access != ALL_ACCESS {
                    checks.push(vec![
                        (mov_x(R6, R2), false),
                        (and_k(R6, e.access.into()), false),
                        (jeq_k(R6, 0, 0), true),
                    ]);
                }
            } else if e.access != ALL_ACCESS {
                // An allow exception: it applies when every bit asked for is in it.
                let missing = i32::from(!e.access & ALL_ACCESS);
                checks.push(vec![(mov_x(R6, R2), false), (and_k(R6, missing), false), (jne_k(R6, 0, 0), true)]);
            }
            for (n, reg) in [(e.major, R4), (e.minor, R5)] {
                if let Some(n) = n {
                    checks.push(vec![(jne_k(reg, n as i32, 0), true)]);
                }
            }
            let block: Vec<(u64, bool)> = checks
                .into_iter()
                .flatten()
                .chain([(mov_k(R0, i32::from(!self.default_allow)), false), (exit(), false)])
                .collect();
            let len = block.len();
            for (i, (ins, is_jump)) in block.into_iter().enumerate() {
                prog.push(if is_jump { with_offset(ins, (len - i - 1) as i16) } else { ins });
            }
        }
        prog.extend([mov_k(R0, i32::from(self.default_allow)), exit()]);
        prog
    }
}

/// The few eBPF instructions the device program needs, encoded as the kernel reads
/// `struct bpf_insn` on a little-endian host: opcode, dst and src registers, a 16-bit offset
/// and a 32-bit immediate.
pub(super) mod insn {
    pub const R0: u8 = 0;
    pub const R1: u8 = 1;
    pub const R2: u8 = 2;
    pub const R3: u8 = 3;
    pub const R4: u8 = 4;
    pub const R5: u8 = 5;
    pub const R6: u8 = 6;
    /// `BPF_DEVCG_DEV_BLOCK`, `BPF_DEVCG_DEV_CHAR`.
    pub const DEV_BLOCK: i32 = 1;
    pub const DEV_CHAR: i32 = 2;

    const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const ALU64_AND_K: u8 = 0x57;
    const ALU64_RSH_K: u8 = 0x77;
    const ALU64_MOV_K: u8 = 0xb7;
    const ALU64_MOV_X: u8 = 0xbf;
    const JMP_JEQ_K: u8 = 0x15;
    const JMP_JNE_K: u8 = 0x55;
    const JMP_EXIT: u8 = 0x95;

    fn encode(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        u64::from(op) | u64::from(dst | src << 4) << 8 | u64::from(off as u16) << 16 | u64::from(imm as u32) << 32
    }

    /// The instruction with its offset field replaced.
    pub fn with_offset(insn: u64, off: i16) -> u64 {
        insn & !(0xffff << 16) | u64::from(off as u16) << 16
    }

    /// `dst = *(u32 *)(src + off)`
    pub fn ldx_w(dst: u8, src: u8, off: i16) -> u64 {
        encode(LDX_MEM_W, dst, src, off, 0)
    }
    pub fn mov_x(dst: u8, src: u8) -> u64 {
        encode(ALU64_MOV_X, dst, src, 0, 0)
    }
    pub fn mov_k(dst: u8, imm: i32) -> u64 {
        encode(ALU64_MOV_K, dst, 0, 0, imm)
    }
    pub fn and_k(dst: u8, imm: i32) -> u64 {
        encode(ALU64_AND_K, dst, 0, 0, imm)
    }
    pub fn rsh_k(dst: u8, imm: i32) -> u64 {
        encode(ALU64_RSH_K, dst, 0, 0, imm)
    }
    /// `if dst == imm goto pc + 1 + off`
    pub fn jeq_k(dst: u8, imm: i32, off: i16) -> u64 {
        encode(JMP_JEQ_K, dst, 0, off, imm)
    }
    /// `if dst != imm goto pc + 1 + off`
    pub fn jne_k(dst: u8, imm: i32, off: i16) -> u64 {
        encode(JMP_JNE_K, dst, 0, off, imm)
    }
    pub fn exit() -> u64 {
        encode(JMP_EXIT, 0, 0, 0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [Kind; 2] = [Kind::Block, Kind::Char];

    fn rule(allow: bool, kind: Kind, major: Option<u32>, minor: Option<u32>, access: u8) -> Rule {
        Rule { allow, kind, major, minor, access }
    }

    /// What the program returns for one access, run in rbpf's interpreter on the context the
    /// kernel would pass.
    fn run(prog: &[u64], kind: Kind, major: u32, minor: u32, access: u8) -> bool {
        let bytes: Vec<u8> = prog.iter().flat_map(|i| i.to_le_bytes()).collect();
        let vm = rbpf::EbpfVmRaw::new(Some(&bytes)).expect("the program passes rbpf's checks");
        let typ = if kind == Kind::Block { insn::DEV_BLOCK } else { insn::DEV_CHAR } as u32;
        let mut ctx: Vec<u8> =
            [u32::from(access) << 16 | typ, major, minor].iter().flat_map(|v| v.to_ne_bytes()).collect();
        match vm.execute_program(&mut ctx).expect("the program runs") {
            0 => false,
            1 => true,
            other => panic!("program returned {other}"),
        }
    }

    /// The program decides every access as the v1 controller would, over a grid of devices
    /// around the rules' numbers and every combination of access bits.
    fn assert_program_matches(policy: &Policy) {
        let prog = policy.program();
        for kind in KINDS {
            for major in [0, 1, 5, 8, 10, 136, 4095] {
                for minor in [0, 1, 3, 5, 200, 232, 1 << 19] {
                    for access in 1..=ALL_ACCESS {
                        assert_eq!(
                            run(&prog, kind, major, minor, access),
                            policy.allows(kind, major, minor, access),
                            "{kind:?} {major}:{minor} access {access:#b} under {policy:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_default_policy_denies_all_but_the_standard_devices() {
        let deny_all =
            oci_spec::runtime::LinuxDeviceCgroupBuilder::default().allow(false).access("rwm").build().unwrap();
        let policy = Policy::from_rules(&rules(&[deny_all]).unwrap());
        assert!(!policy.default_allow);
        assert_eq!(policy.exceptions, DEFAULT_RULES);
        // /dev/kvm (c 10:232) and a disk (b 8:0): made, but not opened.
        for (kind, major, minor) in [(Kind::Char, 10, 232), (Kind::Block, 8, 0)] {
            assert!(policy.allows(kind, major, minor, MKNOD));
            assert!(!policy.allows(kind, major, minor, READ));
            assert!(!policy.allows(kind, major, minor, WRITE | MKNOD));
        }
        for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (136, 4), (10, 200)] {
            assert!(policy.allows(Kind::Char, major, minor, READ | WRITE), "c {major}:{minor}");
        }
        assert!(!policy.allows(Kind::Block, 1, 3, READ), "a block device with a char device's numbers");
        assert_program_matches(&policy);
    }

    #[test]
    fn no_rules_but_the_defaults_allow_everything() {
        let policy = Policy::from_rules(&rules(&[]).unwrap());
        assert_eq!(policy, Policy { default_allow: true, exceptions: vec![] });
        assert_eq!(policy.program().len(), 8, "the header and `return 1`");
        assert_program_matches(&policy);
    }

    #[test]
    fn rules_combine_as_the_v1_controller_combines_them() {
        // Under allow-all, denials are exceptions; an allow takes access back from one with
        // the same devices, and an `a` rule starts over.
        let policy = Policy::from_rules(&[
            rule(false, Kind::Char, Some(10), Some(232), READ | WRITE),
            rule(false, Kind::Block, Some(8), None, ALL_ACCESS),
            rule(true, Kind::Block, Some(8), None, MKNOD),
            rule(false, Kind::Char, Some(10), Some(232), MKNOD),
            rule(true, Kind::Char, Some(1), Some(3), READ),
        ]);
        assert_eq!(
            policy,
            Policy {
                default_allow: true,
                exceptions: vec![
                    rule(false, Kind::Char, Some(10), Some(232), ALL_ACCESS),
                    rule(false, Kind::Block, Some(8), None, READ | WRITE),
                ],
            }
        );
        assert!(policy.allows(Kind::Block, 8, 1, MKNOD));
        assert!(!policy.allows(Kind::Block, 8, 1, MKNOD | READ), "any denied bit denies");
        assert_program_matches(&policy);

        let policy = Policy::from_rules(&[
            rule(false, Kind::All, None, None, ALL_ACCESS),
            rule(true, Kind::Char, Some(136), None, READ | WRITE),
            rule(true, Kind::Char, None, Some(5), READ),
            rule(false, Kind::Char, Some(136), None, WRITE),
            rule(true, Kind::Block, None, None, MKNOD),
        ]);
        assert_eq!(policy.exceptions.len(), 3);
        assert!(policy.allows(Kind::Char, 136, 0, READ));
        assert!(!policy.allows(Kind::Char, 136, 0, READ | WRITE), "every bit must be allowed");
        assert!(policy.allows(Kind::Char, 8, 5, READ));
        assert_program_matches(&policy);

        let reset = Policy::from_rules(&[
            rule(false, Kind::Char, Some(10), Some(232), READ),
            rule(true, Kind::All, Some(3), None, READ),
        ]);
        assert_eq!(reset, Policy { default_allow: true, exceptions: vec![] });
    }

    #[test]
    fn spec_rules_are_checked_and_written_as_v1_lines() {
        let spec = |major: i64| {
            oci_spec::runtime::LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::B)
                .major(major)
                .access("mr")
                .build()
                .unwrap()
        };
        assert_eq!(Rule::from_spec(&spec(8)).unwrap().unwrap().to_string(), "b 8:* rm");
        assert!(matches!(Rule::from_spec(&spec(1 << 40)), Err(CgroupError::InvalidValue { .. })));
        assert_eq!(DEFAULT_RULES[0].to_string(), "c *:* m");
        assert_eq!(DEFAULT_RULES[2].to_string(), "c 1:3 rwm");
    }

    /// The program in the kernel, on this host's cgroup2 hierarchy (which every host but a pure
    /// v1 one has), with a policy of its own: runc's defaults always allow `mknod`, so this is
    /// where a denied `mknod` is seen to fail with EPERM.
    #[test]
    fn the_kernel_runs_the_program_as_specified() {
        if !twinbox_testutil::require_root("the_kernel_runs_the_program_as_specified", "attach BPF programs") {
            return;
        }
        let id = format!("twinbox-unit-{}", std::process::id());
        let m = crate::cgroups::CgroupManager::new(None, &id).unwrap();
        let Some(dir) = m.unified_dir() else {
            eprintln!("SKIPPED: the_kernel_runs_the_program_as_specified: no cgroup2 hierarchy on this host");
            return;
        };
        m.create(None).unwrap();
        let policy = Policy::from_rules(&[
            rule(false, Kind::All, None, None, ALL_ACCESS),
            rule(true, Kind::Char, Some(1), Some(5), ALL_ACCESS),
        ]);
        let attached = super::super::bpf::attach_device_program(&dir, &policy.program());
        let nodes = tempfile::tempdir().unwrap();
        let output = attached.map(|()| {
            let mut child = std::process::Command::new("sh")
                .args(["-c", "read _; cd \"$1\"; mknod kvm c 10 232; mknod zero c 1 5 && head -c1 zero | wc -c", "sh"])
                .arg(nodes.path())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            m.add_task(nix::unistd::Pid::from_raw(child.id() as i32)).unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"go\n").unwrap();
            child.wait_with_output().unwrap()
        });
        m.destroy().unwrap();
        let out = output.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "/dev/zero's numbers: made and read; {stderr}");
        assert!(stderr.contains("Operation not permitted"), "{stderr}");
        assert!(!nodes.path().join("kvm").exists());
    }
}

//! One vCPU: created with its CPUID and MSRs, set up for an entry mode (the values come from
//! [`crate::arch::x86_64`]), then run: [`Vcpu::run`] handles port, MMIO and system exits until
//! the guest ends the VM ([`ExitReason`]), fails ([`VcpuError`]), or [`RunControl`] stops it.

use std::time::Duration;

use kvm_bindings::{
    CpuId, KVM_MP_STATE_HALTED, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use twinbox_exit::ExitCode;
use vm_memory::GuestMemoryMmap;

use super::vm::{KvmVm, KvmVmError};
use super::watchdog::RunControl;
use crate::arch::x86_64::regs::RFLAGS_IF;
use crate::arch::x86_64::{cpuid, interrupts, msr, regs, ArchError};
use crate::devices::{Bus, VmEvent};
use crate::ExitReason;

/// Errors of one vCPU: set-up and the ways a guest can stop badly.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU or a VM-level check failed.
    #[error("cannot create vCPU")]
    Create(#[source] KvmVmError),
    /// Setting CPUID, MSRs, the LAPIC or the boot registers and tables failed.
    #[error("cannot set up vCPU {id}")]
    Setup {
        /// vCPU index.
        id: u8,
        /// The step that failed.
        #[source]
        source: ArchError,
    },
    /// Reading the vCPU's state after an exit failed.
    #[error("cannot {what} on vCPU {id}")]
    Ioctl {
        /// The operation, e.g. "get regs".
        what: &'static str,
        /// vCPU index.
        id: u8,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_RUN failed.
    #[error("KVM_RUN failed on vCPU {id}")]
    Run {
        /// vCPU index.
        id: u8,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("guest triple fault on vCPU {id} ({})", last_rip(*rip))]
    TripleFault {
        /// vCPU index.
        id: u8,
        /// Instruction pointer when KVM reported the shutdown; None on AMD, where KVM resets
        /// a vCPU that shut down (its registers then show the reset vector, not the fault).
        rip: Option<u64>,
    },
    /// The guest kernel reported a crash (KVM_SYSTEM_EVENT_CRASH, e.g. pvpanic).
    #[error("guest crashed (system event crash) on vCPU {0}")]
    GuestCrash(u8),
    /// The hardware refused to enter the guest.
    #[error("VM entry failed on vCPU {cpu}: hardware reason {reason:#x}")]
    FailEntry {
        /// hardware_entry_failure_reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// KVM could not emulate or deliver something.
    #[error("KVM internal error on vCPU {id}: suberror {suberror} ({})", internal_error_name(*.suberror))]
    InternalError {
        /// vCPU index.
        id: u8,
        /// kvm_run.internal.suberror.
        suberror: u32,
    },
    /// An exit this VMM has no handler for.
    #[error("unexpected KVM exit {exit} on vCPU {id}")]
    UnexpectedExit {
        /// vCPU index.
        id: u8,
        /// The exit's name.
        exit: &'static str,
    },
    /// The guest ran past the configured timeout.
    #[error("guest still running after the {0:?} timeout")]
    Timeout(Duration),
    /// The watchdog thread could not be started or the kick signal not installed.
    #[error("cannot set up the vCPU watchdog")]
    Watchdog(#[source] std::io::Error),
    /// A thread of a jailed VMM could not narrow its system calls to its kind's.
    #[error("{0}")]
    Confine(String),
    /// The thread serving the vCPU panicked (a bug in twinbox's device emulation); the VM
    /// was stopped.
    #[error("the thread of vCPU {0} panicked (a bug in twinbox's VMM); the VM was stopped")]
    Panicked(u8),
    /// The VMM got SIGINT, SIGTERM or SIGHUP (see
    /// [`stop_on_signals`](super::watchdog::stop_on_signals)) and stopped the guest.
    #[error("stopped by signal {0}")]
    Interrupted(i32),
    /// Saving or restoring the vCPU's state (a snapshot) failed.
    #[error("vCPU {id}: snapshot state")]
    State {
        /// vCPU index.
        id: u8,
        /// What failed.
        #[source]
        source: super::snapshot::StateError,
    },
}

impl ExitCode for VcpuError {
    fn exit_code(&self) -> i32 {
        match self {
            VcpuError::Create(e) => e.exit_code(),
            VcpuError::Setup { source, .. } => source.exit_code(),
            VcpuError::Interrupted(signal) => twinbox_exit::signalled(*signal),
            VcpuError::Ioctl { .. }
            | VcpuError::Run { .. }
            | VcpuError::TripleFault { .. }
            | VcpuError::GuestCrash(_)
            | VcpuError::FailEntry { .. }
            | VcpuError::InternalError { .. }
            | VcpuError::UnexpectedExit { .. }
            | VcpuError::Timeout(_)
            | VcpuError::Watchdog(_)
            | VcpuError::Confine(_)
            | VcpuError::Panicked(_)
            | VcpuError::State { .. } => twinbox_exit::INTERNAL,
        }
    }
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown",
    }
}

/// One vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    /// vCPUs of the VM.
    count: u8,
    /// KVM runs it on AMD SVM (from the supported CPUID's vendor).
    amd: bool,
    /// Since when, and where, the boot vCPU has been seen halted with interrupts off.
    halted_since: Option<(std::time::Instant, u64)>,
}

/// With more than one vCPU, a halt with interrupts off is not final at once: Linux's
/// paravirtual spinlocks wait so (`kvm_wait`) for the lock holder's kick, which can take a while
/// on a slow host (a nested L1 under TCG). Only one that lasts this long counts as dead.
const DEAD_HALT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// What a triple fault's message says of where it happened.
fn last_rip(rip: Option<u64>) -> String {
    match rip {
        Some(rip) => format!("last rip {rip:#x}"),
        None => "KVM on AMD resets a vCPU that shuts down, so where it faulted is lost".to_owned(),
    }
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

impl Vcpu {
    /// Creates vCPU `id` of `count` with CPUID and the basic MSRs set.
    pub fn new(vm: &KvmVm, supported: &CpuId, id: u8, count: u8) -> Result<Self, VcpuError> {
        let fd = vm.fd().create_vcpu(u64::from(id)).map_err(|e| VcpuError::Create(KvmVmError::CreateVcpu(id, e)))?;
        let amd = supported
            .as_slice()
            .iter()
            .any(|e| e.function == 0 && [e.ebx, e.edx, e.ecx].map(u32::to_le_bytes).concat() == b"AuthenticAMD");
        let vcpu = Vcpu { fd, id, count, amd, halted_since: None };
        vcpu.setup(|fd| cpuid::setup_cpuid(fd, supported, id, count, vm.tsc_deadline()))?;
        vcpu.setup(msr::setup_msrs)?;
        Ok(vcpu)
    }

    /// vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Its state for a snapshot; only between two runs (the vCPU stopped).
    pub fn save_state(&self) -> Result<super::snapshot::VcpuState, VcpuError> {
        super::snapshot::VcpuState::save(&self.fd).map_err(|source| VcpuError::State { id: self.id, source })
    }

    /// Completes what the last exit left to KVM (the guest's port or MMIO instruction, whose
    /// data KVM takes at the next KVM_RUN) without entering the guest again, so that a saved
    /// state is past it: KVM_RUN with `immediate_exit` set, as Firecracker pauses a vCPU.
    pub fn settle(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(self.ioctl("complete the last exit", e)),
            Ok(()) => Ok(()),
        }
    }

    /// Gives this new vCPU (CPUID set, not yet run) a saved state; `amd`: the host's CPU is
    /// AMD's (see [`super::snapshot::VcpuState::restore`]).
    pub fn restore_state(&self, state: &super::snapshot::VcpuState, amd: bool) -> Result<(), VcpuError> {
        state.restore(&self.fd, amd).map_err(|source| VcpuError::State { id: self.id, source })
    }

    /// The KVM vCPU, for tests that drive KVM_RUN themselves.
    #[cfg(test)]
    pub(crate) fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Runs one set-up step of [`crate::arch::x86_64`] on this vCPU.
    fn setup(&self, step: impl FnOnce(&VcpuFd) -> Result<(), ArchError>) -> Result<(), VcpuError> {
        step(&self.fd).map_err(|source| VcpuError::Setup { id: self.id, source })
    }

    fn ioctl(&self, what: &'static str, source: kvm_ioctls::Error) -> VcpuError {
        VcpuError::Ioctl { what, id: self.id, source }
    }

    /// LINT0 delivers ExtINT and LINT1 NMI ([`interrupts::set_lint`]); needs KVM's LAPIC.
    pub fn set_lint(&self) -> Result<(), VcpuError> {
        self.setup(interrupts::set_lint)
    }

    /// Flat 32-bit protected mode ([`regs::setup_flat_protected`]): the entry of stub guests and
    /// of PVH kernels (`rbx` = start_info).
    pub fn setup_flat_protected(&self, entry: u64, stack: u64, rbx: u64) -> Result<(), VcpuError> {
        self.setup(|fd| regs::setup_flat_protected(fd, entry, stack, rbx))
    }

    /// 64-bit long mode as the Linux 64-bit boot protocol wants it ([`regs::setup_long_mode`]):
    /// GDT, identity-mapped first GiB, `rsi` = the zero page.
    pub fn setup_long_mode(&self, memory: &GuestMemoryMmap, entry: u64, boot_params: u64) -> Result<(), VcpuError> {
        self.setup(|fd| regs::setup_long_mode(fd, memory, entry, boot_params))
    }

    /// Runs this vCPU on the calling thread until the guest ends the VM (`Ok(Some(reason))`),
    /// another vCPU did (`Ok(None)`, after [`RunControl::stop`]), or something fails. Port and
    /// MMIO exits go to `pio` and `mmio`; `after_exit` runs after each handled exit (the
    /// console forwarder). The thread registers with `control` so the watchdog can kick it.
    pub fn run(
        &mut self,
        pio: &Bus,
        mmio: &Bus,
        control: &RunControl,
        after_exit: &mut dyn FnMut(),
    ) -> Result<Option<ExitReason>, VcpuError> {
        let _registered = control.register();
        let result = self.run_loop(pio, mmio, control, after_exit);
        // Whatever ended this vCPU ends the VM: the others stop at their next exit or kick.
        control.stop();
        result
    }

    fn run_loop(
        &mut self,
        pio: &Bus,
        mmio: &Bus,
        control: &RunControl,
        after_exit: &mut dyn FnMut(),
    ) -> Result<Option<ExitReason>, VcpuError> {
        let id = self.id;
        loop {
            if let Some(e) = control.stop_error() {
                return Err(e);
            }
            if control.stopping() {
                return Ok(None);
            }
            let event = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => pio.write(u64::from(port), data),
                Ok(VcpuExit::IoIn(port, data)) => {
                    pio.read(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => mmio.write(addr, data),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    mmio.read(addr, data);
                    None
                }
                Ok(VcpuExit::Hlt) => {
                    // Only without an in-kernel LAPIC (with one, KVM parks the vCPU itself),
                    // so there is no interrupt source that could ever wake it.
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Ok(Some(ExitReason::Halted { rip }));
                }
                Ok(VcpuExit::Shutdown) => {
                    let rip = if self.amd { None } else { self.fd.get_regs().ok().map(|r| r.rip) };
                    return Err(VcpuError::TripleFault { id, rip });
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return match kind {
                        KVM_SYSTEM_EVENT_RESET => Ok(Some(ExitReason::Reset)),
                        KVM_SYSTEM_EVENT_SHUTDOWN => Ok(Some(ExitReason::Shutdown)),
                        KVM_SYSTEM_EVENT_CRASH => Err(VcpuError::GuestCrash(id)),
                        _ => Err(VcpuError::UnexpectedExit { id, exit: "system event" }),
                    };
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => return Err(VcpuError::FailEntry { reason, cpu }),
                Ok(VcpuExit::InternalError) => {
                    let suberror = self.internal_suberror();
                    return Err(VcpuError::InternalError { id, suberror });
                }
                // A level-triggered IOAPIC pin was acknowledged; every line here is a pulse, so
                // there is nothing pending to deliver again (see devices::legacy::ioapic).
                Ok(VcpuExit::IoapicEoi(_)) => None,
                Ok(VcpuExit::Intr) => {
                    if let Some(stop) = self.dead_halt()? {
                        return Ok(Some(stop));
                    }
                    None
                }
                Ok(other) => return Err(VcpuError::UnexpectedExit { id, exit: exit_name(&other) }),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if let Some(stop) = self.dead_halt()? {
                        return Ok(Some(stop));
                    }
                    None
                }
                Err(source) => return Err(VcpuError::Run { id, source }),
            };
            after_exit();
            match event {
                Some(VmEvent::Reset) => return Ok(Some(ExitReason::Reset)),
                Some(VmEvent::Exit(status)) => return Ok(Some(ExitReason::Exited(status))),
                Some(VmEvent::Ready) if control.pause_when_ready() => return Ok(Some(ExitReason::Ready)),
                Some(VmEvent::Ready) => {}
                None => {}
            }
        }
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM fills the `internal` arm of the exit union for KVM_EXIT_INTERNAL_ERROR,
        // the exit being handled; the arm is plain integers, valid for any bit pattern.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// A vCPU halted with interrupts off will never run again: report it instead of waiting
    /// (with several vCPUs, once it has stayed so for [`DEAD_HALT_GRACE`]). Only the boot vCPU
    /// counts: Linux parks offline application processors exactly so.
    fn dead_halt(&mut self) -> Result<Option<ExitReason>, VcpuError> {
        if self.id != 0 {
            return Ok(None);
        }
        let mp_state = self.fd.get_mp_state().map_err(|e| self.ioctl("get MP state", e))?;
        let regs = if mp_state.mp_state == KVM_MP_STATE_HALTED {
            Some(self.fd.get_regs().map_err(|e| self.ioctl("get regs", e))?)
        } else {
            None
        };
        let Some(rip) = regs.filter(|r| r.rflags & RFLAGS_IF == 0).map(|r| r.rip) else {
            self.halted_since = None;
            return Ok(None);
        };
        if self.count <= 1 {
            return Ok(Some(ExitReason::Halted { rip }));
        }
        match self.halted_since {
            Some((since, at)) if at == rip => {
                Ok((since.elapsed() >= DEAD_HALT_GRACE).then_some(ExitReason::Halted { rip }))
            }
            _ => {
                self.halted_since = Some((std::time::Instant::now(), rip));
                Ok(None)
            }
        }
    }
}

fn exit_name(exit: &VcpuExit<'_>) -> &'static str {
    match exit {
        VcpuExit::Unknown => "unknown",
        VcpuExit::Exception => "exception",
        VcpuExit::Hypercall(_) => "hypercall",
        VcpuExit::Debug(_) => "debug",
        VcpuExit::IrqWindowOpen => "irq window open",
        VcpuExit::Nmi => "nmi",
        VcpuExit::X86Rdmsr(_) => "rdmsr",
        VcpuExit::X86Wrmsr(_) => "wrmsr",
        VcpuExit::IoapicEoi(_) => "ioapic eoi",
        VcpuExit::Hyperv => "hyperv",
        VcpuExit::MemoryFault { .. } => "memory fault",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_triple_fault_says_where_when_it_can() {
        let intel = VcpuError::TripleFault { id: 0, rip: Some(0xffff_ffff_8100_0000) };
        assert_eq!(intel.to_string(), "guest triple fault on vCPU 0 (last rip 0xffffffff81000000)");
        // On AMD the registers after the exit are the reset state's (rip 0xfff0): not shown as
        // if the guest had been there.
        let amd = VcpuError::TripleFault { id: 1, rip: None };
        assert!(amd.to_string().contains("resets a vCPU that shuts down"), "{amd}");
        assert!(!amd.to_string().contains("0xfff0"));
    }
}

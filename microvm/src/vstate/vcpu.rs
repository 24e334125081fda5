//! vCPUs: CPUID, MSRs, the register state for each entry mode, and the run loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MP_STATE_HALTED,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::vm::{KvmVm, KvmVmError};
use crate::devices::{Bus, VmEvent};

// Boot-time layout of the structures the VMM writes for a 64-bit entry.
/// Guest address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest address of the (empty) IDT.
pub const IDT_ADDR: u64 = 0x520;
/// The four-level page tables: PML4, PDPT, PD (2 MiB pages identity-mapping the first GiB).
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Initial stack of the boot CPU.
pub const BOOT_STACK: u64 = 0x8ff0;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IF: u64 = 1 << 9;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets the delivery mode (bits 8..=10) of the LVT register at `offset` in a LAPIC page.
fn set_lvt_mode(regs: &mut [libc::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as libc::c_char;
    }
}

/// How often a running vCPU is interrupted to check for the timeout and a dead halt.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Errors of one vCPU: set-up and the ways a guest can stop badly.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU or a VM-level check failed.
    #[error("cannot create vCPU")]
    Create(#[source] KvmVmError),
    /// KVM's CPUID list is already at its size limit.
    #[error("cannot add CPUID leaf 6: the CPUID list is full")]
    CpuidFull,
    /// A register-state ioctl failed.
    #[error("cannot {what} on vCPU {id}")]
    Ioctl {
        /// The operation, e.g. "set CPUID".
        what: &'static str,
        /// vCPU index.
        id: u8,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of the MSR list.
    #[error("KVM refused MSR {index:#x} on vCPU {id}")]
    Msr {
        /// vCPU index.
        id: u8,
        /// The first MSR not set.
        index: u32,
    },
    /// Writing the GDT or page tables into guest memory failed.
    #[error("cannot write the boot page tables/GDT into guest memory")]
    BootTables(#[source] vm_memory::GuestMemoryError),
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
    #[error("guest triple fault on vCPU {id} (last rip {rip:#x})")]
    TripleFault {
        /// vCPU index.
        id: u8,
        /// Instruction pointer when KVM reported the shutdown, if readable.
        rip: u64,
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
    /// The VMM got SIGINT, SIGTERM or SIGHUP (see [`stop_on_signals`]) and stopped the guest.
    #[error("stopped by signal {0}")]
    Interrupted(i32),
}

/// The signal that asked every running vCPU to stop, 0 for none.
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn stop_handler(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an atomic store: async-signal-safe.
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP stop the running guest instead of killing the process, so
/// the VMM's cleanup (image holds, temp files) runs: the vCPU loop notices within
/// [`POLL_INTERVAL`] and returns [`VcpuError::Interrupted`].
pub fn stop_on_signals() -> Result<(), std::io::Error> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, stop_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// The signal a [`stop_on_signals`] handler caught, if any.
pub fn stop_requested() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
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

/// How a vCPU's run loop ended when the guest itself ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStop {
    /// i8042 reset or KVM_SYSTEM_EVENT_RESET.
    Reset,
    /// KVM_SYSTEM_EVENT_SHUTDOWN (ACPI power-off).
    Shutdown,
    /// Exit status written to the exit port.
    Exited(i32),
    /// The vCPU halted with interrupts disabled: nothing can wake it.
    Halted {
        /// Instruction pointer after the `hlt`.
        rip: u64,
    },
}

/// One vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

fn segment(selector: u16, type_: u8, code64: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code64),
        s: 1,
        l: u8::from(code64),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// A GDT entry from a kvm_segment, as the CPU reads it.
fn gdt_entry(seg: &kvm_segment) -> u64 {
    let limit = u64::from(seg.limit >> 12); // 4 KiB granularity
    let base = seg.base;
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(seg.type_) << 40)
        | (u64::from(seg.s) << 44)
        | (u64::from(seg.dpl) << 45)
        | (u64::from(seg.present) << 47)
        | (((limit >> 16) & 0xf) << 48)
        | (u64::from(seg.l) << 53)
        | (u64::from(seg.db) << 54)
        | (u64::from(seg.g) << 55)
        | (((base >> 24) & 0xff) << 56)
}

/// Fills CPUID for vCPU `id` of `count` from KVM's supported set: APIC ids, logical processor
/// count, and the hypervisor bit.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count.max(1)) << 16);
                entry.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
}

/// CPUID leaf 1 ECX: the LAPIC timer has TSC-deadline mode.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID leaf 6 EAX: the APIC timer always runs (also in deep C-states).
const CPUID_6_EAX_ARAT: u32 = 1 << 2;

/// Tells the guest its local APIC timer has TSC-deadline mode and always runs (KVM's LAPIC
/// does both; KVM_GET_SUPPORTED_CPUID leaves the TSC-deadline bit to the VMM). With both,
/// Linux needs no PIT: it neither calibrates against one nor keeps one as broadcast timer.
pub fn advertise_lapic_timer(cpuid: &mut CpuId) -> Result<(), VcpuError> {
    let mut has_leaf6 = false;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ecx |= CPUID_1_ECX_TSC_DEADLINE,
            6 => {
                entry.eax |= CPUID_6_EAX_ARAT;
                has_leaf6 = true;
            }
            _ => {}
        }
    }
    let max_basic = cpuid.as_slice().iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    if !has_leaf6 && max_basic >= 6 {
        let leaf6 = kvm_cpuid_entry2 { function: 6, eax: CPUID_6_EAX_ARAT, ..Default::default() };
        cpuid.push(leaf6).map_err(|_| VcpuError::CpuidFull)?;
    }
    Ok(())
}

impl Vcpu {
    /// Creates vCPU `id` of `count` with CPUID and the basic MSRs set.
    pub fn new(vm: &KvmVm, supported: &CpuId, id: u8, count: u8) -> Result<Self, VcpuError> {
        let fd = vm.fd().create_vcpu(u64::from(id)).map_err(|e| VcpuError::Create(KvmVmError::CreateVcpu(id, e)))?;
        let vcpu = Vcpu { fd, id };
        let mut cpuid = supported.clone();
        filter_cpuid(&mut cpuid, id, count);
        if vm.tsc_deadline() {
            advertise_lapic_timer(&mut cpuid)?;
        }
        vcpu.fd.set_cpuid2(&cpuid).map_err(|e| vcpu.ioctl("set CPUID", e))?;
        vcpu.set_msrs()?;
        Ok(vcpu)
    }

    /// vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    fn ioctl(&self, what: &'static str, source: kvm_ioctls::Error) -> VcpuError {
        VcpuError::Ioctl { what, id: self.id, source }
    }

    fn set_msrs(&self) -> Result<(), VcpuError> {
        let list = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        ];
        let entries: Vec<kvm_msr_entry> =
            list.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).expect("the MSR list is far below the FAM limit");
        let set = self.fd.set_msrs(&msrs).map_err(|e| self.ioctl("set MSRs", e))?;
        if set != entries.len() {
            return Err(VcpuError::Msr { id: self.id, index: entries[set].index });
        }
        Ok(())
    }

    /// LINT0 delivers ExtINT (the PIC's output) and LINT1 NMI, as a PC's firmware leaves the
    /// local APIC; needs KVM's LAPIC (either irqchip kind).
    pub fn set_lint(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(|e| self.ioctl("get LAPIC", e))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(|e| self.ioctl("set LAPIC", e))
    }

    fn set_fpu(&self) -> Result<(), VcpuError> {
        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(|e| self.ioctl("set FPU", e))
    }

    /// Flat 32-bit protected mode, paging off, all segments base 0 limit 4 GiB, no GDT or IDT
    /// (the hidden segment state is loaded directly). The entry of stub guests and of PVH
    /// kernels (`rbx` = start_info).
    pub fn setup_flat_protected(&self, entry: u64, stack: u64, rbx: u64) -> Result<(), VcpuError> {
        let mut sregs: kvm_sregs = self.fd.get_sregs().map_err(|e| self.ioctl("get sregs", e))?;
        sregs.cs = segment(0x8, 0xb, false);
        let data = segment(0x10, 0x3, false);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment { selector: 0x18, type_: 0xb, limit: 0x67, present: 1, ..Default::default() };
        sregs.gdt.base = 0;
        sregs.gdt.limit = 0;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.fd.set_sregs(&sregs).map_err(|e| self.ioctl("set sregs", e))?;
        let regs = kvm_regs { rflags: RFLAGS_RESERVED, rip: entry, rsp: stack, rbx, ..Default::default() };
        self.fd.set_regs(&regs).map_err(|e| self.ioctl("set regs", e))?;
        self.set_fpu()
    }

    /// 64-bit long mode as the Linux 64-bit boot protocol wants it: GDT, identity-mapped first
    /// GiB, `rsi` = the zero page.
    pub fn setup_long_mode(&self, memory: &GuestMemoryMmap, entry: u64, boot_params: u64) -> Result<(), VcpuError> {
        let code = segment(0x8, 0xb, true);
        let data = segment(0x10, 0x3, false);
        let tss = kvm_segment { selector: 0x18, type_: 0xb, s: 0, db: 0, ..segment(0x18, 0xb, false) };
        let gdt = [0u64, gdt_entry(&code), gdt_entry(&data), gdt_entry(&tss)];
        for (i, e) in gdt.iter().enumerate() {
            memory.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64)).map_err(VcpuError::BootTables)?;
        }
        memory.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(VcpuError::BootTables)?;
        memory.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR)).map_err(VcpuError::BootTables)?;
        memory.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR)).map_err(VcpuError::BootTables)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            memory.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8)).map_err(VcpuError::BootTables)?;
        }

        let mut sregs = self.fd.get_sregs().map_err(|e| self.ioctl("get sregs", e))?;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = 7;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
        sregs.efer |= EFER_LME | EFER_LMA;
        self.fd.set_sregs(&sregs).map_err(|e| self.ioctl("set sregs", e))?;
        let regs = kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: boot_params,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(|e| self.ioctl("set regs", e))?;
        self.set_fpu()
    }

    /// Runs this vCPU on the calling thread until the guest ends the VM (`Ok(Some(stop))`),
    /// another vCPU did (`Ok(None)`, after [`RunControl::stop`]), or something fails. Port and
    /// MMIO exits go to `pio` and `mmio`; `after_exit` runs after each handled exit (the
    /// console forwarder). The thread registers with `control` so the watchdog can kick it.
    pub fn run(
        &mut self,
        pio: &Bus,
        mmio: &Bus,
        control: &RunControl,
        after_exit: &mut dyn FnMut(),
    ) -> Result<Option<VcpuStop>, VcpuError> {
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
    ) -> Result<Option<VcpuStop>, VcpuError> {
        let id = self.id;
        loop {
            if control.timed_out.load(Ordering::SeqCst) {
                return Err(VcpuError::Timeout(control.timeout.unwrap_or_default()));
            }
            if let Some(sig) = stop_requested() {
                return Err(VcpuError::Interrupted(sig));
            }
            if control.stopping.load(Ordering::SeqCst) {
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
                    return Ok(Some(VcpuStop::Halted { rip }));
                }
                Ok(VcpuExit::Shutdown) => {
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(VcpuError::TripleFault { id, rip });
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return match kind {
                        KVM_SYSTEM_EVENT_RESET => Ok(Some(VcpuStop::Reset)),
                        KVM_SYSTEM_EVENT_SHUTDOWN => Ok(Some(VcpuStop::Shutdown)),
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
                Some(VmEvent::Reset) => return Ok(Some(VcpuStop::Reset)),
                Some(VmEvent::Exit(status)) => return Ok(Some(VcpuStop::Exited(status))),
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

    /// A vCPU halted with interrupts off will never run again: report it instead of waiting.
    /// Only the boot vCPU counts: Linux parks offline application processors exactly so.
    fn dead_halt(&self) -> Result<Option<VcpuStop>, VcpuError> {
        if self.id != 0 {
            return Ok(None);
        }
        let mp_state = self.fd.get_mp_state().map_err(|e| self.ioctl("get MP state", e))?;
        if mp_state.mp_state != KVM_MP_STATE_HALTED {
            return Ok(None);
        }
        let regs = self.fd.get_regs().map_err(|e| self.ioctl("get regs", e))?;
        if regs.rflags & RFLAGS_IF != 0 {
            return Ok(None);
        }
        Ok(Some(VcpuStop::Halted { rip: regs.rip }))
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

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU out of KVM_RUN (its handler does nothing; the EINTR is the
/// point).
fn kick_signal() -> Result<libc::c_int, std::io::Error> {
    static INSTALLED: OnceLock<Result<libc::c_int, i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        let sig = vmm_sys_util::signal::SIGRTMIN();
        vmm_sys_util::signal::register_signal_handler(sig, kick_handler).map(|()| sig).map_err(|e| e.errno())
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

/// What the vCPU threads of one VM share: the stop flag, the timeout, and the threads the
/// watchdog kicks out of KVM_RUN every [`POLL_INTERVAL`] so they notice either.
#[derive(Debug)]
pub struct RunControl {
    stopping: AtomicBool,
    timed_out: AtomicBool,
    timeout: Option<Duration>,
    threads: Mutex<Vec<libc::pthread_t>>,
}

/// A vCPU thread's registration; dropping it unregisters the thread, so it is never signalled
/// after it has finished.
pub struct Registration<'a> {
    control: &'a RunControl,
    thread: libc::pthread_t,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut threads = self.control.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = threads.iter().position(|t| *t == self.thread) {
            threads.swap_remove(i);
        }
    }
}

impl RunControl {
    /// Control for a VM that stops with [`VcpuError::Timeout`] after `timeout`.
    pub fn new(timeout: Option<Duration>) -> Self {
        RunControl {
            stopping: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
            timeout,
            threads: Mutex::default(),
        }
    }

    fn register(&self) -> Registration<'_> {
        // SAFETY: pthread_self has no preconditions and cannot fail.
        let thread = unsafe { libc::pthread_self() };
        self.threads.lock().unwrap_or_else(|e| e.into_inner()).push(thread);
        Registration { control: self, thread }
    }

    /// Asks every vCPU to return; each does at its next exit, which the kick forces.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.kick_all();
    }

    fn kick_all(&self) {
        let Ok(sig) = kick_signal() else { return };
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for t in threads.iter() {
            // SAFETY: every listed thread is alive: a thread removes itself (Registration's
            // Drop, under this same lock) before it finishes, and the kick signal has a no-op
            // handler installed (kick_signal succeeded).
            unsafe { libc::pthread_kill(*t, sig) };
        }
    }
}

/// A thread that kicks every registered vCPU thread every [`POLL_INTERVAL`] and raises the
/// timeout flag when the time is up.
pub struct Watchdog {
    done: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Watchdog {
    /// Starts watching the vCPUs of `control`.
    pub fn start(control: Arc<RunControl>) -> Result<Self, VcpuError> {
        kick_signal().map_err(VcpuError::Watchdog)?;
        let (done, rx) = mpsc::channel::<()>();
        let deadline = control.timeout.map(|t| Instant::now() + t);
        let thread = std::thread::Builder::new()
            .name("vcpu-watchdog".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(POLL_INTERVAL) {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        control.timed_out.store(true, Ordering::SeqCst);
                    }
                    control.kick_all();
                }
            })
            .map_err(VcpuError::Watchdog)?;
        Ok(Watchdog { done, thread })
    }

    /// Stops the watchdog thread and waits for it.
    pub fn stop(self) {
        drop(self.done);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode_changes_only_its_bits() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT0 + 2] = 1; // bit 16: masked
        regs[APIC_LVT0 + 1] = 0x05u8 as libc::c_char; // an old mode, to be replaced
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut regs, APIC_LVT1, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2], 1, "the mask bit is kept");
        assert_eq!(regs[APIC_LVT1 + 1] as u8, 0x04);
    }

    #[test]
    fn gdt_entries_match_the_classic_values() {
        assert_eq!(gdt_entry(&segment(0x8, 0xb, true)), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(&segment(0x10, 0x3, false)), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn lapic_timer_bits_are_advertised_and_leaf_6_added_when_missing() {
        let mut cpuid = CpuId::new(2).unwrap();
        cpuid.as_mut_slice()[0].eax = 0xd; // max basic leaf
        cpuid.as_mut_slice()[1].function = 1;
        advertise_lapic_timer(&mut cpuid).unwrap();
        let leaf = |c: &CpuId, f: u32| *c.as_slice().iter().find(|e| e.function == f).unwrap();
        assert_eq!(leaf(&cpuid, 1).ecx & CPUID_1_ECX_TSC_DEADLINE, CPUID_1_ECX_TSC_DEADLINE);
        assert_eq!(leaf(&cpuid, 6).eax, CPUID_6_EAX_ARAT);
        // Present already: the bit is or-ed in, nothing added.
        cpuid.as_mut_slice()[2].eax = 0x1;
        advertise_lapic_timer(&mut cpuid).unwrap();
        assert_eq!(cpuid.as_slice().len(), 3);
        assert_eq!(leaf(&cpuid, 6).eax, 0x1 | CPUID_6_EAX_ARAT);
        // A CPU whose basic leaves stop below 6 gets no leaf 6.
        let mut old = CpuId::new(1).unwrap();
        old.as_mut_slice()[0].eax = 4;
        advertise_lapic_timer(&mut old).unwrap();
        assert_eq!(old.as_slice().len(), 1);
    }

    #[test]
    fn cpuid_gets_apic_id_count_and_hypervisor_bit() {
        let mut cpuid = CpuId::new(2).unwrap();
        cpuid.as_mut_slice()[0].function = 1;
        cpuid.as_mut_slice()[0].ebx = 0xffff_1234;
        cpuid.as_mut_slice()[1].function = 0xb;
        filter_cpuid(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx, 0x0304_1234);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[1].edx, 3);
    }
}

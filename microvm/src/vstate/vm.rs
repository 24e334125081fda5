//! The KVM system fd and the VM fd: the interrupt controllers (split or all in the kernel) and
//! PIT, the TSS and identity-map pages, guest memory slots, irqfds and MSI routes.

use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, CpuId, KvmIrqRouting,
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use twinbox_exit::ExitCode;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::IrqChip;

/// Where KVM puts the three pages of the TSS it needs on Intel (just below 4 GiB, in the gap).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The identity-map page KVM needs on Intel for real mode, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
const KVM_PIT_SPEAKER_DUMMY: u32 = 1;
/// IOAPIC pins whose MSI routes KVM scans for level-triggered vectors in split mode.
pub const SPLIT_IRQCHIP_PINS: u64 = 24;

/// Errors of the KVM system and VM fds.
#[derive(Debug, thiserror::Error)]
pub enum KvmVmError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: load kvm_intel/kvm_amd or run on a host with virtualization")]
    NoKvm,
    /// /dev/kvm exists but cannot be opened by this user.
    #[error("permission denied on /dev/kvm: add the user to the kvm group or run as root")]
    PermissionDenied,
    /// Opening /dev/kvm failed otherwise.
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// The kernel speaks another KVM API.
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    /// KVM_CREATE_VM failed.
    #[error("cannot create the VM (KVM_CREATE_VM)")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("cannot set the TSS address")]
    TssAddress(#[source] kvm_ioctls::Error),
    /// KVM_SET_IDENTITY_MAP_ADDR failed.
    #[error("cannot set the identity map address")]
    IdentityMap(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("cannot create the in-kernel irqchip")]
    IrqChip(#[source] kvm_ioctls::Error),
    /// KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP) failed or the capability is missing.
    #[error("cannot create a split irqchip (KVM_CAP_SPLIT_IRQCHIP); `--irqchip kernel` puts the IOAPIC in the kernel instead")]
    SplitIrqChip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("cannot create the in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest memory slot {slot}")]
    MemorySlot {
        /// The slot number.
        slot: u32,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read KVM's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// KVM_IOEVENTFD failed.
    #[error("cannot register an ioeventfd at {addr:#x}")]
    Ioeventfd {
        /// The MMIO address.
        addr: u64,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IRQFD failed.
    #[error("cannot register an irqfd for GSI {gsi}")]
    Irqfd {
        /// The interrupt line.
        gsi: u32,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU count exceeds what KVM supports.
    #[error("{requested} vCPUs asked, KVM supports at most {max}")]
    TooManyVcpus {
        /// What the configuration asked for.
        requested: usize,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
}

impl ExitCode for KvmVmError {
    fn exit_code(&self) -> i32 {
        use twinbox_exit::{INTERNAL, USER_ERROR};
        match self {
            // The host's KVM set-up, the user's access to it, or too many vCPUs asked.
            KvmVmError::NoKvm | KvmVmError::PermissionDenied | KvmVmError::TooManyVcpus { .. } => USER_ERROR,
            KvmVmError::Open(_)
            | KvmVmError::ApiVersion(_)
            | KvmVmError::CreateVm(_)
            | KvmVmError::TssAddress(_)
            | KvmVmError::IdentityMap(_)
            | KvmVmError::IrqChip(_)
            | KvmVmError::SplitIrqChip(_)
            | KvmVmError::Pit(_)
            | KvmVmError::MemorySlot { .. }
            | KvmVmError::SupportedCpuid(_)
            | KvmVmError::Irqfd { .. }
            | KvmVmError::Ioeventfd { .. }
            | KvmVmError::CreateVcpu(..) => INTERNAL,
        }
    }
}

/// The VM fd with the memory registered in it, shared by the [`KvmVm`] and the [`MsiRoutes`]
/// handles (the userspace IOAPIC's): whoever drops the last reference closes the VM fd first
/// (field order), so the memory is never unmapped under a live VM.
struct VmShared {
    fd: VmFd,
    memory: GuestMemoryMmap,
}

/// A VM: the KVM fd, the VM fd, and the guest memory registered with it.
///
/// Dropping it (and every [`MsiRoutes`] handle) closes the fds, which tears the VM down in the
/// kernel; the memory mappings are unmapped by `GuestMemoryMmap`'s own `Drop`.
pub struct KvmVm {
    irqchip: Option<IrqChip>,
    tsc_deadline: bool,
    kvm: Kvm,
    shared: Arc<VmShared>,
}

/// An interrupt message for the local APICs: what an IOAPIC redirection entry or a device's
/// MSI capability turns into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// The address (0xfee0_0000 | destination << 12 | ...).
    pub address: u64,
    /// The data (vector, delivery mode, trigger mode).
    pub data: u32,
}

/// Programs KVM's GSI routing table, the way interrupt lines reach the LAPICs in split-irqchip
/// mode: an irqfd or `KVM_IRQ_LINE` on GSI `g` sends the MSI routed at `g`, or nothing when `g`
/// has no route.
pub trait RouteTable: Send {
    /// Replaces the whole table with `routes` (GSI, message).
    fn set_routes(&self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()>;
}

/// A [`RouteTable`] on a KVM VM.
pub struct MsiRoutes(Arc<VmShared>);

impl std::fmt::Debug for MsiRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiRoutes").finish_non_exhaustive()
    }
}

impl RouteTable for MsiRoutes {
    fn set_routes(&self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()> {
        let mut table = KvmIrqRouting::new(0).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        for &(gsi, msg) in routes {
            let mut entry = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
            entry.u.msi.address_lo = msg.address as u32;
            entry.u.msi.address_hi = (msg.address >> 32) as u32;
            entry.u.msi.data = msg.data;
            table.push(entry).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        }
        self.0.fd.set_gsi_routing(&table).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm").finish_non_exhaustive()
    }
}

/// Opens /dev/kvm, mapping the two common failures to errors a user can act on.
pub fn open_kvm() -> Result<Kvm, KvmVmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmVmError::NoKvm,
        libc::EACCES | libc::EPERM => KvmVmError::PermissionDenied,
        _ => KvmVmError::Open(e),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmVmError::ApiVersion(version));
    }
    Ok(kvm)
}

impl KvmVm {
    /// Creates the VM with its interrupt controllers (see [`IrqChip`]; `None`: none at all) and
    /// registers `memory`.
    ///
    /// Without an irqchip there are no interrupts at all (a stub guest needs none), and a
    /// `hlt` exits to the VMM. On PVM here, destroying the in-kernel PIC/IOAPIC and PIT costs
    /// ≈ 25 ms at VM teardown, a split irqchip 0.1 ms; the floor benchmark reports both.
    pub fn new(memory: GuestMemoryMmap, irqchip: Option<IrqChip>) -> Result<Self, KvmVmError> {
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(KvmVmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(KvmVmError::TssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS).map_err(KvmVmError::IdentityMap)?;
        match irqchip {
            None => {}
            Some(IrqChip::Split) => {
                let mut cap = kvm_enable_cap { cap: KVM_CAP_SPLIT_IRQCHIP, ..Default::default() };
                cap.args[0] = SPLIT_IRQCHIP_PINS;
                fd.enable_cap(&cap).map_err(KvmVmError::SplitIrqChip)?;
            }
            Some(IrqChip::Kernel) => {
                fd.create_irq_chip().map_err(KvmVmError::IrqChip)?;
                let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
                fd.create_pit2(pit).map_err(KvmVmError::Pit)?;
            }
        }
        let tsc_deadline = irqchip.is_some() && fd.check_extension(Cap::TscDeadlineTimer);
        for (slot, region) in memory.iter().enumerate() {
            let slot = slot as u32;
            let host = region.as_ptr() as u64;
            let mem_region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the host range [host, host + len) is a live mapping owned by `memory`,
            // which `VmShared` keeps alive as long as `fd` (the VM) exists: its field order
            // drops `fd` before `memory`, and both live in the one `Arc`.
            unsafe { fd.set_user_memory_region(mem_region) }
                .map_err(|source| KvmVmError::MemorySlot { slot, source })?;
        }
        Ok(KvmVm { irqchip, tsc_deadline, kvm, shared: Arc::new(VmShared { fd, memory }) })
    }

    /// The interrupt controllers, if any.
    pub fn irqchip(&self) -> Option<IrqChip> {
        self.irqchip
    }

    /// Whether the guest may be told of the LAPIC's TSC-deadline mode (an in-kernel LAPIC and
    /// KVM_CAP_TSC_DEADLINE_TIMER).
    pub fn tsc_deadline(&self) -> bool {
        self.tsc_deadline
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.shared.memory
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.shared.fd
    }

    /// A handle on KVM's GSI routing table, for the userspace IOAPIC of a split irqchip.
    pub fn msi_routes(&self) -> MsiRoutes {
        MsiRoutes(self.shared.clone())
    }

    /// KVM's supported CPUID, to be filtered per vCPU.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmVmError> {
        self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(KvmVmError::SupportedCpuid)
    }

    /// Checks `count` against KVM_CAP_MAX_VCPUS.
    pub fn check_vcpu_count(&self, count: usize) -> Result<(), KvmVmError> {
        let max = self.kvm.get_max_vcpus();
        if count > max {
            return Err(KvmVmError::TooManyVcpus { requested: count, max });
        }
        Ok(())
    }

    /// Has KVM signal `evt` for a 4-byte guest write of `value` to MMIO address `addr`, instead
    /// of an exit to the VMM (a virtio queue notification served by an I/O thread).
    pub fn register_ioevent(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), KvmVmError> {
        self.fd()
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), value)
            .map_err(|source| KvmVmError::Ioeventfd { addr, source })
    }

    /// Routes `evt` to the interrupt line `gsi` (an IOAPIC pin, in the kernel or ours).
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), KvmVmError> {
        self.fd().register_irqfd(evt, gsi).map_err(|source| KvmVmError::Irqfd { gsi, source })
    }
}

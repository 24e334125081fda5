//! The KVM system fd and the VM fd: in-kernel irqchip and PIT, the TSS and identity-map pages,
//! guest memory slots, irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Where KVM puts the three pages of the TSS it needs on Intel (just below 4 GiB, in the gap).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The identity-map page KVM needs on Intel for real mode, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
const KVM_PIT_SPEAKER_DUMMY: u32 = 1;

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

/// A VM: the KVM fd, the VM fd, and the guest memory registered with it.
///
/// Dropping it closes the fds, which tears the VM down in the kernel; the memory mappings are
/// unmapped by `GuestMemoryMmap`'s own `Drop`.
pub struct KvmVm {
    irqchip: bool,
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryMmap,
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
    /// Creates the VM, with KVM's in-kernel irqchip (PIC, IOAPIC, LAPIC) and PIT when
    /// `irqchip` is set, and registers `memory`.
    ///
    /// Without the irqchip there are no interrupts at all (a stub guest needs none), and a
    /// `hlt` exits to the VMM. On PVM here, destroying the in-kernel irqchip and PIT costs
    /// ≈ 20 ms at VM teardown and creating the PIT 2–8 ms; the split is what the floor
    /// benchmark reports.
    pub fn new(memory: GuestMemoryMmap, irqchip: bool) -> Result<Self, KvmVmError> {
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(KvmVmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(KvmVmError::TssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS).map_err(KvmVmError::IdentityMap)?;
        if irqchip {
            fd.create_irq_chip().map_err(KvmVmError::IrqChip)?;
            let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            fd.create_pit2(pit).map_err(KvmVmError::Pit)?;
        }
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
            // which this struct keeps alive as long as `fd` (the VM) exists; the field order
            // of `KvmVm` drops `fd` before `memory`.
            unsafe { fd.set_user_memory_region(mem_region) }
                .map_err(|source| KvmVmError::MemorySlot { slot, source })?;
        }
        Ok(KvmVm { irqchip, kvm, fd, memory })
    }

    /// Whether KVM emulates the interrupt controllers and the PIT.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
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

    /// Routes `evt` to the interrupt line `gsi` of the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), KvmVmError> {
        self.fd.register_irqfd(evt, gsi).map_err(|source| KvmVmError::Irqfd { gsi, source })
    }
}

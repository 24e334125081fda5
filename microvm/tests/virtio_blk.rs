//! virtio-blk under real KVM: a hand-assembled stub guest plays the driver (handshake through
//! the MMIO registers, one IN and one OUT request through a split queue) and reports what it
//! saw on the exit port; the host checks the image afterwards.
//!
//! Needs /dev/kvm. Without it each test prints "SKIPPED: …" and passes, except under CI=true,
//! where a missing /dev/kvm fails the test.

use std::io::Write;
use std::time::Instant;

use twinbox_microvm::config::DiskConfig;
use twinbox_microvm::devices::virtio::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use twinbox_microvm::stub::StubAsm;
use twinbox_microvm::{ExitReason, VmBuilder, VmConfig, VmError};

fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => twinbox_testutil::require(false, test, &format!("/dev/kvm is not usable: {e}")),
    }
}

// virtio-mmio registers.
const STATUS: u32 = 0x70;
const DRIVER_FEATURES: u32 = 0x20;
const DRIVER_FEATURES_SEL: u32 = 0x24;
const QUEUE_SEL: u32 = 0x30;
const QUEUE_NUM: u32 = 0x38;
const QUEUE_READY: u32 = 0x44;
const QUEUE_NOTIFY: u32 = 0x50;
const QUEUE_DESC_LOW: u32 = 0x80;
const QUEUE_DRIVER_LOW: u32 = 0x90;
const QUEUE_DEVICE_LOW: u32 = 0xa0;

// Guest memory the stub uses.
const DESC: u32 = 0x20_0000;
const AVAIL: u32 = 0x20_1000;
const USED: u32 = 0x20_2000;
const HEADER: u32 = 0x20_3000;
const IN_BUF: u32 = 0x20_4000;
const STATUS_IN: u32 = 0x20_5000;
const OUT_BUF: u32 = 0x20_6000;
const STATUS_OUT: u32 = 0x20_5004;

/// 32-bit flat-mode machine code, a few instructions more than `StubAsm` has.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    /// `mov dword [addr], value`
    fn store(&mut self, addr: u32, value: u32) -> &mut Self {
        self.0.extend([0xc7, 0x05]);
        self.0.extend(addr.to_le_bytes());
        self.0.extend(value.to_le_bytes());
        self
    }

    fn reg(&mut self, disk: u32, offset: u32, value: u32) -> &mut Self {
        self.store(VIRTIO_MMIO_BASE as u32 + disk * VIRTIO_MMIO_SIZE as u32 + offset, value)
    }

    /// A split-queue descriptor at index `i`.
    fn desc(&mut self, i: u32, addr: u32, len: u32, flags: u16, next: u16) -> &mut Self {
        let at = DESC + 16 * i;
        self.store(at, addr)
            .store(at + 4, 0)
            .store(at + 8, len)
            .store(at + 12, u32::from(flags) | u32::from(next) << 16)
    }

    /// The IN/OUT header: type, reserved, sector.
    fn header(&mut self, request_type: u32, sector: u32) -> &mut Self {
        self.store(HEADER, request_type).store(HEADER + 4, 0).store(HEADER + 8, sector).store(HEADER + 12, 0)
    }

    /// `mov edi, addr; mov ecx, dwords; mov eax, value; rep stosd`
    fn fill(&mut self, addr: u32, dwords: u32, value: u32) -> &mut Self {
        self.0.push(0xbf);
        self.0.extend(addr.to_le_bytes());
        self.0.push(0xb9);
        self.0.extend(dwords.to_le_bytes());
        self.0.push(0xb8);
        self.0.extend(value.to_le_bytes());
        self.0.extend([0xf3, 0xab]);
        self
    }
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// Handshake, then IN of sector 0 into IN_BUF, then OUT of OUT_BUF (0xa5...) to sector 1.
/// Exit status: IN status | first IN byte << 8 | used idx << 16 | OUT status << 24.
fn driver_stub() -> Vec<u8> {
    let mut a = Asm::default();
    a.reg(0, STATUS, 0).reg(0, STATUS, 1).reg(0, STATUS, 1 | 2);
    a.reg(0, DRIVER_FEATURES_SEL, 1).reg(0, DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1 (bit 32)
    a.reg(0, DRIVER_FEATURES_SEL, 0).reg(0, DRIVER_FEATURES, 0);
    a.reg(0, STATUS, 1 | 2 | 8);
    a.reg(0, QUEUE_SEL, 0).reg(0, QUEUE_NUM, 16);
    a.reg(0, QUEUE_DESC_LOW, DESC).reg(0, QUEUE_DRIVER_LOW, AVAIL).reg(0, QUEUE_DEVICE_LOW, USED);
    a.reg(0, QUEUE_READY, 1).reg(0, STATUS, 1 | 2 | 8 | 4);

    // IN, sector 0: header, 512 writable bytes, status.
    a.header(0, 0).store(STATUS_IN, 0xff);
    a.desc(0, HEADER, 16, NEXT, 1).desc(1, IN_BUF, 512, NEXT | WRITE, 2).desc(2, STATUS_IN, 1, WRITE, 0);
    a.store(AVAIL + 4, 0).store(AVAIL, 1 << 16); // ring[0] = 0, then flags 0, idx 1
    a.reg(0, QUEUE_NOTIFY, 0);

    // OUT, sector 1: the header is read before the device completes, so reusing it is fine.
    a.fill(OUT_BUF, 128, 0xa5a5_a5a5);
    a.header(1, 1).store(STATUS_OUT, 0xff);
    a.desc(3, HEADER, 16, NEXT, 4).desc(4, OUT_BUF, 512, NEXT, 5).desc(5, STATUS_OUT, 1, WRITE, 0);
    a.store(AVAIL + 4, 3 << 16).store(AVAIL, 2 << 16); // ring[1] = 3, idx 2
    a.reg(0, QUEUE_NOTIFY, 0);

    let mut code = a.0;
    // movzx eax, byte [STATUS_IN]; movzx ecx, byte [IN_BUF]; shl ecx, 8; or eax, ecx
    code.extend([0x0f, 0xb6, 0x05]);
    code.extend(STATUS_IN.to_le_bytes());
    code.extend([0x0f, 0xb6, 0x0d]);
    code.extend(IN_BUF.to_le_bytes());
    code.extend([0xc1, 0xe1, 0x08, 0x09, 0xc8]);
    // movzx ecx, word [USED + 2]; shl ecx, 16; or eax, ecx
    code.extend([0x0f, 0xb7, 0x0d]);
    code.extend((USED + 2).to_le_bytes());
    code.extend([0xc1, 0xe1, 0x10, 0x09, 0xc8]);
    // movzx ecx, byte [STATUS_OUT]; shl ecx, 24; or eax, ecx
    code.extend([0x0f, 0xb6, 0x0d]);
    code.extend(STATUS_OUT.to_le_bytes());
    code.extend([0xc1, 0xe1, 0x18, 0x09, 0xc8]);
    // mov dx, 0x501; out dx, eax; spin
    code.extend([0x66, 0xba, 0x01, 0x05, 0xef]);
    code.extend(StubAsm::new().spin().finish());
    code
}

fn image(sectors: usize) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for i in 0..sectors {
        f.write_all(&[0x5a ^ i as u8; 512]).unwrap();
    }
    f
}

fn run(disks: Vec<DiskConfig>, irqchip: bool) -> Result<ExitReason, VmError> {
    let config = VmConfig { memory_mib: 16, timeout_ms: Some(10_000), disks, ..VmConfig::default() };
    let mut vm = VmBuilder::new(config).start_time(Instant::now()).interrupts(irqchip).stub(driver_stub()).build()?;
    Ok(vm.run(&mut Vec::new())?.reason)
}

#[test]
fn stub_driver_reads_and_writes_a_disk() {
    if !kvm_available("stub_driver_reads_and_writes_a_disk") {
        return;
    }
    for irqchip in [true, false] {
        let img = image(4);
        let other = image(1);
        let disks = vec![DiskConfig::new(img.path()), DiskConfig { path: other.path().into(), read_only: true }];
        let reason = run(disks, irqchip).expect("the stub reports");
        // IN OK, sector 0 starts with 0x5a, two chains used, OUT OK.
        assert_eq!(reason, ExitReason::Exited(0x0002_5a00), "irqchip {irqchip}");
        let disk = std::fs::read(img.path()).unwrap();
        assert_eq!(&disk[512..1024], &[0xa5; 512][..]);
        assert_eq!(&disk[..512], &[0x5a; 512][..]);
        assert_eq!(&disk[1024..1536], &[0x5a ^ 2; 512][..]);
    }
}

#[test]
fn read_only_disk_refuses_the_stub_write() {
    if !kvm_available("read_only_disk_refuses_the_stub_write") {
        return;
    }
    let img = image(4);
    let before = std::fs::read(img.path()).unwrap();
    let reason = run(vec![DiskConfig { path: img.path().into(), read_only: true }], true).expect("the stub reports");
    // IN OK, used idx 2, OUT status IOERR (1).
    assert_eq!(reason, ExitReason::Exited(0x0102_5a00));
    assert_eq!(std::fs::read(img.path()).unwrap(), before);
}

#[test]
fn eight_disks_fit_and_a_ninth_is_refused() {
    if !kvm_available("eight_disks_fit_and_a_ninth_is_refused") {
        return;
    }
    let imgs: Vec<_> = (0..9).map(|_| image(1)).collect();
    let disks: Vec<_> = imgs.iter().map(|f| DiskConfig::new(f.path())).collect();
    let reason = run(disks[..8].to_vec(), true).expect("eight disks");
    // Disk 0 has a single sector: the OUT to sector 1 is out of range.
    assert_eq!(reason, ExitReason::Exited(0x0102_5a00));
    let err = run(disks, true).unwrap_err();
    assert!(matches!(err, VmError::Config(_)), "{err}");
}

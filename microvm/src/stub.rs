//! Tiny hand-assembled guests for tests and the floor benchmark.
//!
//! The code runs in flat 32-bit protected mode (paging off, segments base 0 limit 4 GiB),
//! loaded at [`STUB_LOAD_ADDR`]: the state this VMM sets for a stub, and the state a PVH entry
//! point gets, so [`pvh_elf`] wraps the same bytes into an ELF QEMU's `-kernel` boots.

use crate::devices::legacy::COM1_PORT;
use crate::devices::pseudo::boot_timer::{BOOT_TIMER_ADDR, MAGIC_BOOT_COMPLETE};
use crate::devices::pseudo::exit_port::EXIT_PORT;

/// Guest-physical address stubs are loaded at and entered at (1 MiB, as a PVH kernel).
pub const STUB_LOAD_ADDR: u64 = 0x10_0000;
/// Stack pointer given to stubs.
pub const STUB_STACK: u64 = 0x8ff0;

/// Builds a stub, instruction by instruction (32-bit encodings).
#[derive(Debug, Default, Clone)]
pub struct StubAsm {
    code: Vec<u8>,
}

impl StubAsm {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    /// `mov dx, COM1; (mov al, b; out dx, al)*`
    pub fn serial_print(mut self, text: &[u8]) -> Self {
        self.code.extend([0x66, 0xba]);
        self.code.extend((COM1_PORT as u16).to_le_bytes());
        for &b in text {
            self.code.extend([0xb0, b, 0xee]);
        }
        self
    }

    /// `mov dword [0xc000_0000], 123`: the Firecracker boot-timer signal.
    pub fn boot_timer(mut self) -> Self {
        self.code.extend([0xc7, 0x05]);
        self.code.extend((BOOT_TIMER_ADDR as u32).to_le_bytes());
        self.code.extend(u32::from(MAGIC_BOOT_COMPLETE).to_le_bytes());
        self
    }

    /// `mov al, 0xfe; out 0x64, al`: i8042 CPU reset.
    pub fn i8042_reset(mut self) -> Self {
        self.code.extend([0xb0, 0xfe, 0xe6, 0x64]);
        self
    }

    /// `mov dx, 0x501; mov eax, status; out dx, eax`: report an exit status.
    pub fn exit_status(mut self, status: u32) -> Self {
        self.code.extend([0x66, 0xba]);
        self.code.extend((EXIT_PORT as u16).to_le_bytes());
        self.code.push(0xb8);
        self.code.extend(status.to_le_bytes());
        self.code.push(0xef);
        self
    }

    /// `mov dx, 0x502; out dx, al`: the guest agent's ready signal (a template waits for its
    /// workload).
    pub fn ready(mut self) -> Self {
        self.code.extend([0x66, 0xba]);
        self.code.extend(twinbox_agent::READY_PORT.to_le_bytes());
        self.code.push(0xee);
        self
    }

    /// Machine code of the caller's, as is.
    pub fn raw(mut self, code: &[u8]) -> Self {
        self.code.extend_from_slice(code);
        self
    }

    /// `cli; hlt`: stop for good.
    pub fn cli_hlt(mut self) -> Self {
        self.code.extend([0xfa, 0xf4]);
        self
    }

    /// `sti; 1: hlt; jmp 1b`: idle with interrupts on, as an idle kernel does.
    pub fn idle(mut self) -> Self {
        self.code.extend([0xfb, 0xf4, 0xeb, 0xfd]);
        self
    }

    /// `1: jmp 1b`: a hang.
    pub fn spin(mut self) -> Self {
        self.code.extend([0xeb, 0xfe]);
        self
    }

    /// `push 0; push 0; lidt [esp]; ud2`: an exception with an empty IDT, i.e. a triple
    /// fault. (`ud2`, not `int3`: PVM's instruction emulator fails on `int3` in this mode with
    /// a KVM internal error instead of faulting.)
    pub fn triple_fault(mut self) -> Self {
        self.code.extend([0x6a, 0x00, 0x6a, 0x00, 0x0f, 0x01, 0x1c, 0x24, 0x0f, 0x0b]);
        self
    }

    /// The machine code.
    pub fn finish(self) -> Vec<u8> {
        self.code
    }
}

/// The floor benchmark's guest: signal the boot timer, reset through the i8042; then, for a
/// VMM without an i8042 (QEMU `-M microvm`), report status 0 on the exit port; then halt.
pub fn floor_stub() -> Vec<u8> {
    StubAsm::new().boot_timer().i8042_reset().exit_status(0).cli_hlt().finish()
}

/// Wraps `code` into an ELF64 x86-64 executable loaded and entered at [`STUB_LOAD_ADDR`], with
/// a Xen `PHYS32_ENTRY` note so it boots through PVH (QEMU `-kernel`, linux-loader).
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let notes_off = EHDR + 2 * PHDR;
    // Note: namesz, descsz, type, "Xen\0", entry (u32).
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes());
    note.extend(4u32.to_le_bytes());
    note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend(b"Xen\0");
    note.extend((STUB_LOAD_ADDR as u32).to_le_bytes());
    let code_off = (notes_off + note.len()).next_multiple_of(16);

    let mut elf = Vec::with_capacity(code_off + code.len());
    elf.extend(b"\x7fELF");
    elf.extend([2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    elf.extend([0u8; 8]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(62u16.to_le_bytes()); // EM_X86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend(STUB_LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend((EHDR as u64).to_le_bytes()); // e_phoff
    elf.extend(0u64.to_le_bytes()); // e_shoff
    elf.extend(0u32.to_le_bytes()); // e_flags
    elf.extend((EHDR as u16).to_le_bytes());
    elf.extend((PHDR as u16).to_le_bytes());
    elf.extend(2u16.to_le_bytes()); // e_phnum
    elf.extend(64u16.to_le_bytes()); // e_shentsize
    elf.extend(0u16.to_le_bytes()); // e_shnum
    elf.extend(0u16.to_le_bytes()); // e_shstrndx
    let phdr = |elf: &mut Vec<u8>, kind: u32, flags: u32, off: usize, addr: u64, size: usize| {
        elf.extend(kind.to_le_bytes());
        elf.extend(flags.to_le_bytes());
        elf.extend((off as u64).to_le_bytes());
        elf.extend(addr.to_le_bytes()); // p_vaddr
        elf.extend(addr.to_le_bytes()); // p_paddr
        elf.extend((size as u64).to_le_bytes()); // p_filesz
        elf.extend((size as u64).to_le_bytes()); // p_memsz
        elf.extend(if kind == 1 { 0x1000u64 } else { 4 }.to_le_bytes());
    };
    phdr(&mut elf, 1, 5, code_off, STUB_LOAD_ADDR, code.len()); // PT_LOAD, R+X
    phdr(&mut elf, 4, 4, notes_off, 0, note.len()); // PT_NOTE
    elf.extend(&note);
    elf.resize(code_off, 0);
    elf.extend(code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(StubAsm::new().serial_print(b"H").finish(), [0x66, 0xba, 0xf8, 0x03, 0xb0, b'H', 0xee]);
        assert_eq!(StubAsm::new().boot_timer().finish(), [0xc7, 0x05, 0, 0, 0, 0xc0, 123, 0, 0, 0]);
        assert_eq!(StubAsm::new().i8042_reset().finish(), [0xb0, 0xfe, 0xe6, 0x64]);
        assert_eq!(StubAsm::new().exit_status(3).finish(), [0x66, 0xba, 0x01, 0x05, 0xb8, 3, 0, 0, 0, 0xef]);
    }

    #[test]
    fn pvh_elf_layout() {
        let elf = pvh_elf(&[0xf4]);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(*elf.last().unwrap(), 0xf4);
        assert_eq!(elf.len() % 16, 1);
    }
}

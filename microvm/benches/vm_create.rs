//! The VMM's creation steps, each on its own: guest memory, the KVM VM with a split or in-kernel
//! irqchip and PIT (create and destroy: on PVM the destroy dominates), one vCPU with CPUID and
//! MSRs, the MP table, an image run's initramfs, and loading the guest kernel when one is built.
//! The whole floor (process start → boot timer → exit) is `benches/floor.rs`.
//!
//! `cargo bench -p twinbox-microvm --bench vm_create` (needs /dev/kvm for the KVM steps).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use twinbox_microvm::agent::GuestConfig;
use twinbox_microvm::loader::default_kernel;
use twinbox_microvm::loader::load_linux;
use twinbox_microvm::mptable::setup_mptable;
use twinbox_microvm::vstate::memory::create_guest_memory;
use twinbox_microvm::vstate::vcpu::Vcpu;
use twinbox_microvm::vstate::vm::KvmVm;
use twinbox_microvm::IrqChip;

fn steps(c: &mut Criterion) {
    let mut g = c.benchmark_group("vm_create");
    g.sample_size(20);
    g.bench_function("guest memory 128 MiB (mmap)", |b| b.iter(|| black_box(create_guest_memory(128).unwrap())));
    let mem = create_guest_memory(128).unwrap();
    g.bench_function("MP table, 2 vCPUs", |b| b.iter(|| setup_mptable(&mem, black_box(2)).unwrap()));
    let config = GuestConfig { args: vec!["/hello".into(), "true".into()], ..GuestConfig::default() };
    g.bench_function("initramfs (agent + config)", |b| {
        b.iter(|| black_box(twinbox_microvm::initramfs::build(black_box(&config))))
    });
    let kernel = default_kernel();
    if kernel.is_file() {
        g.bench_function("load vmlinux + boot params", |b| {
            b.iter(|| black_box(load_linux(&mem, &kernel, None, "console=ttyS0").unwrap()))
        });
    } else {
        eprintln!("vm_create: no guest kernel at {}: kernel loading not measured", kernel.display());
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok() {
        for (name, irqchip) in [
            ("KVM VM with in-kernel irqchip + PIT, create and destroy", Some(IrqChip::Kernel)),
            ("KVM VM with split irqchip, create and destroy", Some(IrqChip::Split)),
            ("KVM VM bare", None),
        ] {
            g.bench_function(name, |b| {
                b.iter(|| {
                    let vm = KvmVm::new(create_guest_memory(16).unwrap(), irqchip).unwrap();
                    drop(black_box(vm));
                })
            });
        }
        // A fresh (bare, cheap) VM per iteration, made and dropped outside the timing: KVM
        // never gives a vCPU id back while its VM lives.
        g.bench_function("vCPU with CPUID and MSRs", |b| {
            b.iter_batched(
                || {
                    let vm = KvmVm::new(create_guest_memory(16).unwrap(), None).unwrap();
                    let cpuid = vm.supported_cpuid().unwrap();
                    (vm, cpuid)
                },
                |(vm, cpuid)| {
                    let vcpu = Vcpu::new(&vm, &cpuid, 0, 1).unwrap();
                    (vcpu, vm)
                },
                BatchSize::PerIteration,
            )
        });
    } else {
        twinbox_testutil::require(false, "vm_create KVM steps", "/dev/kvm is not usable");
    }
    g.finish();
}

criterion_group!(benches, steps);
criterion_main!(benches);

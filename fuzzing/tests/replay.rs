//! Every seed, corpus file and crash of the fuzzers (`fuzz/seeds/<target>/`, written by hand;
//! `fuzz/corpus/<target>/`, what libFuzzer found, minimized; `fuzz/artifacts/<target>/`),
//! run through its target on stable: a fixed crash stays fixed, and CI checks the corpora
//! without a fuzzer.

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_and_past_crash_runs_clean() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in twinbox_fuzz_targets::TARGETS {
        let seeds = files(&fuzz.join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name} is empty");
        let corpus = files(&fuzz.join("corpus").join(name));
        let crashes = files(&fuzz.join("artifacts").join(name));
        for file in seeds.iter().chain(&corpus).chain(&crashes) {
            let data = std::fs::read(file).unwrap();
            // A panic names the file that made it.
            let result = std::panic::catch_unwind(|| target(&data));
            assert!(result.is_ok(), "{name}: {} panicked", file.display());
        }
    }
}

#[test]
fn every_target_has_a_fuzz_binary() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
    for (name, _) in twinbox_fuzz_targets::TARGETS {
        assert!(manifest.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml has no [[bin]] {name}");
        assert!(fuzz.join("fuzz_targets").join(format!("{name}.rs")).is_file(), "fuzz/fuzz_targets/{name}.rs");
    }
}

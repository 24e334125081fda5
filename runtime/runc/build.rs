//! Links `twinbox-runc` as a position-dependent executable.
//!
//! A PIE of this size carries about 16 000 relative relocations that the dynamic loader
//! applies at every start, writing (and so copying) some 80 pages of relocated data. The
//! runtime is started once per container operation, and that work was about a tenth of a
//! container start (measured in `cargo bench -p twinbox-runc --bench start`). The code
//! stays position-independent; only the final link fixes the executable's own address, as
//! runc's statically linked Go binary does. Shared libraries, heap and stack are still placed
//! at random; the executable's own code is not (the price of the faster start). A
//! `crt-static` build through RUSTFLAGS is left as rustc makes it (static-pie);
//! scripts/build-static-runc.sh gives crt-static to rustc for this binary alone, which this
//! script cannot see, so it also asks for `relocation-model=static`, which `-no-pie` agrees with.

fn main() {
    let static_pie = std::env::var("CARGO_CFG_TARGET_FEATURE").is_ok_and(|f| f.split(',').any(|f| f == "crt-static"));
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") && !static_pie {
        println!("cargo:rustc-link-arg-bin=twinbox-runc=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
